"""The one step loop of the eval_harness trainers (``train``, ``train-av-lora``, ``train-ar``, ``train-grpo``).

A trainer builds its model, optimizer and state, then hands :func:`run_steps` four callables: the
step (one optimizer update; returns the step's log fields), the validation (returns its metrics and
keeps ``best/``), the checkpoint save, and the progress-bar postfix. The conventions below hold for
every trainer; their module docstrings refer here.

Batch order
    Step ``s`` (0-based) of an epoch-based trainer takes batch ``s mod steps_per_epoch`` of epoch
    ``s // steps_per_epoch``, where ``steps_per_epoch = ceil(n / batch_size)`` and the epoch's order
    is ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))``
    (:func:`epoch_batch`): every row once per epoch (the last batch of an epoch may be short), and a
    resumed run sees exactly the batches an uninterrupted one would. (GRPO draws its batch from a
    generator seeded by the step instead; the same holds.)
Log rows
    After step ``s`` one JSON row ``{"step": s + 1, <the step's fields>, "elapsed_s", <validation
    metrics>}`` is appended to ``log.jsonl``. Validation steps are every ``eval_every``-th step and
    the last one; the trainers log a validation row ``step 0`` themselves before the first step.
Log before checkpoint
    On a validation step the row is appended *before* the checkpoint (``state.json`` with the step
    and ``elapsed_s``) is saved, so a checkpoint never lacks its log rows; rows past the checkpoint
    (a kill between the two) are dropped by :func:`trim_log` on ``--resume`` and redone.
N processes
    Only rank 0 logs, checkpoints and writes ``result.json``; the stop flags are ORed over the
    ranks at each step boundary (:mod:`eval_harness.distributed`).
What a stop or kill leaves
    SIGTERM/SIGINT (:class:`StopFlag`) only set a flag: the current step finishes (logged, and
    validated and checkpointed if it is a validation step), then the loop stops. On any exit from
    the loop (the end, a signal, an exception) the ``finally`` saves a checkpoint at the step
    reached; without an exception :func:`run_steps` then sets ``stopped_early`` and ``total_steps``
    in the state and writes ``result.json``. A hard kill (SIGKILL, power loss) leaves the last saved
    checkpoint and the log rows up to the kill; ``--resume`` continues from that checkpoint.
Elapsed time
    ``elapsed_s`` is carried in the state across resumes: the trainer's clock ``t0`` is
    ``perf_counter() − state["elapsed_s"]`` (:func:`start_clock`).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import torch
from tqdm import tqdm

from nla_space.io import atomic_write_json, atomic_write_text, jsonl_lines

from .. import distributed

log = logging.getLogger(__name__)

T = TypeVar("T")


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints and stops at the next step boundary."""

    def __init__(self) -> None:
        self.stop = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("signal %d: saving a checkpoint and stopping", signum)
        self.stop = True

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------------------------ run folder



