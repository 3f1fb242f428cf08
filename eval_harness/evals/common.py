"""What the evals share (``centered-eval``, ``rerank-eval`` and ``oracle-ceiling`` all of it): opening a card and a target
set, choosing targets and the pool, the one per-target sample-and-score step, and statistics.

Conventions (stated once here; the commands cite them):

* **Targets** are the first M rows of the target set's held-out ``test`` split, in row order
  (:func:`eval_targets`). Nothing else is ever evaluated.
* **Pool and μ** come from the ``mu_pool`` split only: the pool is its first ``pool_size`` rows and
  μ is their mean (:func:`nla_space.scoring.anisotropy_mu`), as the reference did with its 2000
  pool rows — but the pool is disjoint from the targets *by construction* (different split).
* **Samples**: for each target, one greedy rollout and K sampled rollouts (temperature T, top-p of
  the card's config) from :meth:`nla_space.runtime.OpenCard.rollout`, re-encoded prefix-free without
  BOS, EOS-inclusive (:func:`nla_space.reencode.reencode_ids`) and scored raw and centered
  (:func:`nla_space.policy.score_vectors`). The sampling seed of target row ``i`` is
  ``seed * 1_000_003 + i`` (:func:`target_seed`), so every target's samples depend only on the
  seed and the row: a resumed or ``--limit``-ed run gives the same per-target numbers.
* **K-curve**: best-of-K′ over the *first* K′ of the same K samples, K′ ∈ {1, 2, 4, …} ∪ {K}.
* **logp**: mean per-token log-prob of a candidate under the AV (teacher-forced second forward,
  raw logits, EOS-inclusive mask), :func:`sequence_logprob`.
* **Card kinds**: every eval that takes ``--card`` declares the kinds it supports in its class's
  ``supported_kinds`` (keys of :data:`nla_space.runtime.CARD_KINDS`; :data:`ALL_KINDS` when it uses only
  the :class:`~nla_space.verbalizers.base.OpenedCard` interface) and calls :func:`require_card_kind`
  with the argument checks (:func:`open_run`, :func:`eval_harness.evals.card_targets.open_card_targets`), so
  another kind is refused before any target, corpus or model is read and before anything is written.
  ``centered-eval`` and ``rerank-eval`` are prefix-only: they re-encode with the round-trip
  convention and rerank by logp under the soft prefix.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from nla_space.activations import pad_rows
from nla_space.backbone import CPU_DTYPES, Backbone
from nla_space.cards import Card, find_card
from nla_space.errors import NLAInputError
from nla_space.policy import score_vectors
from nla_space.reencode import reencode_ids
from nla_space.rollout import eos_inclusive_mask
from nla_space.runtime import CARD_KINDS, OpenCard, open_card
from nla_space.scoring import anisotropy_mu, pairwise_fve

from ..data.dataset import TargetSet, load_target_set
from ..settings import DTYPE_HELP, setting
from ..distributed import rank_device

log = logging.getLogger(__name__)

#: Reference: the random floor uses all off-diagonal pairs among the first 512 pool vectors.
RANDOM_FLOOR_POOL = 512


def target_seed(seed: int, row: int) -> int:
    return int(seed) * 1_000_003 + int(row)


def k_grid(K: int) -> list[int]:
    """{1, 2, 4, …} up to K, plus K itself."""
    ks, k = [], 1
    while k < K:
        ks.append(k)
        k *= 2
    return ks + [K]


# ----------------------------------------------------------------------------------------------
# statistics


def mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def percentile(xs: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), ``q`` in [0, 100]."""
    xs = sorted(x for x in xs if x is not None and math.isfinite(x))
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's ρ with tie-averaged ranks; None when undefined (n < 2 or a constant input)."""
    import pandas as pd

    if len(a) < 2:
        return None
    ra = pd.Series(list(a)).rank(method="average")
    rb = pd.Series(list(b)).rank(method="average")
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(ra.corr(rb))


def topk_mean(xs: Sequence[float], k: int) -> float:
    top = sorted(xs, reverse=True)[:k]
    return sum(top) / len(top)


# ----------------------------------------------------------------------------------------------
# opening a card and its targets


