"""Settings dataclasses as command-line options: one declaration per setting (trainers and evals).

A command's settings are one dataclass; :func:`setting` declares a field together with its
command-line option (help, choices, several values, whether it has one at all) and whether a resume
may change it. :func:`add_setting_options` turns the dataclass into the command's options
(``--snake-name`` for ``snake_name``; a field without a default is a required option) and
:func:`settings_from_args` reads them back.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Sequence


#: the evals' ``--dtype`` help (one text for every eval that opens a card)
DTYPE_HELP = ("backbone compute dtype: float32 or bfloat16 (default: float32 on CPU, the card's on CUDA); bfloat16 on CPU "
              "runs in the mode of --bf16-mode, reference unless told otherwise")


def setting(default: Any = dataclasses.MISSING, help: str | None = None, *, choices: Sequence[str] | None = None,
            option: bool = True, resumable: bool = False, negate: str | None = None, many: bool = False,
            extend: bool = False) -> Any:
    """A settings field. ``help``/``choices``: its option's; ``option=False``: no option (the default
    applies); ``resumable``: a resume may change it (run length, validation cadence); ``negate``:
    for a bool that defaults to True, the flag that turns it off (e.g. ``--no-centered``); ``many``:
    a ``tuple[T, ...]`` field read as one or more values (``nargs="+"``; the option's value is a list),
    ``extend``: and the option may be repeated, its values added up."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "option": option, "resumable": resumable, "negate": negate,
            "many": many or extend, "extend": extend}
    return dataclasses.field(default=default, metadata=meta)


def _option_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("option", True)]


def resumable_settings(cls: type) -> frozenset[str]:
    """The fields of ``cls`` a resume may change."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("resumable"))


def _value_type(hint: Any) -> Any:
    """``int`` for ``int``, ``int | None`` or ``tuple[int, ...]``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (tuple, list):
        hint = typing.get_args(hint)[0]
    return hint


def add_setting_options(p: argparse.ArgumentParser, cls: type, default_help: bool = False) -> None:
    """One option per field of the settings dataclass ``cls`` (see :func:`setting`); a field without
    help gets ``"default X"`` when ``default_help``, else none."""
    hints = typing.get_type_hints(cls)
    for f in _option_fields(cls):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        help_text = meta.get("help")
        if f.default is dataclasses.MISSING:
            p.add_argument(flag, type=_value_type(hints[f.name]), required=True, help=help_text or f"{f.name} (required)",
                           **({"nargs": "+"} if meta.get("many") else {}))
            continue
        if help_text is None and default_help:
            help_text = f"default {f.default}"
        kind = _value_type(hints[f.name])
        if meta.get("many"):
            p.add_argument(flag, type=kind, nargs="+", default=None if f.default is None else list(f.default), help=help_text,
                           **({"action": "extend"} if meta.get("extend") else {}))
        elif kind is bool:
            if meta.get("negate"):
                p.add_argument(meta["negate"], dest=f.name, action="store_false", help=help_text)
            else:
                p.add_argument(flag, action="store_true", help=help_text)
        elif meta.get("choices"):
            p.add_argument(flag, choices=meta["choices"], default=f.default, help=help_text)
        else:
            p.add_argument(flag, type=kind, default=f.default, help=help_text)


def settings_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The settings dataclass ``cls`` from parsed options (fields without an option keep their default)."""
    return cls(**{f.name: getattr(args, f.name) for f in _option_fields(cls)})
