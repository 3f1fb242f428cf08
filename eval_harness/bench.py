"""Timing of best-of-K: the project's path against a plain reference recipe, and the FLOP bound.

Both paths get the same card, the same activation and fixed-length rollouts (stop tokens
ignored), so they do the same amount of work:

* **project**: :meth:`nla_space.runtime.OpenCard.rollout` (KV-cached loop, LM head on the last
  position only, one batched call) + :func:`nla_space.reencode.reencode_ids` (truncated forward,
  blocks < ℓ only).
* **plain**: ``model.generate(inputs_embeds=…, do_sample=True)`` on the K-times repeated prefix +
  a full-depth re-encode with ``output_hidden_states=True`` (the reference scripts' recipe).

FLOP bound: matmul FLOPs of the work (2 × params touched per token, the LM head per sampled token,
attention scores) divided by the machine's measured matmul throughput.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from nla_space.activations import extract
from nla_space.reencode import reencode_ids
from nla_space.rollout import eos_inclusive_mask
from nla_space.runtime import OpenCard

log = logging.getLogger(__name__)


@dataclass
class BenchRow:
    k: int
    tokens: int
    project_s: float
    plain_s: float
    project_sample_s: float
    project_score_s: float
    plain_sample_s: float
    plain_score_s: float
    flop_bound_s: float

    @property
    def speedup(self) -> float:
        return self.plain_s / self.project_s

    @property
    def fraction_of_bound(self) -> float:
        return self.flop_bound_s / self.project_s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            speedup=round(self.speedup, 3),
            fraction_of_flop_bound=round(self.fraction_of_bound, 3),
            project_candidates_per_s=round(self.k / self.project_s, 3),
            plain_candidates_per_s=round(self.k / self.plain_s, 3),
        )
        return d


@dataclass
class BenchReport:
    card: str
    device: str
    threads: int
    matmul_gflops: float
    cold_start_s: float | None
    warm_start_s: float | None
    rows: list[BenchRow] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "card": self.card,
            "device": self.device,
            "threads": self.threads,
            "matmul_gflops": round(self.matmul_gflops, 1),
            "cold_start_s": self.cold_start_s,
            "warm_start_s": self.warm_start_s,
            "rows": [r.to_dict() for r in self.rows],
            **self.extra,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 5) -> float:
    """Measured dense matmul throughput (best of ``reps``), GFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def flop_count(opened: OpenCard, k: int, new_tokens: int, layer: int) -> float:
    """Matmul FLOPs of best-of-K: sampling through all blocks + LM head, re-encode through ℓ blocks."""
    cfg = opened.backbone.config
    d, n_layers = opened.backbone.hidden_size, opened.backbone.num_layers
    vocab = int(cfg.vocab_size)
    emb = vocab * d
    total_params = sum(p.numel() for p in opened.backbone.model.parameters())
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    block_params = (total_params - emb - (0 if tied else emb)) / n_layers
    P = opened.av.prefix_length
    # sampling: every prefix and generated position goes through all blocks; LM head per new token
    pos = k * (P + new_tokens)
    attn = 2 * 2 * d * n_layers * k * sum(P + t for t in range(new_tokens))
    sample = 2 * block_params * n_layers * pos + 2 * emb * k * new_tokens + attn
    # re-encode: new tokens through ℓ blocks, causal attention
    reenc = 2 * block_params * layer * k * new_tokens + 2 * 2 * d * layer * k * new_tokens * new_tokens / 2
    return float(sample + reenc)


def _plain(opened: OpenCard, v: torch.Tensor, k: int, new_tokens: int, layer: int, seed: int) -> tuple[float, float]:
    """The reference recipe: HF generate + full-depth re-encode with output_hidden_states."""
    bb = opened.backbone
    model = bb.model
    prefix = opened.av.embeds(v.to(bb.device)[None].expand(k, -1), bb, layer)
    torch.manual_seed(seed)
    _sync(bb.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        ids = model.generate(
            inputs_embeds=prefix,
            attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long, device=bb.device),
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=bb.pad_id,
        )
        _sync(bb.device)
        t1 = time.perf_counter()
        mask = eos_inclusive_mask(ids, [])
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
        _ = hs[layer][:, -1].float().cpu()
    _sync(bb.device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def _project(opened: OpenCard, v: torch.Tensor, k: int, new_tokens: int, layer: int, seed: int) -> tuple[float, float]:
    bb = opened.backbone
    gen = torch.Generator(device=bb.device).manual_seed(seed)
    prefix = opened.av.embeds(v.to(bb.device)[None].expand(k, -1), bb, layer)
    from nla_space.rollout import sample

    _sync(bb.device)
    t0 = time.perf_counter()
    roll = sample(bb, prefix, new_tokens, temperature=1.0, top_p=1.0, generator=gen, stop_ids=[])
    _sync(bb.device)
    t1 = time.perf_counter()
    h = reencode_ids(bb, layer, roll.ids, roll.mask)
    _ = h.cpu()
    _sync(bb.device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def run_bench(opened: OpenCard, ks: list[int], new_tokens: int = 64, text: str = "The Eiffel Tower is in Paris.", repeats: int = 1, seed: int = 0) -> BenchReport:
    """Time both paths for each K (best of ``repeats``), same card, same activation, same lengths."""
    bb = opened.backbone
    layer = opened.card.default_layer
    v = extract(bb, text, layer)
    gflops = matmul_gflops(bb.device, bb.dtype)
    report = BenchReport(
        card=opened.card.id,
        device=f"{bb.device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cpus)"
        if bb.device.type == "cpu"
        else torch.cuda.get_device_name(bb.device),
        threads=torch.get_num_threads(),
        matmul_gflops=gflops,
        cold_start_s=None,
        warm_start_s=None,
    )
    _project(opened, v, 2, 4, layer, seed)  # warm-up
    _plain(opened, v, 2, 4, layer, seed)
    for k in ks:
        proj = min((_project(opened, v, k, new_tokens, layer, seed) for _ in range(repeats)), key=sum)
        plain = min((_plain(opened, v, k, new_tokens, layer, seed) for _ in range(repeats)), key=sum)
        bound = flop_count(opened, k, new_tokens, layer) / (gflops * 1e9)
        row = BenchRow(
            k=k,
            tokens=new_tokens,
            project_s=sum(proj),
            plain_s=sum(plain),
            project_sample_s=proj[0],
            project_score_s=proj[1],
            plain_sample_s=plain[0],
            plain_score_s=plain[1],
            flop_bound_s=bound,
        )
        log.info("K=%d: project %.2fs, plain %.2fs (×%.2f), bound %.2fs", k, row.project_s, row.plain_s, row.speedup, bound)
        report.rows.append(row)
    return report
