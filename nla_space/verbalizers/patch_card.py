"""A patch card opened for use (:mod:`nla_space.verbalizers.patch`, kind ``patch``): a raw-text reader
(:class:`nla_space.verbalizers.base.RawTextCard`) with the patch AV's rollout, its free per-token states
for guided decoding, and its read-like-a-text scoring; ``verbalize`` is the base class's.

Card file (kind ``"patch"``)::

    "av": {"folder": "assets/cards/NAME"}     PEFT adapter + patch_av.json (+ mu.safetensors, pool.safetensors)
    "mu_file": "mu.safetensors"
    "patch": {"pool_file": "pool.safetensors", "default_strategy": "guided", "guided_beta": 1.0, "calibration": {...}}
    "default_tau": confidence threshold (the calibration's tau)

Several layers. A card whose AV reads several layers (``PatchSpec.layers``) lists them in ``layers``
(the first is the default) and keeps, per layer ℓ, μ as the tensor ``mu.L{ℓ}`` of ``mu.safetensors``,
the pool as ``pool.L{ℓ}`` of ``pool.safetensors`` (:func:`nla_space.specificity.load_pools`) and the
calibration in ``patch.layer_calibrations["ℓ"]`` (the default layer's in ``patch.calibration``); a
request at ℓ is scored, calibrated and hedged with ℓ's own (:meth:`OpenPatchCard.specificity_at`,
:meth:`OpenPatchCard.tau_at`). Every layer shares the one backbone and adapter; each has its own
:class:`~nla_space.verbalizers.patch.ResidualPatch`.

The backbone of a patch card is private to it (the LoRA is attached to its blocks above ℓ in
place), shared only between opens of the same AV folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .. import activations, guided
from ..backbone import Backbone, load_backbone
from ..card_files import card_files, load_card_mu, open_compass
from ..cards import Card
from ..cards.sections import PatchSection
from ..errors import CheckpointError, NLAInputError
from ..placement import placement_from_env
from ..kv_cache import preallocated_cache, reorder_cache
from ..rollout import Rollout, request_generator, sample
from ..specificity import Specificity, load_pools
from .base import RawTextCard
from .patch import PatchSpec, ResidualPatch, attach, read_spec

log = logging.getLogger(__name__)

REPEAT_ENV = "NLA_GREEDY_REPEAT_NGRAM"  #: overrides the card's greedy repetition guard (measurements: 0 turns it off)
_OPENED: dict[tuple[str, ...], tuple[Backbone, Any]] = {}
_OPENED_LOCK = threading.Lock()


@dataclass
class PatchAV:
    """The opened AV: its spec, the hook that writes ``v`` at each card layer ℓ, and the PEFT model (in place on the backbone)."""

    spec: PatchSpec
    patches: dict[int, ResidualPatch]
    peft_model: Any
    d_vec: int


class PatchStepper:
    """Guided decoding's stepper *and* tracker for a patch AV: the AV's forward records the layer-ℓ
    state of each row's text (``[BOS] + tokens``) as it goes, which is the state the score reads."""

    def __init__(self, card: "OpenPatchCard", v: torch.Tensor, max_new_tokens: int, layer: int):
        self.bb = card.backbone
        self.v = v.to(self.bb.device)[None]
        self.cache = preallocated_cache(self.bb.config, max_new_tokens + 2)
        self.length = 0
        self._ctx = card.av.patches[layer].apply(self.v, record=True)
        self.states = self._ctx.__enter__()

    def close(self) -> None:
        self._ctx.__exit__(None, None, None)

    def start(self, n: int) -> torch.Tensor:
        bos = self.bb.embed_tokens(torch.full((n, 1), self.bb.bos_id, device=self.bb.device))
        self.length = 1
        mask = torch.ones(n, 1, dtype=torch.long, device=self.bb.device)
        return self.bb.model(inputs_embeds=bos, attention_mask=mask, past_key_values=self.cache, use_cache=True).logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.length += 1
        mask = torch.ones(tokens.shape[0], self.length, dtype=torch.long, device=tokens.device)
        return self.bb.model(input_ids=tokens[:, None], attention_mask=mask, past_key_values=self.cache, use_cache=True,
                             logits_to_keep=1).logits[:, -1]

    def push(self, tokens: torch.Tensor) -> torch.Tensor:
        """The state recorded by the :meth:`step` that fed ``tokens``."""
        return self.states[-1].float()

    def reorder(self, index: torch.Tensor) -> None:
        reorder_cache(self.cache, index)


