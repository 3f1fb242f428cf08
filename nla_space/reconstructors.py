"""Activation reconstructors (ARs): text → activation, used as the scorer of injection cards.

Three released layouts share one forward: Anthropic's NLA ARs
(https://github.com/kitft/natural_language_autoencoders, e.g.
https://huggingface.co/kitft/nla-qwen2.5-7b-L20-ar) and nla-at-home's LoRA ARs
(https://github.com/anicka-net/nla-at-home, e.g. https://huggingface.co/anicka/nla-phi4-universal-ar-v2):

``value_head`` (Anthropic)
    A full fine-tune truncated to blocks ``0..K`` (``num_hidden_layers = K+1``), final norm and LM
    head unused, plus ``value_head.safetensors`` (key ``weight``, ``[d, d]``, no bias; identity at
    initialisation, see :func:`identity_head`). Template (raw string, no chat template, tokenised
    with the tokenizer's special tokens, i.e. BOS on Gemma/Llama):
    ``Summary of the following text: <text>{explanation}</text> <summary>``; read at the last real
    token (the ``>`` of ``<summary>``).
``lora_heads`` (nla-at-home universal AR)
    The base model plus a LoRA adapter, one ``Linear(d, d, bias=False)`` head per layer in
    ``value_heads.safetensors`` keyed by the block index (``"4"``, ``"10"``, …), same template,
    left padding, at most 256 tokens, read at the last token.
``lora_marker`` (nla-at-home Qwen L20 "hook" AR)
    The base model plus a LoRA adapter, the template followed by the marker, no special tokens, read
    at the **first** marker position, no head.

Conventions, stated once:

* Layer: ℓ = K + 1, ``hidden_states[ℓ]`` (the output of block K, no final norm), computed by a
  weight-sharing view that runs blocks ``0..K`` only (:mod:`nla_space.activations`).
* Padding: position ids are ``cumsum(mask) − 1``, so a padded row (left or right) gets exactly the
  vector of the same text alone; the read position is the last real token (or the first marker).
* Heads run in float32 on the float32 hidden state: ``pred = h @ Wᵀ``.
* Too-long prompts keep their suffix: the explanation's tokens are cut, never the read token.
* Score: both vectors L2-normalised to ``s`` (``mse_scale``, default √d), ``mse = mean_d (p̂ − ĝ)²
  = (s²/d)·2(1 − cos)``; with s = √d this is ``2(1 − cos) = 4(1 − fve_nrm)``, so ranking candidates
  by :func:`nla_space.scoring.fve_nrm` of the reconstruction (what :mod:`nla_space.policy` does)
  is ranking them by −MSE, Anthropic's reward.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .activations import decoder_of
from .backbone import Backbone, load_backbone
from .card_files import ADAPTER_PATTERNS, FULL_PATTERNS, compass_scorer, section_files
from .cards.sections import AR_KINDS, AR_TEMPLATE, ReconstructorSection
from .compass import CompassScorer
from .errors import CheckpointError, NLAInputError
from .hub import load_state_dict
from .sidecar import Sidecar, load_sidecar
from .verbalizers.lora import attach_lora

log = logging.getLogger(__name__)

__all__ = ["AR_KINDS", "AR_TEMPLATE", "ARSpec", "Reconstructor", "head_layer_keys", "identity_head", "nrm_mse", "open_reconstructor"]


def normalize_to(x: torch.Tensor, s: float) -> torch.Tensor:
    """``x · s / max(‖x‖₂, 1e-12)`` over the last dim, in float32."""
    x = x.float()
    return x * (s / x.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def nrm_mse(pred: torch.Tensor, gold: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Anthropic's AR loss: per-element MSE of both vectors normalised to ``scale`` (default √d)."""
    d = pred.shape[-1]
    s = math.sqrt(d) if scale is None else float(scale)
    return (normalize_to(pred, s) - normalize_to(gold, s)).pow(2).mean(dim=-1)


