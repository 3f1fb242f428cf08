"""Command line: ``python -m nla_space verbalize …`` and ``python -m nla_space cards``.

Exit codes: 0 success, 2 bad input (one line on stderr, no traceback), 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Iterator, NoReturn, Sequence

from . import cpu_bf16
from .io import jsonl_lines
from .errors import NLAInputError
from .backbone import CPU_DTYPES
from .cards import find_card
from .policy import DEFAULT_K, MAX_K, MAX_NEW_TOKENS, STRATEGIES, Verbalization, resolve_decoding, selection_score
from .sweep import LayerResult, sweep

#: ``--layer all``: the layer sweep (:func:`nla_space.sweep.sweep`)
ALL_LAYERS = "all"


def _read_vector(path: str) -> Any:
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise NLAInputError(f"vector file not found: {p}")
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise NLAInputError(f"{p}: not a readable .npy array ({exc})") from exc
    if arr.dtype.kind not in "fiu":
        raise NLAInputError(f"{p}: expected a numeric array, found dtype {arr.dtype}")
    if arr.ndim != 1 and not (arr.ndim == 2 and arr.shape[0] == 1):
        raise NLAInputError(f"{p}: expected a 1-D vector, found shape {arr.shape}")
    return arr.astype("float32").reshape(-1)


def _read_texts(path: str) -> Iterator[tuple[Any, str]]:
    p = Path(path)
    if not p.is_file():
        raise NLAInputError(f"texts file not found: {p}")
    rows = []
    try:
        content = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise NLAInputError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    for n, line in enumerate(jsonl_lines(content), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise NLAInputError(f"{p}:{n}: not a JSON object ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise NLAInputError(f'{p}:{n}: each line needs {{"id": ..., "text": "..."}}')
        rows.append((row.get("id", n), row["text"]))
    if not rows:
        raise NLAInputError(f"{p}: no texts")
    return iter(rows)


def _summary(res: Verbalization) -> str:
    b = res.best
    badge = "HEDGED (uncertain)" if res.hedged else "confident"
    kind = {"confidence": "confidence", "centered": "centered fve_nrm", "raw": "raw fve_nrm"}[res.criterion]
    lines = [
        f"card {res.card}  layer {res.layer}  K={res.k}  τ={res.tau:.3f}  trained={str(res.trained).lower()}",
        f"best ({kind} {res.score:.3f}, {badge}):",
        f"  {b.text!r}",
    ]
    if res.compass:
        c = res.compass
        lines += [f"compass rerank (cosine {c['conf']:.3f} vs τ {c['tau']:.2f}, {'hedged' if c['hedged'] else 'confident'}; "
                  f"{'same pick' if c['best_index'] == res.best_index else 'a different pick'}):",
                  f"  {res.candidates[c['best_index']].text!r}"]
    ranked_by = "specificity" if res.best.specificity is not None else "score"
    lines.append(f"candidates (by {ranked_by}, as the best is picked):")

    order = sorted(range(len(res.candidates)), key=lambda i: -selection_score(res.candidates[i], res.fluency_weight))
    for i in order[:10]:
        c = res.candidates[i]
        cen = f"{c.score_cen:.3f}" if c.score_cen is not None else "  -  "
        mark = "*" if i == res.best_index else " "
        lines.append(f" {mark} cen {cen} raw {c.score_raw:.3f}  {c.text[:90]!r}")
    if len(order) > 10:
        lines.append(f"   … {len(order) - 10} more")
    lines.append("timings: " + ", ".join(f"{k} {v:.2f}" for k, v in res.timings.items()))
    lines += [f"note: {n}" for n in res.notes]
    return "\n".join(lines)


def _sweep_summary(results: list[LayerResult]) -> str:
    """One header line, then one line per swept layer: depth, score, badge, best text."""
    first = results[0].verbalization
    lines = [f"card {first.card}  sweep of {len(results)} layer(s)  K={first.k}  τ={first.tau:.3f}  seed {first.seed}  "
             f"{'centered' if first.centered else 'raw'} fve_nrm"]
    for r in results:
        depth = f"{r.depth_pct:3d}%" if r.depth_pct is not None else "   -"
        badge = "HEDGED   " if r.hedged else "confident"
        lines.append(f"layer {r.layer:3d}  depth {depth}  score {r.score:.3f}  {badge}  {r.best_text[:90]!r}")
    notes = dict.fromkeys(n.text for r in results for n in r.verbalization.notes if n.kind != "depth")  # depth: a column
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def _layer(s: str) -> int | str:
    """``--layer``: an integer, or ``all`` (the layer sweep)."""
    if s.strip().lower() == ALL_LAYERS:
        return ALL_LAYERS
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layer must be an integer or '{ALL_LAYERS}', got {s!r}") from None


def _finite(name: str, kind: type):
    def parse(s: str) -> Any:
        try:
            val = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {s!r}")
        if isinstance(val, float) and not math.isfinite(val):
            raise argparse.ArgumentTypeError(f"{name} must be finite, got {s!r}")
        return val

    return parse


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``error: …`` line on stderr and exit code 2."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="nla-space", description="Read a language model's activation as a sentence (also: python -m nla_space).")
    sub = ap.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verbalize", help="verbalize a text's activation (or a raw vector)")
    v.add_argument("--card", default=None, help="card id, alias or local folder (default: the embedded card)")
    v.add_argument("--backbone", default=None, help="override the card's backbone (hub id, folder, or embedded:NAME)")
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text whose activation to verbalize")
    src.add_argument("--vector", help="a .npy float vector of the backbone's hidden size (skips extraction)")
    src.add_argument("--texts", help="JSON Lines file of {\"id\": ..., \"text\": ...}; model loaded once")
    v.add_argument("--layer", type=_layer, default=None,
                   help="layer (hidden_states index); default: the card's; 'all': sweep every layer of the card (same K, seed, τ)")
    v.add_argument("--k", type=_finite("--k", int), default=None,
                   help=f"candidates of best-of-k or guided, 1..{MAX_K} (default {DEFAULT_K}); "
                        "refused with greedy decoding (which writes one), the default card's default")
    v.add_argument("--tau", type=_finite("--tau", float), default=None, help="hedging threshold in [0, 1] (default: the card's)")
    v.add_argument("--temperature", type=_finite("--temperature", float), default=1.0)
    v.add_argument("--max-new-tokens", type=_finite("--max-new-tokens", int), default=None,
                   help=f"1..{MAX_NEW_TOKENS} (default: the card's, e.g. the length its AV was trained on)")
    v.add_argument("--greedy", action="store_true", help="one greedy candidate instead of K samples (= --strategy greedy)")
    v.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="guided (a search steered by the score), best-of-k, or greedy (default: the card's)")
    v.add_argument("--position", type=_finite("--position", int), default=None,
                   help="the token whose state is read: 0 = the text's first token, negative from the end "
                        "(default: the card's read position, the last token)")
    v.add_argument("--seed", type=_finite("--seed", int), default=0)
    v.add_argument("--device", default=None, help="cpu, cuda, or auto (default)")
    v.add_argument("--dtype", choices=CPU_DTYPES, default=None,
                   help="backbone compute dtype (default: $NLA_CPU_DTYPE on CPU, else float32 on CPU and the card's on CUDA); "
                        "bfloat16 on CPU is opt-in: faster matmuls, scores still float32")
    v.add_argument("--bf16-mode", choices=cpu_bf16.MODES, default=None,
                   help="how a bfloat16 backbone runs on CPU: fast (default, or $NLA_CPU_BF16: float32 attention, packed "
                        "weights) or reference (exactly as from_pretrained builds it, as the reference code runs)")
    v.add_argument("--json", action="store_true", help="print one JSON object per input")
    c = sub.add_parser("cards", help="list the built-in cards")
    c.add_argument("--markdown", action="store_true", help="the Markdown table of docs/cards.md and the About tab")
    s = sub.add_parser("serve", help="launch the demo app (the same app as `python app.py`)")
    s.add_argument("--host", default=None, help="default: $GRADIO_SERVER_NAME or 127.0.0.1")
    s.add_argument("--port", type=int, default=None, help="default: $GRADIO_SERVER_PORT or 7860")
    return ap


def _cmd_verbalize(args: argparse.Namespace) -> int:
    with cpu_bf16.mode_for_process(args.bf16_mode):  # read by every backbone load (cpu_bf16.resolve_mode)
        return _verbalize(args)


def _verbalize(args: argparse.Namespace) -> int:
    from .backbone import requested_dtype
    from .runtime import open_card

    sweeping = args.layer == ALL_LAYERS
    if sweeping and args.vector:
        raise NLAInputError("--layer all sweeps the layers of a text: give --text or --texts (a raw vector belongs to one layer)")
    if args.vector and args.position is not None:
        raise NLAInputError("--position picks a token of a text; a raw --vector has no tokens")
    # a K the decoding would not use is refused before the model loads (the card repeats the check)
    resolve_decoding(args.strategy, args.greedy, find_card(args.card).default_strategy, args.k)
    opened = open_card(args.card, backbone=args.backbone, device=args.device, dtype=requested_dtype(args.dtype, args.device))
    params = dict(layer=args.layer, k=args.k, tau=args.tau, temperature=args.temperature,
                  max_new_tokens=args.max_new_tokens, greedy=args.greedy, seed=args.seed,
                  strategy=args.strategy, position=args.position)
    if args.texts:
        inputs = list(_read_texts(args.texts))
    elif args.vector:
        inputs = [(None, _read_vector(args.vector))]
    else:
        inputs = [(None, args.text)]
    if sweeping:
        params.pop("layer")
    for ident, item in inputs:
        if sweeping:
            results = sweep(opened, item, **params)
            out: dict[str, Any] = {"sweep": [r.to_dict() for r in results]}
            summary = _sweep_summary(results)
        else:
            res = opened.verbalize(text=item, **params) if isinstance(item, str) else opened.verbalize(vector=item, **params)
            out, summary = res.to_dict(), _summary(res)
        if args.json:
            if args.texts:
                out = {"id": ident, **out}
            print(json.dumps(out, ensure_ascii=False), flush=True)
        else:
            if args.texts:
                print(f"== {ident}")
            print(summary, flush=True)
    return 0


def _cmd_cards(args: argparse.Namespace) -> int:
    from .cards import builtin_cards, cards_table

    if args.markdown:
        print(cards_table())
        return 0
    for c in builtin_cards():
        print(f"{c.id:40s} layers {c.layers}  backbone {c.backbone_id}  aliases {', '.join(c.aliases)}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    """``python app.py`` from an installed package: preload the default card, build the app, launch it."""
    try:
        from .ui import build_demo, launch_kwargs, preload
    except ImportError as exc:
        raise NLAInputError(f"the demo needs Gradio: pip install 'nla-space[demo]' ({exc})") from exc
    overrides = {k: v for k, v in (("server_name", args.host), ("server_port", args.port)) if v is not None}
    preload()
    build_demo().launch(**launch_kwargs(**overrides))
    return 0


def _quiet_libraries() -> None:
    """No per-tensor loading bars or library chatter on a terminal meant for results."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        if args.command == "verbalize":
            return _cmd_verbalize(args)
        if args.command == "serve":
            return _cmd_serve(args)
        return _cmd_cards(args)
    except NLAInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
