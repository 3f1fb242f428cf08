"""The eval base class: everything about one eval in one class (in the spirit of lm-evaluation-harness tasks).

An eval declares, as class attributes:

``name``             the command (``python -m eval_harness <name>``) and the results' ``meta.command``;
``table``            the leaderboard table its numbers fill (the card files' ``published`` key);
``help``             one line for ``--help``;
``supported_kinds``  the card kinds it accepts (keys of :data:`nla_space.runtime.CARD_KINDS`; any
                     other kind is refused before any work, :func:`eval_harness.evals.common.require_card_kind`);
``Config``           a dataclass whose fields are the command's options, one declaration per field
                     (:func:`eval_harness.settings.setting`; ``--snake-name`` for ``snake_name``);
``metrics``          the :class:`Metric` rows the leaderboard shows from its results,

and implements the run as hooks called by :meth:`EvalTask.run`, in this order: :meth:`open` (validate,
open the card and targets; returns the target ids), :meth:`fingerprint` (what a resume must match),
:meth:`process` (the per-target work: one JSON-able record with ``"target"``), :meth:`aggregate`
(records → the results' keys), :meth:`meta_fields`, :meth:`samples` (the ``--log-samples`` lines),
:meth:`write_extra` and :meth:`summary`. :meth:`flat_values` turns a results file back into the
flat ``key → number`` table the leaderboard reads (``M`` and ``K`` included where known).

With N processes (``torchrun``/``accelerate launch``) the targets are split over the ranks and
rank 0 aggregates and writes (:class:`eval_harness.results.Checkpoint`, :mod:`eval_harness.distributed`).

Conventions shared by every eval (targets, μ, seeds, resume, meta): :mod:`eval_harness.evals.common`
and :mod:`eval_harness.results`. The registry is :data:`eval_harness.evals.EVALS`.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .. import distributed
from ..results import Checkpoint, now_iso, run_meta, write_results
from ..settings import add_setting_options, settings_from_args


@dataclass(frozen=True)
class Metric:
    """One leaderboard row kind: ``key`` of ``table`` (a flattened results key, :meth:`EvalTask.flat_values`)."""

    table: str  #: the leaderboard table (an eval's ``table``, or a variant such as ``policy_eval_compass``)
    key: str  #: key name in the results (the SRT eval scripts' names where they exist, ``docs/evals.md``)
    label: str  #: human label; ``{K}`` is filled in
    k_dependent: bool = False  #: depends on the number of samples K (a row per K)
    centered: bool = True
    fve: bool = True  #: an fve_nrm score (ρ applies when centered)


class EvalTask:
    """One eval; see the module docstring. An instance is one run: ``cfg`` (a ``Config``) and the parsed ``args``."""

    name: ClassVar[str]
    table: ClassVar[str]
    help: ClassVar[str]
    supported_kinds: ClassVar[tuple[str, ...]]
    Config: ClassVar[type]
    metrics: ClassVar[tuple[Metric, ...]] = ()
    #: further leaderboard tables this eval's results may fill (chosen per file by :meth:`result_table`)
    variant_tables: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Any, args: argparse.Namespace | None = None) -> None:
        self.cfg = cfg
        self.args = args if args is not None else argparse.Namespace(**vars(cfg))

    # ------------------------------------------------------------------ command line

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        add_setting_options(p, cls.Config)

    @classmethod
    def main(cls, args: argparse.Namespace) -> int:
        """The command: parsed options → a run."""
        return cls(settings_from_args(cls.Config, args), args).run()

    # ------------------------------------------------------------------ leaderboard

    @classmethod
    def tables(cls) -> tuple[str, ...]:
        return (cls.table, *cls.variant_tables)

    @classmethod
    def result_table(cls, meta: dict[str, Any]) -> str:
        """The leaderboard table a results file of this eval fills (``meta``: its meta block)."""
        return cls.table

    @classmethod
    def flat_values(cls, results: dict[str, Any]) -> dict[str, Any]:
        """A results file's numbers as one flat dict (default: its top-level keys as they are)."""
        return {k: v for k, v in results.items() if k != "meta"}

    # ------------------------------------------------------------------ the run

    def open(self) -> list[int]:
        """Validate the options and the output location, open what the run needs; the target ids."""
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        raise NotImplementedError

    def process(self, target: int) -> dict[str, Any]:
        """The per-target work: one record (JSON-able, with ``"target"``), checkpointed as it comes."""
        raise NotImplementedError

    def aggregate(self, recs: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def meta_fields(self, results: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def samples(self, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return recs

    def write_extra(self, results: dict[str, Any], recs: list[dict[str, Any]]) -> None:
        """Files beside the results (none by default)."""

    def summary(self, results: dict[str, Any]) -> str:
        return f"{self.name} → {self.cfg.out}"

    def run(self) -> int:
        started, started_iso = time.time(), now_iso()
        targets = self.open()
        ckpt = Checkpoint(Path(self.cfg.out), self.fingerprint(), self.cfg.resume).open()
        recs = ckpt.run(targets, self.process, desc=self.name)
        if not distributed.world().is_main:  # N processes: rank 0 aggregates and writes (eval_harness.distributed)
            return 0
        results = self.aggregate(recs)
        results["meta"] = run_meta(self.name, self.meta_fields(results), started, started_iso, self.cfg.out, self.args)
        log_samples = getattr(self.cfg, "log_samples", None)
        write_results(self.cfg.out, results, self.samples(recs), Path(log_samples) if log_samples else None)
        self.write_extra(results, recs)
        ckpt.finish()
        print(self.summary(results))
        return 0
