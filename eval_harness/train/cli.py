"""The command-line surface the injection trainers share (``train-av-lora``, ``train-ar``, ``train-grpo``):
the run options and the closing line. Each command adds only what is its own."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..settings import add_setting_options

TARGETS_HELP = "folder written by `injection-targets`"


def add_run_options(p: argparse.ArgumentParser, config: type, targets_help: str = TARGETS_HELP,
                    inputs: tuple[tuple[str, dict[str, Any]], ...] = ()) -> None:
    """``--targets``, the command's own ``inputs`` (name, ``add_argument`` keywords), ``--out``,
    ``--backbone``, the ``config`` dataclass's settings (one declaration per setting), ``--resume``, ``--device``."""
    p.add_argument("--targets", type=Path, required=True, help=targets_help)
    for name, kw in inputs:
        p.add_argument(name, **kw)
    p.add_argument("--out", type=Path, required=True, help="run folder (log.jsonl, best/, checkpoint/)")
    p.add_argument("--backbone", default=None, help="default: the target set's backbone")
    add_setting_options(p, config)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default=None)


def summary(state: dict[str, Any], best_what: str, out: Path, stopped: str | None = None) -> str:
    """The line a trainer command ends with: how it stopped, the step, the best value and where it is."""
    msg = stopped or ("stopped early (rerun with --resume)" if state["stopped_early"] else "done")
    return (f"{msg}: step {state['step']}/{state['total_steps']}, best {best_what} {state['best']} at step "
            f"{state['best_step']}, in {out / 'best'}")
