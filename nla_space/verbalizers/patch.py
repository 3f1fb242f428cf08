"""The *patch* verbalizer: ``v`` written into the residual stream at its own layer, read by a LoRA above it.

Design (measured against the prefix AV before it was chosen; see ``docs/training_patch.md``)
    ``v`` is a layer-ℓ state (``hidden_states[ℓ]``, :mod:`nla_space.activations`), so the blocks
    above ℓ already know how to read it. The AV is the backbone itself, run on ``[BOS] + text``,
    with the output of block ℓ−1 at the BOS position (position 0) replaced by ``v``, and a LoRA on
    blocks ℓ … N−1 only. Blocks 0 … ℓ−1 are untouched, so:

    * the layer-ℓ states of the tokens the AV writes are exactly the states of ``[BOS] + text``
      through the plain backbone, i.e. the re-encode the score needs, computed during generation
      at no extra cost (guided decoding reads them from :class:`ResidualPatch`);
    * in training, ``v`` of a text is read from the same forward that computes its loss (the
      state at the text's last token), so no target vectors need to be stored;
    * the backward pass covers only the blocks above ℓ.

    Zero-shot (no LoRA) the patch already lowers the CE of a text given its own ``v`` versus a
    shuffled one; the LoRA is trained with token CE on natural text windows
    (:mod:`eval_harness.train.patch`).

Several layers, one adapter (``PatchSpec.layers``)
    An AV may read several layers ``ℓ₁ < … < ℓₙ`` with one LoRA on blocks ℓ₁ … N−1. Reading at ℓ,
    the LoRA is *on only for blocks ≥ ℓ*, so everything above still holds at every ℓ: blocks below
    the patch run untouched. The gate is per thread and on only inside :meth:`ResidualPatch.apply`
    (:func:`gate_lora`): any other forward through the same model (a read, a re-encode, another
    request) sees the plain backbone. A single-layer AV is the case ``layers == [layer]``.

Text conventions
    The AV's input is ``[BOS] + tokens(text)`` exactly as :func:`nla_space.activations.encode_text`
    builds it; its targets are ``tokens(text) + [EOS]`` where EOS is the backbone's first stop id,
    so a rollout ends where a typed text would. A candidate is scored by reading it the way a user
    text is read (``[BOS] + tokens``, last text token, no EOS): :func:`read_texts`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..activations import check_layer, decoder_of
from ..backbone import Backbone
from ..errors import CheckpointError

log = logging.getLogger(__name__)

SPEC_FILE = "patch_av.json"
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class PatchSpec:
    """What a patch AV folder declares (``patch_av.json``); every default is here, once."""

    layer: int  #: the lowest layer read: the LoRA is on blocks ``layer … N−1``
    layers: list[int] | None = None  #: every layer the AV reads (sorted, lowest = ``layer``); None means ``[layer]``
    r: int = 16
    alpha: int = 32
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    max_new_tokens: int = 40  #: default rollout length (the training windows are at most ~48 tokens)
    max_text_tokens: int = 64  #: training windows are cut to this many tokens
    top_p: float = 1.0

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "PatchSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        if "layer" not in data:
            raise CheckpointError(f"{where}: missing 'layer'")
        spec = cls(**data)
        if spec.layers is not None and (sorted(set(spec.layers)) != list(spec.layers) or spec.layers[0] != spec.layer):
            raise CheckpointError(f"{where}: 'layers' must be sorted, distinct and start at 'layer' ({spec.layer}); got {spec.layers}")
        return spec

    @property
    def read_layers(self) -> list[int]:
        """The layers this AV reads (``layers``, or ``[layer]``)."""
        return list(self.layers) if self.layers else [self.layer]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lora_config(self, num_layers: int) -> Any:
        """The PEFT LoRA config: the spec's modules on blocks ℓ₁ … N−1 only (ℓ₁ = ``layer``, the lowest read)."""
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=0.0, target_modules=list(self.target_modules),
                          layers_to_transform=list(range(self.layer, num_layers)), task_type="CAUSAL_LM")


_GATE = threading.local()  #: ``.lowest``: the layer this thread's AV forward reads (None: LoRA off)
_BLOCK_RE = re.compile(r"\.layers\.(\d+)\.")
_GATED: dict[type, type] = {}


def _lora_on(block: int) -> bool:
    lowest = getattr(_GATE, "lowest", None)
    return lowest is not None and block >= lowest


def _gated(cls: type) -> type:
    """``cls`` (a PEFT LoRA layer class) whose ``disable_adapters`` also holds outside the gate."""
    if cls not in _GATED:
        base = cls.disable_adapters

        def disable_adapters(self: Any) -> bool:
            return base.fget(self) or not _lora_on(self._nla_block)

        _GATED[cls] = type(f"Gated{cls.__name__}", (cls,), {"disable_adapters": property(disable_adapters)})
    return _GATED[cls]


def gate_lora(peft_model: Any) -> Any:
    """Make each LoRA layer of ``peft_model`` in block k run only while this thread is inside a
    :meth:`ResidualPatch.apply` that reads a layer ≤ k (see the module docstring).

    Why a class swap: PEFT decides per module, through the ``disable_adapters`` property, whether
    the adapter runs; its public switch (``enable_adapters``) is global and also flips
    ``requires_grad``, so it cannot serve two threads reading different layers. The swapped class
    only adds the gate to that property; saving, loading and ``isinstance`` are unchanged."""
    from peft.tuners.lora import LoraLayer

    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraLayer):
            m = _BLOCK_RE.search(name)
            if m is None:
                raise CheckpointError(f"patch AV: LoRA module {name} is not in a decoder block")
            mod._nla_block = int(m.group(1))
            mod.__class__ = _gated(type(mod))
    return peft_model


