"""Where a backbone's layers live when it does not fit one device: ``accelerate``'s big-model loading.

A :class:`Placement` is passed to ``from_pretrained`` as ``device_map`` / ``max_memory`` /
``offload_folder`` (https://huggingface.co/docs/accelerate/usage_guides/big_modeling). accelerate
then puts each block on a GPU, the CPU or disk, and wraps each module with a hook that moves its
inputs to the module's device, so every forward this project runs keeps working unchanged when the
layers are split: reads, rollouts with the KV cache, the truncated re-encode that stops after block
ℓ−1 (it calls the blocks in order; each block's hook moves the hidden state), and the patch hook on
block ℓ−1. The model's *input* device is the device of its token embedding
(:meth:`nla_space.backbone.Backbone.device`); inputs are placed there.

Chosen with ``device_map``:

* ``"auto"`` (or ``balanced``, ``balanced_low_0``, ``sequential``): accelerate fills the GPUs, then
  the CPU, then disk, each up to ``max_memory`` (``{"0": "70GiB", "1": "70GiB", "cpu": "200GiB"}``);
* an explicit ``{module name: device}`` map (``"cpu"``, ``0``, ``"cuda:1"``, ``"disk"``).

From the command line and the app: ``NLA_DEVICE_MAP=auto`` (or a JSON map),
``NLA_MAX_MEMORY=0=70GiB,1=70GiB,cpu=200GiB`` and ``NLA_OFFLOAD_FOLDER`` (default: a folder under
the cache). A placed backbone is never moved or cast after loading (``dtype`` is given to
``from_pretrained``), and it is frozen like any other.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import NLAInputError

DEVICE_MAP_ENV = "NLA_DEVICE_MAP"
MAX_MEMORY_ENV = "NLA_MAX_MEMORY"
OFFLOAD_ENV = "NLA_OFFLOAD_FOLDER"
AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class Placement:
    """A backbone's ``device_map`` (an accelerate strategy name or a module → device map), its
    per-device ``max_memory`` and the folder for disk-offloaded weights."""

    device_map: str | dict[str, Any]
    max_memory: dict[Any, str] = field(default_factory=dict)
    offload_folder: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.device_map, str) and self.device_map not in AUTO_MAPS:
            raise NLAInputError(f"device_map {self.device_map!r}: use one of {', '.join(AUTO_MAPS)} or a {{module: device}} map")

    def key(self) -> str:
        """A stable text for caches keyed by placement."""
        return json.dumps([self.device_map, {str(k): v for k, v in self.max_memory.items()}, self.offload_folder], sort_keys=True)

    def from_pretrained_kwargs(self, default_offload: Path) -> dict[str, Any]:
        kw: dict[str, Any] = {"device_map": self.device_map}
        if self.max_memory:
            kw["max_memory"] = dict(self.max_memory)
        values = list(self.device_map.values()) if isinstance(self.device_map, dict) else []
        if self.offload_folder or "disk" in values or self.max_memory:
            folder = Path(self.offload_folder) if self.offload_folder else default_offload
            folder.mkdir(parents=True, exist_ok=True)
            kw["offload_folder"] = str(folder)
        return kw


def parse_max_memory(text: str) -> dict[Any, str]:
    """``"0=70GiB,1=70GiB,cpu=200GiB"`` → ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}``."""
    out: dict[Any, str] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        dev, sep, size = part.partition("=")
        if not sep or not size.strip():
            raise NLAInputError(f"max memory {part!r}: write DEVICE=SIZE, e.g. 0=70GiB or cpu=200GiB")
        dev = dev.strip()
        out[int(dev) if dev.isdigit() else dev] = size.strip()
    return out


def placement_from_env() -> Placement | None:
    """The placement of ``$NLA_DEVICE_MAP`` / ``$NLA_MAX_MEMORY`` / ``$NLA_OFFLOAD_FOLDER``, or None."""
    raw = os.environ.get(DEVICE_MAP_ENV, "").strip()
    if not raw:
        return None
    try:
        device_map: Any = json.loads(raw) if raw.startswith("{") else raw
    except json.JSONDecodeError as exc:
        raise NLAInputError(f"${DEVICE_MAP_ENV}: not a JSON map ({exc})") from exc
    return Placement(device_map, parse_max_memory(os.environ.get(MAX_MEMORY_ENV, "")), os.environ.get(OFFLOAD_ENV) or None)


def is_placed(model: Any) -> bool:
    """Whether accelerate dispatched ``model`` over a device map (it must not be moved then)."""
    return bool(getattr(model, "hf_device_map", None))
