"""The command line: every bad input is one ``error: …`` line on stderr and exit code 2 (no
traceback); ``--text``, ``--vector`` and ``--texts`` work on a tiny card over a tiny backbone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny
from nla_space import cli
from nla_space.policy import MAX_K
from nla_space.verbalizers import NLAConfig, build_prefix_av

ROOT = Path(__file__).resolve().parent.parent
D = 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama backbone folder and a trained-looking card folder for it (layer 2, with μ)."""
    root = tmp_path_factory.mktemp("cli")
    bb = tiny.save_backbone(root / "bb", "llama")
    backbone = tiny.make_backbone("llama")
    av = build_prefix_av(NLAConfig(backbone_dtype="float32", backbone_id=str(bb), extraction_layer=2, num_prefix_tokens=2), backbone)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in av.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    card = root / "card"
    av.save(card)
    from nla_space.io import save_tensors

    save_tensors(card / "mu.safetensors", {"mu": torch.randn(D, generator=g) * 0.1})
    return {"bb": bb, "card": card, "root": root}


def base(folders, *extra: str) -> list[str]:
    return ["verbalize", "--card", str(folders["card"]), "--backbone", str(folders["bb"]), "--max-new-tokens", "6", *extra]


def run_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; assert exit 2 and exactly one ``error:`` line; return it."""
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse-level errors
        rc = exc.code
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert rc == 2, out.err
    assert len(lines) == 1, out.err
    assert lines[0].startswith("error: "), out.err
    assert "Traceback" not in out.err and out.out == ""
    return lines[0]


def npy(folders, name: str, arr, allow_pickle: bool = False) -> str:
    path = folders["root"] / name
    np.save(path, arr, allow_pickle=allow_pickle)
    return str(path)


class _EvilOpen:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_text_ok_json(folders, capsys):
    rc = cli.main(base(folders, "--text", "the cat is red", "--k", "3", "--json", "--seed", "5", "--tau", "0.4"))
    out = capsys.readouterr()
    assert rc == 0, out.err
    d = json.loads(out.out)
    assert d["layer"] == 2 and d["k"] == 3 and len(d["candidates"]) == 3 and d["tau"] == 0.4
    assert d["trained"] is True and d["centered"] is True and d["seed"] == 5
    assert d["best"] == d["candidates"][d["best_index"]]
    assert d["hedged"] == (d["best"]["score_cen"] < 0.4)


def test_text_ok_human_summary(folders, capsys):
    rc = cli.main(base(folders, "--text", "the cat is red", "--k", "2"))
    out = capsys.readouterr()
    assert rc == 0 and "best (centered fve_nrm" in out.out and "timings:" in out.out


def test_vector_ok(folders, capsys):
    v = np.random.default_rng(0).standard_normal(D).astype("float32")
    rc = cli.main(base(folders, "--vector", npy(folders, "v.npy", v), "--greedy", "--json"))
    out = capsys.readouterr()
    assert rc == 0, out.err
    d = json.loads(out.out)
    assert d["k"] == 1 and d["greedy"] is True and len(d["candidates"]) == 1
    # A (1, d) array and a float64 array are accepted as the same vector.
    rc = cli.main(base(folders, "--vector", npy(folders, "v2.npy", v[None].astype("float64")), "--greedy", "--json"))
    d2 = json.loads(capsys.readouterr().out)
    assert rc == 0 and d2["best"]["token_ids"] == d["best"]["token_ids"]


def test_texts_jsonl_batch(folders, capsys):
    path = folders["root"] / "in.jsonl"
    rows = [{"id": "a", "text": "the cat"}, {"id": 7, "text": "the dog is blue"}, {"text": "paris is in france"}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    rc = cli.main(base(folders, "--texts", str(path), "--k", "2", "--json"))
    out = capsys.readouterr()
    assert rc == 0, out.err
    lines = out.out.strip().splitlines()
    assert len(lines) == 3
    got = [json.loads(ln) for ln in lines]
    assert [g["id"] for g in got] == ["a", 7, 4]  # missing id → the line number
    assert all(g["k"] == 2 and len(g["candidates"]) == 2 for g in got)
    # Each line equals the single-text run with the same seed.
    rc = cli.main(base(folders, "--text", "the dog is blue", "--k", "2", "--json"))
    single = json.loads(capsys.readouterr().out)
    assert single["candidates"] == got[1]["candidates"]


@pytest.mark.parametrize(
    "args,match",
    [
        (["--text", ""], "empty"),
        (["--text", "   \t "], "empty"),
        (["--text", " ".join(["the"] * 300)], "limit is 256"),
        (["--text", "the cat", "--k", "0"], "k must"),
        (["--text", "the cat", "--k", "-2"], "k must"),
        (["--text", "the cat", "--k", str(MAX_K + 1)], "k must"),
        (["--text", "the cat", "--k", "two"], "--k"),
        (["--text", "the cat", "--tau", "-0.1"], "tau must"),
        (["--text", "the cat", "--tau", "1.5"], "tau must"),
        (["--text", "the cat", "--tau", "nan"], "--tau"),
        (["--text", "the cat", "--temperature", "inf"], "--temperature"),
        (["--text", "the cat", "--max-new-tokens", "0"], "max_new_tokens"),
        (["--text", "the cat", "--layer", "1"], "supports layer"),
        (["--text", "the cat", "--layer", "99"], "supports layer"),
        (["--text", "the cat", "--layer", "-1"], "supports layer"),
        (["--text", "the cat", "--seed", str(2**64)], "seed must"),
        (["--text", "the cat", "--seed", "-1"], "seed must"),
        (["--text", "the cat", "--device", "foo"], "not a device name"),
        (["--text", "the cat", "--vector", "x.npy"], "not allowed with"),
        ([], "one of the arguments"),
    ],
)
def test_bad_parameters(folders, capsys, args, match):
    line = run_error(capsys, base(folders, *args))
    assert match in line


def test_bad_vectors(folders, capsys):
    rng = np.random.default_rng(1)
    nan = rng.standard_normal(D).astype("float32")
    nan[3] = np.nan
    inf = rng.standard_normal(D).astype("float32")
    inf[0] = np.inf
    cases = {
        "short.npy": (rng.standard_normal(D - 1).astype("float32"), "has 31 values"),
        "long.npy": (rng.standard_normal(D * 2).astype("float32"), "has 64 values"),
        "nan.npy": (nan, "NaN"),
        "inf.npy": (inf, "NaN or infinite"),
        "matrix.npy": (rng.standard_normal((3, D)).astype("float32"), "1-D vector"),
        "strings.npy": (np.array(["a"] * D), "numeric"),
        "bools.npy": (np.ones(D, dtype=bool), "numeric"),
        "complex.npy": (np.ones(D, dtype=np.complex64), "numeric"),
    }
    for name, (arr, match) in cases.items():
        line = run_error(capsys, base(folders, "--vector", npy(folders, name, arr)))
        assert match in line, (name, line)
    text = folders["root"] / "not.npy"
    text.write_text("1 2 3")
    assert "not a readable .npy" in run_error(capsys, base(folders, "--vector", str(text)))
    assert "not found" in run_error(capsys, base(folders, "--vector", str(folders["root"] / "absent.npy")))


def test_pickled_npy_is_refused_without_running(folders, capsys):
    marker = folders["root"] / "PWNED-npy"
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = _EvilOpen(marker), 1.0
    path = npy(folders, "evil.npy", arr, allow_pickle=True)
    line = run_error(capsys, base(folders, "--vector", path))
    assert "not a readable .npy" in line and "allow_pickle" in line
    assert not marker.exists()


def test_bad_cards_and_checkpoints(folders, capsys, tmp_path):
    assert "unknown card 'no-such-card'" in run_error(capsys, ["verbalize", "--card", "no-such-card", "--text", "the cat"])
    missing = tmp_path / "missing-folder"
    assert "unknown card" in run_error(capsys, ["verbalize", "--card", str(missing), "--backbone", str(folders["bb"]), "--text", "the cat"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in run_error(capsys, ["verbalize", "--card", str(empty), "--backbone", str(folders["bb"]), "--text", "the cat"])
    # A card folder whose weights are corrupt.
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "config.json").write_bytes((folders["card"] / "config.json").read_bytes())
    (bad / "av.safetensors").write_bytes((folders["card"] / "av.safetensors").read_bytes()[:100])
    assert "not a readable safetensors" in run_error(capsys, ["verbalize", "--card", str(bad), "--backbone", str(folders["bb"]), "--text", "the cat"])
    # ... whose weights are missing.
    (bad / "av.safetensors").unlink()
    assert "no AV weights" in run_error(capsys, ["verbalize", "--card", str(bad), "--backbone", str(folders["bb"]), "--text", "the cat"])
    # ... whose config is not JSON.
    (bad / "config.json").write_text("{")
    assert "not valid JSON" in run_error(capsys, ["verbalize", "--card", str(bad), "--backbone", str(folders["bb"]), "--text", "the cat"])
    # A backbone that is neither a folder nor cached (offline).
    line = run_error(capsys, ["verbalize", "--card", str(folders["card"]), "--backbone", "nobody/absent-model", "--text", "the cat"])
    assert "offline" in line
    # A backbone folder that is not a model.
    assert "no config.json" in run_error(capsys, ["verbalize", "--card", str(folders["card"]), "--backbone", str(empty), "--text", "the cat"])
    # A texts file that is not JSON Lines.
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"id": 1, "text": "the cat"}\nnot json\n')
    assert "bad.jsonl:2" in run_error(capsys, base(folders, "--texts", str(jl)))
    jl.write_text('{"id": 1, "txt": "the cat"}\n')
    assert "each line needs" in run_error(capsys, base(folders, "--texts", str(jl)))
    jl.write_bytes(b'{"id": 1, "text": "caf\xe9"}\n')
    assert "not UTF-8" in run_error(capsys, base(folders, "--texts", str(jl)))
    jl.write_text("\n\n")
    assert "no texts" in run_error(capsys, base(folders, "--texts", str(jl)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda(folders, capsys):
    assert "CUDA is not available" in run_error(capsys, base(folders, "--text", "the cat", "--device", "cuda"))


def test_cards_command_lists_builtins(capsys):
    assert cli.main(["cards"]) == 0
    out = capsys.readouterr().out
    assert "nla-space/smollm2-135m-L21" in out and "RiverRider/srt-nla-av-v1" in out


def _subprocess(args: list[str], **env_extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env_extra)
    return subprocess.run([sys.executable, "-m", "nla_space", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_subprocess_bad_input_exits_2_with_one_line(folders):
    proc = _subprocess(base(folders, "--text", "the cat", "--k", "0"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: k must be an integer from 1 to {MAX_K}, got 0"]
    assert proc.stdout == ""


def test_subprocess_bad_argument_type_exits_2_with_one_line(folders):
    proc = _subprocess(base(folders, "--text", "the cat", "--tau", "high"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--tau" in lines[0], proc.stderr


def test_subprocess_hub_card_offline_not_cached_is_one_line(tmp_path):
    proc = _subprocess(["verbalize", "--card", "srt-gemma2-2b", "--text", "the cat"], HF_HUB_CACHE=str(tmp_path / "empty-hub"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot get google/gemma-2-2b@main: offline mode")
