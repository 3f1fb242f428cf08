"""The run folder of every trainer (``train``, ``train-av-lora``, ``train-ar``, ``train-grpo``, ``train-patch``).

Layout (these names are read by older runs' resumes, ``patch-release`` and ``publish``; keep them)
    ``train_config.json``  the run's settings and derived counts, rewritten at every start and resume
    ``log.jsonl``          one JSON row per logged step (conventions in :mod:`eval_harness.train.loop`)
    ``checkpoint/``        the latest resumable step: the trainer's files, ``state.json`` written last
    ``best/``              the best validation step, in the trainer's own loadable format
    ``result.json``        the final state, once the run has stopped (:func:`eval_harness.train.loop.run_steps`);
                           a resume deletes it until it stops again

Guarantees (one implementation, :class:`RunFolder`, for all five trainers)
    Claim. A fresh run starts only in a missing or empty folder. A folder holding a run needs
    ``--resume``; a non-empty folder holding no run is refused in both modes, so a mistyped ``--out``
    never gets run files mixed into it.
    Same run. On resume the stored ``train_config.json`` must agree with the new settings except
    the run length and validation cadence (the settings a trainer marks ``resumable``, and the
    derived total); otherwise the resume is refused naming each difference. A setting present on
    only one side (added or dropped between versions of this code) is not compared, and two paths
    that resolve to the same file are equal.
    Kill safety. ``checkpoint/`` and ``best/`` are each written whole into ``<name>.new`` (the
    trainer's writer puts the folder's marker file last) and swapped in by two renames. A kill at
    any instant leaves, for each, the old copy or the new one complete; between the two renames the
    new one waits as ``<name>.new``, and the next resume puts it in place. A resumed run therefore
    reads one step's files together, never a mix of two steps.
    Log. Rows after the resumed checkpoint's step, and a row cut by a kill, are dropped on resume and
    redone, so a resumed log equals an uninterrupted one. A resume that finds no complete checkpoint
    (the run was killed before its first) starts again at step 0 with an empty log.
    N processes (:mod:`eval_harness.distributed`). Every rank checks the folder and loads the
    checkpoint; only rank 0 writes (config, log, checkpoint, best, result); rank 0 validates and
    broadcasts the metrics. ``train_config.json`` records the world size under ``parallel`` (N > 1; a
    resume may change it: the batch is split, not multiplied, so ``batch_size`` is the effective batch).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from nla_space.errors import NLAInputError
from nla_space.io import atomic_write_json

from .. import distributed
from .loop import LoopSettings, append_log, run_steps, start_clock, trim_log

log = logging.getLogger(__name__)

CONFIG_FILE = "train_config.json"
LOG_FILE = "log.jsonl"
RESULT_FILE = "result.json"
CHECKPOINT = "checkpoint"
BEST = "best"
STATE_FILE = "state.json"  #: the checkpoint's marker, written last
BEST_RECORD = "best.json"  #: the step and metrics of ``best/``; the usual marker of that folder
ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_KEY = "trainer"  #: the command name, stored in ``train_config.json``
PARALLEL_KEY = "parallel"  #: the world size of the latest start, stored in ``train_config.json``

_NEW, _OLD = ".new", ".old"
#: what makes a folder a run folder (any one of them)
RUN_ENTRIES = frozenset({CONFIG_FILE, LOG_FILE, RESULT_FILE} | {n + s for n in (CHECKPOINT, BEST) for s in ("", _NEW, _OLD)})

Writer = Callable[[Path], None]  #: fills a folder


def fresh_state() -> dict[str, Any]:
    """The state of a run at step 0 (trainers may add keys)."""
    return {"step": 0, "best": None, "best_step": None, "elapsed_s": 0.0}


def config_differences(stored: dict[str, Any], new: dict[str, Any], may_change: Collection[str] = ()) -> list[str]:
    """``"key: A in the run, B now"`` for each setting present on both sides that differs (nested
    dicts compared key by key; keys in ``may_change`` skipped; equal resolved paths are equal)."""
    out = []
    for key in (k for k in stored if k in new and k not in may_change):
        a, b = stored[key], new[key]
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in config_differences(a, b)]
        elif a != b and not (isinstance(a, str) and isinstance(b, str) and Path(a).resolve() == Path(b).resolve()):
            out.append(f"{key}: {a!r} in the run, {b!r} now")
    return out


class RunFolder:
    """A trainer's output folder (see the module docstring for the layout and the guarantees).

    Use: ``run = RunFolder(out, "train-x", resume=...)`` before any expensive work (wrong folders
    are refused at once); build the model; ``state = run.start(config, load)``; then
    ``run.loop(...)`` with the trainer's step, its :meth:`validation` and its checkpoint writer."""

    def __init__(self, out: Path, trainer: str, *, resume: bool, best_marker: str = BEST_RECORD):
        self.out, self.trainer, self.resume, self.best_marker = Path(out), trainer, resume, best_marker
        self.state: dict[str, Any] = fresh_state()
        self.resumed = False  #: a checkpoint was loaded (set by :meth:`start`)
        if self.out.exists() and not self.out.is_dir():
            raise NLAInputError(f"--out {self.out} is a file, not a folder")
        entries = sorted(p.name for p in self.out.iterdir() if not p.name.startswith(".")) if self.out.is_dir() else []
        if entries and not RUN_ENTRIES & set(entries):
            shown = ", ".join(entries[:5]) + (", …" if len(entries) > 5 else "")
            raise NLAInputError(f"--out {self.out} is not a run folder (it holds {shown}); use a new or empty folder")
        if entries and not resume:
            raise NLAInputError(f"{self.out} already holds a run (use --resume to continue it, or another --out)")
        distributed.barrier()  # every rank has checked the folder before rank 0 writes into it
        if distributed.world().is_main:
            self.out.mkdir(parents=True, exist_ok=True)

    @property
    def log_path(self) -> Path:
        return self.out / LOG_FILE

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / CHECKPOINT

    @property
    def best_dir(self) -> Path:
        return self.out / BEST

    # ------------------------------------------------------------------------------ start / resume

    def start(self, config: dict[str, Any], load: Callable[[Path], None], initial: dict[str, Any] | None = None,
              may_change: Collection[str] = ()) -> dict[str, Any]:
        """Check ``config`` against the stored one (on resume), write it, then load the latest
        complete checkpoint with ``load(folder)`` (the trainer's files) and return the run's state:
        the checkpoint's ``state.json``, or ``initial`` (default :func:`fresh_state`) at step 0."""
        w = distributed.world()
        config = {**json.loads(json.dumps(config)), TRAINER_KEY: self.trainer}
        if w.distributed:
            config[PARALLEL_KEY] = {"world_size": w.size, "lr_schedule": "per global step",
                                    "batch": "each step's batch is split over the ranks: the batch size setting is the effective batch"}
        stored_path = self.out / CONFIG_FILE
        if self.resume and stored_path.is_file():
            stored = json.loads(stored_path.read_text(encoding="utf-8"))
            if stored.get(TRAINER_KEY, self.trainer) != self.trainer:
                raise NLAInputError(f"{self.out} holds a {stored[TRAINER_KEY]} run, not a {self.trainer} run")
            diffs = config_differences(stored, config, {*may_change, PARALLEL_KEY})
            if diffs:
                allowed = f" (a resume may change only {', '.join(sorted(may_change))})" if may_change else ""
                raise NLAInputError(f"{self.out} holds a different run: {'; '.join(diffs)}{allowed}")
        if w.is_main:
            atomic_write_json(stored_path, config)
            (self.out / RESULT_FILE).unlink(missing_ok=True)
            _recover(self.checkpoint_dir, STATE_FILE)
            _recover(self.best_dir, self.best_marker)
        distributed.barrier()  # the recovered checkpoint is in place before any rank reads it
        self.state = dict(initial) if initial is not None else fresh_state()
        if (self.checkpoint_dir / STATE_FILE).is_file():
            load(self.checkpoint_dir)
            self.state = json.loads((self.checkpoint_dir / STATE_FILE).read_text(encoding="utf-8"))
            self.resumed = True
            if w.is_main:
                trim_log(self.log_path, int(self.state["step"]))
            log.info("resumed %s at step %d (best %s at step %s)", self.out, self.state["step"], self.state.get("best"),
                     self.state.get("best_step"))
        elif self.resume and w.is_main:
            if self.log_path.exists():
                log.warning("%s has no complete checkpoint: starting again at step 0", self.out)
            trim_log(self.log_path, -1)
        distributed.barrier()
        return self.state

    # ------------------------------------------------------------------------------ saving

    def save_checkpoint(self, write: Writer) -> None:
        """``checkpoint/`` replaced whole by what ``write(folder)`` puts there (``state.json`` last); rank 0 only."""
        if distributed.world().is_main:
            _swap(self.checkpoint_dir, write, STATE_FILE)

    def save_best(self, write: Writer) -> None:
        """``best/`` replaced whole by what ``write(folder)`` puts there (the best marker last); rank 0 only."""
        if distributed.world().is_main:
            _swap(self.best_dir, write, self.best_marker)

    def validation(self, evaluate: Callable[[int], dict[str, Any]], metric: str, *, higher_is_better: bool,
                   write_best: Callable[[Path, int, dict[str, Any]], None], time_key: str = "val_s") -> Callable[[int], dict[str, Any]]:
        """The validation of step ``s``: ``evaluate(s)``'s metrics plus their wall time under
        ``time_key``; when ``metric`` improves on ``state["best"]``, the state records it and
        ``best/`` is saved by ``write_best(folder, s, metrics)``. A result without ``metric`` keeps the best.
        In an N-process run rank 0 evaluates and every rank gets its metrics."""
        def validate_step(step: int) -> dict[str, Any]:
            t = time.perf_counter()
            res = evaluate(step) if distributed.world().is_main else None
            if res is not None:
                res[time_key] = round(time.perf_counter() - t, 2)
            res = distributed.broadcast_object(res)
            value, best = res.get(metric), self.state["best"]
            if value is not None and (best is None or (value > best if higher_is_better else value < best)):
                self.state["best"], self.state["best_step"] = value, step
                self.save_best(lambda folder: write_best(folder, step, res))
                log.info("step %d: new best %s = %.5g", step, metric, value)
            return res

        return validate_step

    # ------------------------------------------------------------------------------ the loop

    def loop(self, *, total: int, eval_every: int, desc: str, step: Callable[[int], dict[str, Any]],
             validate: Callable[[int], dict[str, Any]], write_checkpoint: Writer,
             postfix: Callable[[dict[str, Any]], dict[str, Any]], first_row: dict[str, Any] | None = None,
             should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Start the clock (continuing ``elapsed_s``); a run that loaded no checkpoint first logs
        its step-0 validation (``{"step": 0, **first_row, "elapsed_s", **metrics}``); then
        :func:`eval_harness.train.loop.run_steps` with checkpoints saved by :meth:`save_checkpoint`."""
        t0 = start_clock(self.state)
        if not self.resumed:
            res = validate(0)
            if distributed.world().is_main:
                append_log(self.log_path, {"step": 0, **(first_row or {}), "elapsed_s": round(time.perf_counter() - t0, 2), **res})
        return run_steps(LoopSettings(self.out, total, eval_every, desc), self.state, t0, step, validate,
                         lambda: self.save_checkpoint(write_checkpoint), postfix, should_stop)


# ---------------------------------------------------------------------------------- folder swap


def _sibling(folder: Path, suffix: str) -> Path:
    return folder.with_name(folder.name + suffix)


def _swap(folder: Path, write: Writer, marker: str) -> None:
    """Fill ``<folder>.new`` with ``write``, then rename ``folder`` to ``<folder>.old`` and
    ``<folder>.new`` to ``folder``, and delete the old copy (see the module docstring)."""
    new, old = _sibling(folder, _NEW), _sibling(folder, _OLD)
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    write(new)
    if not (new / marker).is_file():
        raise RuntimeError(f"the writer of {folder.name}/ did not write its marker {marker}")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def _recover(folder: Path, marker: str) -> None:
    """Finish a swap a kill interrupted: the newest complete copy among ``<folder>.new``, ``folder``
    and ``<folder>.old`` becomes ``folder``; the other copies are deleted."""
    copies = [_sibling(folder, _NEW), folder, _sibling(folder, _OLD)]
    found = next((c for c in copies if (c / marker).is_file()), None)
    if found is not None and found != folder:
        log.warning("recovering %s from %s (the run was killed while saving it)", folder, found.name)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(found, folder)
    for c in (copies[0], copies[2]):
        shutil.rmtree(c, ignore_errors=True)
