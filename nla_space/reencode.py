"""Re-encoders: map candidate texts back to activations so they can be scored against ``v``.

Backbone self-re-encode (SRT cards; the round trip of the SRT eval scripts, ``docs/references.md``): the generated token ids themselves, not
decoded and re-tokenized, **prefix-free and without BOS**, masked EOS-inclusive
(:func:`nla_space.rollout.eos_inclusive_mask`), through the truncated forward at the card's layer;
the vector is read at the last valid position (the first stop token if any, else the last token).
The published anchors depend on this exact convention.
"""

from __future__ import annotations

import torch

from .activations import hidden_at_layer, read_last_valid
from .backbone import Backbone


@torch.inference_mode()
def reencode_ids(backbone: Backbone, layer: int, ids: torch.Tensor, mask: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Vectors ``(B, d)`` (float32) of right-padded candidate ids ``(B, T)`` under ``mask``."""
    out = []
    for i in range(0, ids.shape[0], batch_size):
        chunk_ids, chunk_mask = ids[i : i + batch_size], mask[i : i + batch_size]
        # Trim columns that are padding in every row of the chunk (padding-aware batching).
        width = int(chunk_mask.sum(dim=1).max())
        chunk_ids, chunk_mask = chunk_ids[:, :width], chunk_mask[:, :width]
        hidden = hidden_at_layer(backbone, layer, input_ids=chunk_ids, attention_mask=chunk_mask)
        out.append(read_last_valid(hidden, chunk_mask).float())
    return torch.cat(out, dim=0)
