"""Faults in the long-running harness commands, on tiny random models.

* ``targets``, ``train`` and ``centered-eval`` run as real subprocesses (``python -m eval_harness``),
  are killed mid-run (SIGKILL; SIGTERM too, the rest of the matrix under ``-m slow``) once the output
  folder shows progress, then resumed with ``--resume``: the finished files equal an uninterrupted run
  with the same seed, byte for byte (tensors, texts, result numbers; only timings and provenance may
  differ). An interrupted output is never taken as complete: readers refuse it with a clear message.
* A kill *while a training checkpoint is being saved* (simulated in-process at each instant) still
  resumes to the uninterrupted result, and a log line cut by the kill is dropped.
* An unwritable, read-only or full output location is refused at start-up, before any model is
  loaded, with one ``error:`` line (exit 2); a disk that fills up mid-run gives one line too, and the
  run continues with ``--resume`` once there is space again (tmpfs mounts; they need root and are
  skipped without it, with an in-process ENOSPC simulation that always runs).
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest

import tiny
from nla_space.errors import CheckpointError

ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.01
HEALTH = ["--min-dim-std", "1e-4", "--min-norm-std", "0"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), MKL_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    return env


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "eval_harness", *map(str, args), "--threads", "1"]


def _run(args: list[str], log: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    with log.open("w") as err:
        proc = subprocess.run(args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(args[3:6])} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    return proc


def _interrupt(args: list[str], progress: Callable[[], bool], sig: int, log: Path, timeout: float = 300) -> int:
    """Start ``args``, wait until ``progress()`` holds, send ``sig``, return the exit code.
    Fails if the run finishes (or dies) before it could be interrupted."""
    with log.open("w") as err:
        proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + timeout
            while not progress():
                if proc.poll() is not None:
                    pytest.fail(f"the run ended (rc {proc.returncode}) before it could be interrupted:\n{log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail("no progress within the time limit")
                time.sleep(POLL_S)
            proc.send_signal(sig)
            return proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)


def _lines(path: Path) -> int:
    try:
        return sum(1 for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip())
    except (FileNotFoundError, UnicodeDecodeError):
        return 0


def _no_timing(d: dict, drop: tuple[str, ...]) -> dict:
    return {k: v for k, v in d.items() if k not in drop}


# ------------------------------------------------------------------------------------------------
# Shared inputs: a tiny backbone, a reference targets folder and a reference training run


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def bb(work) -> Path:
    return tiny.save_backbone(work / "bb")


def _targets_args(bb: Path, out: Path, n: int = 400) -> list[str]:
    return _cmd("targets", "--backbone", bb, "--layer", "2", "--n", str(n), "--seq-len", "16", "--batch-size", "8",
                "--n-val", "8", "--n-test", "24", "--n-mu-pool", "16", "--seed", "5", "--out", out, *HEALTH)


@pytest.fixture(scope="module")
def ref_targets(work, bb) -> Path:
    out = work / "targets-ref"
    _run(_targets_args(bb, out), work / "targets-ref.log")
    return out


def _train_args(targets: Path, out: Path) -> list[str]:
    return _cmd("train", "--targets", targets, "--out", out, "--max-steps", "160", "--val-every", "40",
                "--val-vectors", "2", "--val-k", "2", "--batch-size", "8", "--lr", "1e-2", "--seed", "1")


@pytest.fixture(scope="module")
def ref_train(work, ref_targets) -> Path:
    out = work / "train-ref"
    _run(_train_args(ref_targets, out), work / "train-ref.log")
    return out


def _eval_args(card: Path, bb: Path, targets: Path, out: Path) -> list[str]:
    return _cmd("centered-eval", "--card", card, "--backbone", bb, "--targets", targets, "--M", "24", "--K", "8",
                "--pool-size", "16", "--max-new-tokens", "12", "--seed", "3", "--out", out,
                "--log-samples", out.with_suffix(".samples.jsonl"))


@pytest.fixture(scope="module")
def ref_eval(work, bb, ref_targets, ref_train) -> Path:
    out = work / "eval-ref" / "centered.json"
    _run(_eval_args(ref_train / "best", bb, ref_targets, out), work / "eval-ref.log")
    return out


# ------------------------------------------------------------------------------------------------
# targets


@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)], ids=["KILL", "TERM"])
def test_targets_killed_then_resumed_equals_uninterrupted(tmp_path, bb, ref_targets, sig):
    from eval_harness.cli import main
    from eval_harness.data.dataset import load_target_set

    out = tmp_path / "t"
    rc = _interrupt(_targets_args(bb, out), lambda: _lines(out / "shards" / "00002.jsonl") > 0, sig, tmp_path / "a.log")
    assert rc == -sig
    assert not (out / "meta.json").exists()
    with pytest.raises(CheckpointError, match="not finished"):
        load_target_set(out)  # a reader never takes the interrupted folder for a target set
    assert main(["train", "--targets", str(out), "--out", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    assert main(["targets", "--backbone", str(bb), "--layer", "2", "--n", "400", "--seq-len", "16", "--batch-size", "8",
                 "--seed", "5", "--out", str(out), *HEALTH]) == 2  # no silent restart over it without --resume

    _run(_targets_args(bb, out) + ["--resume"], tmp_path / "b.log")
    for name in ("vectors.safetensors", "texts.jsonl", "mu.safetensors"):
        _same_file(out / name, ref_targets / name)
    meta, ref = (json.loads((d / "meta.json").read_text()) for d in (out, ref_targets))
    assert _no_timing(meta, ("timing",)) == _no_timing(ref, ("timing",))


# ------------------------------------------------------------------------------------------------
# train


def _safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """(header, data bytes). The header is compared as JSON: safetensors writes its ``__metadata__``
    map in a per-process hash order, so two identical saves can differ in the order of those keys."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _same_file(a: Path, b: Path) -> None:
    if a.suffix == ".safetensors":
        ha, da = _safetensors_parts(a)
        hb, db = _safetensors_parts(b)
        assert ha == hb and da == db, a.name  # same tensors, byte for byte
    else:
        assert a.read_bytes() == b.read_bytes(), a.name