@dataclass(kw_only=True)
class SampledConfig:
    """Options of the card-based sampled evals (``centered-eval``, ``rerank-eval``)."""

    M: int = setting(200, "number of test-split targets (default 200)")
    K: int = setting(64, "samples per target (default 64)")
    card: str = setting(help="card id, alias, or local release folder")
    backbone: str | None = setting(None, "override the card's backbone (hub id, folder, embedded:NAME)")
    targets: Path = setting(help="targets folder (eval_harness targets)")
    pool_size: int = setting(2000, "μ / NN pool: first N rows of the mu_pool split (default 2000)")
    out: Path = setting(help="results JSON")
    temperature: float = setting(1.0)
    max_new_tokens: int = setting(64)
    seed: int = setting(0)
    limit: int | None = setting(None, "evaluate at most this many targets (smoke runs; recorded in meta)")
    resume: bool = setting(False, "continue an interrupted run from <out>.partial.jsonl")
    log_samples: Path | None = setting(None, "per-target samples as JSON Lines")
    device: str | None = setting(None)
    dtype: str | None = setting(None, DTYPE_HELP, choices=CPU_DTYPES)
    note: str | None = setting(None, "free text recorded as meta.note (e.g. where the AV was trained)")


#: every card kind: a command that uses only the opened-card interface supports them all
ALL_KINDS: tuple[str, ...] = tuple(CARD_KINDS)


def require_card_kind(name: str | None, supported: Sequence[str], command: str) -> Card:
    """The card ``name`` (its file read, nothing opened), refused with :class:`NLAInputError` unless its
    kind is one of ``supported`` (the eval's ``supported_kinds``)."""
    card = find_card(name)
    if card.kind not in supported:
        raise NLAInputError(f"{command} supports {' and '.join(supported)} cards; card {card.id} is a {card.kind} card",
                            field="card")
    return card


def set_threads(n: int | None) -> None:
    check_positive("--threads", n)
    if n:
        torch.set_num_threads(n)


