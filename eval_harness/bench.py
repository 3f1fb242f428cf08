"""Timing of best-of-K: the project's path against a plain reference recipe, and the FLOP bound.

Both paths get the same card, the same activation and fixed-length rollouts (stop tokens
ignored), so they do the same amount of work:

* **project**: :meth:`nla_space.runtime.OpenCard.rollout` (KV-cached loop, LM head on the last
  position only, one batched call) + :func:`nla_space.reencode.reencode_ids` (truncated forward,
  blocks < ℓ only).
* **plain**: ``model.generate(inputs_embeds=…, do_sample=True)`` on the K-times repeated prefix +
  a full-depth re-encode with ``output_hidden_states=True`` (the reference scripts' recipe).

FLOP bound: matmul FLOPs of the work (2 × params touched per token, the LM head per sampled token,
attention scores) divided by the machine's measured matmul throughput **in the dtype of the path**
(``project_dtype`` for ``flop_bound_s``, ``plain_dtype`` for ``plain_flop_bound_s``; both measured
with the same square matmul, listed in ``matmul_gflops_by_dtype``).

Memory bound (``memory_bound_s``): the bytes the work must move at least — each of the rollout's
``tokens`` forwards (the prefill, then one per further token) reads all block weights and the LM
head once (for all K rows together) plus the KV cache so far, and the re-encode reads its blocks'
weights once — divided by the measured copy bandwidth of the device (``memory_gbps``: a large
tensor copy, read + write). On a GPU this is the HBM-bandwidth bound.

Pipelines (``pipelines``): the harness's own work per second, timed with its own functions on
the same card — ``targets`` sequences/s (:func:`eval_harness.data.targets.sample_ids` bare-BOS
self-samples of ``tokens`` tokens + :func:`~eval_harness.data.targets.encode_ids`) and
``centered-eval`` targets/s (:func:`eval_harness.evals.common.sample_target`: greedy + K samples, re-encoded
and scored, stop tokens honoured, on those sequences' activations).

``random_weights_card`` opens a card's backbone *shape* (``backbone.shape`` in the card file) with
random weights, so real-size timings need no download (issue 7, GPU part).

Dtypes: the project path runs in its card's backbone dtype (``bench --dtype``; float32 on CPU unless
asked), the plain path in ``--plain-dtype`` (float32 on CPU: the reference recipe's). Both run on
the same AV weights (:meth:`nla_space.runtime.OpenCard.with_dtype`). When the project path runs in
bfloat16, :func:`dtype_fidelity` measures what that costs in scores against float32.
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
from nla_space.policy import score_vectors
from nla_space.reencode import reencode_ids
from nla_space.scoring import cosine
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
    flop_bound_s: float  #: the project path's bound, at the matmul throughput of ``project_dtype``
    project_dtype: str = "float32"
    plain_dtype: str = "float32"
    plain_flop_bound_s: float | None = None  #: the plain path's bound, at the throughput of ``plain_dtype``
    memory_bound_s: float | None = None  #: the project path's bytes over the measured copy bandwidth

    @property
    def speedup(self) -> float:
        return self.plain_s / self.project_s

    @property
    def fraction_of_bound(self) -> float:
        return self.flop_bound_s / self.project_s

    @property
    def memory_bound_ratio(self) -> float | None:
        """project time / memory bound (the issue's GPU target: at most 3)."""
        return None if not self.memory_bound_s else self.project_s / self.memory_bound_s

    @property
    def plain_fraction_of_bound(self) -> float | None:
        return None if self.plain_flop_bound_s is None else self.plain_flop_bound_s / self.plain_s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        plain_frac = self.plain_fraction_of_bound
        d.update(
            speedup=round(self.speedup, 3),
            fraction_of_flop_bound=round(self.fraction_of_bound, 3),
            plain_fraction_of_flop_bound=None if plain_frac is None else round(plain_frac, 3),
            times_memory_bound=None if self.memory_bound_ratio is None else round(self.memory_bound_ratio, 3),
            project_candidates_per_s=round(self.k / self.project_s, 3),
            plain_candidates_per_s=round(self.k / self.plain_s, 3),
        )
        return d


@dataclass
class BenchReport:
    card: str
    device: str
    threads: int
    matmul_gflops: float  #: measured in ``project_dtype``
    cold_start_s: float | None
    warm_start_s: float | None
    rows: list[BenchRow] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    project_dtype: str = "float32"
    plain_dtype: str = "float32"
    matmul_gflops_by_dtype: dict[str, float] = field(default_factory=dict)
    memory_gbps: float | None = None  #: measured copy bandwidth (read + write), GB/s
    #: :func:`dtype_fidelity` of the bfloat16 project path against float32; None unless it ran in bfloat16
    bf16_fidelity: dict[str, Any] | None = None
    #: :func:`pipeline_rates`; None when not measured
    pipelines: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "card": self.card,
            "device": self.device,
            "threads": self.threads,
            "matmul_gflops": round(self.matmul_gflops, 1),
            "cold_start_s": self.cold_start_s,
            "warm_start_s": self.warm_start_s,
            "rows": [r.to_dict() for r in self.rows],
            "project_dtype": self.project_dtype,
            "plain_dtype": self.plain_dtype,
            "matmul_gflops_by_dtype": {k: round(v, 1) for k, v in self.matmul_gflops_by_dtype.items()},
            "memory_gbps": None if self.memory_gbps is None else round(self.memory_gbps, 1),
            **self.extra,
        }
        if self.bf16_fidelity is not None:
            out["bf16_fidelity"] = self.bf16_fidelity
        if self.pipelines is not None:
            out["pipelines"] = self.pipelines
        return out


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


