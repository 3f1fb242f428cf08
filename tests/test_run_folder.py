"""The run folder every trainer writes (:mod:`eval_harness.train.run_folder`).

Unit tests of :class:`RunFolder` (claim, resume check, log trim, the folder swap killed at each
instant, best tracking), then the same guarantee for each of the five trainers on tiny random
models: killed (in-process: every write after the kill fails, as if the process were gone) while
saving a checkpoint or ``best/``, then resumed, each ends with the files of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import tiny
from eval_harness.train.run_folder import STATE_FILE, RunFolder, config_differences
from nla_space.errors import NLAInputError


class _Killed(BaseException):
    """Stands for SIGKILL inside the process: nothing after it runs (not even ``finally`` writes)."""


def _write_files(step: int, names: tuple[str, ...] = ("a.bin", "b.bin")) -> Callable[[Path], None]:
    """A writer of ``names`` holding ``step``, then ``state.json`` (the marker) last."""
    def write(folder: Path) -> None:
        for n in names:
            (folder / n).write_text(str(step))
        (folder / STATE_FILE).write_text(json.dumps({"step": step, "best": None, "best_step": None, "elapsed_s": 0.0}))
    return write


def _read_files(folder: Path) -> set[str]:
    return {(folder / n).read_text() for n in ("a.bin", "b.bin")}


# ------------------------------------------------------------------------------------ RunFolder


def test_a_fresh_run_needs_a_new_or_empty_folder(tmp_path):
    RunFolder(tmp_path / "new", "t", resume=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".nla-write-check.x.tmp").write_text("")  # hidden leftovers do not count
    RunFolder(tmp_path / "empty", "t", resume=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("")
    with pytest.raises(NLAInputError, match="already holds a run.*--resume"):
        RunFolder(run, "t", resume=False)
    RunFolder(run, "t", resume=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "meta.json").write_text("{}")
    for resume in (False, True):
        with pytest.raises(NLAInputError, match="not a run folder .*meta.json"):
            RunFolder(other, "t", resume=resume)
    (tmp_path / "file").write_text("")
    with pytest.raises(NLAInputError, match="is a file"):
        RunFolder(tmp_path / "file", "t", resume=True)


def test_resume_refuses_a_different_run_and_allows_a_longer_one(tmp_path, monkeypatch):
    cfg = {"corpus": "data/c.jsonl", "layer": 3, "steps": 10, "lr": 1e-3, "nested": {"a": 1, "b": 2}}
    RunFolder(tmp_path, "train-x", resume=False).start(cfg, load=lambda f: None)
    monkeypatch.chdir(tmp_path.parent)
    (tmp_path.parent / "data").mkdir(exist_ok=True)
    same_path = str((tmp_path.parent / "data" / "c.jsonl").resolve())  # equal once resolved
    longer = {**cfg, "corpus": same_path, "steps": 20, "nested": {"a": 1}, "new_setting": 5}  # added/dropped keys are not compared
    RunFolder(tmp_path, "train-x", resume=True).start(longer, load=lambda f: None, may_change={"steps"})
    assert json.loads((tmp_path / "train_config.json").read_text())["steps"] == 20  # rewritten with the new settings
    with pytest.raises(NLAInputError, match=r"different run: layer: 3 in the run, 4 now; nested\.a: 1 in the run, 2 now "
                                            r"\(a resume may change only steps\)"):
        RunFolder(tmp_path, "train-x", resume=True).start({**longer, "layer": 4, "nested": {"a": 2}}, load=lambda f: None, may_change={"steps"})
    with pytest.raises(NLAInputError, match="holds a train-x run, not a train-y run"):
        RunFolder(tmp_path, "train-y", resume=True).start(longer, load=lambda f: None)
    assert config_differences({"x": 1.0, "y": [1, 2]}, {"x": 1, "y": [1, 2]}) == []


def test_resume_trims_the_log_to_the_checkpoint_and_restarts_without_one(tmp_path):
    run = RunFolder(tmp_path, "t", resume=False)
    run.start({}, load=lambda f: None)
    run.save_checkpoint(_write_files(2))
    (tmp_path / "log.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(5)) + '{"step": 5, "lo')
    (tmp_path / "result.json").write_text("{}")  # a stopped run: resuming it makes it unfinished again
    loaded: list[Path] = []
    state = RunFolder(tmp_path, "t", resume=True).start({}, load=loaded.append)
    assert state["step"] == 2 and loaded == [tmp_path / "checkpoint"] and not (tmp_path / "result.json").exists()
    assert [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [0, 1, 2]
    shutil.rmtree(tmp_path / "checkpoint")  # killed before its first checkpoint: start again at step 0
    again = RunFolder(tmp_path, "t", resume=True)
    assert again.start({}, load=loaded.append) == {"step": 0, "best": None, "best_step": None, "elapsed_s": 0.0}
    assert not again.resumed and (tmp_path / "log.jsonl").read_text() == "" and len(loaded) == 1


@pytest.mark.parametrize("instant", ["inside-writer", "before-first-rename", "between-renames", "after-swap", "before-cleanup"])
def test_a_kill_while_swapping_leaves_the_old_or_the_new_copy_whole(tmp_path, monkeypatch, instant):
    run = RunFolder(tmp_path, "t", resume=False)
    run.start({}, load=lambda f: None)
    run.save_checkpoint(_write_files(1))
    real_replace, real_rmtree = os.replace, shutil.rmtree
    calls = {"replace": 0}

    def writer(folder: Path) -> None:
        (folder / "a.bin").write_text("2")
        if instant == "inside-writer":
            raise _Killed()
        _write_files(2)(folder)

    def replace(src, dst):
        calls["replace"] += 1
        if (instant, calls["replace"]) in (("before-first-rename", 1), ("between-renames", 2)):
            raise _Killed()
        real_replace(src, dst)
        if instant == "after-swap" and calls["replace"] == 2:
            raise _Killed()

    def rmtree(path, *a, **kw):
        if instant == "before-cleanup" and calls["replace"] == 2:
            raise _Killed()
        real_rmtree(path, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(_Killed):
        run.save_checkpoint(writer)
    monkeypatch.undo()
    resumed = RunFolder(tmp_path, "t", resume=True)
    state = resumed.start({}, load=lambda f: None)
    expect = 1 if instant == "inside-writer" else 2  # once the new copy is complete, it is the one a resume takes
    assert state["step"] == expect and _read_files(tmp_path / "checkpoint") == {str(expect)}  # one step's files together
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "train_config.json"]  # no .new / .old left


def test_a_writer_must_write_its_marker(tmp_path):
    run = RunFolder(tmp_path, "t", resume=False)
    with pytest.raises(RuntimeError, match="marker state.json"):
        run.save_checkpoint(lambda folder: (folder / "a.bin").write_text("x"))
    assert not (tmp_path / "checkpoint").exists()


@pytest.mark.parametrize("higher", [True, False])
def test_validation_keeps_the_best_step(tmp_path, higher):
    run = RunFolder(tmp_path, "t", resume=False)
    run.start({}, load=lambda f: None)
    values = iter([0.5, 0.7, 0.3, None])
    written: list[int] = []

    def write_best(folder: Path, step: int, res: dict[str, Any]) -> None:
        written.append(step)
        (folder / "best.json").write_text(json.dumps({"step": step, **res}))

    validate = run.validation(lambda s: {} if (v := next(values)) is None else {"m": v}, "m", higher_is_better=higher,
                              write_best=write_best, time_key="t_s")
    results = [validate(s) for s in (0, 1, 2, 3)]
    assert all("t_s" in r for r in results)
    assert written == ([0, 1] if higher else [0, 2]) and run.state["best_step"] == written[-1]
    assert json.loads((tmp_path / "best" / "best.json").read_text())["step"] == written[-1]


# --------------------------------------------------------------------------- the five trainers


KEYWORDS = ("cat", "dog", "fire", "water")
TIMING = ("elapsed_s", "val_s", "eval_s")


@dataclass
class Trainer:
    name: str
    run: Callable[..., dict[str, Any]]  #: (out, resume=False, **settings) → final state
    total: int


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Trainer]:
    """Each trainer on its own tiny inputs, 6 steps, validation (and a checkpoint) every 2; seeds
    chosen so that each run's best step is past step 2 (measured: 4 or 6), so a kill while saving
    ``best/`` leaves a checkpoint to resume from."""
    from eval_harness.data.injection_targets import InjectionTargetsSpec, build_injection_targets
    from eval_harness.data.targets import HealthThresholds, TargetsSpec, build_targets
    from eval_harness.train.prefix import TrainConfig, train
    from eval_harness.train.ar import ARTrainConfig, train_ar
    from eval_harness.train.av_lora import AVTrainConfig, train_av
    from eval_harness.train.grpo import GRPOConfig, train_grpo
    from eval_harness.train.patch import PatchTrainConfig, train_patch
    from nla_space.backbone import load_backbone

    root = tmp_path_factory.mktemp("trainers")
    bb_dir = tiny.save_backbone(root / "bb")
    bb = load_backbone(str(bb_dir))
    prefix_targets = build_targets(bb, TargetsSpec(backbone=str(bb_dir), layer=2, n=40, seq_len=6, seed=0, batch_size=20, n_val=4,
                                                   n_test=4, n_mu_pool=8, health=HealthThresholds(min_dim_std=1e-4, min_norm_std=0.0)),
                                   root / "targets")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "split": ["train", "train", "val", "mu_pool"][i % 4]}) + "\n"
                              for i, t in enumerate(tiny.SENTENCES * 6)))
    model, tok = tiny.make_marker_model("qwen2", layers=8, hidden=32, seed=1)
    base = root / "base"
    model.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    rnd = random.Random(0)
    words = [w for w in tiny.WORDS if w.isalpha()]
    texts = root / "texts.jsonl"
    texts.write_text("".join(json.dumps({"id": f"x{i}", "text": " ".join(rnd.choice(words) for _ in range(4)) + " " + KEYWORDS[i % 4]})
                             + "\n" for i in range(40)))
    ts = build_injection_targets(load_backbone(str(base)), InjectionTargetsSpec(
        backbone=str(base), texts_file=str(texts), bands=[10, 47, 80], max_new_tokens=4, batch_size=16,
        fractions={"av_sft": 0.4, "ar_sft": 0.2, "rl": 0.2, "heldout": 0.2}), root / "inj")
    lora = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0)  # no dropout: its RNG is not part of a checkpoint
    av_cfg = dict(batch_size=6, lr=5e-3, val_frac=0.25, val_rows=12, **lora)
    train_av(load_backbone(str(base)), ts, root / "sft", AVTrainConfig(max_steps=2, val_every=2, **av_cfg))

    def toy_reward(texts, ids, closed, v, v_wrong, layer):  # the fraction of even token ids; no AR needed
        r = torch.tensor([sum(t % 2 == 0 for t in row) / max(len(row), 1) for row in ids])
        return {"reward": r, "cos_true": r, "cos_wrong": torch.full_like(r, 0.5)}

    def fresh() -> Any:
        return load_backbone(str(base))  # the LoRA trainers attach their adapter in place: a private copy each run

    n, k = 6, 2
    return {t.name: t for t in [
        Trainer("train", lambda out, resume=False, **kw: train(bb, prefix_targets, out, TrainConfig(**{
            "lr": 0.1, "batch_size": 8, "num_prefix_tokens": 2, "max_steps": n, "val_every": k, "val_vectors": 4, "val_k": 2,
            "seed": 7, **kw}), resume=resume), n),
        Trainer("train-patch", lambda out, resume=False, **kw: train_patch(load_backbone(str(bb_dir)), corpus, out, PatchTrainConfig(**{
            "layer": 2, "steps": n, "batch_size": 4, "eval_every": k, "val_rows": 8, "r": 4, "alpha": 8, "lr": 0.01, **kw}),
            resume=resume), n),
        Trainer("train-av-lora", lambda out, resume=False, **kw: train_av(fresh(), ts, out, AVTrainConfig(**{
            "max_steps": n, "val_every": k, **av_cfg, **kw}), resume=resume), n),
        Trainer("train-ar", lambda out, resume=False, **kw: train_ar(fresh(), ts, out, ARTrainConfig(**{
            "max_steps": n, "eval_every": k, "batch_size": 8, "lr": 3e-3, "head_lr": 1e-2, "eval_texts": 4, **lora, **kw}),
            resume=resume), n),
        Trainer("train-grpo", lambda out, resume=False, **kw: train_grpo(fresh(), ts, root / "sft" / "best", out, GRPOConfig(**{
            "steps": n, "eval_every": k, "batch": 2, "group_size": 2, "max_new_tokens": 4, "lr": 1e-2, "eval_items": 2, "seed": 1, **kw}),
            resume=resume, reward_fn=toy_reward), n),
    ]}


@pytest.fixture(scope="module")
def references(world, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs, made when first asked for."""

    class Lazy(dict):
        def __missing__(self, name: str) -> Path:
            self[name] = out = tmp_path_factory.mktemp("ref") / name
            world[name].run(out)
            return out

    return Lazy()


