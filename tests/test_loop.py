"""The trainers' shared step loop (:mod:`eval_harness.train.loop`): batch order, log/checkpoint order, stops, resume."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from eval_harness.train.loop import (LoopSettings, SupervisedStep, epoch_batch, epoch_schedule, run_steps, start_clock, trim_log)


def test_epoch_batch_covers_each_row_once_per_epoch_and_is_reproducible():
    items = [f"r{i}" for i in range(10)]
    spe, total = epoch_schedule(len(items), 4, 2.0, None)
    assert (spe, total) == (3, 6) and epoch_schedule(10, 4, 2.0, 5) == (3, 5) and epoch_schedule(1, 4, 0.1, None) == (1, 1)
    epochs = []
    for e in range(3):
        batches = [epoch_batch(items, e * spe + p, 4, seed=7) for p in range(spe)]
        assert [len(b) for b in batches] == [4, 4, 2]  # the last batch of an epoch is short
        flat = [x for b in batches for x in b]
        assert sorted(flat) == sorted(items)  # each row exactly once per epoch
        epochs.append(flat)
    assert epochs[0] != epochs[1]  # a new permutation each epoch (seed + epoch)
    assert [epoch_batch(items, s, 4, seed=7) for s in range(9)] == [epoch_batch(items, s, 4, seed=7) for s in range(9)]
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(7 + 1)).tolist()
    assert epoch_batch(items, spe + 1, 4, seed=7) == [items[j] for j in perm[4:8]]  # the documented order


def _loop(tmp_path, state, total=5, every=2, events=None, stop_at=None, should_stop=None):
    events = [] if events is None else events
    log_path = tmp_path / "log.jsonl"

    def step_fn(s):
        if stop_at is not None and s == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        events.append(("step", s))
        return {"loss": float(s)}

    def validate(s):
        events.append(("val", s))
        return {"val_x": s * 10}

    def save():
        rows = [json.loads(x)["step"] for x in log_path.read_text().splitlines()] if log_path.exists() else []
        events.append(("ckpt", state["step"], rows[-1] if rows else None))

    t0 = start_clock(state)
    return run_steps(LoopSettings(tmp_path, total, every, "test"), state, t0, step_fn, validate, save, lambda row: {"loss": row["loss"]},
                     should_stop=should_stop), events


def test_run_steps_logs_before_checkpoint_and_writes_result(tmp_path):
    state = {"step": 0, "best": None, "elapsed_s": 0.0}
    st, ev = _loop(tmp_path, state)
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert list(rows[0]) == ["step", "loss", "elapsed_s"] and list(rows[1]) == ["step", "loss", "elapsed_s", "val_x"]
    assert [r.get("val_x") for r in rows] == [None, 20, None, 40, 50]  # every 2nd step and the last
    ckpts = [e for e in ev if e[0] == "ckpt"]
    assert ckpts == [("ckpt", 2, 2), ("ckpt", 4, 4), ("ckpt", 5, 5), ("ckpt", 5, 5)]  # the row is logged first; finally saves again
    assert st["stopped_early"] is False and st["total_steps"] == 5 and st["step"] == 5
    assert json.loads((tmp_path / "result.json").read_text())["step"] == 5


def test_run_steps_resumes_from_the_state_step_and_trim_log_drops_later_rows(tmp_path):
    (tmp_path / "log.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(5)) + '{"step": 5, "lo')
    trim_log(tmp_path / "log.jsonl", 2)  # also drops the line a kill cut
    assert [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [0, 1, 2]
    st, ev = _loop(tmp_path, {"step": 2, "elapsed_s": 3.0})
    assert [e[1] for e in ev if e[0] == "step"] == [2, 3, 4]
    assert [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [0, 1, 2, 3, 4, 5]
    assert st["elapsed_s"] >= 3.0


def test_run_steps_sigterm_finishes_the_step_checkpoints_and_restores_the_handler(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    st, ev = _loop(tmp_path, {"step": 0}, total=10, every=4, stop_at=2)
    assert st["step"] == 3 and st["stopped_early"] and st["total_steps"] == 10  # the step in progress finished
    assert ev[-1] == ("ckpt", 3, 3)
    assert signal.getsignal(signal.SIGTERM) == before


def test_run_steps_should_stop_and_exception_checkpoint(tmp_path):
    (tmp_path / "a").mkdir()
    st, _ = _loop(tmp_path / "a", {"step": 0}, total=10, every=100, should_stop=lambda: len(_rows(tmp_path / "a")) >= 2)
    assert st["step"] == 2 and st["stopped_early"]

    saved = []

    def boom(s):
        if s == 1:
            raise RuntimeError("boom")
        return {}

    (tmp_path / "b").mkdir()
    state = {"step": 0}
    with pytest.raises(RuntimeError):
        run_steps(LoopSettings(tmp_path / "b", 5, 100, "t"), state, start_clock(state), boom, lambda s: {}, lambda: saved.append(state["step"]),
                  lambda row: {})
    assert saved == [1] and not (tmp_path / "b" / "result.json").exists()


def _rows(folder):
    p = folder / "log.jsonl"
    return p.read_text().splitlines() if p.exists() else []


def test_supervised_step_sets_lr_and_resumed_equals_uninterrupted():
    items = list(range(12))
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    y = x @ torch.tensor([1.0, -2.0, 0.5])

    def run(steps, start=0, model=None, opt=None):
        if model is None:
            torch.manual_seed(0)
            model = torch.nn.Linear(3, 1)
            opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        sgd = SupervisedStep(items, 5, 3, opt, model.parameters(), 1.0, lambda b, step: ((model(x[b])[:, 0] - y[b]) ** 2).mean(),
                             lambda s: 0.01 * (s + 1))
        fields = [sgd(s) for s in range(start, steps)]
        return model, opt, fields

    full, _, fields = run(6)
    assert list(fields[0]) == ["epoch", "loss", "lr"] and fields[0]["epoch"] == round(1 / 3, 4) and fields[5]["lr"] == 0.06
    part, opt, _ = run(4)
    part, _, _ = run(6, start=4, model=part, opt=opt)
    assert all(torch.equal(a, b) for a, b in zip(full.parameters(), part.parameters()))
    no_lr = SupervisedStep(items, 5, 3, opt, part.parameters(), 1.0, lambda b, step: part(x[b]).sum())
    assert list(no_lr(0)) == ["epoch", "loss"]
