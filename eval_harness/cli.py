"""``python -m eval_harness <command>``: the evals of :data:`eval_harness.evals.EVALS` and the tools of :data:`TOOLS`.

An eval is one :class:`~eval_harness.evals.base.EvalTask` class (its ``Config`` fields are its options);
a tool is a module with ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Every command also takes ``--threads`` and ``--bf16-mode`` (``reference`` by default: a bfloat16 CPU
backbone runs exactly as ``from_pretrained`` builds it, :mod:`nla_space.cpu_bf16`). Bad input (:class:`nla_space.errors.NLAInputError`) prints
one ``error:`` line and exits with 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import logging
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from nla_space import cpu_bf16
from nla_space.errors import NLAInputError

from .evals import EVALS

#: the commands that are not evals: name → module (modules not present in this checkout are skipped)
TOOLS: dict[str, str] = {
    "targets": "eval_harness.cmd_targets",
    "injection-targets": "eval_harness.cmd_injection_targets",
    "text-corpus": "eval_harness.cmd_text_corpus",
    "train": "eval_harness.cmd_train",
    "train-av-lora": "eval_harness.cmd_train_av_lora",
    "train-ar": "eval_harness.cmd_train_ar",
    "train-grpo": "eval_harness.cmd_train_grpo",
    "train-patch": "eval_harness.cmd_train_patch",
    "fit-compass": "eval_harness.cmd_fit_compass",
    "leaderboard": "eval_harness.cmd_leaderboard",
    "publish": "eval_harness.cmd_publish",
    "patch-release": "eval_harness.cmd_patch_release",
    "bench": "eval_harness.cmd_bench",
    "scale-plan": "eval_harness.cmd_scale_plan",
}


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def commands() -> dict[str, Command]:
    """Every command: the tools present in this checkout, then the registered evals."""
    out: dict[str, Command] = {}
    for name, modname in TOOLS.items():
        if importlib.util.find_spec(modname) is not None:
            mod = importlib.import_module(modname)
            out[name] = Command(mod.HELP, mod.add_arguments, mod.run)
    for name, cls in EVALS.items():
        out[name] = Command(cls.help, cls.add_arguments, cls.main)
    return out


def build_parser(cmds: dict[str, Command]) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nla-eval", description="nla-space evaluation harness (also: python -m eval_harness)")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, cmd in cmds.items():
        text = cmd.help.replace("%", "%%")  # argparse formats help strings with %
        p = sub.add_parser(name, help=text, description=text)
        cmd.add_arguments(p)
        p.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (1 avoids oversubscription on a shared CPU; default: torch's choice)")
        p.add_argument("--bf16-mode", choices=cpu_bf16.MODES, default="reference",
                       help="how a bfloat16 backbone runs on CPU: reference (default here: exactly as from_pretrained builds "
                            "it, so published numbers reproduce) or fast (the app's float32 attention and packed weights)")
    return ap


#: OSErrors that mean "the output location cannot take data", reported as one line (exit 2).
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cmds = commands()
    args = build_parser(cmds).parse_args(argv)
    try:
        from .evals.common import set_threads

        set_threads(args.threads)  # every command takes --threads: validated and applied here, once
        with cpu_bf16.mode_for_process(args.bf16_mode):  # read by every backbone load of the command
            return int(cmds[args.command].run(args) or 0)
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