def _rows(path: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in path.read_text().splitlines() if x.strip()]


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)
    return a == b


def _same_run(run: Path, ref: Path) -> None:
    from nla_space.hub import load_state_dict

    a, b = load_state_dict(run / "checkpoint" / "adapter.safetensors"), load_state_dict(ref / "checkpoint" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    rows, ref_rows = _rows(run / "log.jsonl"), _rows(ref / "log.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    assert all(_close(x, y) for x, y in zip(rows, ref_rows)), (rows, ref_rows)
    best, ref_best = ({k: v for k, v in json.loads((d / "best" / "best.json").read_text()).items() if k not in TIMING} for d in (run, ref))
    assert _close(best, ref_best), (best, ref_best)
    state, ref_state = (json.loads((d / "result.json").read_text()) for d in (run, ref))
    assert state["step"] == ref_state["step"] and state["best_step"] == ref_state["best_step"] and not state["stopped_early"]
    assert not [p.name for p in run.iterdir() if p.name.endswith((".new", ".old"))]


def _kill_hooks(monkeypatch, instant: str, best_step: int) -> None:
    """Make the process "die" at ``instant``: the write that reaches it, and every write after it, raise."""
    real_replace, real_rmtree = os.replace, shutil.rmtree
    dead = {"on": False}
    seen = {"opt": 0, "swap": 0}

    def die() -> None:
        dead["on"] = True
        raise _Killed()

    def replace(src, dst, *a, **kw):
        if dead["on"]:
            raise _Killed()
        s, d = Path(src), Path(dst)
        if instant == "checkpoint-mid-write" and d.parent.name == "checkpoint.new" and d.name == "optimizer.pt":
            seen["opt"] += 1
            if seen["opt"] == 2:  # the step-4 checkpoint: its adapter is written, its optimizer not yet
                die()
        if instant == "checkpoint-between-renames" and s.name == "checkpoint.new":
            seen["swap"] += 1
            if seen["swap"] == 2:
                die()
        if instant == "best-between-renames" and s.name == "best.new" and json.loads((s / "best.json").read_text())["step"] == best_step:
            die()
        return real_replace(src, dst, *a, **kw)

    def rmtree(path, *a, **kw):
        if dead["on"]:
            raise _Killed()
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)


TRAINERS = ["train", "train-patch", "train-av-lora", "train-ar", "train-grpo"]


@pytest.mark.parametrize("instant", ["checkpoint-mid-write", "checkpoint-between-renames", "best-between-renames"])
@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_trainer_killed_while_saving_resumes_to_the_uninterrupted_run(world, references, tmp_path, monkeypatch, caplog,
                                                                           trainer, instant):
    """The resume starts from the newest complete checkpoint (not from scratch) and ends equal to
    the uninterrupted run: checkpoint weights, log rows, ``best/`` record, result."""
    t, ref = world[trainer], references[trainer]
    best_step = json.loads((ref / "best" / "best.json").read_text())["step"]
    # the step-4 checkpoint is cut (step 2's is the newest whole one), or complete as checkpoint.new;
    # a kill while saving best/ at step s comes before step s's checkpoint (none before step 2)
    resume_at = {"checkpoint-mid-write": 2, "checkpoint-between-renames": 4, "best-between-renames": best_step - 2}[instant]
    out = tmp_path / "run"
    _kill_hooks(monkeypatch, instant, best_step)
    with pytest.raises(_Killed):
        t.run(out)
    monkeypatch.undo()
    with (out / "log.jsonl").open("a") as f:
        f.write('{"step": 9, "loss": 0.')  # a log line cut by the kill
    with pytest.raises(NLAInputError, match="already holds a run"):
        t.run(out)  # a fresh run over the killed one is refused
    caplog.set_level(logging.INFO, logger="eval_harness.train.run_folder")
    state = t.run(out, resume=True)
    resumed = [int(m.group(1)) for r in caplog.records if (m := re.match(r"resumed \S+ at step (\d+)", r.getMessage()))]
    assert resumed == ([resume_at] if resume_at > 0 else []), (resumed, resume_at)
    assert state["step"] == t.total
    _same_run(out, ref)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_trainer_resumes_only_its_own_run(world, references, tmp_path, trainer):
    """A resume with a changed setting is refused by name (before any file changes); a resume that
    only lengthens the run is accepted; a folder that holds no run is refused."""
    t = world[trainer]
    out = tmp_path / "run"
    shutil.copytree(references[trainer], out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(NLAInputError, match=r"different run: .*seed: \d+ in the run, 12345 now"):
        t.run(out, resume=True, seed=12345)
    assert before == {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    longer = {"train-patch": "steps", "train-grpo": "steps"}.get(trainer, "max_steps")
    assert t.run(out, resume=True, **{longer: t.total + 1})["step"] == t.total + 1
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(NLAInputError, match="not a run folder"):
        t.run(tmp_path / "notes", resume=True)