def append_log(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def trim_log(path: Path, max_step: int) -> None:
    """Drop log rows after the checkpoint being resumed (they will be redone)."""
    if not path.is_file():
        return
    keep = []
    for ln in jsonl_lines(path.read_text(encoding="utf-8")):
        try:
            if ln.strip() and json.loads(ln)["step"] <= max_step:
                keep.append(ln)
        except (json.JSONDecodeError, KeyError, TypeError):  # a line cut by a kill mid-write
            continue
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def start_clock(state: dict[str, Any]) -> float:
    """``t0`` such that ``perf_counter() − t0`` continues the state's ``elapsed_s``."""
    return time.perf_counter() - float(state.get("elapsed_s", 0.0))


# ---------------------------------------------------------------------------------- batch order


def epoch_schedule(n: int, batch_size: int, epochs: float, max_steps: int | None) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)``: ``max_steps`` if given, else ``round(epochs · steps_per_epoch)`` (≥ 1)."""
    spe = math.ceil(n / batch_size)
    total = max_steps if max_steps is not None else max(1, int(round(epochs * spe)))
    return spe, total


def epoch_batch(items: Sequence[T], step: int, batch_size: int, seed: int) -> list[T]:
    """The items of step ``step`` (0-based): batch ``step mod steps_per_epoch`` of the epoch's
    permutation seeded ``seed + epoch`` (see the module docstring)."""
    epoch, pos = divmod(step, math.ceil(len(items) / batch_size))
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [items[j] for j in perm[pos * batch_size : (pos + 1) * batch_size]]


class SupervisedStep:
    """The step of the epoch-based (supervised) trainers: :func:`epoch_batch`, the LR on every param
    group (when ``lr_at`` is given), ``loss_fn(batch, step)``, zero_grad / backward / clip / step.
    Returns the log fields ``epoch``, ``loss`` (and ``lr``); keeps an EMA of the loss for the bar.

    In an N-process run (:mod:`eval_harness.distributed`) each rank computes ``loss_fn`` on its
    slice of the global batch, weighted by ``units(slice) / units(batch)`` (``units``: what the
    loss is a mean over, e.g. its tokens; default the rows), and the gradients are summed over
    ranks before the clip, so the update and the logged loss are the single-process ones."""

    def __init__(self, items: Sequence[Any], batch_size: int, seed: int, opt: torch.optim.Optimizer, params: Iterable[torch.Tensor],
                 grad_clip: float, loss_fn: Callable[[list[Any], int], torch.Tensor], lr_at: Callable[[int], float] | None = None,
                 units: Callable[[list[Any]], float] = len):
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.spe = math.ceil(len(items) / batch_size)
        self.opt, self.params, self.grad_clip = opt, list(params), grad_clip
        self.loss_fn, self.lr_at, self.units = loss_fn, lr_at, units
        self.ema: float | None = None

    def _loss(self, batch: list[Any], step: int) -> tuple[torch.Tensor | None, float]:
        """This rank's weighted loss (None for an empty slice) and its value as logged."""
        if not distributed.world().distributed:
            loss = self.loss_fn(batch, step)
            return loss, float(loss.detach())
        mine = distributed.shard(batch)
        w = distributed.world()
        torch.manual_seed((self.seed * 1_000_003 + step) * 1_009 + w.rank)  # dropout masks: per rank (distributed.py)
        own, total = (float(self.units(mine)) if mine else 0.0), float(self.units(batch))
        loss = self.loss_fn(mine, step) * (own / total) if mine else None
        (logged,) = distributed.all_reduce_sum([float(loss.detach()) if loss is not None else 0.0])
        return loss, logged

    def __call__(self, step: int) -> dict[str, Any]:
        batch = epoch_batch(self.items, step, self.batch_size, self.seed)
        lr = None
        if self.lr_at is not None:
            lr = self.lr_at(step)
            for g in self.opt.param_groups:  # a group may carry an "lr_scale" (e.g. the AV's projection)
                g["lr"] = lr * g.get("lr_scale", 1.0)
        self.opt.zero_grad(set_to_none=True)
        loss, lv = self._loss(batch, step)
        if loss is not None:
            loss.backward()
        distributed.all_reduce_grads(self.params)
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.ema = lv if self.ema is None else 0.9 * self.ema + 0.1 * lv
        fields: dict[str, Any] = {"epoch": round((step + 1) / self.spe, 4), "loss": round(lv, 5)}
        if self.lr_at is not None:
            fields["lr"] = lr
        return fields

    def postfix(self, state: dict[str, Any], loss_fmt: str = ".3f", best_fmt: str = ".3f") -> Callable[[dict[str, Any]], dict[str, Any]]:
        """The bar's ``loss`` (EMA) and ``best`` (of ``state``), for :func:`run_steps`."""
        return lambda row: {"loss": format(self.ema, loss_fmt),
                            "best": format(state["best"], best_fmt) if state["best"] is not None else "-"}


# ------------------------------------------------------------------------------------------- loop


@dataclass
class LoopSettings:
    out: Path  #: the run folder: ``log.jsonl`` and ``result.json`` are written there
    total: int  #: steps of the whole run
    eval_every: int  #: validate and checkpoint every this many steps (and at the last)
    desc: str  #: progress-bar label


def run_steps(settings: LoopSettings, state: dict[str, Any], t0: float, step_fn: Callable[[int], dict[str, Any]],
              validate: Callable[[int], dict[str, Any]], save_checkpoint: Callable[[], None],
              postfix: Callable[[dict[str, Any]], dict[str, Any]], should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run steps ``state["step"] .. settings.total − 1`` (see the module docstring for the log,
    checkpoint and stop conventions). ``step_fn(s)`` does step ``s`` and returns its log fields
    (``step`` and ``elapsed_s`` are added here); ``validate(s)`` returns the metrics added to the
    row of a validation step; ``save_checkpoint()`` saves the state (whose ``step`` and ``elapsed_s``
    are set before); ``should_stop()`` ends the run early at a step boundary. Returns the state with
    ``stopped_early`` and ``total_steps``, also written to ``result.json``."""
    total = settings.total
    log_path = settings.out / "log.jsonl"
    step = int(state["step"])
    main = distributed.world().is_main
    bar = tqdm(total=total, initial=step, desc=settings.desc, unit="step", dynamic_ncols=True, disable=not main)

    def stopping(flag: StopFlag) -> bool:  # every rank stops at the same step (a signal may reach them apart)
        return distributed.any_rank(flag.stop or (should_stop is not None and should_stop()))

    with StopFlag() as flag:
        try:
            while step < total and not stopping(flag):
                fields = step_fn(step)
                step += 1
                row: dict[str, Any] = {"step": step, **fields, "elapsed_s": round(time.perf_counter() - t0, 2)}
                at_val = step % settings.eval_every == 0 or step == total
                if at_val:
                    row.update(validate(step))
                if main:
                    append_log(log_path, row)  # before the checkpoint: a kill between them only redoes steps
                if at_val:
                    state.update(step=step, elapsed_s=time.perf_counter() - t0)
                    save_checkpoint()
                bar.set_postfix(**postfix(row))
                bar.update(1)
        finally:
            bar.close()
            state.update(step=step, elapsed_s=time.perf_counter() - t0)
            save_checkpoint()
    state["stopped_early"] = step < total
    state["total_steps"] = total
    if main:
        atomic_write_json(settings.out / "result.json", state)
    distributed.barrier()
    return state