def memory_gbps(device: torch.device, mbytes: int = 512, reps: int = 5) -> float:
    """Measured copy bandwidth (bytes read + bytes written per second, best of ``reps``), GB/s."""
    n = mbytes * 2**20 // 4
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best / 1e9


def _shape_counts(opened: OpenCard) -> tuple[int, int, int, float, int, int]:
    """(d, layers, vocab, params per block, KV width per layer (kv_heads × head_dim), bytes per element)."""
    cfg = opened.backbone.config
    d, n_layers = opened.backbone.hidden_size, opened.backbone.num_layers
    vocab = int(cfg.vocab_size)
    emb = vocab * d
    total_params = sum(p.numel() for p in opened.backbone.model.parameters())
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    block_params = (total_params - emb - (0 if tied else emb)) / n_layers
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(cfg, "head_dim", None) or d // heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads) * head_dim
    return d, n_layers, vocab, block_params, kv, opened.backbone.model.dtype.itemsize


def memory_bytes(opened: OpenCard, k: int, new_tokens: int, layer: int) -> float:
    """Least bytes best-of-K moves: the weights once per forward (``new_tokens`` forwards: the prefill,
    then one per further token) and once for the re-encode, plus the KV cache each forward reads."""
    d, n_layers, vocab, block_params, kv, elt = _shape_counts(opened)
    P = opened.av.prefix_length
    weights = (block_params * n_layers + vocab * d) * elt
    kv_reads = 2 * kv * n_layers * k * elt * sum(P + t for t in range(new_tokens))
    reenc = block_params * layer * elt
    return float(weights * new_tokens + kv_reads + reenc)


def flop_count(opened: OpenCard, k: int, new_tokens: int, layer: int) -> float:
    """Matmul FLOPs of best-of-K: sampling through all blocks + LM head, re-encode through ℓ blocks."""
    d, n_layers, vocab, block_params, _, _ = _shape_counts(opened)
    emb = vocab * d
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