@contextlib.contextmanager
def _gate_from(layer: int) -> Iterator[None]:
    old = getattr(_GATE, "lowest", None)
    _GATE.lowest = layer
    try:
        yield
    finally:
        _GATE.lowest = old


class ResidualPatch:
    """A forward hook on block ℓ−1 that writes ``v`` into position 0 of ``hidden_states[ℓ]``.

    Inside ``with patch.apply(v) as states:`` the AV's LoRA is on for blocks ≥ ℓ in this thread
    (:func:`gate_lora`), and the first forward call through the block *made by this
    thread* is the one holding position 0 (a training forward, or a rollout's prefill): its
    position-0 output is replaced. With ``record=True`` every such call's last-position output is
    appended to ``states`` (the layer-ℓ state of the text so far, for guided decoding). Calls from
    other threads (another request reading an activation through the same blocks) pass untouched,
    so concurrent requests need no lock. ``v`` may be a ``(B, d)`` or ``(1, d)`` tensor, or a
    function of the block's output ``(B, T, d)`` returning ``(B, d)`` (training reads ``v`` from the
    same forward).
    """

    def __init__(self, backbone: Backbone, layer: int):
        self.layer = check_layer(backbone, layer)
        if self.layer < 1:
            raise CheckpointError("a patch AV needs layer ≥ 1 (v is the output of a block)")
        self.block = decoder_of(backbone.model).layers[self.layer - 1]

    @contextlib.contextmanager
    def apply(self, v: torch.Tensor | Callable[[torch.Tensor], torch.Tensor], record: bool = False) -> Iterator[list[torch.Tensor]]:
        first = [True]
        states: list[torch.Tensor] = []
        owner = threading.get_ident()

        def hook(module: Any, args: Any, output: Any) -> Any:
            if threading.get_ident() != owner:
                return None
            h = output[0] if isinstance(output, tuple) else output
            if first[0]:
                first[0] = False
                vv = v(h) if callable(v) else v
                h = torch.cat([vv.to(h.dtype)[:, None, :].expand(h.shape[0], 1, -1), h[:, 1:]], dim=1)
            if record:
                states.append(h[:, -1].detach())
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handle = self.block.register_forward_hook(hook)
        try:
            with _gate_from(self.layer):
                yield states
        finally:
            handle.remove()


def text_rows(backbone: Backbone, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each text (no special tokens), cut to ``max_tokens``; an empty text gives ``[]``."""
    return [list(backbone.tokenizer(t, add_special_tokens=False)["input_ids"])[:max_tokens] for t in texts]


def teacher_batch(backbone: Backbone, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels, last)`` for teacher forcing on ``[BOS] + row``.

    ``labels[b, t]`` is the token after position t (``row + [EOS]``), ``-100`` on padding;
    ``last[b]`` is the position of the row's last text token (where its ``v`` is read)."""
    if backbone.bos_id is None:
        raise CheckpointError("a patch AV needs a backbone with a BOS token (v is written at position 0)")
    eos = backbone.stop_ids[0] if backbone.stop_ids else backbone.pad_id
    T = max(len(r) for r in rows) + 1
    ids = torch.full((len(rows), T), backbone.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    last = torch.zeros(len(rows), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r)
        ids[b, : n + 1] = torch.tensor([backbone.bos_id] + r)
        mask[b, : n + 1] = 1
        labels[b, : n + 1] = torch.tensor(r + [eos])
        last[b] = n
    dev = backbone.device
    return ids.to(dev), mask.to(dev), labels.to(dev), last.to(dev)


def token_ce(backbone: Backbone, patch: ResidualPatch, rows: list[list[int]], shuffle: torch.Tensor | None = None) -> torch.Tensor:
    """Mean token CE (nats/token) of ``row + [EOS]`` given each row's own ``v`` (or, with ``shuffle``
    a permutation, the ``v`` of row ``shuffle[b]``), ``v`` read from the same forward."""
    ids, mask, labels, last = teacher_batch(backbone, rows)
    ar = torch.arange(ids.shape[0], device=ids.device)

    def v_of(h: torch.Tensor) -> torch.Tensor:
        v = h[ar, last].detach()
        return v if shuffle is None else v[shuffle.to(v.device)]

    with patch.apply(v_of):
        logits = backbone.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def attach(backbone: Backbone, spec: PatchSpec, folder: Path | None = None, trainable: bool = False) -> Any:
    """The backbone's model with the patch AV's LoRA (in place): a fresh one from ``spec``, or the one in ``folder``."""
    from .lora import attach_lora, freeze, new_lora

    if folder is not None:
        return gate_lora(attach_lora(backbone, folder, trainable))
    pm = gate_lora(new_lora(backbone, spec.lora_config(backbone.num_layers)))
    return pm if trainable else freeze(pm)


def read_spec(folder: Path) -> PatchSpec:
    from ..io import read_json_object

    path = folder / SPEC_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {SPEC_FILE}: not a patch AV folder")
    return PatchSpec.from_dict(read_json_object(path, "a patch AV spec"), str(path))