def _compare_train(run: Path, ref: Path) -> None:
    for name in ("checkpoint/adapter.safetensors", "best/av.safetensors", "best/config.json", "best/mu.safetensors"):
        _same_file(run / name, ref / name)
    drop = ("elapsed_s", "val_s")
    rows, ref_rows = ([_no_timing(json.loads(x), drop) for x in (d / "log.jsonl").read_text().splitlines()] for d in (run, ref))
    assert rows == ref_rows
    res, ref_res = (json.loads((d / "result.json").read_text()) for d in (run, ref))
    assert _no_timing(res, drop) == _no_timing(ref_res, drop) and not res["stopped_early"]
    assert _no_timing(json.loads((run / "best/best.json").read_text()), drop) == _no_timing(json.loads((ref / "best/best.json").read_text()), drop)


@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)], ids=["KILL", "TERM"])
def test_train_killed_then_resumed_equals_uninterrupted(tmp_path, ref_targets, ref_train, sig):
    from eval_harness.cli import main

    out = tmp_path / "run"
    if sig == signal.SIGKILL:  # past the first periodic checkpoint (step 40), mid-way to the next
        progress = lambda: (out / "checkpoint" / "state.json").is_file() and _lines(out / "log.jsonl") > 45  # noqa: E731
    else:  # any step: SIGTERM checkpoints at the next step boundary
        progress = lambda: _lines(out / "log.jsonl") > 10  # noqa: E731
    rc = _interrupt(_train_args(ref_targets, out), progress, sig, tmp_path / "a.log")
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert 0 < state["step"] < 160
    if sig == signal.SIGTERM:
        assert rc == 0 and json.loads((out / "result.json").read_text())["stopped_early"]
        assert "signal 15: saving a checkpoint" in (tmp_path / "a.log").read_text()
    else:
        assert rc == -9 and not (out / "result.json").exists()
    assert main(["train", "--targets", str(ref_targets), "--out", str(out), "--max-steps", "160"]) == 2  # not over it

    _run(_train_args(ref_targets, out) + ["--resume"], tmp_path / "b.log")
    _compare_train(out, ref_train)


class _Killed(BaseException):
    """Stands for SIGKILL inside the process: nothing after it runs (not even ``finally`` writes)."""