def dtype_fidelity(
    opened: OpenCard,
    reference: OpenCard,
    text: str,
    k: int,
    new_tokens: int,
    seed: int = 0,
    layer: int | None = None,
) -> dict[str, Any]:
    """How far best-of-K in ``opened``'s dtype (e.g. bfloat16) strays from ``reference``'s (float32).

    Both cards must share the AV and μ (:meth:`OpenCard.with_dtype`). Both runs get the same
    activation (the reference's reading of ``text``) and the same seed, and sample with the card's
    own rollout (stop tokens honoured, at most ``new_tokens``). The score is the one selection uses
    (:func:`nla_space.policy.score_vectors`: centered when the card has μ, else raw), always float32.

    Keys: ``mean_abs_delta_score``/``max_abs_delta_score`` — |score in opened's dtype − score in
    the reference's| over the K candidates of the low-precision run, i.e. the same token ids
    re-encoded in both dtypes; ``same_best_pick`` — both dtypes pick the same one of those
    candidates; ``same_best_text_as_reference_run`` — the low-precision run's best text equals the
    best text of a whole reference run with the same seed (sampling may diverge, so this is the
    stricter test); ``identical_candidates`` — rows of both runs with identical token ids;
    ``best_score_in_reference`` vs ``reference_run_best_score`` — the low-precision pick scored in
    the reference dtype, and the reference run's own best; ``activation_cosine`` — cosine of the two
    dtypes' readings of ``text``.
    """
    layer = opened.card.default_layer if layer is None else layer
    v = extract(reference.backbone, text, layer)
    v_low = extract(opened.backbone, text, layer)

    def scores(oc: OpenCard, roll: Any) -> torch.Tensor:
        raw, cen = score_vectors(oc.reconstruct(roll, layer), v, oc.mu)
        return cen if cen is not None else raw

    with torch.inference_mode():
        roll = opened.rollout(v, k, 1.0, new_tokens, False, seed, layer)
        ref_roll = reference.rollout(v, k, 1.0, new_tokens, False, seed, layer)
        s_low = scores(opened, roll)
        s_low_in_ref = scores(reference, roll)
        s_ref = scores(reference, ref_roll)
    delta = (s_low - s_low_in_ref).abs()
    best, best_in_ref, ref_best = int(s_low.argmax()), int(s_low_in_ref.argmax()), int(s_ref.argmax())
    texts, ref_texts = opened.candidate_texts(roll), reference.candidate_texts(ref_roll)

    def row(r: Any, i: int) -> list[int]:
        return [int(t) for t in r.ids[i, : int(r.mask[i].sum())]]

    identical = sum(row(roll, i) == row(ref_roll, i) for i in range(min(roll.ids.shape[0], ref_roll.ids.shape[0])))
    out = {
        "dtype": opened.backbone.dtype_name,
        "reference_dtype": reference.backbone.dtype_name,
        "k": k,
        "max_new_tokens": new_tokens,
        "seed": seed,
        "layer": layer,
        "score": "centered" if opened.mu is not None else "raw",
        "activation_cosine": round(float(cosine(v_low, v)), 6),
        "mean_abs_delta_score": round(float(delta.mean()), 6),
        "max_abs_delta_score": round(float(delta.max()), 6),
        "same_best_pick": best == best_in_ref,
        "best_index": best,
        "reference_best_index": best_in_ref,
        "identical_candidates": int(identical),
        "same_best_text_as_reference_run": texts[best] == ref_texts[ref_best],
        "best_score_in_reference": round(float(s_low_in_ref[best]), 6),
        "reference_run_best_score": round(float(s_ref[ref_best]), 6),
    }
    log.info("%s vs %s fidelity (K=%d): mean |Δscore| %.4f, same pick %s", out["dtype"], out["reference_dtype"], k,
             out["mean_abs_delta_score"], out["same_best_pick"])
    return out


def pipeline_rates(opened: OpenCard, k: int, new_tokens: int, sequences: int = 16, targets: int = 1, seed: int = 0) -> dict[str, Any]:
    """``targets`` sequences/s and ``centered-eval`` targets/s, timed with the harness's functions."""
    from types import SimpleNamespace

    from .evals.common import EvalRun, sample_target
    from .data.targets import encode_ids, sample_ids

    bb = opened.backbone
    layer = opened.card.default_layer
    _sync(bb.device)
    t0 = time.perf_counter()
    rows = sample_ids(bb, sequences, new_tokens, torch.Generator(device=bb.device).manual_seed(seed))
    vectors = encode_ids(bb, layer, rows)
    _sync(bb.device)
    targets_s = time.perf_counter() - t0
    # The eval's per-target work on those activations; μ = their mean stands in for the μ pool's.
    run = EvalRun(oc=opened, ts=SimpleNamespace(vectors=vectors), layer=layer, targets=list(range(targets)),
                  pool=SimpleNamespace(mu=vectors.mean(dim=0)), K=k, temperature=1.0, max_new_tokens=new_tokens, seed=seed)
    t0 = time.perf_counter()
    for row in range(targets):
        sample_target(run, row)
    _sync(bb.device)
    eval_s = time.perf_counter() - t0
    return {
        "targets_sequences_per_s": round(sequences / targets_s, 3),
        "targets_sequences": sequences,
        "targets_tokens": new_tokens,
        "centered_eval_targets_per_s": round(targets / eval_s, 4),
        "centered_eval_K": k,
        "centered_eval_targets": targets,
    }


