"""``python -m eval_harness patch-release``: ship a train-patch run as a card; see :mod:`eval_harness.patch_release`."""

from __future__ import annotations

import argparse
from pathlib import Path

from nla_space.cards import REPO_ROOT, Card
from nla_space.runtime import open_card, shared_backbone
from nla_space.verbalizers.patch import read_spec

from .patch_release import calibrate, card_dict, copy_av, read_card_json, write_card, write_pool
from .text_corpus import read_corpus

HELP = "ship a train-patch run as a patch card: AV folder, μ and specificity pool, val calibration, card file"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, required=True, help="train-patch run folder (its best/ is shipped)")
    p.add_argument("--corpus", type=Path, required=True, help="the corpus it was trained on (mu_pool → pool, val → calibration)")
    p.add_argument("--av-folder", required=True, help="destination, relative to the repository root (e.g. assets/cards/NAME)")
    p.add_argument("--card-file", type=Path, required=True, help="card JSON to write (e.g. nla_space/cards/NAME.json)")
    p.add_argument("--card-id", required=True)
    p.add_argument("--aliases", default="", help="comma-separated")
    p.add_argument("--title", default="")
    p.add_argument("--description", default="")
    p.add_argument("--backbone", required=True, help="the backbone the run trained on (embedded:NAME, hub id, folder)")
    p.add_argument("--calibrate", type=int, default=0, help="calibrate on the first N val texts (0: keep the card's calibration)")
    p.add_argument("--strategy", default="guided", help="the card's default strategy, used for calibration")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--guided-beta", type=float, default=1.0, help="β of guided decoding stored in the card (default 1)")
    p.add_argument("--target-precision", type=float, default=0.85)
    p.add_argument("--device", default=None)


def run(args: argparse.Namespace) -> int:
    av_folder = REPO_ROOT / args.av_folder
    copy_av(args.run / "best", av_folder)
    bb = shared_backbone(args.backbone, device=args.device)
    spec_layer = read_spec(av_folder).layer
    pool = write_pool(bb, spec_layer, args.corpus, av_folder)
    old = read_card_json(args.card_file)
    calibration = old.get("patch", {}).get("calibration")
    keep = {k: old[k] for k in ("training", "heldout", "compass", "anchors", "published") if k in old}
    keep.setdefault("training", {})["pool"] = pool

    def make(cal: dict | None) -> dict:
        return card_dict(args.card_id, [a for a in args.aliases.split(",") if a], args.title, args.description,
                         {"id": args.backbone, "revision": None, "dtype": "float32"}, spec_layer, args.av_folder, cal, args.strategy, keep,
                         guided_beta=args.guided_beta)

    if args.calibrate:
        write_card(args.card_file, make(None))
        oc = open_card(Card.from_dict(make(None), str(args.card_file)), device=args.device)
        rows = read_corpus(args.corpus, "val")[: args.calibrate]
        calibration = calibrate(oc, rows, args.strategy, args.k, args.target_precision,
                                records=args.run / "calibration_records.jsonl")
    write_card(args.card_file, make(calibration))
    print(f"wrote {args.card_file} (calibration: {calibration})")
    return 0
