"""ZeroGPU glue: ``spaces.GPU`` when the package is installed, a no-op decorator otherwise.

``app.py`` imports :mod:`spaces` before torch (on ZeroGPU that import patches torch). Here we only
*use* it: off-Space ``spaces.GPU`` already returns the function unchanged (the ``spaces`` package; see docs/references.md), and
without the package at all :func:`gpu` falls back to the identity, so the same code runs on a
laptop, in CI, on a CUDA Space and on a ZeroGPU Space.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

try:  # pragma: no cover - depends on the environment
    import spaces as _spaces
except Exception:  # ImportError, or a broken install: run without ZeroGPU
    _spaces = None


def on_zero_gpu() -> bool:
    """True on a Hugging Face ZeroGPU Space (the platform sets ``SPACES_ZERO_GPU``)."""
    return bool(os.environ.get("SPACES_ZERO_GPU"))


def default_device() -> str:
    """``cuda`` on ZeroGPU (emulated outside GPU functions) or when CUDA is there, else ``cpu``.

    ``NLA_SPACE_DEVICE`` overrides it.
    """
    env = os.environ.get("NLA_SPACE_DEVICE")
    if env:
        return env
    if on_zero_gpu():
        return "cuda"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def gpu(duration: Callable[..., int] | int | None = None) -> Callable[[F], F]:
    """``@spaces.GPU(duration=...)`` when :mod:`spaces` is importable, else the identity."""

    def wrap(fn: F) -> F:
        if _spaces is None:
            return fn
        return _spaces.GPU(duration=duration)(fn)  # type: ignore[no-any-return]

    return wrap