def weights_digest(oc: OpenCard) -> dict[str, Any] | None:
    """Path and SHA-256 of the card's local AV weights file (None for hub cards and untrained AVs)."""
    import hashlib

    from nla_space.verbalizers.prefix import find_weights

    folder = oc.card.local_folder
    path = find_weights(folder) if folder is not None and folder.is_dir() else None
    if path is None:
        return None
    return {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def check_positive(name: str, value: int | None, lo: int = 1) -> None:
    if value is not None and (not isinstance(value, int) or value < lo):
        raise NLAInputError(f"{name} must be an integer ≥ {lo}, got {value!r}")


def eval_targets(ts: TargetSet, M: int, limit: int | None = None) -> list[int]:
    """The first ``min(M, limit)`` rows of the ``test`` split (the only rows any eval scores)."""
    rows = ts.indices("test")
    if not rows:
        raise NLAInputError(f"{ts.folder}: the test split is empty; nothing to evaluate")
    n = min(M, limit) if limit is not None else M
    if len(rows) < n:
        log.warning("%s: asked for %d targets, the test split has %d", ts.folder, n, len(rows))
    return rows[:n]


def pool_rows(ts: TargetSet, pool_size: int) -> list[int]:
    rows = ts.indices("mu_pool")
    if not rows:
        raise NLAInputError(f"{ts.folder}: the mu_pool split is empty; μ and the NN pool need it")
    if len(rows) < pool_size:
        log.warning("%s: pool size %d asked, the mu_pool split has %d", ts.folder, pool_size, len(rows))
    return rows[:pool_size]


@dataclass
class Pool:
    rows: list[int]
    vectors: torch.Tensor  #: (P, d) float32
    mu: torch.Tensor  #: (d,) mean of ``vectors``

    @property
    def size(self) -> int:
        return len(self.rows)


def make_pool(ts: TargetSet, pool_size: int) -> Pool:
    rows = pool_rows(ts, pool_size)
    vecs = ts.vectors[rows].float()
    return Pool(rows=rows, vectors=vecs, mu=anisotropy_mu(vecs))


def check_targets(ts: TargetSet, backbone: Backbone, layer: int) -> None:
    if ts.vectors.shape[1] != backbone.hidden_size:
        raise NLAInputError(f"{ts.folder}: vectors have d={ts.vectors.shape[1]}, the backbone has d={backbone.hidden_size}")
    if int(ts.meta.get("layer", layer)) != layer:
        raise NLAInputError(f"{ts.folder}: targets were read at layer {ts.meta.get('layer')}, the card reads layer {layer}")
    spec = ts.meta.get("backbone")
    if spec and spec != backbone.spec:
        log.warning("targets were built with backbone %r, evaluating on %r", spec, backbone.spec)


@dataclass
class EvalRun:
    """An opened card, its target set, the targets to score and the pool."""

    oc: OpenCard
    ts: TargetSet
    layer: int
    targets: list[int]
    pool: Pool
    K: int
    temperature: float
    max_new_tokens: int
    seed: int
    av_weights: dict[str, Any] | None = None  #: path + SHA-256 of the AV file, read when the card was opened

    @property
    def backbone(self) -> Backbone:
        return self.oc.backbone

    def meta_fields(self, args: Any, M_requested: int) -> dict[str, Any]:
        card = self.oc.card
        bb = self.backbone
        from ..results import device_info, precision_info

        return {
            "card": card.id,
            "card_title": card.title,
            "trained": self.oc.trained,
            "backbone": bb.spec,
            "backbone_revision": bb.revision,
            "backbone_source": bb.source_path,
            "layer": self.layer,
            "M": len(self.targets),
            "M_requested": M_requested,
            "K": self.K,
            "pool_size": self.pool.size,
            "seed": self.seed,
            "temperature": self.temperature,
            "top_p": self.oc.top_p,
            "max_new_tokens": self.max_new_tokens,
            "limit": args.limit,
            "targets": str(self.ts.folder),
            "targets_split": "test",
            "targets_rows": [self.targets[0], self.targets[-1]] if self.targets else None,
            "targets_meta": {k: self.ts.meta.get(k) for k in ("backbone", "backbone_revision", "layer", "seed", "n", "split_counts")},
            "mu_source": f"mean of the first {self.pool.size} rows of the targets' mu_pool split (disjoint from the test split)",
            "mu_norm": round(float(self.pool.mu.norm()), 4),
            "card_mu_norm": round(float(self.oc.mu.norm()), 4) if self.oc.mu is not None else None,
            "av_weights": self.av_weights,
            "note": getattr(args, "note", None),
            "device": device_info(bb.device),
            "precision": precision_info(bb),
        }

    def fingerprint(self, command: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "command": command, "card": self.oc.card.id, "backbone": self.backbone.spec, "layer": self.layer,
            "targets": str(Path(self.ts.folder).resolve()), "K": self.K, "temperature": self.temperature,
            "max_new_tokens": self.max_new_tokens, "seed": self.seed, "pool_size": self.pool.size,
            # a resumed run must use the very same AV weights (a file swapped mid-run is refused)
            "av_sha256": (self.av_weights or {}).get("sha256"), **(extra or {}),
        }


def open_run(args: Any, supported: Sequence[str], command: str) -> EvalRun:
    """Validate the arguments, the output location and the card's kind (``supported``: the command's
    ``supported_kinds``), then open the card and targets, pick targets and pool."""
    from nla_space.io import check_writable

    check_writable(Path(args.out).parent, "results JSON")  # before any work: a full or read-only disk fails now
    if getattr(args, "log_samples", None) is not None:
        check_writable(Path(args.log_samples).parent, "sample log")
    check_positive("--M", args.M)
    check_positive("--K", args.K)
    check_positive("--pool-size", args.pool_size, 2)
    check_positive("--limit", args.limit)
    check_positive("--max-new-tokens", args.max_new_tokens)
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise NLAInputError(f"--temperature must be ≥ 0, got {args.temperature}")
    require_card_kind(args.card, supported, command)
    ts = load_target_set(args.targets)
    oc = open_card(args.card, backbone=args.backbone, device=rank_device(args.device), dtype=args.dtype)
    digest = weights_digest(oc)
    layer = oc.check_layer(None)
    check_targets(ts, oc.backbone, layer)
    if not oc.trained:
        log.warning("card %s has no trained AV weights: these numbers measure an identity-initialised AV", oc.card.id)
    return EvalRun(
        oc=oc, ts=ts, layer=layer, targets=eval_targets(ts, args.M, args.limit), pool=make_pool(ts, args.pool_size),
        K=args.K, temperature=float(args.temperature), max_new_tokens=args.max_new_tokens, seed=args.seed, av_weights=digest,
    )


# ----------------------------------------------------------------------------------------------
# the one per-target sample-and-score step


@torch.inference_mode()
def sequence_logprob(oc: OpenCard, v: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, layer: int, batch_size: int = 16) -> torch.Tensor:
    """Mean per-token log-prob (K,) of each candidate under the AV: teacher-forced forward of
    ``[prefix(v), embed(ids[:, :-1])]``, raw logits (no temperature), masked EOS-inclusive."""
    bb = oc.backbone
    dev = bb.device
    out = []
    for i in range(0, ids.shape[0], batch_size):
        cid, cmask = ids[i : i + batch_size].to(dev), mask[i : i + batch_size].to(dev)
        n, T = cid.shape
        prefix = oc.av.embeds(v.to(dev)[None].expand(n, -1), bb, layer)
        P = prefix.shape[1]
        x = torch.cat([prefix, bb.embed_tokens(cid[:, :-1]).to(prefix.dtype)], dim=1)
        am = torch.cat([torch.ones(n, P, dtype=cmask.dtype, device=dev), cmask[:, :-1]], dim=1)
        logits = bb.model(inputs_embeds=x, attention_mask=am, use_cache=False).logits[:, P - 1 : P - 1 + T]
        lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, cid[..., None]).squeeze(-1)
        m = cmask.float()
        out.append(((lp * m).sum(1) / m.sum(1).clamp(min=1)).cpu())
    return torch.cat(out)