@pytest.mark.parametrize("instant", ["after-adapter", "after-optimizer", "between-renames", "after-swap"])
def test_train_killed_while_saving_a_checkpoint_resumes_exactly(tmp_path, ref_targets, monkeypatch, instant):
    """SIGKILL can land between any two writes of a checkpoint; the checkpoint read back must be one
    step's adapter, optimizer and state together, and resume must give the uninterrupted result."""
    import eval_harness.train.prefix as tr
    from eval_harness.data.dataset import load_target_set
    from nla_space.backbone import load_backbone

    ts = load_target_set(ref_targets)
    bb = load_backbone(ts.meta["backbone"])
    cfg = dict(lr=1e-2, batch_size=8, max_steps=9, val_every=3, val_vectors=2, val_k=2, seed=1)
    ref = tr.train(bb, ts, tmp_path / "ref", tr.TrainConfig(**cfg))

    dead = {"on": False}
    real = {"save_tensors": tr.save_tensors, "atomic_write": tr.atomic_write, "atomic_write_json": tr.atomic_write_json,
            "replace": tr.os.replace}

    def guard(name: str, path: Path) -> None:
        if dead["on"]:
            raise _Killed()
        p = str(path)
        at_step6 = (tmp_path / "run" / "log.jsonl").is_file() and _lines(tmp_path / "run" / "log.jsonl") >= 6
        hit = {"after-adapter": name == "atomic_write" and p.endswith("optimizer.pt"),
               "after-optimizer": name == "atomic_write_json" and p.endswith("checkpoint.new/state.json"),
               "between-renames": name == "replace" and p.endswith("checkpoint.new"),
               "after-swap": False}[instant]
        if at_step6 and hit:
            dead["on"] = True
            raise _Killed()

    def wrap(name: str):
        def f(path, *a, **kw):
            guard(name, path)
            out = real[name](path, *a, **kw)
            if instant == "after-swap" and name == "replace" and str(path).endswith("checkpoint.new") \
                    and _lines(tmp_path / "run" / "log.jsonl") >= 6:
                dead["on"] = True
                raise _Killed()
            return out
        return f

    monkeypatch.setattr(tr, "save_tensors", wrap("save_tensors"))
    monkeypatch.setattr(tr, "atomic_write", wrap("atomic_write"))
    monkeypatch.setattr(tr, "atomic_write_json", wrap("atomic_write_json"))
    monkeypatch.setattr(tr.os, "replace", wrap("replace"))
    with pytest.raises(_Killed):
        tr.train(bb, ts, tmp_path / "run", tr.TrainConfig(**cfg))
    monkeypatch.undo()
    with (tmp_path / "run" / "log.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 0.')  # a log line cut by the kill
    resumed = tr.train(bb, ts, tmp_path / "run", tr.TrainConfig(**cfg), resume=True)
    assert resumed["step"] == ref["step"] == 9 and resumed["best"] == ref["best"]
    _same_file(tmp_path / "run" / "checkpoint" / "adapter.safetensors", tmp_path / "ref" / "checkpoint" / "adapter.safetensors")
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(10))


def _best_is_consistent(run: Path, bb, ts, cfg: dict) -> None:
    """The weights in ``run/best`` reproduce the metric its ``best.json`` records (same step)."""
    import eval_harness.train.prefix as tr
    from nla_space.hub import load_state_dict
    from nla_space.runtime import open_card

    rec = json.loads((run / "best" / "best.json").read_text())
    oc = open_card(str(run / "best"), backbone=ts.meta["backbone"])
    mu = load_state_dict(run / "best" / "mu.safetensors")["mu"]
    val = ts.vectors[ts.indices("val")[: cfg["val_vectors"]]]
    res = tr.validate(oc.av, bb, ts.layer, val, mu, cfg["val_k"], int(ts.meta["seq_len"]), cfg["seed"])
    key = f"val_bestof{cfg['val_k']}_cen"
    assert res[key] == pytest.approx(rec[key], abs=1e-6), (rec["step"], res[key], rec[key])


