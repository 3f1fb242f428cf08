"""``oracle-ceiling``: the anchors of a backbone and layer — replay, random floor, NN-in-pool and the
paraphrase ceiling — on the held-out test split (``srt.md`` §3.4, §6).

For each name in ``replay, random_floor, nn_in_pool, paraphrase_all, paraphrase_best,
paraphrase_mean_per_src`` and its ``_cen`` twin the keys ``{name}_cos_mean, _cos_p05, _cos_p50,
_cos_p95, _fve_mean, _fve_p50, _n`` (fve = ½(1+cos)), plus ``normalisation_denom_fve[_cen]``
(paraphrase best minus random floor) and ``formula``.

* targets: the first ``--n-targets`` rows of the ``test`` split;
* μ: mean of the first ``--pool-size`` rows of the ``mu_pool`` split (the reference used the
  evaluated targets themselves, ``srt.md`` §7.9);
* replay: the target's own stored token ids (no BOS), re-encoded by the round-trip convention;
* random floor: all off-diagonal pairs of the targets; NN-in-pool: per target, the best other target;
* paraphrase: the exact reference prompt, tokenized with the tokenizer's default special tokens,
  k samples per source at temperature T and top-p 0.95, one source per batch (no padding, so the
  reference's right-padding problem cannot occur); the new tokens are decoded without special
  tokens (empty → " "), re-tokenized without special tokens (≤ 128 tokens) and re-encoded; per
  source the best raw and the best centered are taken separately, as in the reference.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from nla_space.activations import check_layer
from nla_space.cards import find_card
from nla_space.errors import NLAInputError
from nla_space.rollout import sample
from nla_space.runtime import shared_backbone
from nla_space.scoring import cosine, pairwise_fve

from . import evals
from .dataset import load_target_set
from .results import Checkpoint, device_info, now_iso, run_meta, write_results

log = logging.getLogger(__name__)

HELP = "anchors of a backbone/layer on held-out targets: replay, random floor, NN-in-pool, paraphrase best-of-k"
COMMAND = "oracle-ceiling"
PROMPT = "Paraphrase the following text using different words but the same meaning.\n\nText: {s}\n\nParaphrase:"
MAX_PROMPT_TOKENS = 512
MAX_ENCODE_LEN = 128
NAMES = ("replay", "random_floor", "nn_in_pool", "paraphrase_all", "paraphrase_best", "paraphrase_mean_per_src")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=None, help="hub id, folder or embedded:NAME (or give --card)")
    p.add_argument("--layer", type=int, default=None, help="hidden_states index (default: the card's)")
    p.add_argument("--card", default=None, help="take backbone and layer from this card")
    p.add_argument("--targets", required=True, type=Path)
    p.add_argument("--n-targets", type=int, default=200)
    p.add_argument("--paraphrase-k", type=int, default=8, help="paraphrases per source (0 = skip)")
    p.add_argument("--paraphrase-max-new", type=int, default=64)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--pool-size", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--log-samples", type=Path, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--note", default=None, help="free text recorded as meta.note")


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


def source_record(bb: Any, layer: int, ts: Any, row: int, mu: torch.Tensor, k: int, args: argparse.Namespace, keep: bool) -> dict[str, Any]:
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


def run(args: argparse.Namespace) -> int:
    started, started_iso = time.time(), now_iso()
    for name in ("n_targets", "pool_size", "paraphrase_max_new"):
        evals.check_positive(f"--{name.replace('_', '-')}", getattr(args, name))
    evals.check_positive("--paraphrase-k", args.paraphrase_k, 0)
    evals.check_positive("--limit", args.limit)
    from nla_space.io import check_writable

    check_writable(Path(args.out).parent, "results JSON")  # before any work: a full or read-only disk fails now
    spec, layer, revision, card_id = args.backbone, args.layer, None, None
    if args.card:
        card = find_card(args.card)
        spec, card_id = spec or card.backbone_id, card.id
        revision = card.backbone.get("revision") if not args.backbone else None
        layer = card.default_layer if layer is None else layer
    if not spec or layer is None:
        raise NLAInputError("give --backbone and --layer, or --card")
    ts = load_target_set(args.targets)
    bb = shared_backbone(spec, revision, args.device)
    check_layer(bb, layer)
    evals.check_targets(ts, bb, layer)
    targets = evals.eval_targets(ts, args.n_targets, args.limit)
    pool = evals.make_pool(ts, args.pool_size)
    keep = args.log_samples is not None
    fp = {"command": COMMAND, "backbone": spec, "layer": layer, "targets": str(args.targets.resolve()), "seed": args.seed,
          "paraphrase_k": args.paraphrase_k, "paraphrase_max_new": args.paraphrase_max_new, "temperature": args.temperature,
          "top_p": args.top_p, "pool_size": pool.size, "log_samples": keep}
    ckpt = Checkpoint(args.out, fp, args.resume).open()
    with torch.inference_mode():
        recs = ckpt.run(targets, lambda row: source_record(bb, layer, ts, row, pool.mu, args.paraphrase_k, args, keep), desc=COMMAND)
    results: dict[str, Any] = {"backbone": spec, "layer": layer, "n_targets": len(recs), "targets_path": str(args.targets),
                               "anisotropy_mu_norm": round(float(pool.mu.norm()), 4)}
    results.update(aggregate(recs, ts.vectors[targets].float(), pool.mu))
    results["meta"] = run_meta(COMMAND, {
        "card": card_id, "backbone": spec, "backbone_revision": bb.revision, "backbone_source": bb.source_path, "layer": layer,
        "M": len(recs), "M_requested": args.n_targets, "K": args.paraphrase_k, "paraphrase_k": args.paraphrase_k,
        "paraphrase_max_new": args.paraphrase_max_new, "temperature": args.temperature, "top_p": args.top_p,
        "pool_size": pool.size, "seed": args.seed, "limit": args.limit, "targets": str(ts.folder), "targets_split": "test",
        "mu_source": f"mean of the first {pool.size} rows of the targets' mu_pool split (the reference used the evaluated targets: srt.md §7.9)",
        "replay_source": "the targets' stored token ids (no BOS), re-encoded prefix-free, EOS-inclusive",
        "prompt": PROMPT, "device": device_info(bb.device), "note": args.note,
    }, started, started_iso, args.out, args)
    samples = [{"target": r["target"], "text": ts.texts[r["target"]], **{k: r[k] for k in ("replay", "replay_cen", "para", "para_cen", "texts") if k in r}}
               for r in recs]
    write_results(args.out, results, samples, args.log_samples)
    ckpt.finish()
    fmt = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"{COMMAND}: {spec} L{layer}, n={len(recs)}: replay cen {fmt(results['replay_cen_fve_mean'])}, random cen "
          f"{fmt(results['random_floor_cen_fve_mean'])}, NN-in-pool cen {fmt(results['nn_in_pool_cen_fve_mean'])}, paraphrase best cen "
          f"{fmt(results.get('paraphrase_best_cen_fve_mean'))} → {args.out}")
    return 0
