"""``fit-compass``: fit nla-at-home's compass (:mod:`nla_space.compass`) on a targets folder.

Rows: the ``train`` and ``val`` splits fit (α chosen inside them by the compass's own 10% split, then
refit on all of them); the held-out ``test`` split scores the fit (:func:`nla_space.compass.held_out`:
R² of the raw ridge output, mean cos(t*, y), 1-in-N self-retrieval top-1); ``mu_pool`` is not used.
Y = unit all-MiniLM-L6-v2 embeddings of the rows' texts. The map is keyed by the **block**
``ℓ − block_offset`` (the reference's keys; :class:`nla_space.compass.CompassScorer` and
``policy-eval --compass`` read it with the same offset). Writes ``OUT`` (safetensors) and
``OUT`` with ``.json``: the fit's numbers and provenance.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict
from pathlib import Path

from nla_space.compass import DEFAULT_ALPHAS, Compass, MiniLM, held_out
from nla_space.errors import NLAInputError
from nla_space.io import atomic_write_json

from .data.dataset import load_target_set
from .results import now_iso, run_meta

log = logging.getLogger(__name__)

HELP = "fit a compass (ridge: activation → MiniLM of the text) on a targets folder's train+val rows; held-out fit on test"
COMMAND = "fit-compass"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--targets", required=True, type=Path, help="targets folder (eval_harness targets)")
    p.add_argument("--out", required=True, type=Path, help="compass.safetensors to write (a .json with the fit goes beside it)")
    p.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS))
    p.add_argument("--block-offset", type=int, default=1, help="key = layer − offset (default 1: hidden_states[ℓ] is block ℓ−1)")
    p.add_argument("--seed", type=int, default=0, help="the α-selection split's RandomState seed")
    p.add_argument("--batch-size", type=int, default=64, help="texts per MiniLM batch")


def run(args: argparse.Namespace) -> int:
    import torch

    started, started_iso = time.time(), now_iso()
    ts = load_target_set(args.targets)
    fit_rows = ts.indices("train") + ts.indices("val")
    test_rows = ts.indices("test")
    if len(fit_rows) < 4 or len(test_rows) < 2:
        raise NLAInputError(f"{ts.folder}: fit-compass needs ≥ 4 train+val rows and ≥ 2 test rows, got {len(fit_rows)} and {len(test_rows)}")
    if any(not a > 0 for a in args.alphas):
        raise NLAInputError(f"--alphas must be positive, got {args.alphas}")
    embed = MiniLM()

    def Y(rows: list[int]) -> torch.Tensor:
        return torch.cat([embed([ts.texts[r] for r in rows[i : i + args.batch_size]]) for i in range(0, len(rows), args.batch_size)])

    block = ts.layer - args.block_offset
    comp = Compass.fit({block: ts.vectors[fit_rows]}, Y(fit_rows), alphas=args.alphas, seed=args.seed,
                       fit_on=f"train+val splits of {ts.folder} ({len(fit_rows)} rows)")
    ho = held_out(comp.maps[block], ts.vectors[test_rows], Y(test_rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    comp.save(args.out)
    m = comp.maps[block]
    report = {
        "layer": ts.layer, "block": block, "block_offset": args.block_offset, "alpha": m.alpha, "alphas": args.alphas,
        "val_top1": m.val_top1, "n_fit": len(fit_rows), "held_out": asdict(ho), "faith_model": comp.faith_model,
        "fit_on": comp.fit_on, "centered": True,
        "meta": run_meta(COMMAND, {"targets": str(ts.folder), "targets_meta": {k: ts.meta.get(k) for k in ("backbone", "backbone_revision", "layer", "seed", "n", "split_counts")},
                                   "compass_file": str(args.out)}, started, started_iso, args.out.with_suffix(".json"), args),
    }
    atomic_write_json(args.out.with_suffix(".json"), report)
    print(f"{COMMAND}: layer {ts.layer} (block {block}), n_fit {len(fit_rows)}, α {m.alpha}, val top-1 {m.val_top1:.3f}; "
          f"held-out ({ho.n}): R² {ho.r2:.3f}, mean cos {ho.mean_cos:.3f}, top-1 {ho.top1:.3f} → {args.out}")
    return 0