@pytest.mark.parametrize("instant", ["before-best-json", "between-renames"])
def test_train_killed_while_saving_best_leaves_a_consistent_best(tmp_path, ref_targets, monkeypatch, instant):
    """``best/`` (weights + mu + best.json) is replaced as one unit: after a kill a reader finds the
    previous best whole, or no ``best/`` at all — never new weights beside an old ``best.json``."""
    import eval_harness.train.prefix as tr
    from eval_harness.data.dataset import load_target_set
    from nla_space.backbone import load_backbone

    ts = load_target_set(ref_targets)
    bb = load_backbone(ts.meta["backbone"])
    cfg = dict(lr=1e-2, batch_size=8, max_steps=12, val_every=3, val_vectors=8, val_k=4, seed=2)  # improves at step 6
    tr.train(bb, ts, tmp_path / "ref", tr.TrainConfig(**cfg))
    key = f"val_bestof{cfg['val_k']}_cen"
    vals = [(r["step"], r[key]) for r in map(json.loads, (tmp_path / "ref" / "log.jsonl").read_text().splitlines()) if key in r]
    improved = [s for i, (s, v) in enumerate(vals) if i > 0 and v > max(x for _, x in vals[:i])]
    assert improved, f"this config never improves on step 0 ({vals}); the test needs one that does"
    target = improved[0]

    real_json, real_replace = tr.atomic_write_json, tr.os.replace
    best_swaps = {"n": 0}

    def json_guard(path, data, *a, **kw):
        if instant == "before-best-json" and str(path).endswith("best.new/best.json") and data.get("step") == target:
            raise _Killed()
        return real_json(path, data, *a, **kw)

    def replace_guard(src, dst, *a, **kw):
        if str(src).endswith("best.new"):
            best_swaps["n"] += 1
            if instant == "between-renames" and best_swaps["n"] == 2:  # the first best after step 0
                raise _Killed()
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(tr, "atomic_write_json", json_guard)
    monkeypatch.setattr(tr.os, "replace", replace_guard)
    with pytest.raises(_Killed):
        tr.train(bb, ts, tmp_path / "run", tr.TrainConfig(**cfg))
    monkeypatch.undo()
    run = tmp_path / "run"
    if (run / "best").exists():
        assert json.loads((run / "best" / "best.json").read_text())["step"] == 0  # the previous best, whole
        _best_is_consistent(run, bb, ts, cfg)
    else:  # killed between the two renames: no best/ (a reader is refused), complete copies beside it
        assert instant == "between-renames" and (run / "best.new" / "best.json").is_file()
    tr.train(bb, ts, run, tr.TrainConfig(**cfg), resume=True)
    for name in ("av.safetensors", "mu.safetensors", "config.json"):
        _same_file(run / "best" / name, tmp_path / "ref" / "best" / name)
    _best_is_consistent(run, bb, ts, cfg)
    assert not (run / "best.new").exists() and not (run / "best.old").exists()


# ------------------------------------------------------------------------------------------------
# centered-eval


@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)], ids=["KILL", "TERM"])
def test_centered_eval_killed_then_resumed_equals_uninterrupted(tmp_path, bb, ref_targets, ref_train, ref_eval, sig):
    from eval_harness.results import load_results

    out = tmp_path / "res" / "centered.json"
    partial = out.with_name(out.name + ".partial.jsonl")
    args = _eval_args(ref_train / "best", bb, ref_targets, out)
    rc = _interrupt(args, lambda: _lines(partial) >= 4, sig, tmp_path / "a.log")
    assert rc == -sig
    assert not out.exists() and partial.is_file()
    assert list(load_results([out.parent])) == []  # the leaderboard never reads a partial run

    _run(args + ["--resume"], tmp_path / "b.log")
    assert not partial.exists()
    res, ref = (json.loads(p.read_text()) for p in (out, ref_eval))
    assert _no_timing(res, ("meta",)) == _no_timing(ref, ("meta",))
    assert json.dumps(_no_timing(res, ("meta",)), sort_keys=True) == json.dumps(_no_timing(ref, ("meta",)), sort_keys=True)
    volatile = ("started", "finished", "wall_time_s", "args", "path", "git_commit")
    assert _no_timing(res["meta"], volatile) == _no_timing(ref["meta"], volatile)
    assert out.with_suffix(".samples.jsonl").read_bytes() == ref_eval.with_suffix(".samples.jsonl").read_bytes()


# ------------------------------------------------------------------------------------------------
# Unwritable / full output locations: refused at start-up, before any model is loaded


def _forbid_work(monkeypatch) -> None:
    """Make any model loading fail the test: the pre-flight check must come first."""
    import eval_harness.cmd_targets as ct
    import eval_harness.cmd_train as ctr
    import eval_harness.evals.common as ev

    def boom(*a, **kw):
        raise AssertionError("work started before the output location was checked")

    monkeypatch.setattr(ct, "shared_backbone", boom)
    monkeypatch.setattr(ctr, "load_target_set", boom)
    monkeypatch.setattr(ev, "load_target_set", boom)
    monkeypatch.setattr(ev, "open_card", boom)


