"""N processes against one (issue 24): the trainers, ``targets`` and an eval run under ``torchrun``
with 2 processes on the gloo backend, and give what one process gives (losses within float
tolerance; target and result files exactly); a 2-process run killed mid-run resumes, with 2 or 1
processes, to the uninterrupted run.

Marked ``distributed``; ``bash .ci/run`` runs them (``-m distributed`` selects only these).
The rules they check are stated in :mod:`eval_harness.distributed`.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
KEYWORDS = ("cat", "dog", "fire", "water")
TRAINERS = ("train-patch", "train", "train-av-lora", "train-ar", "train-grpo")
LOSS_KEYS = ("loss", "val_ce", "val_loss", "val_ce_gain", "reward", "eval_reward", "eval_cen_cos")


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1", **extra}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


#: what a failed launch's report leads with: the lines that say why a rank died (a CI log shows only the
#: start and the end of a long message, and a torchrun summary at the end names only the signal)
_WHY = re.compile(r"Error|error:|Traceback|terminate called|what\(\)|Abort|abort|Killed|Signal|exitcode")


def _failure_lines(stderr: str, limit: int = 40) -> str:
    hits = [line for line in stderr.splitlines() if _WHY.search(line)]
    return "\n".join(hits[:limit]) or "(no error line in stderr)"


def launch(n: int, argv: list[str], module: bool = False, check: bool = True, launcher: str = "torchrun", **env: str) -> subprocess.CompletedProcess:
    """``argv`` (a script and its arguments, or ``-m`` module arguments) in ``n`` processes under
    torchrun or ``accelerate launch`` (plain ``python`` for ``n == 0``: the single-process baseline
    without a launcher)."""
    target = (["-m"] if module else []) + [str(a) for a in argv]
    if n == 0:
        cmd = [sys.executable, *target]
    elif launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", *target]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *(["-m"] if module else []), "--",
               *[str(a) for a in argv]]
    res = subprocess.run(cmd, env=_env(**env), cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}:\n{_failure_lines(res.stderr)}\n--- stderr tail ---\n{res.stderr[-3000:]}")
    return res


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Every trainer's tiny inputs in one folder (read by tests/dist_worker.py)."""
    from eval_harness.data.injection_targets import InjectionTargetsSpec, build_injection_targets
    from eval_harness.data.targets import HealthThresholds, TargetsSpec, build_targets
    from eval_harness.train.av_lora import AVTrainConfig, train_av
    from nla_space.backbone import load_backbone

    root = tmp_path_factory.mktemp("dist")
    bb_dir = tiny.save_backbone(root / "bb")
    build_targets(load_backbone(str(bb_dir)), TargetsSpec(backbone=str(bb_dir), layer=2, n=40, seq_len=6, seed=0, batch_size=20, n_val=4,
                                                          n_test=4, n_mu_pool=8, health=HealthThresholds(min_dim_std=1e-4, min_norm_std=0.0)),
                  root / "targets")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t, "split": ["train", "train", "val", "mu_pool"][i % 4]}) + "\n"
                                               for i, t in enumerate(tiny.SENTENCES * 6)))
    model, tok = tiny.make_marker_model("qwen2", layers=8, hidden=32, seed=1)
    model.save_pretrained(str(root / "base"))
    tok.save_pretrained(str(root / "base"))
    rnd = random.Random(0)
    words = [w for w in tiny.WORDS if w.isalpha()]
    texts = root / "texts.jsonl"
    texts.write_text("".join(json.dumps({"id": f"x{i}", "text": " ".join(rnd.choice(words) for _ in range(4)) + " " + KEYWORDS[i % 4]})
                             + "\n" for i in range(40)))
    ts = build_injection_targets(load_backbone(str(root / "base")), InjectionTargetsSpec(
        backbone=str(root / "base"), texts_file=str(texts), bands=[10, 47, 80], max_new_tokens=4, batch_size=16,
        fractions={"av_sft": 0.4, "ar_sft": 0.2, "rl": 0.2, "heldout": 0.2}), root / "inj")
    train_av(load_backbone(str(root / "base")), ts, root / "sft", AVTrainConfig(max_steps=2, val_every=2, batch_size=6, lr=5e-3, val_frac=0.25,
                                                                                val_rows=12, lora_r=4, lora_alpha=8, lora_dropout=0.0))
    return root


def log_rows(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines() if ln.strip()]