def identity_head(d: int) -> torch.Tensor:
    """The value head at initialisation: ``Linear(d, d, bias=False)`` with the identity matrix."""
    return torch.eye(d, dtype=torch.float32)


def head_layer_keys(tensors: dict[str, torch.Tensor], block_offset: int = 1) -> dict[int, torch.Tensor]:
    """Per-layer heads keyed by block index (``"4"`` or the older ``value_head.4.weight``) → {ℓ: W}."""
    out: dict[int, torch.Tensor] = {}
    for key, w in tensors.items():
        m = re.fullmatch(r"(?:value_head\.|x\.)?(\d+)(?:\.weight)?", key)
        if m is None:
            raise CheckpointError(f"value-head key {key!r} names no block index")
        out[int(m.group(1)) + block_offset] = w.float()
    return out


@dataclass
class ARSpec:
    """How an AR reads a text: a card's :class:`~nla_space.cards.sections.ReconstructorSection` (which
    states every default) merged with the AR's sidecar (its ``ar`` template and ``mse_scale`` win)."""

    template: str
    add_special_tokens: bool
    padding_side: str
    max_tokens: int
    read: str
    marker: str | None
    block_offset: int
    mse_scale: float | None

    @classmethod
    def from_section(cls, section: ReconstructorSection, sidecar: Sidecar | None, where: str) -> "ARSpec":
        spec = cls(
            template=sidecar.ar_template if sidecar and sidecar.ar_template else section.template,
            add_special_tokens=section.add_special_tokens,
            padding_side=section.padding_side,
            max_tokens=section.max_tokens,
            read=section.read,
            marker=section.marker,
            block_offset=section.block_offset,
            mse_scale=sidecar.mse_scale if sidecar and sidecar.mse_scale is not None else section.mse_scale,
        )
        if "{explanation}" not in spec.template:
            raise CheckpointError(f"{where}: the AR template has no {{explanation}} placeholder")
        return spec