def _texts(bb: Backbone, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [bb.tokenizer.decode([int(t) for t in ids[i, : int(mask[i].sum())]], skip_special_tokens=True) for i in range(ids.shape[0])]


def sample_target(run: EvalRun, row: int, *, logp: bool = False, anchor: torch.Tensor | None = None, keep_text: bool = False) -> dict[str, Any]:
    """Greedy + K sampled candidates for target ``row``, re-encoded and scored (raw and centered vs
    the pool μ); optionally each candidate's logp under the AV and its centered cosine to ``anchor``."""
    oc, bb, mu = run.oc, run.backbone, run.pool.mu
    v = run.ts.vectors[row].float()
    seed = target_seed(run.seed, row)
    g = oc.rollout(v, 1, run.temperature, run.max_new_tokens, True, seed, run.layer)
    s = oc.rollout(v, run.K, run.temperature, run.max_new_tokens, False, seed, run.layer)
    hg = reencode_ids(bb, run.layer, g.ids, g.mask)
    hs = reencode_ids(bb, run.layer, s.ids, s.mask)
    g_raw, g_cen = score_vectors(hg, v, mu)
    raw, cen = score_vectors(hs, v, mu)
    rec: dict[str, Any] = {
        "target": row,
        "greedy_raw": float(g_raw[0]), "greedy_cen": float(g_cen[0]),
        "raw": [float(x) for x in raw], "cen": [float(x) for x in cen],
        "lengths": [int(x) for x in s.lengths],
    }
    if logp:
        rec["logp"] = [float(x) for x in sequence_logprob(oc, v, s.ids, s.mask, run.layer)]
    if anchor is not None:
        a = (anchor.float() - mu).to(hs.device)
        rec["anchor_cos"] = [float(x) for x in torch.nn.functional.cosine_similarity(hs.float() - mu.to(hs.device), a[None], dim=-1)]
    if keep_text:
        rec["greedy_text"] = _texts(bb, g.ids, g.mask)[0]
        rec["texts"] = _texts(bb, s.ids, s.mask)
    return rec


# ----------------------------------------------------------------------------------------------
# pool baselines


@dataclass
class Nearest:
    raw_idx: list[int]  #: per target, index into the pool of the raw nearest neighbour
    cen_idx: list[int]  #: … of the centered nearest neighbour
    raw_fve: list[float]  #: fve of the raw neighbour (pool vector used as h; reference NN-retrieval)
    cen_fve: list[float]


def nearest_in_pool(vectors: torch.Tensor, pool: Pool) -> Nearest:
    """For each vector, its nearest pool vector by raw and (separately) by centered cosine."""
    raw = pairwise_fve(vectors, pool.vectors)
    cen = pairwise_fve(vectors - pool.mu, pool.vectors - pool.mu)
    rv, ri = raw.max(dim=1)
    cv, ci = cen.max(dim=1)
    return Nearest(ri.tolist(), ci.tolist(), rv.tolist(), cv.tolist())


def random_floor(pool: Pool, n: int = RANDOM_FLOOR_POOL) -> tuple[float, float]:
    """Mean raw and centered fve over all off-diagonal pairs of the first ``n`` pool vectors."""
    x = pool.vectors[:n]
    if x.shape[0] < 2:
        raise NLAInputError("the random floor needs at least 2 pool vectors")
    off = ~torch.eye(x.shape[0], dtype=torch.bool)
    raw = pairwise_fve(x, x)[off].mean()
    cen = pairwise_fve(x - pool.mu, x - pool.mu)[off].mean()
    return float(raw), float(cen)


def reencode_rows(bb: Backbone, layer: int, token_ids: list[list[int]], batch_size: int = 32) -> torch.Tensor:
    """Re-encode stored texts (token ids without BOS) by the round-trip convention (prefix-free,
    no BOS, EOS-inclusive, read at the last valid token): (N, d) float32."""
    out = []
    for i in range(0, len(token_ids), batch_size):
        ids, valid = pad_rows([ids or [bb.pad_id] for ids in token_ids[i : i + batch_size]], bb.pad_id)
        mask = eos_inclusive_mask(ids, bb.stop_ids) * valid
        out.append(reencode_ids(bb, layer, ids.to(bb.device), mask.to(bb.device)).cpu())
    return torch.cat(out)