def assert_same_run(a: Path, b: Path, rtol: float = 1e-4) -> None:
    """Same steps and losses (within float tolerance), and best/ adapters within tolerance."""
    ra, rb = log_rows(a), log_rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    compared = 0
    for x, y in zip(ra, rb):
        for key in LOSS_KEYS:
            if x.get(key) is not None or y.get(key) is not None:
                assert y.get(key) == pytest.approx(x.get(key), rel=rtol, abs=1e-4), (key, x["step"])
                compared += 1
    assert compared >= len(ra)  # every row had a loss or a validation metric to compare
    from nla_space.hub import load_state_dict

    files = sorted(p.name for p in (a / "best").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (b / "best").glob("*.safetensors"))
    for name in files:
        ta, tb = load_state_dict(a / "best" / name), load_state_dict(b / "best" / name)
        assert ta.keys() == tb.keys()
        for k in ta:
            torch.testing.assert_close(tb[k].float(), ta[k].float(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_trainer_in_2_processes_matches_1(inputs: Path, tmp_path: Path, trainer: str) -> None:
    launch(0, [WORKER, trainer, inputs, tmp_path / "one"])
    launch(2, [WORKER, trainer, inputs, tmp_path / "two"])
    assert_same_run(tmp_path / "one", tmp_path / "two")
    cfg = json.loads((tmp_path / "two" / "train_config.json").read_text())
    assert cfg["parallel"]["world_size"] == 2 and "parallel" not in json.loads((tmp_path / "one" / "train_config.json").read_text())
    assert json.loads((tmp_path / "two" / "result.json").read_text())["step"] == 6


@pytest.mark.parametrize("resume_with", [2, 1])
def test_killed_2_process_run_resumes_to_the_uninterrupted_run(inputs: Path, tmp_path: Path, resume_with: int) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    launch(2, [WORKER, "train-patch", inputs, full], NLA_TEST_STEPS="8")
    killed = launch(2, [WORKER, "train-patch", inputs, cut], check=False, NLA_TEST_STEPS="8", NLA_TEST_KILL_AFTER="2")
    assert killed.returncode != 0  # rank 0 died by SIGKILL after its second checkpoint
    state = json.loads((cut / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and not (cut / "result.json").exists()
    launch(resume_with or 0, [WORKER, "train-patch", inputs, cut, "--resume"], NLA_TEST_STEPS="8")
    assert_same_run(full, cut)


@pytest.mark.parametrize("command,launcher", [("targets", "torchrun"), ("targets", "accelerate"), ("injection-targets", "torchrun")])
def test_targets_in_2_processes_write_the_files_of_1(inputs: Path, tmp_path: Path, command: str, launcher: str) -> None:
    if command == "targets":
        args = ["eval_harness", "targets", "--backbone", inputs / "bb", "--layer", 2, "--n", 50, "--seq-len", 5, "--batch-size", 8,
                "--n-val", 4, "--n-test", 4, "--n-mu-pool", 6, "--min-dim-std", 1e-4, "--min-norm-std", 0]
    else:
        args = ["eval_harness", "injection-targets", "--backbone", inputs / "base", "--texts", inputs / "texts.jsonl", "--bands", "10,47,80",
                "--max-new-tokens", 4, "--batch-size", 6]
    launch(0, [*args, "--out", tmp_path / "one"], module=True)
    res = launch(2, [*args, "--out", tmp_path / "two"], module=True, launcher=launcher)
    assert "rank 1 of 2" in res.stderr  # two processes did join one group
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert one == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert len([p for p in one if p.parts[0] == "shards"]) == 2 * 7  # 7 shards (of 8 rows, or 6 texts), vectors + texts
    for rel in one:
        a, b = (tmp_path / "one" / rel), (tmp_path / "two" / rel)
        if rel.name in ("meta.json", "timing.json"):  # wall times differ; everything else is the same
            ma, mb = json.loads(a.read_text()), json.loads(b.read_text())
            for m in (ma, mb):
                for key in ("timing", "generate_s", "seconds_per_seq", "seconds", "seconds_per_text", "elapsed_s", "extract_s"):
                    m.pop(key, None)
            assert ma == mb, rel
        else:
            assert a.read_bytes() == b.read_bytes(), rel


def test_eval_in_2_processes_writes_the_results_of_1(tmp_path: Path) -> None:
    card = tiny.make_patch_card(tmp_path / "card", default_strategy="greedy")
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny.SENTENCES[:7]))
    args = ["eval_harness", "reading-eval", "--card", card, "--texts", texts, "--strategies", "greedy,guided", "--k", 3,
            "--max-new-tokens", 5, "--no-minilm", "--no-judge"]
    launch(0, [*args, "--out", tmp_path / "one.json", "--log-samples", tmp_path / "one.jsonl"], module=True)
    launch(2, [*args, "--out", tmp_path / "two.json", "--log-samples", tmp_path / "two.jsonl"], module=True)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    for r in (one, two):
        for run in r["results"].values():
            run.pop("seconds_per_text", None)
    strip = lambda s: [{k: v for k, v in json.loads(ln).items() if k != "seconds"} for ln in s.splitlines()]  # noqa: E731
    assert strip((tmp_path / "one.jsonl").read_text()) == strip((tmp_path / "two.jsonl").read_text())
    assert set(one["results"]) == {"greedy", "guided_k3"} and one["results"] == two["results"]
    assert not list(tmp_path.glob("*.partial*"))  # the partial files are gone once the results are written
