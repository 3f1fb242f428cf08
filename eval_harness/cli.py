"""``python -m eval_harness <command>``: one module per command.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Bad input (:class:`nla_space.errors.NLAInputError`) prints one ``error:`` line and exits with 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import logging
import sys
from typing import Sequence

from nla_space.errors import NLAInputError

#: command name → module (modules not present in this checkout are skipped)
COMMANDS: dict[str, str] = {
    "targets": "eval_harness.cmd_targets",
    "train": "eval_harness.cmd_train",
    "centered-eval": "eval_harness.cmd_centered_eval",
    "rerank-eval": "eval_harness.cmd_rerank_eval",
    "oracle-ceiling": "eval_harness.cmd_oracle_ceiling",
    "leaderboard": "eval_harness.cmd_leaderboard",
    "publish": "eval_harness.cmd_publish",
    "bench": "eval_harness.cmd_bench",
    "policy-eval": "eval_harness.cmd_policy_eval",
    "roundtrip": "eval_harness.cmd_roundtrip",
    "injection-targets": "eval_harness.cmd_injection_targets",
    "train-av-lora": "eval_harness.cmd_train_av_lora",
    "train-ar": "eval_harness.cmd_train_ar",
    "train-grpo": "eval_harness.cmd_train_grpo",
    "fit-compass": "eval_harness.cmd_fit_compass",
    "text-corpus": "eval_harness.cmd_text_corpus",
    "train-patch": "eval_harness.cmd_train_patch",
    "patch-release": "eval_harness.cmd_patch_release",
    "reading-eval": "eval_harness.cmd_reading_eval",
}


def _available() -> dict[str, object]:
    mods = {}
    for name, modname in COMMANDS.items():
        if importlib.util.find_spec(modname) is not None:
            mods[name] = importlib.import_module(modname)
    return mods


def build_parser(mods: dict[str, object]) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m eval_harness", description="nla-space evaluation harness")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, mod in mods.items():
        text = getattr(mod, "HELP", "").replace("%", "%%")  # argparse formats help strings with %
        p = sub.add_parser(name, help=text, description=text)
        mod.add_arguments(p)
        p.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (1 avoids oversubscription on a shared CPU; default: torch's choice)")
    return ap


#: OSErrors that mean "the output location cannot take data", reported as one line (exit 2).
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mods = _available()
    args = build_parser(mods).parse_args(argv)
    try:
        from .evals import set_threads

        set_threads(args.threads)  # every command takes --threads: validated and applied here, once
        return int(mods[args.command].run(args) or 0)
    except NLAInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in _DISK_ERRNOS:
            raise
        # A disk that filled up (or went read-only) mid-run: one line; the finished part is kept.
        print(f"\nerror: {exc.filename or 'file system'}: {exc.strerror or exc} "
              "(free space or fix the location, then rerun with --resume)", file=sys.stderr)
        return 2