def _all_commands(bb: Path, targets: Path, card: Path, out_dir: Path) -> dict[str, list[str]]:
    return {
        "targets": ["targets", "--backbone", str(bb), "--layer", "2", "--n", "40", "--out", str(out_dir / "t")],
        "train": ["train", "--targets", str(targets), "--out", str(out_dir / "run")],
        "centered-eval": ["centered-eval", "--card", str(card), "--targets", str(targets), "--out", str(out_dir / "r.json")],
        "centered-eval-log": ["centered-eval", "--card", str(card), "--targets", str(targets), "--out", str(card.parent / "r.json"),
                              "--log-samples", str(out_dir / "s.jsonl")],
    }


def _assert_refused_at_startup(capsys, argv: list[str], reason: str) -> None:
    from eval_harness.cli import main

    t0 = time.monotonic()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and "cannot write" in lines[0] and re.search(reason, lines[0]), err
    assert time.monotonic() - t0 < 30


def test_output_under_a_file_is_refused_at_startup(tmp_path, bb, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _forbid_work(monkeypatch)
    for name, argv in _all_commands(bb, tmp_path / "targets", tmp_path / "card", blocker).items():
        _assert_refused_at_startup(capsys, argv, "Not a directory|not a folder")


def test_full_disk_is_refused_at_startup_simulated(tmp_path, bb, monkeypatch, capsys):
    """Always runs (no root needed): the probe write fails with ENOSPC as on a full disk."""
    import nla_space.io as nio

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    _forbid_work(monkeypatch)
    monkeypatch.setattr(nio.tempfile, "mkstemp", full)
    for name, argv in _all_commands(bb, tmp_path / "targets", tmp_path / "card", tmp_path / "out").items():
        _assert_refused_at_startup(capsys, argv, "No space left on device")


def _mount_tmpfs(where: Path, opts: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(opts) -> Path``: a fresh tmpfs under tmp_path (skips the test where mounting is not allowed)."""
    mounted: list[Path] = []

    def mount(opts: str) -> Path:
        where = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
        if not _mount_tmpfs(where, opts):
            pytest.skip("cannot mount a tmpfs here (needs root); the simulated ENOSPC test covers the check")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        _umount(where)


def _fill(folder: Path) -> None:
    """Fill a filesystem to the last byte."""
    with (folder / "filler").open("wb", buffering=0) as f:
        try:
            for _ in range(1 << 20):  # bounded: 4 GiB at most
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        else:
            pytest.fail("the tmpfs never filled up")


def test_full_and_read_only_disks_are_refused_at_startup(tmp_path, bb, monkeypatch, capsys, tmpfs):
    full = tmpfs("size=256k")
    _fill(full)
    ro = tmpfs("ro,size=64k")
    _forbid_work(monkeypatch)
    for name, argv in _all_commands(bb, tmp_path / "targets", tmp_path / "card", full).items():
        _assert_refused_at_startup(capsys, argv, "No space left on device")
    for name, argv in _all_commands(bb, tmp_path / "targets", tmp_path / "card", ro / "sub").items():
        _assert_refused_at_startup(capsys, argv, "Read-only file system")


def test_disk_filling_up_mid_run_gives_one_line_and_resumes(tmp_path, bb, ref_targets, tmpfs):
    """Room for the start-up probe (1 MiB), not for the whole run (150 shards of 4 KiB pages): the run
    stops with one error line; after the disk is grown, ``--resume`` finishes it, and its rows are
    those of an uninterrupted run (shard ``i`` depends only on the seed and ``i``)."""
    import torch

    from eval_harness.data.dataset import load_target_set

    disk = tmpfs("size=1100k")
    out = disk / "t"
    args = _targets_args(bb, out, n=1200)
    with (tmp_path / "a.log").open("w") as err:
        proc = subprocess.run(args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=err, timeout=300)
    log = (tmp_path / "a.log").read_text()
    assert proc.returncode == 2, log[-3000:]
    errors = re.findall(r"error: [^\r\n]*", log)  # may follow a progress bar's last \r-line
    assert len(errors) == 1 and "No space left on device" in errors[0] and "--resume" in errors[0], log[-3000:]
    assert str(out) in errors[0], errors  # names the file it could not write
    assert "Traceback" not in log
    assert not (out / "meta.json").exists() and (out / "shards" / "00000.jsonl").is_file()
    with pytest.raises(CheckpointError, match="not finished"):
        load_target_set(out)
    subprocess.run(["mount", "-o", "remount,size=32m", str(disk)], check=True, timeout=30)
    _run(args + ["--resume"], tmp_path / "b.log")
    done, ref = load_target_set(out), load_target_set(ref_targets)
    assert len(done) == 1200 and torch.equal(done.vectors[:400], ref.vectors) and done.token_ids[:400] == ref.token_ids
