"""``oracle-ceiling``: the anchors of a backbone and layer — replay, random floor, NN-in-pool and the
paraphrase ceiling — on the held-out test split (SRT ``scripts/oracle_ceiling.py``; ``docs/evals.md``).

For each name in ``replay, random_floor, nn_in_pool, paraphrase_all, paraphrase_best,
paraphrase_mean_per_src`` and its ``_cen`` twin the keys ``{name}_cos_mean, _cos_p05, _cos_p50,
_cos_p95, _fve_mean, _fve_p50, _n`` (fve = ½(1+cos)), plus ``normalisation_denom_fve[_cen]``
(paraphrase best minus random floor) and ``formula``.

* targets: the first ``--n-targets`` rows of the ``test`` split;
* μ: mean of the first ``--pool-size`` rows of the ``mu_pool`` split (the reference used the
  evaluated targets themselves);
* replay: the target's own stored token ids (no BOS), re-encoded by the round-trip convention;
* random floor: all off-diagonal pairs of the targets; NN-in-pool: per target, the best other target;
* paraphrase: the exact reference prompt, tokenized with the tokenizer's default special tokens,
  k samples per source at temperature T and top-p 0.95, one source per batch (no padding, so the
  reference's right-padding problem cannot occur); the new tokens are decoded without special
  tokens (empty → " "), re-tokenized without special tokens (≤ 128 tokens) and re-encoded; per
  source the best raw and the best centered are taken separately, as in the reference.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nla_space.activations import check_layer
from nla_space.backbone import shared_backbone
from nla_space.errors import NLAInputError
from nla_space.rollout import sample
from nla_space.scoring import cosine, pairwise_fve

from . import common as evals
from ..data.dataset import load_target_set
from ..distributed import rank_device
from ..results import device_info
from ..settings import setting
from .base import EvalTask, Metric

log = logging.getLogger(__name__)

TABLE = "oracle_ceiling"

PROMPT = "Paraphrase the following text using different words but the same meaning.\n\nText: {s}\n\nParaphrase:"
MAX_PROMPT_TOKENS = 512
MAX_ENCODE_LEN = 128
NAMES = ("replay", "random_floor", "nn_in_pool", "paraphrase_all", "paraphrase_best", "paraphrase_mean_per_src")


@dataclass(kw_only=True)
class OracleConfig:
    backbone: str | None = setting(None, "hub id, folder or embedded:NAME (or give --card)")
    layer: int | None = setting(None, "hidden_states index (default: the card's)")
    card: str | None = setting(None, "take backbone and layer from this card")
    targets: Path = setting(help="targets folder (eval_harness targets)")
    n_targets: int = setting(200)
    paraphrase_k: int = setting(8, "paraphrases per source (0 = skip)")
    paraphrase_max_new: int = setting(64)
    top_p: float = setting(0.95)
    temperature: float = setting(1.0)
    pool_size: int = setting(2000)
    seed: int = setting(0)
    out: Path = setting(help="results JSON")
    limit: int | None = setting(None)
    resume: bool = setting(False)
    log_samples: Path | None = setting(None)
    device: str | None = setting(None)
    note: str | None = setting(None, "free text recorded as meta.note")


def stats(name: str, cos: list[float]) -> dict[str, Any]:
    """``{name}_cos_mean/_cos_p05/_cos_p50/_cos_p95/_fve_mean/_fve_p50/_n``."""
    cos = [c for c in cos if c is not None and math.isfinite(c)]
    mean, p50 = evals.mean(cos), evals.percentile(cos, 50)
    return {
        f"{name}_cos_mean": mean,
        f"{name}_cos_p05": evals.percentile(cos, 5),
        f"{name}_cos_p50": p50,
        f"{name}_cos_p95": evals.percentile(cos, 95),
        f"{name}_fve_mean": None if mean is None else 0.5 * (1 + mean),
        f"{name}_fve_p50": None if p50 is None else 0.5 * (1 + p50),
        f"{name}_n": len(cos),
    }


def _retokenize(bb: Any, text: str) -> list[int]:
    return list(bb.tokenizer(text or " ", add_special_tokens=False)["input_ids"])[:MAX_ENCODE_LEN]


def source_record(bb: Any, layer: int, ts: Any, row: int, mu: torch.Tensor, k: int, args: OracleConfig, keep: bool) -> dict[str, Any]:
    v = ts.vectors[row].float()
    h = evals.reencode_rows(bb, layer, [ts.token_ids[row]])[0]
    rec: dict[str, Any] = {"target": row, "replay": float(cosine(h, v)), "replay_cen": float(cosine(h - mu, v - mu))}
    if k > 0:
        ids = bb.tokenizer(PROMPT.format(s=ts.texts[row]), truncation=True, max_length=MAX_PROMPT_TOKENS)["input_ids"]
        prefix = bb.embed_tokens(torch.tensor([ids], device=bb.device)).expand(k, -1, -1)
        gen = torch.Generator(device=bb.device).manual_seed(evals.target_seed(args.seed, row))
        roll = sample(bb, prefix, args.paraphrase_max_new, temperature=args.temperature, top_p=args.top_p, generator=gen)
        texts = [bb.tokenizer.decode([int(t) for t in roll.ids[i, : int(roll.mask[i].sum())]], skip_special_tokens=True) or " "
                 for i in range(k)]
        hp = evals.reencode_rows(bb, layer, [_retokenize(bb, t) for t in texts])
        rec["para"] = [float(x) for x in cosine(hp, v[None])]
        rec["para_cen"] = [float(x) for x in cosine(hp - mu, (v - mu)[None])]
        if keep:
            rec["texts"] = texts
    return rec


def aggregate(recs: list[dict[str, Any]], vecs: torch.Tensor, mu: torch.Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {}
    n = vecs.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    for suffix, x in (("", vecs), ("_cen", vecs - mu)):
        cos = 2 * pairwise_fve(x, x) - 1
        out.update(stats(f"replay{suffix}", [r[f"replay{suffix}"] for r in recs]))
        out.update(stats(f"random_floor{suffix}", cos[off].tolist() if n > 1 else []))
        nn = cos.masked_fill(~off, -1.0).max(dim=1).values.tolist() if n > 1 else []
        out.update(stats(f"nn_in_pool{suffix}", nn))
        if recs and "para" in recs[0]:
            key = "para" + suffix
            out.update(stats(f"paraphrase_all{suffix}", [c for r in recs for c in r[key]]))
            out.update(stats(f"paraphrase_best{suffix}", [max(r[key]) for r in recs]))
            out.update(stats(f"paraphrase_mean_per_src{suffix}", [sum(r[key]) / len(r[key]) for r in recs]))
    for suffix in ("", "_cen"):
        top, floor = out.get(f"paraphrase_best{suffix}_fve_mean"), out.get(f"random_floor{suffix}_fve_mean")
        out[f"normalisation_denom_fve{suffix}"] = None if top is None or floor is None else top - floor
    out["formula"] = ("rho = (fve - random_floor_cen_fve_mean) / normalisation_denom_fve_cen, with this backbone's own "
                      "floor and ceiling; fve = (1 + cos) / 2; _cen: μ (mean of the mu_pool rows) subtracted from both vectors")
    return out


class OracleCeiling(EvalTask):
    """``oracle-ceiling``; the keys are listed in the module docstring."""

    name = "oracle-ceiling"
    table = TABLE
    help = "anchors of a backbone/layer on held-out targets: replay, random floor, NN-in-pool, paraphrase best-of-k"
    #: any kind: ``--card`` names only the backbone and the layer (no AV runs)
    supported_kinds = evals.ALL_KINDS
    Config = OracleConfig
    metrics = (
        Metric(TABLE, "replay_cen_fve_mean", "replay (centered)"),
        Metric(TABLE, "paraphrase_best_cen_fve_mean", "paraphrase best-of-{K} (centered)", k_dependent=True),
        Metric(TABLE, "nn_in_pool_cen_fve_mean", "NN-in-pool (centered)"),
        Metric(TABLE, "random_floor_cen_fve_mean", "random floor, oracle-ceiling (centered)"),
        Metric(TABLE, "replay_fve_mean", "replay (raw)", centered=False),
        Metric(TABLE, "paraphrase_best_fve_mean", "paraphrase best-of-{K} (raw)", k_dependent=True, centered=False),
        Metric(TABLE, "nn_in_pool_fve_mean", "NN-in-pool (raw)", centered=False),
        Metric(TABLE, "random_floor_fve_mean", "random floor, oracle-ceiling (raw)", centered=False),
    )

    def open(self) -> list[int]:
        args = self.cfg
        for name in ("n_targets", "pool_size", "paraphrase_max_new"):
            evals.check_positive(f"--{name.replace('_', '-')}", getattr(args, name))
        evals.check_positive("--paraphrase-k", args.paraphrase_k, 0)
        evals.check_positive("--limit", args.limit)
        from nla_space.io import check_writable

        check_writable(Path(args.out).parent, "results JSON")  # before any work: a full or read-only disk fails now
        spec, layer, revision, card_id = args.backbone, args.layer, None, None
        if args.card:
            card = evals.require_card_kind(args.card, self.supported_kinds, self.name)
            spec, card_id = spec or card.backbone_id, card.id
            revision = card.backbone.revision if not args.backbone else None
            layer = card.default_layer if layer is None else layer
        if not spec or layer is None:
            raise NLAInputError("give --backbone and --layer, or --card")
        self.spec, self.layer, self.card_id = spec, layer, card_id
        self.ts = load_target_set(args.targets)
        self.bb = shared_backbone(spec, revision, rank_device(args.device))
        check_layer(self.bb, layer)
        evals.check_targets(self.ts, self.bb, layer)
        self.targets = evals.eval_targets(self.ts, args.n_targets, args.limit)
        self.pool = evals.make_pool(self.ts, args.pool_size)
        return self.targets

    def fingerprint(self) -> dict[str, Any]:
        a = self.cfg
        return {"command": self.name, "backbone": self.spec, "layer": self.layer, "targets": str(a.targets.resolve()), "seed": a.seed,
                "paraphrase_k": a.paraphrase_k, "paraphrase_max_new": a.paraphrase_max_new, "temperature": a.temperature,
                "top_p": a.top_p, "pool_size": self.pool.size, "log_samples": a.log_samples is not None}

    @torch.inference_mode()
    def process(self, target: int) -> dict[str, Any]:
        a = self.cfg
        return source_record(self.bb, self.layer, self.ts, target, self.pool.mu, a.paraphrase_k, a, a.log_samples is not None)

    def aggregate(self, recs: list[dict[str, Any]]) -> dict[str, Any]:
        results: dict[str, Any] = {"backbone": self.spec, "layer": self.layer, "n_targets": len(recs), "targets_path": str(self.cfg.targets),
                                   "anisotropy_mu_norm": round(float(self.pool.mu.norm()), 4)}
        results.update(aggregate(recs, self.ts.vectors[self.targets].float(), self.pool.mu))
        return results

    def meta_fields(self, results: dict[str, Any]) -> dict[str, Any]:
        a, pool, bb = self.cfg, self.pool, self.bb
        return {
            "card": self.card_id, "backbone": self.spec, "backbone_revision": bb.revision, "backbone_source": bb.source_path,
            "layer": self.layer, "M": results["n_targets"], "M_requested": a.n_targets, "K": a.paraphrase_k, "paraphrase_k": a.paraphrase_k,
            "paraphrase_max_new": a.paraphrase_max_new, "temperature": a.temperature, "top_p": a.top_p,
            "pool_size": pool.size, "seed": a.seed, "limit": a.limit, "targets": str(self.ts.folder), "targets_split": "test",
            "mu_source": f"mean of the first {pool.size} rows of the targets' mu_pool split (the SRT reference oracle_ceiling.py used the evaluated targets)",
            "replay_source": "the targets' stored token ids (no BOS), re-encoded prefix-free, EOS-inclusive",
            "prompt": PROMPT, "device": device_info(bb.device), "note": a.note,
        }

    def samples(self, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keys = ("replay", "replay_cen", "para", "para_cen", "texts")
        return [{"target": r["target"], "text": self.ts.texts[r["target"]], **{k: r[k] for k in keys if k in r}} for r in recs]

    def summary(self, results: dict[str, Any]) -> str:
        fmt = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
        return (f"{self.name}: {self.spec} L{self.layer}, n={results['n_targets']}: replay cen {fmt(results['replay_cen_fve_mean'])}, random cen "
                f"{fmt(results['random_floor_cen_fve_mean'])}, NN-in-pool cen {fmt(results['nn_in_pool_cen_fve_mean'])}, paraphrase best cen "
                f"{fmt(results.get('paraphrase_best_cen_fve_mean'))} → {self.cfg.out}")