@dataclass
class Reconstructor:
    """An AR: model + tokenizer + spec + heads ({ℓ: W (d, d)}, or None for no head)."""

    backbone: Backbone
    spec: ARSpec
    heads: dict[int, torch.Tensor] | None
    peft_model: Any = None
    folder: Path | None = None
    #: set when the AR's LoRA is a second adapter on the AV's own PeftModel (one base in memory)
    adapter_name: str | None = None
    _views: dict[int, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: what ``encode`` returns: activations (scored against the activation, μ-centered when there is a μ)
    space = "activation"

    def __post_init__(self) -> None:
        d = self.backbone.hidden_size
        for ell, w in (self.heads or {}).items():
            if tuple(w.shape) != (d, d):
                raise CheckpointError(f"AR head for layer {ell} has shape {tuple(w.shape)}, expected ({d}, {d})")
        self.marker_id: int | None = None
        if self.spec.read == "marker":
            ids = self.backbone.tokenizer(self.spec.marker, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise CheckpointError(f"AR marker {self.spec.marker!r} encodes to {len(ids)} tokens, not one")
            self.marker_id = int(ids[0])

    @contextlib.contextmanager
    def _active(self) -> Iterator[None]:
        """Make this AR's adapter the active one for the forward, then restore the previous one."""
        if self.adapter_name is None:
            yield
            return
        prev = self.peft_model.active_adapter
        self.peft_model.set_adapter(self.adapter_name, inference_mode=True)
        try:
            yield
        finally:
            self.peft_model.set_adapter(prev, inference_mode=True)

    def supports(self, layer: int) -> bool:
        if self.heads is not None:
            return layer in self.heads
        return 1 <= layer <= self.backbone.num_layers

    def _view(self, layer: int) -> Any:
        """Blocks ``0..layer-1`` of the decoder, identity final norm (weights shared)."""
        with self._lock:
            view = self._views.get(layer)
            if view is None:
                model = self.backbone.model
                full = model if hasattr(model, "layers") and hasattr(model, "embed_tokens") else decoder_of(model)
                if len(full.layers) < layer:
                    raise CheckpointError(f"the AR has {len(full.layers)} blocks; layer {layer} needs {layer}")
                view = copy.copy(full)
                view._modules = dict(full._modules)
                view._modules["layers"] = torch.nn.ModuleList(list(full.layers)[:layer])
                view._modules["norm"] = torch.nn.Identity()
                self._views[layer] = view
        return view

    def prompt_ids(self, explanation: str) -> list[int]:
        """Token ids of the filled template, suffix-preserving when longer than ``max_tokens``."""
        tok = self.backbone.tokenizer
        spec = self.spec
        text = spec.template.format(explanation=explanation.strip())
        if spec.read == "marker":
            text = text + spec.marker
        ids = [int(i) for i in tok(text, add_special_tokens=spec.add_special_tokens)["input_ids"]]
        if len(ids) > spec.max_tokens:
            tail = spec.template.split("{explanation}", 1)[1] + (spec.marker if spec.read == "marker" else "")
            tail_ids = [int(i) for i in tok(tail, add_special_tokens=False)["input_ids"]]
            ids = ids[: spec.max_tokens - len(tail_ids)] + tail_ids
        return ids

    def batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.prompt_ids(t) for t in texts]
        width = max(len(r) for r in rows)
        pad = self.backbone.pad_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if self.spec.padding_side == "left":
                ids[i, width - len(r) :] = torch.tensor(r)
                mask[i, width - len(r) :] = 1
            else:
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
        return ids, mask

    def read_positions(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.spec.read == "marker":
            is_m = (ids == self.marker_id) & mask.bool()
            if not bool(is_m.any(dim=1).all()):
                raise CheckpointError("an AR prompt lost its marker token")
            return is_m.long().argmax(dim=1)
        T = mask.shape[1]
        pos = torch.arange(T).expand_as(mask)
        return torch.where(mask.bool(), pos, torch.full_like(pos, -1)).max(dim=1).values

    @torch.inference_mode()
    def hidden(self, texts: list[str], layer: int) -> torch.Tensor:
        """``hidden_states[layer]`` at each text's read position, float32 ``(N, d)`` (no head)."""
        return self.forward_hidden(texts, layer)

    def forward_hidden(self, texts: list[str], layer: int) -> torch.Tensor:
        """:meth:`hidden` with autograd left to the caller (the AR trainer backpropagates through it)."""
        if not texts:
            raise NLAInputError("no texts to reconstruct")
        ids, mask = self.batch(texts)
        idx = self.read_positions(ids, mask)
        dev = self.backbone.device
        ids, mask = ids.to(dev), mask.to(dev)
        position_ids = (mask.cumsum(dim=1) - 1).clamp_min(0)
        with self._active():
            out = self._view(layer)(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
        h = out.last_hidden_state
        return h[torch.arange(h.shape[0], device=dev), idx.to(dev)].float()

    @torch.inference_mode()
    def encode(self, texts: list[str], layer: int, batch_size: int = 16) -> torch.Tensor:
        """Reconstructed activations ``(N, d)`` (float32) of ``texts`` at ``layer``."""
        if not self.supports(layer):
            raise NLAInputError(f"the reconstructor has no head for layer {layer}")
        out = []
        for i in range(0, len(texts), batch_size):
            h = self.hidden(texts[i : i + batch_size], layer)
            if self.heads is not None:
                h = h @ self.heads[layer].to(h.device).T
            out.append(h)
        return torch.cat(out, dim=0)

    def target(self, v: torch.Tensor, layer: int) -> torch.Tensor:
        """What reconstructions are scored against: the activation itself."""
        return v

    def mse(self, pred: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Anthropic's score of each reconstruction against ``v`` (lower is better)."""
        return nrm_mse(pred, v.to(pred.device).expand_as(pred), self.spec.mse_scale)


def open_reconstructor(
    section: ReconstructorSection,
    device: str | None = None,
    dtype: str | None = None,
    where: str = "reconstructor",
    default_base: tuple[str, str | None] | None = None,
    share: tuple[str, str | None, Backbone, Any] | None = None,
    explicit_dtype: str | None = None,
) -> Reconstructor | CompassScorer:
    """Load the AR a card's ``reconstructor`` section names (see the module docstring for the kinds).

    ``dtype`` is the card's backbone dtype (used on CUDA only), ``explicit_dtype`` the user's request
    (see :func:`nla_space.backbone.resolve_dtype`).

    Kind ``compass`` gives a :class:`nla_space.compass.CompassScorer` instead (same ``supports`` /
    ``encode`` / ``target`` interface): nla-at-home's compass as the best-of-K scorer.

    ``share = (base id, revision, backbone, PeftModel)``: a LoRA AR on that same base is loaded as a
    second adapter (``"ar"``) of that PeftModel instead of a second copy of the base; it is made
    active only for its own forwards."""
    kind = section.kind
    if kind == "compass":
        return compass_scorer(section.compass_section(), section_files(section, ["*.safetensors", "*.json"], f"{where} compass"))
    head_file = section.head_file_name
    patterns = (FULL_PATTERNS if kind == "value_head" else ADAPTER_PATTERNS) + ([head_file] if head_file else [])
    folder = section_files(section, patterns, f"{where} AR")
    sidecar = load_sidecar(folder)
    spec = ARSpec.from_section(section, sidecar, where)
    peft_model = None
    adapter_name = None
    if kind == "value_head":
        bb = load_backbone(str(folder), device=device, dtype=explicit_dtype, default_dtype=dtype)
        if sidecar is not None and sidecar.extraction_layer_index is not None:
            block = sidecar.extraction_layer_index
        elif section.block is not None:
            block = section.block
        else:
            block = bb.num_layers - 1
        name = str(head_file)
        tensors = load_state_dict(folder / name)
        if "weight" not in tensors:
            raise CheckpointError(f"{folder / name}: no 'weight' tensor (keys {sorted(tensors)[:5]})")
        heads: dict[int, torch.Tensor] | None = {block + spec.block_offset: tensors["weight"].float()}
    else:
        base = section.base
        base_id = base.id or (default_base[0] if default_base else None)
        base_rev = base.revision if base.id else (default_base[1] if default_base else None)
        if not base_id:
            raise CheckpointError(f"{where}: a LoRA reconstructor needs base.id")
        adapter_name = None
        if share is not None and (share[0], share[1]) == (base_id, base_rev):
            bb, peft_model, adapter_name = share[2], share[3], "ar"
            if adapter_name not in peft_model.peft_config:
                try:
                    peft_model.load_adapter(str(folder), adapter_name=adapter_name, is_trainable=False)
                except (OSError, ValueError, KeyError, RuntimeError) as exc:
                    raise CheckpointError(f"{folder}: cannot load the AR adapter ({type(exc).__name__}: {exc})") from exc
                for p in peft_model.parameters():
                    p.requires_grad_(False)
        else:
            bb = load_backbone(base_id, revision=base_rev, device=device, dtype=explicit_dtype, default_dtype=dtype)
            peft_model = attach_lora(bb, folder)
        heads = None
        if kind == "lora_heads":
            heads = head_layer_keys(load_state_dict(folder / str(head_file)), spec.block_offset)
    ar = Reconstructor(backbone=bb, spec=spec, heads=heads, peft_model=peft_model, folder=folder,
                       adapter_name=adapter_name if kind != "value_head" else None)
    for ell, w in (heads or {}).items():
        heads[ell] = w.to(bb.device)  # type: ignore[index]
    log.info("opened %s reconstructor from %s (layers %s)", kind, folder, sorted(heads) if heads else "any")
    return ar
