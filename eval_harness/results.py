"""Results files: the ``meta`` block, atomic writes, per-target resume, per-sample logs.

Every eval command writes **one JSON file**: the reference key names (the SRT eval scripts', ``docs/evals.md``) at the top
level, plus ``meta`` (:func:`run_meta`): command, card, backbone + revision, layer, M, K, pool
size, seed, targets folder and split, μ source, git commit, package versions, device, start/finish
time and wall time. Written atomically (:func:`nla_space.io.atomic_write_json`).

Resume: while it runs, a command appends one JSON line per finished target to
``<out>.partial.jsonl`` (flushed and fsynced), after a header line holding the run's
*fingerprint* (every setting that changes the numbers). ``--resume`` reads the finished targets
back and continues with the next; a header that does not match the current settings is refused.
Each target's randomness depends on (seed, target row) only, so a resumed run writes the same
numbers as an uninterrupted one. The partial file is removed once the final JSON is written.

N processes (:mod:`eval_harness.distributed`): the targets are split over the ranks (target j of
the list to rank ``j mod N``), each rank appends its records to ``<out>.partial.rank<R>.jsonl``,
rank 0 gathers all records in target order and writes the results. ``--resume`` reads every
partial file there is (of one process or of any N), so a run may be resumed with another N.

``--log-samples FILE.jsonl``: one line per target (its candidates, texts and scores), written
atomically at the end from the same records.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from nla_space.cards import REPO_ROOT
from nla_space.errors import NLAInputError
from nla_space.io import atomic_write_json, atomic_write_text, jsonl_lines

from . import distributed

log = logging.getLogger(__name__)

PACKAGES = ("torch", "transformers", "safetensors", "huggingface-hub", "numpy", "tokenizers", "nla-space")


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def git_commit(root: Path = REPO_ROOT) -> str | None:
    """``HEAD`` of the repository, with ``+dirty`` when the working tree has changes; None outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=20)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info(device: Any) -> str:
    import torch

    dev = str(device)
    if dev.startswith("cuda") and torch.cuda.is_available():
        return f"{dev} ({torch.cuda.get_device_name(torch.device(dev))})"
    return f"{dev} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()})"


def precision_info(backbone: Any) -> str:
    """The backbone's compute dtype as a results file records it; a bfloat16 CPU backbone names its
    mode (:mod:`nla_space.cpu_bf16`): ``bfloat16 (reference)`` or ``bfloat16 (fast)``."""
    from nla_space import cpu_bf16

    name = backbone.dtype_name
    if name == "bfloat16" and backbone.device.type == "cpu":
        name += f" ({cpu_bf16.mode_of(backbone.model)})"
    return name


