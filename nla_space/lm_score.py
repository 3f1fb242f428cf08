"""How likely a token row is as text under a backbone's own LM head: the one implementation behind
guided decoding's fluency prior (:mod:`nla_space.guided`) and the fluency judge of ``reading-eval``
(:mod:`eval_harness.evals.fluency`, perplexity = exp(−mean log-probability)).

Convention: a row is read as ``[BOS] + row`` (no BOS on a backbone without one, and then the first
token, having no context, is not scored); every other token of the row is scored by the model's
prediction from the tokens before it. No stop token is appended.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .backbone import Backbone


@torch.inference_mode()
def mean_logprobs(backbone: Backbone, rows: Sequence[Sequence[int]], batch_size: int = 16) -> list[float | None]:
    """Mean log-probability per scored token (nats) of each row (module docstring); None for a row with no scored token."""
    start = [backbone.bos_id] if backbone.bos_id is not None else []
    full = [start + [int(t) for t in r] for r in rows]
    out: list[float | None] = []
    for i in range(0, len(full), batch_size):
        chunk = full[i : i + batch_size]
        T = max(max(len(r) for r in chunk), 2)
        ids = torch.full((len(chunk), T), backbone.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for b, r in enumerate(chunk):
            if r:
                ids[b, : len(r)] = torch.tensor(r)
                mask[b, : len(r)] = 1
        logits = backbone.model(input_ids=ids.to(backbone.device), attention_mask=mask.to(backbone.device)).logits.float().cpu()
        lp = -torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="none").view(len(chunk), T - 1)
        m = mask[:, 1:].float()
        for b in range(len(chunk)):
            k = float(m[b].sum())
            out.append(float((lp[b] * m[b]).sum()) / k if k > 0 else None)
    return out