def run_bench(
    opened: OpenCard,
    ks: list[int],
    new_tokens: int = 64,
    text: str = "The Eiffel Tower is in Paris.",
    repeats: int = 1,
    seed: int = 0,
    plain: OpenCard | None = None,
    fidelity_reference: OpenCard | None = None,
    vector: torch.Tensor | None = None,
    pipelines: bool = False,
) -> BenchReport:
    """Time both paths for each K (best of ``repeats``), same card, same activation, same lengths.

    ``opened`` runs the project path; ``plain`` (default: ``opened``) the plain recipe, typically
    the same card in another dtype (:meth:`OpenCard.with_dtype`). With ``fidelity_reference`` (the
    card in float32), :func:`dtype_fidelity` at the largest K fills ``bf16_fidelity``. ``vector``
    replaces the activation of ``text`` (random-weight backbones have no tokenizer). ``pipelines``
    adds :func:`pipeline_rates` at the largest K.
    """
    plain = opened if plain is None else plain
    bb, pbb = opened.backbone, plain.backbone
    layer = opened.card.default_layer
    v = extract(bb, text, layer) if vector is None else vector.float().reshape(-1)
    by_dtype = {name: matmul_gflops(bb.device, dt) for name, dt in {bb.dtype_name: bb.dtype, pbb.dtype_name: pbb.dtype}.items()}
    gflops = by_dtype[bb.dtype_name]
    report = BenchReport(
        card=opened.card.id,
        device=f"{bb.device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cpus)"
        if bb.device.type == "cpu"
        else torch.cuda.get_device_name(bb.device),
        threads=torch.get_num_threads(),
        matmul_gflops=gflops,
        cold_start_s=None,
        warm_start_s=None,
        project_dtype=bb.dtype_name,
        plain_dtype=pbb.dtype_name,
        matmul_gflops_by_dtype=by_dtype,
        memory_gbps=memory_gbps(bb.device),
    )
    _project(opened, v, 2, 4, layer, seed)  # warm-up
    _plain(plain, v, 2, 4, layer, seed)
    for k in ks:
        proj = min((_project(opened, v, k, new_tokens, layer, seed) for _ in range(repeats)), key=sum)
        pl = min((_plain(plain, v, k, new_tokens, layer, seed) for _ in range(repeats)), key=sum)
        flops = flop_count(opened, k, new_tokens, layer)
        row = BenchRow(
            k=k,
            tokens=new_tokens,
            project_s=sum(proj),
            plain_s=sum(pl),
            project_sample_s=proj[0],
            project_score_s=proj[1],
            plain_sample_s=pl[0],
            plain_score_s=pl[1],
            flop_bound_s=flops / (gflops * 1e9),
            project_dtype=bb.dtype_name,
            plain_dtype=pbb.dtype_name,
            plain_flop_bound_s=flops / (by_dtype[pbb.dtype_name] * 1e9),
            memory_bound_s=memory_bytes(opened, k, new_tokens, layer) / (report.memory_gbps * 1e9),
        )
        log.info("K=%d: project (%s) %.2fs, plain (%s) %.2fs (×%.2f), FLOP bound %.2fs, memory bound %.2fs", k,
                 row.project_dtype, row.project_s, row.plain_dtype, row.plain_s, row.speedup, row.flop_bound_s,
                 row.memory_bound_s)
        report.rows.append(row)
    if pipelines:
        report.pipelines = pipeline_rates(opened, max(ks), new_tokens, seed=seed)
        log.info("pipelines: %s", report.pipelines)
    if fidelity_reference is not None:
        report.bf16_fidelity = dtype_fidelity(opened, fidelity_reference, text, max(ks), new_tokens, seed, layer)
    return report
