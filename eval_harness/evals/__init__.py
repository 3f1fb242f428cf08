"""The evals: one :class:`~eval_harness.evals.base.EvalTask` class each, registered in :data:`EVALS`.

The CLI (``python -m eval_harness <name>``) and the leaderboard builder
(:mod:`eval_harness.leaderboard_build`) read evals from :data:`EVALS` only; adding an eval is one
class passed to :func:`register`. Shared machinery: :mod:`.common` (card, targets, pool, the sampled
step, statistics) and :mod:`.card_targets` (any card kind on a targets folder, several layers).
"""

from __future__ import annotations

from .base import EvalTask, Metric
from .centered_eval import CenteredEval
from .oracle_ceiling import OracleCeiling
from .policy_eval import PolicyEval
from .reading_eval import ReadingEvalTask
from .rerank_eval import RerankEval
from .roundtrip import Roundtrip

#: command name → eval class, in the order the leaderboard lists their rows
EVALS: dict[str, type[EvalTask]] = {}


def register(cls: type[EvalTask]) -> type[EvalTask]:
    """Add ``cls`` to :data:`EVALS` under its ``name`` (usable as a class decorator)."""
    EVALS[cls.name] = cls
    return cls


for _cls in (CenteredEval, RerankEval, OracleCeiling, PolicyEval, Roundtrip, ReadingEvalTask):
    register(_cls)

__all__ = ["EVALS", "EvalTask", "Metric", "register"]
