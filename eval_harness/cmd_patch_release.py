"""``python -m eval_harness patch-release``: ship a train-patch run as a card; see :mod:`eval_harness.patch_release`."""

from __future__ import annotations

import argparse
from pathlib import Path

from nla_space.backbone import shared_backbone
from nla_space.cards import PACKAGE_ROOT, Card
from nla_space.errors import NLAInputError
from nla_space.runtime import open_card
from nla_space.verbalizers.patch import read_spec

from nla_space.specificity import FEATURES, Calibration, Specificity, load_pool

from .patch_release import (calibrate, calibration_rows, card_dict, confidence_anchors, copy_av, fit_from_records, read_card_json,
                            records_for, write_card, write_pool)
from .data.text_corpus import read_corpus

HELP = "ship a train-patch run as a patch card: AV folder, μ and specificity pool, val calibration, card file"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, required=True, help="train-patch run folder (its best/ is shipped)")
    p.add_argument("--corpus", type=Path, required=True, help="the corpus it was trained on (mu_pool → pool, val → calibration)")
    p.add_argument("--av-folder", required=True, help="destination, relative to the nla_space package (e.g. assets/cards/NAME)")
    p.add_argument("--card-file", type=Path, required=True, help="card JSON to write (e.g. nla_space/cards/NAME.json)")
    p.add_argument("--card-id", required=True)
    p.add_argument("--aliases", default="", help="comma-separated")
    p.add_argument("--title", default=None, help="default: the existing card file's title")
    p.add_argument("--description", default=None, help="default: the existing card file's description")
    p.add_argument("--backbone", required=True, help="the backbone the run trained on (embedded:NAME, hub id, folder)")
    p.add_argument("--calibrate", type=int, default=0,
                   help="calibrate on the first N calibration texts (0: keep the card's calibration); see --calibration-texts")
    p.add_argument("--calibration-texts", type=Path, default=None,
                   help="JSONL of {text, kind} written like what users type (default: the corpus's val split)")
    p.add_argument("--calibration-records", type=Path, default=None,
                   help="refit from these per-text records (reading-eval --log-samples on the calibration texts) instead of verbalizing")
    p.add_argument("--strategy", default="guided", help="the card's default strategy, used for calibration")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--guided-beta", type=float, default=1.0, help="β of guided decoding stored in the card (default 1)")
    p.add_argument("--target-precision", type=float, default=0.85)
    p.add_argument("--feature", choices=FEATURES, default="margin40",
                   help="the calibration feature (nla_space.specificity: z, or margin40 = margin over the pool's top 2.5%%)")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="the card's layers, default first (default: every layer the AV reads, the lowest first); "
                        "each gets its μ, pool and (with --calibrate) calibration")
    p.add_argument("--device", default=None)


def run(args: argparse.Namespace) -> int:
    av_folder = PACKAGE_ROOT / args.av_folder
    copy_av(args.run / "best", av_folder)
    bb = shared_backbone(args.backbone, device=args.device)
    read_layers = read_spec(av_folder).read_layers
    layers = list(args.layers) if args.layers else read_layers
    unread = [ell for ell in layers if ell not in read_layers]
    if unread or len(set(layers)) != len(layers):
        raise NLAInputError(f"--layers {layers}: the AV reads {read_layers} (each layer once)")
    pool = write_pool(bb, layers, args.corpus, av_folder)
    old = read_card_json(args.card_file)
    old_patch = old.get("patch", {})
    calibration = old_patch.get("calibration")
    per_layer = {int(ell): c for ell, c in old_patch.get("layer_calibrations", {}).items()}
    keep = {k: old[k] for k in ("license", "training", "heldout", "compass", "anchors", "published") if k in old}
    keep.setdefault("training", {})["pool"] = pool

    title = old.get("title", "") if args.title is None else args.title
    description = old.get("description", "") if args.description is None else args.description

    def make(cal: dict | None, others: dict[int, dict]) -> dict:
        return card_dict(args.card_id, [a for a in args.aliases.split(",") if a], title, description,
                         {"id": args.backbone, "revision": None, "dtype": "float32"}, layers, args.av_folder, cal, args.strategy, keep,
                         guided_beta=args.guided_beta, layer_calibrations=others,
                         greedy_repeat_ngram=int(old_patch.get("greedy_repeat_ngram", 0)))

    if args.calibrate:
        write_card(args.card_file, make(None, {}))
        oc = open_card(Card.from_dict(make(None, {}), str(args.card_file)), device=args.device)
        if args.calibration_texts is not None:
            rows, name = calibration_rows(args.calibration_texts)[: args.calibrate], args.calibration_texts.name
        else:
            rows, name = read_corpus(args.corpus, "val")[: args.calibrate], "corpus val texts"
        fits: dict[int, dict] = {}
        for ell in layers:
            spec = Specificity.from_pool(load_pool(av_folder / "pool.safetensors", ell), oc.mu_at(ell))
            if args.calibration_records is not None:
                recs = records_for(args.calibration_records, args.strategy, args.k, rows, layer=ell)
                fits[ell] = fit_from_records(recs, spec, args.strategy, args.k, args.target_precision, texts_name=name,
                                             feature=args.feature)
            else:
                records = args.run / ("calibration_records.jsonl" if len(layers) == 1 else f"calibration_records.L{ell}.jsonl")
                fits[ell], recs = calibrate(oc, rows, args.strategy, args.k, args.target_precision, spec, records=records,
                                            texts_name=name, feature=args.feature, layer=ell)
            if ell == layers[0]:
                spec.calibration = Calibration.from_dict(fits[ell], name)
                keep["anchors"] = {**keep.get("anchors", {}), **confidence_anchors(recs, spec)}
        calibration, per_layer = fits[layers[0]], fits
    write_card(args.card_file, make(calibration, per_layer))
    print(f"wrote {args.card_file} (calibration at layer {layers[0]}: {calibration})")
    for ell, c in per_layer.items():
        if ell != layers[0]:
            print(f"  layer {ell}: tau {c['tau']}, precision {c['precision']}, coverage {c['coverage']}")
    return 0