@dataclass
class OpenPatchCard(RawTextCard):
    """A patch card opened for use: its private backbone (the LoRA attached above ℓ), the patch AV, μ and pool."""

    av: PatchAV
    repeat_ngram: int = 0  #: the greedy repetition guard's n (the card's ``patch.greedy_repeat_ngram``)
    mus: dict[int, torch.Tensor] = field(default_factory=dict)  #: μ of each card layer that has one
    specificities: dict[int, Specificity] = field(default_factory=dict)  #: the scorer of each card layer that has a pool

    def mu_at(self, layer: int) -> torch.Tensor | None:
        return self.mus.get(layer)

    def specificity_at(self, layer: int) -> Specificity | None:
        return self.specificities.get(layer)

    def tau_at(self, layer: int) -> float:
        """The calibrated τ of ``layer`` (the card's ``default_tau`` at a layer without a calibration)."""
        spec = self.specificities.get(layer)
        return spec.calibration.tau if spec is not None and spec.calibration is not None else self.card.default_tau

    @property
    def top_p(self) -> float:
        return float(self.av.spec.top_p)

    @property
    def av_max_new_tokens(self) -> int:
        return int(self.av.spec.max_new_tokens)

    def reconstruct(self, roll: Rollout, layer: int) -> torch.Tensor:
        """Candidates read like a typed text (``[BOS] + tokens``, stop token dropped) at ℓ."""
        return activations.read_rows(self.backbone, layer, roll.text_rows(self.backbone.stop_ids))

    def reconstruct_texts(self, texts: list[str], layer: int) -> torch.Tensor:
        rows = [list(self.backbone.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        return activations.read_rows(self.backbone, layer, rows)

    def rollout(self, v: torch.Tensor, k: int, temperature: float, max_new_tokens: int, greedy: bool, seed: int | None, layer: int) -> Rollout:
        n = 1 if greedy else k
        bb = self.backbone
        gen = request_generator(seed, bb.device)
        bos = bb.embed_tokens(torch.full((n, 1), bb.bos_id, device=bb.device))
        guard = self.repeat_ngram if greedy else 0
        with self.av.patches[layer].apply(v.to(bb.device)[None]):
            return sample(bb, bos, max_new_tokens, temperature=temperature, top_p=self.top_p, greedy=greedy, generator=gen,
                          repeat_ngram=guard)

    @contextlib.contextmanager
    def search_parts(self, v: torch.Tensor, layer: int, k: int, max_new_tokens: int) -> Iterator[tuple[guided.Stepper, guided.Tracker]]:
        """One :class:`PatchStepper` as both stepper and tracker; its hook is removed when the search ends."""
        stepper = PatchStepper(self, v, max_new_tokens, layer)
        try:
            yield stepper, stepper
        finally:
            stepper.close()


def _private_backbone(card: Card, folder: Path, spec: PatchSpec, device: str | None, dtype: str | None) -> tuple[Backbone, Any]:
    placement = placement_from_env()
    key = (str(folder.resolve()), str(device), str(dtype), placement.key() if placement else "")
    with _OPENED_LOCK:
        if key not in _OPENED:
            bb = load_backbone(card.backbone_id, revision=card.backbone.revision, device=device, dtype=dtype,
                               default_dtype=card.backbone.dtype)
            _OPENED[key] = (bb, attach(bb, spec, folder))
        return _OPENED[key]


def open_patch_card(card: Card, backbone: str | None = None, device: str | None = None, revision: str | None = None,
                    dtype: str | None = None) -> OpenPatchCard:
    """Open a patch card: its private backbone with the LoRA attached, and per card layer its patch, μ,
    specificity pool and calibration (module docstring)."""
    if backbone is not None or revision is not None:
        raise NLAInputError(f"card {card.id}: a patch AV is trained on its own backbone; --backbone/--revision cannot replace it")
    folder = card_files(card)
    if folder is None:
        raise CheckpointError(f"card {card.id}: no AV folder")
    spec = read_spec(folder)
    unread = [ell for ell in card.layers if ell not in spec.read_layers]
    if unread:
        raise CheckpointError(f"card {card.id}: the AV in {folder} reads layer(s) {spec.read_layers}, the card says {card.layers}")
    bb, pm = _private_backbone(card, folder, spec, device, dtype)
    av = PatchAV(spec=spec, patches={ell: ResidualPatch(bb, ell) for ell in card.layers}, peft_model=pm, d_vec=bb.hidden_size)
    notes: list[str] = []
    section = card.patch or PatchSection()
    mus: dict[int, torch.Tensor] = {}
    specificities: dict[int, Specificity] = {}
    for ell in card.layers:
        mu = load_card_mu(folder, card, ell)
        if mu is not None:
            mus[ell] = mu
    pools = load_pools(folder / section.pool_file, list(mus)) if section.pool_file and mus else {}
    for ell, pool in pools.items():
        specificities[ell] = Specificity.from_pool(pool, mus[ell], section.calibration_at(ell, card.default_layer))
    uncalibrated = [ell for ell, s in specificities.items() if s.calibration is None]
    if uncalibrated:
        notes.append(f"no calibration at layer(s) {uncalibrated}: answers there are ranked by specificity, hedged by the centered score")
    compass, compass_tau = open_compass(card, folder, notes)
    default = card.default_layer
    return OpenPatchCard(card=card, backbone=bb, av=av, trained=True, mu=mus.get(default), notes=notes, compass=compass,
                         compass_tau=compass_tau, specificity=specificities.get(default), default_strategy=section.default_strategy,
                         guided_beta=section.guided_beta, guided_prefixes=section.guided_prefixes,
                         guided_fluency_weight=section.guided_fluency_weight, repeat_ngram=int(os.environ.get(REPEAT_ENV, section.greedy_repeat_ngram)), mus=mus,
                         specificities=specificities)
