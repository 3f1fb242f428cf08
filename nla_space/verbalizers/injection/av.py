"""The injection AV as a model: its prompt embedded with the activation written over the marker, and its output cut.

An :class:`InjectionAV` is a causal LM (a base model with a LoRA adapter, or a full fine-tune) plus its
:class:`~nla_space.verbalizers.injection.spec.InjectionSpec`. It checks the marker and its neighbours
once, caches the checked prompt of each depth, builds the embedded prompt whose marker row holds the
scaled activation (:meth:`InjectionAV.inputs_embeds`), switches the adapter off for reading base-model
activations, and turns sampled rows into explanation text. :func:`load_inject_mu` reads the per-layer
μ that the ``center_normalize`` rule subtracts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ...backbone import Backbone
from ...errors import CheckpointError
from ...hub import load_state_dict
from ...rollout import Rollout
from .prompt import check_marker_token, clip_text, encode, find_marker, find_subsequence, neighbor_ids, prompt_ids
from .spec import INJECT_MU_FILE, InjectionSpec, scale_vector


@dataclass
class InjectionAV:
    """An injection AV: its model (a base with a LoRA adapter, or a full fine-tune) and its spec."""

    backbone: Backbone
    spec: InjectionSpec
    peft_model: Any = None
    #: per-layer μ subtracted by the ``center_normalize`` rule (``load_inject_mu``); None otherwise
    inject_mu: dict[int, torch.Tensor] | None = None
    _prompts: dict[int | None, tuple[list[int], int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        tok = self.backbone.tokenizer
        self.marker_id = check_marker_token(tok, self.spec)
        self.left_id, self.right_id = neighbor_ids(tok, self.spec)
        if self.spec.d_model is not None and self.spec.d_model != self.backbone.hidden_size:
            raise CheckpointError(f"the sidecar says d_model={self.spec.d_model}, the model has {self.backbone.hidden_size}")
        close = self.spec.close_tag
        self.close_ids = encode(tok, close, add_special_tokens=False) if close else []

    @property
    def d_vec(self) -> int:
        return self.backbone.hidden_size

    def block(self, layer: int) -> int:
        return layer - self.spec.block_offset

    def depth_pct(self, layer: int) -> int | None:
        return self.spec.depth_pct(self.block(layer), self.backbone.num_layers)

    def prompt(self, layer: int) -> tuple[list[int], int]:
        """(prompt ids, marker position) for ``layer``, checked once per depth and cached."""
        pct = self.depth_pct(layer)
        if pct not in self._prompts:
            ids = prompt_ids(self.backbone.tokenizer, self.spec, pct)
            self._prompts[pct] = (ids, find_marker(ids, self.marker_id, self.left_id, self.right_id))
        return self._prompts[pct]

    def inputs_embeds(self, v: torch.Tensor, layer: int) -> torch.Tensor:
        """The prompt embedded by the model, the marker row replaced by the scaled ``v``: (1, T, d)."""
        ids, pos = self.prompt(layer)
        dev = self.backbone.device
        emb = self.backbone.embed_tokens(torch.tensor([ids], device=dev)).clone()
        mu = None
        if self.spec.rule == "center_normalize":
            if not self.inject_mu or layer not in self.inject_mu:
                raise CheckpointError(f"the center_normalize rule needs μ for layer {layer} ({INJECT_MU_FILE} in the AV folder)")
            mu = self.inject_mu[layer]
        emb[0, pos] = scale_vector(v.to(dev), self.spec.rule, self.spec.scale, mu).to(emb.dtype)
        return emb

    @contextlib.contextmanager
    def adapter_off(self) -> Iterator[None]:
        """The base model: the LoRA adapter disabled (no-op for a full fine-tune)."""
        if self.peft_model is None:
            yield
        else:
            with self.peft_model.disable_adapter():
                yield

    def cut(self, roll: Rollout) -> Rollout:
        """Each row cut (masked) before the first occurrence of the close tag's token ids."""
        mask = roll.mask.clone()
        if self.close_ids:
            for i in range(roll.ids.shape[0]):
                n = int(mask[i].sum())
                j = find_subsequence([int(t) for t in roll.ids[i, :n]], self.close_ids)
                if j >= 0:
                    mask[i, j:] = 0
        return Rollout(ids=roll.ids, mask=mask)

    def decode(self, ids: list[int]) -> str:
        text = self.backbone.tokenizer.decode(ids, skip_special_tokens=True)
        return clip_text(text, self.spec.open_tag, self.spec.close_tag, self.spec.cut_at)


def load_inject_mu(folder: Path, layers: list[int], d: int) -> dict[int, torch.Tensor]:
    """The AV's per-layer injection μ (``INJECT_MU_FILE``, keys ``L{ℓ}``) for every layer in ``layers``."""
    path = Path(folder) / INJECT_MU_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: the center_normalize rule needs {INJECT_MU_FILE} (per-layer μ, keys L{{layer}})")
    tensors = load_state_dict(path)
    out = {}
    for ell in layers:
        t = tensors.get(f"L{ell}")
        if t is None:
            raise CheckpointError(f"{path}: no μ for layer {ell} (has {sorted(tensors)})")
        t = t.float().reshape(-1)
        if t.numel() != d or not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: μ of layer {ell} must be {d} finite values")
        out[ell] = t
    return out
