"""``leaderboard``: published numbers (from the cards, with sources) beside reproduced ones (from
results files, with their meta), ρ per backbone, K-curves and the findings table.

The building is :func:`eval_harness.leaderboard_build.build_leaderboard` (the app reads the same schema);
this command finds the results files, writes ``nla_space/assets/leaderboard.json`` atomically and, when
asked, a markdown rendering and a K-curve PNG.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from nla_space.cards import ASSETS_DIR, REPO_ROOT
from nla_space.io import atomic_write, atomic_write_json, atomic_write_text
from nla_space.leaderboard import DEFAULT_PATH

from .leaderboard_build import build_leaderboard, to_markdown
from .results import load_results

log = logging.getLogger(__name__)

HELP = "build the leaderboard: published card numbers beside reproduced results, K-curves, findings"
DEFAULT_RESULTS = ASSETS_DIR / "results"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=Path, nargs="*", default=None,
                   help=f"results JSON files or folders (default: {DEFAULT_RESULTS.relative_to(REPO_ROOT) if DEFAULT_RESULTS.is_relative_to(REPO_ROOT) else DEFAULT_RESULTS})")
    p.add_argument("--out", type=Path, default=DEFAULT_PATH)
    p.add_argument("--markdown", type=Path, default=None, help="also write a markdown rendering here")
    p.add_argument("--plot", type=Path, default=None, help="also write the K-curves as a PNG here")


def plot_kcurves(lb: dict[str, Any], path: Path) -> None:
    """Centered best-of-K′ against K′ (log2 axis), one line per card and origin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for c in lb.get("kcurves", []):
        series.setdefault((c["card"], c["origin"]), []).append((c["K"], c["score_cen"]))
    for (card, origin), pts in series.items():
        pts.sort()
        ax.plot([k for k, _ in pts], [s for _, s in pts], marker="o", linestyle="-" if origin == "published" else "--",
                label=f"{card} ({origin})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (oracle best-of-K, centered)")
    ax.set_ylabel("centered fve_nrm")
    ax.set_title("K-curves")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    paths = args.results if args.results else ([DEFAULT_RESULTS] if DEFAULT_RESULTS.is_dir() else [])
    results = list(load_results(paths))
    lb = build_leaderboard(results)
    atomic_write_json(args.out, lb)
    if args.markdown:
        atomic_write_text(args.markdown, to_markdown(lb))
    if args.plot:
        plot_kcurves(lb, args.plot)
    n_rep = sum(r["reproduced"] is not None for r in lb["rows"])
    print(f"leaderboard: {len(lb['rows'])} rows ({n_rep} reproduced, from {len(results)} results file(s)), "
          f"{len(lb['kcurves'])} K-curve points, {len(lb['findings'])} findings → {args.out}")
    return 0