def portable(value: Any, root: Path = REPO_ROOT) -> Any:
    """``value`` with every absolute path string made portable: relative to the repository (``root``)
    when under it, ``~/…`` when under the home folder; other values unchanged (dicts and lists walked)."""
    if isinstance(value, dict):
        return {k: portable(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, root) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        p = Path(value)
        for base, prefix in ((root.resolve(), ""), (Path.home().resolve(), "~/")):
            if p.is_relative_to(base):
                return prefix + p.relative_to(base).as_posix()
    return value


def run_meta(command: str, fields: dict[str, Any], started: float, started_iso: str, out: Path,
             args: Any = None) -> dict[str, Any]:
    """The ``meta`` block: the command's own fields plus provenance and timing; ``args`` (the parsed
    arguments) are recorded as strings. Paths are recorded relative to the repository (:func:`portable`),
    so a results file does not carry the layout of the machine that ran it."""
    meta = {"command": command, **fields}
    meta.update({
        "path": str(out),
        "args": {k: (None if v is None else v if isinstance(v, (bool, int, float)) else str(v))
                 for k, v in sorted(vars(args).items()) if k != "command"} if args is not None else None,
        "git_commit": git_commit(),
        "packages": package_versions(),
        "started": started_iso,
        "finished": now_iso(),
        "wall_time_s": round(time.time() - started, 2),
    })
    return portable(meta)


@dataclass
class Checkpoint:
    """Per-target partial results beside ``out`` (see the module docstring)."""

    out: Path
    fingerprint: dict[str, Any]
    resume: bool
    records: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        """This process's partial file (``.partial.jsonl``; ``.partial.rank<R>.jsonl`` of an N-process run)."""
        w = distributed.world()
        return self.out.with_name(self.out.name + (f".partial.rank{w.rank}.jsonl" if w.distributed else ".partial.jsonl"))

    def _all_paths(self) -> list[Path]:
        """Every partial file of this output (any world size)."""
        single = self.out.with_name(self.out.name + ".partial.jsonl")
        ranks = sorted(self.out.parent.glob(self.out.name + ".partial.rank*.jsonl")) if self.out.parent.is_dir() else []
        return [q for q in [single, *ranks] if q.is_file()]

    def _read(self, path: Path, fp: dict[str, Any]) -> None:
        lines = [ln for ln in jsonl_lines(path.read_text(encoding="utf-8")) if ln.strip()]
        header = json.loads(lines[0]) if lines else {}
        if header.get("fingerprint") != fp:
            diff = sorted(k for k in set(fp) | set(header.get("fingerprint", {}))
                          if fp.get(k) != header.get("fingerprint", {}).get(k))
            raise NLAInputError(f"{path}: cannot resume, the settings differ from the interrupted run ({', '.join(diff)}); "
                                "rerun without --resume to start over")
        for ln in lines[1:]:
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError:
                log.warning("%s: dropping a truncated last line", path)
                break
            self.records[int(rec["target"])] = rec

    def open(self) -> "Checkpoint":
        fp = json.loads(json.dumps(self.fingerprint))  # normalised as it will be read back
        found = self._all_paths()
        if self.resume and found:
            for path in found:
                self._read(path, fp)
            log.info("resuming: %d target(s) already done in %s", len(self.records), ", ".join(str(q) for q in found))
        distributed.barrier()  # every rank has read the old files before any is replaced
        if not self.resume and distributed.world().is_main:
            for path in found:
                log.info("starting over: removing %s (pass --resume to continue it)", path)
                path.unlink(missing_ok=True)
        distributed.barrier()
        if not self.path.is_file() or not self.resume:
            atomic_write_text(self.path, json.dumps({"fingerprint": fp}) + "\n")
        return self

    def add(self, record: dict[str, Any]) -> None:
        self.records[int(record["target"])] = record
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def run(self, targets: list[int], work: Callable[[int], dict[str, Any]], desc: str) -> list[dict[str, Any]]:
        """Records for ``targets`` in order, computing (with a tqdm bar) only the missing ones; with
        N processes this rank computes its share and every rank gets all records."""
        from tqdm import tqdm

        todo = [t for t in distributed.shard(targets) if t not in self.records]
        w = distributed.world()
        for t in tqdm(todo, desc=desc, unit="target", initial=max(0, len(targets) - len(todo) * w.size), total=len(targets),
                      dynamic_ncols=True, disable=not w.is_main):
            self.add(work(t))
        if w.distributed:
            for part in distributed.gather_objects({t: self.records[t] for t in todo}):
                self.records.update({int(t): r for t, r in part.items()})
        return [self.records[t] for t in targets]

    def finish(self) -> None:
        """Remove the partial files (rank 0, once the results are written)."""
        if distributed.world().is_main:
            for path in self._all_paths():
                path.unlink()


def write_results(out: Path, results: dict[str, Any], samples: list[dict[str, Any]] | None = None, log_samples: Path | None = None) -> None:
    """The final JSON (atomically) and, when asked, the per-sample JSONL."""
    atomic_write_json(out, results)
    if log_samples is not None and samples is not None:
        atomic_write_text(log_samples, "".join(json.dumps(s, ensure_ascii=False, allow_nan=False) + "\n" for s in samples))


def load_results(paths: list[Path]) -> Iterator[dict[str, Any]]:
    """Results JSONs from files or folders (``*.json`` inside, recursively), skipping non-results."""
    for p in paths:
        files = sorted(Path(p).rglob("*.json")) if Path(p).is_dir() else [Path(p)]
        for f in files:
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
                log.warning("skipping %s: %s", f, exc)
                continue
            if isinstance(data, dict) and isinstance(data.get("meta"), dict) and data["meta"].get("command"):
                data["meta"].setdefault("path", str(f))
                yield data
