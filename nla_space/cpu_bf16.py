"""How a bfloat16 backbone runs fast on CPU: float32 attention and prepacked linear weights.

Both are applied by :func:`prepare` (called from :func:`nla_space.backbone._freeze`) to a model
whose parameters are bfloat16 on CPU, and undone by it for any other dtype or device. Measured
with the torch profiler on this project's CPU (2 cores, AVX-512 BF16), SmolLM2-135M:

* **Attention.** PyTorch's CPU ``scaled_dot_product_attention`` is several times slower in
  bfloat16 than in float32 for decoding shapes (one query position): 1.9 ms against 0.4 ms per call
  for 64 rows × 9 heads × 40 cached positions, a quarter of best-of-64's time. A model whose
  attention is ``sdpa`` is switched to :data:`ATTENTION`, which upcasts query, key and value to
  float32, runs the same ``sdpa`` function with ``sdpa``'s masks, and casts the output back. The
  scores are *more* precise than bfloat16 ``sdpa``'s; outputs are not bit-identical to it.
  Other implementations (``eager`` for Gemma-2's soft-capping) are left alone.
* **Linear layers.** A plain ``nn.Linear`` multiplies with a weight that oneDNN re-lays-out on every
  call. Packing each weight once into oneDNN's blocked layout (``torch.ops.mkldnn``, what
  ``torch.compile``'s CPU freezing does) gives the same bits and is 10–45 % faster at the row counts
  of best-of-K (the 49,152-row LM head at 16 rows: 7.3 → 4.0 ms). The packed copy is held beside
  the weight (same memory again for the linear weights; models above :data:`MAX_PACKED_BYTES` are
  not packed) and is dropped if the weight changes. Autograd, float32 and CUDA calls use the
  weight as before.

float32 models are never touched: the float32 path stays bit-identical to the plain recipe.

Modes (:data:`MODES`; :func:`resolve_mode` is the one place a mode is chosen)
    ``fast`` (the default of the CLI and the app) does both of the above. It is a documented
    deviation from the reference recipes, which run plain bfloat16 ``sdpa``: greedy decodes can
    differ from theirs in the last bits, and so then can the words.
    ``reference`` leaves a bfloat16 model exactly as ``from_pretrained(dtype=torch.bfloat16)``
    builds it (bfloat16 attention, plain linear layers), so its outputs equal the reference code's on
    the same machine; the harness's evals use it (``--bf16-mode``). Choose it with ``--bf16-mode
    reference`` or ``NLA_CPU_BF16=reference``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .errors import NLAInputError

log = logging.getLogger(__name__)

#: the attention implementation registered with ``transformers``
ATTENTION = "nla_sdpa_float32"
#: linear weights larger than this in total (bytes) are not packed
MAX_PACKED_BYTES = 4 << 30

#: bfloat16-on-CPU modes (module docstring)
MODES = ("fast", "reference")
#: environment variable naming the mode for a process (read by :func:`resolve_mode` only)
MODE_ENV = "NLA_CPU_BF16"

_REGISTERED = False
#: module → (packed weight, (data_ptr, version) of the weight it was packed from)
_PACKED: "weakref.WeakKeyDictionary[nn.Module, tuple[torch.Tensor, tuple[int, int]]]" = weakref.WeakKeyDictionary()


def _attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs: Any) -> Any:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.dtype == torch.float32:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    _REGISTERED = True


class PackedLinear(nn.Linear):
    """``nn.Linear`` that multiplies with its prepacked oneDNN weight when it has a current one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        entry = _PACKED.get(self)
        w = self.weight
        if (
            entry is None
            or x.dtype != torch.bfloat16
            or x.device.type != "cpu"
            or entry[1] != (w.data_ptr(), w._version)
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        ):
            return F.linear(x, w, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, entry[0], self.bias, "none", [], "")


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if type(m) in (nn.Linear, PackedLinear)]


def _pack(model: nn.Module, rows_hint: int = 64) -> int:
    mods = [m for m in _linears(model) if m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"]
    total = sum(m.weight.numel() * m.weight.element_size() for m in mods)
    if not mods or total > MAX_PACKED_BYTES or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return 0
    for m in mods:
        w = m.weight
        _PACKED[m] = (torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows_hint), (w.data_ptr(), w._version))
        m.__class__ = PackedLinear
    return len(mods)


def _unpack(model: nn.Module) -> None:
    for m in _linears(model):
        _PACKED.pop(m, None)
        if type(m) is PackedLinear:
            m.__class__ = nn.Linear


def resolve_mode(mode: str | None = None) -> str:
    """The bfloat16 CPU mode: ``mode`` when given, else ``$NLA_CPU_BF16``, else ``fast``; anything
    else is refused with one readable line."""
    chosen = mode if mode is not None else (os.environ.get(MODE_ENV, "").strip() or "fast")
    if chosen not in MODES:
        where = "bf16 mode" if mode is not None else f"{MODE_ENV}="
        raise NLAInputError(f"{where}{chosen!r} is not a bfloat16 CPU mode: use {' or '.join(MODES)}")
    return chosen


@contextlib.contextmanager
def mode_for_process(mode: str | None) -> Iterator[None]:
    """Within the block, :func:`resolve_mode` answers ``mode`` by default (an entry point's ``--bf16-mode``;
    None leaves ``$NLA_CPU_BF16`` as it is); the variable is restored afterwards, so an entry point
    called in-process (tests, notebooks) leaves no mode behind."""
    if mode is None:
        yield
        return
    resolve_mode(mode)
    saved = os.environ.get(MODE_ENV)
    os.environ[MODE_ENV] = mode
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(MODE_ENV, None)
        else:
            os.environ[MODE_ENV] = saved


def mode_of(model: Any) -> str:
    """``fast`` when :func:`prepare` switched ``model``'s attention, else ``reference`` (a plain model)."""
    return "fast" if getattr(model.config, "_attn_implementation", None) == ATTENTION or any(
        type(m) is PackedLinear for m in model.modules()) else "reference"


def prepare(model: Any, mode: str | None = None) -> None:
    """Make ``model`` fast for its current dtype and device in the ``fast`` mode, or leave it plain
    in the ``reference`` mode (:func:`resolve_mode`; module docstring); idempotent."""
    _unpack(model)
    p = next(model.parameters())
    impl = getattr(model.config, "_attn_implementation", None)
    if p.device.type != "cpu" or p.dtype != torch.bfloat16 or resolve_mode(mode) == "reference":
        if impl == ATTENTION:
            model.set_attn_implementation("sdpa")
        return
    if impl == "sdpa":
        _register()
        model.set_attn_implementation(ATTENTION)
    n = _pack(model)
    log.info("bfloat16 on CPU: attention %s, %d linear weights prepacked", model.config._attn_implementation, n)
