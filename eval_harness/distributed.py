"""Data parallelism for the harness: one command run as N processes by ``torchrun`` or ``accelerate launch``.

The launcher (not this module) starts the processes and sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
and the rendezvous address; :func:`world` joins the process group through ``accelerate``'s
``PartialState`` (NCCL on CUDA, gloo on CPU). Without a launcher, or with ``WORLD_SIZE=1``, nothing
is initialised and every helper below is the identity: one process runs exactly as before.

The rules every sharded command follows (one place, used by the trainers, ``targets`` and the evals)

Who writes
    Rank 0 writes run folders and results; the other ranks compute and send. The exceptions are
    each one atomic file of its own: a target shard is written by the rank that made it, and an
    eval's per-rank partial file by its rank. Run folders and outputs must be on a filesystem every
    rank sees (a resume reads the checkpoint on every rank).
Training: one global batch, split
    Step ``s`` takes the same global batch in every world size (:func:`eval_harness.train.loop.epoch_batch`);
    rank r trains on its slice ``batch[r::N]`` (:func:`shard`). Each rank's loss is weighted by
    its share of the batch's units (tokens or rows, the trainer says which), gradients are summed
    over ranks (:func:`all_reduce_grads`), then clipped and stepped on every rank: the update is the
    one a single process makes on the whole batch, up to float summation order. So ``batch_size``
    is the *effective* batch size at every N, the LR schedule is per global step, and a run may be
    resumed with another N.
    Why not ``DistributedDataParallel``: the AVs run the backbone through hooks (the patch, the
    injected embeddings) and GRPO runs several forwards per update, which DDP's one-forward /
    one-backward bucketing does not fit; the trainable parameters are LoRA-sized (≈ 1 M here), so
    one all-reduce after the backward costs what DDP's would.
Validation
    Rank 0 validates and broadcasts the metrics (:func:`broadcast_object`), so every rank takes the
    same best/stop decisions.
Sharded lists of items (targets, evals)
    The j-th item of the list still to do (in the single-process order; the list is made before
    any rank writes) goes to rank ``j mod N``, is computed with its own seed
    (the item's, never the rank's), and rank 0 gathers the results back into item order
    (:func:`gather_in_order`) before writing: the files are those of one process.
Stopping
    A signal may reach the ranks at different steps; the loop ORs the stop flags at each step
    boundary (:func:`any_rank`), so all ranks stop at the same step.
Randomness inside a step
    A trainer with dropout (``--lora-dropout`` > 0) draws each rank's masks from a generator seeded
    by (seed, step, rank): resumable and reproducible at a given N, but not equal to one process's
    masks. With dropout 0 (the tests) an N-process run equals one process.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence, TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` (``local_rank`` on its machine)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_int(*names: str, default: int) -> int:
    for n in names:
        if os.environ.get(n, "").strip():
            return int(os.environ[n])
    return default


TIMEOUT_ENV = "NLA_DIST_TIMEOUT_S"  #: how long a rank waits in a collective (default 3 h: rank 0 may validate or aggregate alone)
DEFAULT_TIMEOUT_S = 3 * 3600


@functools.lru_cache(maxsize=1)
def world() -> World:
    """The process group of this run: one an engine already initialised, else joined once (through
    ``accelerate.PartialState``, with a ``$NLA_DIST_TIMEOUT_S`` timeout) when a launcher started
    more than one process; ``World()`` otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=_env_int("LOCAL_RANK", default=0))
    size = _env_int("WORLD_SIZE", default=1)
    if size <= 1:
        return World()
    from datetime import timedelta

    from accelerate import PartialState

    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S))
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timeout)
    w = World(rank=int(state.process_index), size=int(state.num_processes), local_rank=int(state.local_process_index))
    log.info("rank %d of %d (%s backend)", w.rank, w.size, state.backend)
    return w


def rank_device(device: str | None) -> str | None:
    """The device of this rank: ``cuda:LOCAL_RANK`` when the command asks for CUDA (or ``auto`` on a
    CUDA machine) in a multi-process run, else ``device`` unchanged."""
    w = world()
    if not w.distributed:
        return device
    wants_cuda = (device or "auto") == "auto" and torch.cuda.is_available() or str(device).startswith("cuda")
    if not wants_cuda:
        return device
    from nla_space.placement import placement_from_env

    if placement_from_env() is not None:
        from nla_space.errors import NLAInputError

        raise NLAInputError("$NLA_DEVICE_MAP splits one backbone over several GPUs; it cannot be combined with N processes, "
                            "which each hold a whole copy (unset one of them)")
    return f"cuda:{w.local_rank % max(torch.cuda.device_count(), 1)}"


def _group_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def shard(items: Sequence[T]) -> list[T]:
    """This rank's items: ``items[rank::size]`` (all of them in one process)."""
    w = world()
    return list(items) if not w.distributed else list(items[w.rank :: w.size])


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums over ranks (float64), in one call."""
    if not world().distributed:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_group_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any rank."""
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0 if world().distributed else flag


def all_reduce_grads(params: Iterable[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over ranks in place, flattened into one buffer per dtype so
    it is one collective each. A parameter no rank gave a gradient keeps ``grad is None`` (as in one
    process, where the optimizer then skips it: AdamW would otherwise move it by its momentum);
    one that some rank lacks counts as zeros there."""
    if not world().distributed:
        return
    import torch.distributed as dist

    params = [p for p in params if p.requires_grad]
    has = all_reduce_sum([0.0 if p.grad is None else 1.0 for p in params])
    params = [p for p, h in zip(params, has) if h > 0]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dev = _group_device()
        buf = flat.to(dev)
        dist.all_reduce(buf)
        buf = buf.to(flat.device)
        off = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(buf[off : off + n].view_as(p.grad))
            off += n


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    if not world().distributed:
        return obj
    import torch.distributed as dist

    box = [obj if world().is_main else None]
    dist.broadcast_object_list(box, src=0, device=_group_device())
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    w = world()
    if not w.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, obj)
    return out


def gather_in_order(mine: Sequence[T], n: int) -> list[T]:
    """The per-item results of :func:`shard` (``mine`` = this rank's, in its order) put back in
    item order ``0 … n−1`` on every rank."""
    w = world()
    if not w.distributed:
        return list(mine)
    parts = gather_objects(list(mine))
    out: list[Any] = [None] * n
    for r, part in enumerate(parts):
        for j, x in enumerate(part):
            out[r + j * w.size] = x
    return out


def barrier() -> None:
    if world().distributed:
        import torch.distributed as dist

        dist.barrier()
