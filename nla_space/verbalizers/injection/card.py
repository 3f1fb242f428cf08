"""An injection card opened for use: read the activation from the base model, roll out the AV, score with the AR.

:func:`open_injection_card` loads what a card of kind ``injection`` names (the base model, the AV as a
LoRA adapter on a private copy of it or as a full fine-tune, the sidecar, the reconstructor or compass
that scores candidates, and μ) and returns an :class:`OpenInjectionCard`, an
:class:`nla_space.verbalizers.base.OpenedCard`: ``verbalize`` and the rest of the interface are the
base class's, and this class supplies the injection pieces. It reads activations with the adapter off,
samples K candidates (or runs guided decoding, re-scoring every particle's text with the
reconstructor at each token: correct, and slower than on a prefix or patch card), parses them and
reconstructs them. One request at a time holds the card's lock, since the adapter switch is model state.

Read position (:mod:`nla_space.activations`): an injection card whose input is the raw text
(``input.chat_template: false``, Anthropic's AVs, trained on many positions of raw text) reads token p
of the text as the last token of the text's ids cut after it; one that wraps the text in its chat
template (nla-at-home) reads the template's last token, the only one its AV was trained on, and
refuses any other position.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch

from ... import activations, guided
from ...activations import ReadToken
from ...backbone import Backbone, load_backbone, shared_backbone
from ...card_files import ADAPTER_PATTERNS, FULL_PATTERNS, load_reconstructor_mu, section_files
from ...cards import Card
from ...compass import CompassScorer
from ...errors import CheckpointError, NLAInputError
from ...policy import Note
from ...reconstructors import Reconstructor, open_reconstructor
from ...rollout import Rollout, request_generator, sample
from ...sidecar import load_sidecar
from ..base import OpenedCard
from ..lora import attach_lora
from .av import InjectionAV, load_inject_mu
from .prompt import input_ids_for_text, text_token_indices
from .spec import resolve_spec

log = logging.getLogger(__name__)


@dataclass
class OpenInjectionCard(OpenedCard):
    """An injection card opened for use (module docstring)."""

    card: Card
    av: InjectionAV
    reconstructor: Reconstructor | CompassScorer
    mus: dict[int, torch.Tensor]
    base_loader: Callable[[], Backbone] | None = None
    trained: bool = True
    notes: list[str] = field(default_factory=list)
    _base: Backbone | None = field(default=None, repr=False)
    _lock: ContextManager[Any] = field(default_factory=threading.RLock, repr=False)  #: re-entrant: a request reads under it

    score_label = "reconstructing and scoring"

    @property
    def mu(self) -> torch.Tensor | None:  # type: ignore[override]
        """μ of the default layer (None when the card ships none)."""
        return self.mus.get(self.card.default_layer)

    def mu_at(self, layer: int) -> torch.Tensor | None:
        return self.mus.get(layer)

    @property
    def backbone(self) -> Backbone:  # type: ignore[override]
        """The model the activations are read from: the AV's own base (LoRA) or the base model (full FT)."""
        if self.base_loader is None:
            return self.av.backbone
        if self._base is None:
            self._base = self.base_loader()
            if self._base.hidden_size != self.av.d_vec:
                raise CheckpointError(f"card {self.card.id}: base model d={self._base.hidden_size}, AV d={self.av.d_vec}")
        return self._base

    @property
    def av_backbone(self) -> Backbone:
        return self.av.backbone

    @property
    def d_vec(self) -> int:
        return self.av.d_vec

    @property
    def top_p(self) -> float:
        return float(self.av.spec.top_p)

    @property
    def av_max_new_tokens(self) -> int:
        """The card's ``generation.max_new_tokens``."""
        return self.av.spec.max_new_tokens

    @property
    def scorer_space(self) -> str:  # type: ignore[override]
        """``activation`` for an AR (scored against v, μ-centered when there is a μ), ``embedding`` for a compass."""
        return str(getattr(self.reconstructor, "space", "activation"))

    @property
    def scorer_name(self) -> str:  # type: ignore[override]
        return self.card.reconstructor.kind if self.card.reconstructor else "reconstructor"

    def serialized(self) -> ContextManager[Any]:
        return self._lock

    def depth_pct(self, layer: int) -> int | None:
        """The prompt depth (%) the AV is told for ``layer``, or None when the card's prompt has none."""
        return self.av.depth_pct(layer)

    # -- reading (the base model, adapter off) --

    def _ids(self, text: str, position: int | None) -> tuple[list[int], ReadToken]:
        """The input ids cut after the token read, and that token (module docstring, "Read position")."""
        tok, spec = self.backbone.tokenizer, self.av.spec
        ids = input_ids_for_text(tok, spec, text)
        if spec.input_chat_template:
            if position is not None:
                raise NLAInputError(f"card {self.card.id} reads the text inside its chat template, at the template's last "
                                    "token (the only one its AV was trained on): it takes no position", field="position")
            return ids, ReadToken(None, tok.decode([ids[-1]]))
        own = text_token_indices(tok, spec, text, ids)
        if position is None:
            at, index = len(ids) - 1, (len(own) - 1 if own and own[-1] == len(ids) - 1 else None)
        else:
            index = activations.resolve_position(position, len(own))
            at = own[index]
        return ids[: at + 1], ReadToken(index, tok.decode([ids[at]]), inner=at < len(ids) - 1)

    def read_token(self, text: str, position: int | None = None) -> ReadToken:
        return self._ids(text, position)[1]

    @torch.inference_mode()
    def _forward(self, ids: list[int], layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """``hidden_states[ℓ]`` ((T, d) float32 CPU) of ``ids`` from the base model, under the card's lock."""
        bb = self.backbone
        t = torch.tensor([ids], device=bb.device)
        ctx = self.av.adapter_off() if bb is self.av.backbone else contextlib.nullcontext()
        with self._lock, ctx:
            hidden = activations.hidden_at_layers(bb, layers, input_ids=t, attention_mask=torch.ones_like(t))
        return {ell: h[0].float().cpu() for ell, h in hidden.items()}

    def read_layers(self, text: str, layers: Sequence[int], position: int | None = None) -> dict[int, torch.Tensor]:
        """v of ``text`` at each of ``layers`` from the base model (one truncated forward each), read at the last of
        the ids cut after the token read."""
        ids, _ = self._ids(text, position)
        return {ell: h[-1] for ell, h in self._forward(ids, layers).items()}

    def token_states(self, text: str, layer: int) -> tuple[list[str], torch.Tensor]:
        """The states of the text's own tokens in the input the card reads (chat-wrapped or raw, adapter off)."""
        tok = self.backbone.tokenizer
        ids = input_ids_for_text(tok, self.av.spec, text)
        own = text_token_indices(tok, self.av.spec, text, ids)
        states = self._forward(ids, [layer])[layer]
        return [tok.decode([ids[i]]) for i in own], states[own]

    def request_notes(self, text: str | None, layer: int, position: int | None) -> list[Note]:
        notes = []
        min_pos = self.av.spec.input_min_position
        if text is not None and min_pos:  # with a vector too: the text it was read from
            at = len(self._ids(text, position)[0]) - 1
            if at < min_pos:
                notes.append(Note("out-of-distribution", f"read position {at} < {min_pos}: the AV was trained on later "
                                                         "positions (out of distribution)"))
        pct = self.av.depth_pct(layer)
        if pct is not None:
            notes.append(Note("depth", f"prompt depth {pct}% (block {self.av.block(layer)} of {self.av.backbone.num_layers})"))
            if self.av.spec.trained_depths and pct not in self.av.spec.trained_depths:
                notes.append(Note("out-of-distribution",
                                  f"depth {pct}% is not among the adapter's trained bands {self.av.spec.trained_depths}"))
        return notes

    # -- writing --

    def rollout(self, v: torch.Tensor, k: int, temperature: float, max_new_tokens: int, greedy: bool, seed: int | None, layer: int) -> Rollout:
        """K candidates for ``v`` (one greedy when ``greedy``) in one batched call. A row stops at the
        close tag (its token ids, :attr:`InjectionAV.close_ids`, as a stop sequence) or at EOS, and
        is returned cut (:meth:`InjectionAV.cut`): the valid tokens are the explanation alone."""
        n = 1 if greedy else k
        bb = self.av.backbone
        gen = request_generator(seed, bb.device)
        prefix = self.av.inputs_embeds(v, layer).expand(n, -1, -1)
        stops = [list(self.av.close_ids)] if self.av.close_ids else None
        roll = sample(bb, prefix, max_new_tokens, temperature=temperature, top_p=self.av.spec.top_p, greedy=greedy, generator=gen,
                      stop_sequences=stops)
        return self.finish(roll)

    def finish(self, roll: Rollout) -> Rollout:
        """Rows cut at the close tag (:meth:`InjectionAV.cut`)."""
        return self.av.cut(roll)

    @contextlib.contextmanager
    def search_parts(self, v: torch.Tensor, layer: int, k: int, max_new_tokens: int) -> Iterator[tuple[guided.Stepper, guided.Tracker]]:
        """The AV continuing its injected prompt, and the reconstructor re-run on every particle's text
        (:class:`nla_space.guided.TextTracker`)."""
        stepper = guided.EmbedsStepper(self.av.backbone, self.av.inputs_embeds(v, layer), max_new_tokens)
        yield stepper, guided.TextTracker(self.av.decode, lambda texts: self.reconstructor.encode(texts, layer), k)

    # -- scoring --

    def decode_ids(self, ids: list[int]) -> str:
        """A row parsed as the card says (:meth:`InjectionAV.decode`)."""
        return self.av.decode(ids)

    def reconstruct_texts(self, texts: list[str], layer: int) -> torch.Tensor:
        """The scorer's vectors of ``texts`` (AR reconstructions, or a compass's sentence embeddings), float32 CPU."""
        return self.reconstructor.encode(list(texts), layer).float().cpu()

    def reconstruct(self, roll: Rollout, layer: int) -> torch.Tensor:
        return self.reconstruct_texts(self.candidate_texts(roll), layer)

    def score_target(self, v: torch.Tensor, layer: int) -> torch.Tensor:
        """What reconstructions are compared with: v for an AR, the compass target t* for a compass."""
        return self.reconstructor.target(v.float(), layer).float().cpu()


def open_injection_card(
    card: Card, backbone: str | None = None, device: str | None = None, revision: str | None = None, dtype: str | None = None
) -> OpenInjectionCard:
    """Open an ``injection`` card: base model, AV (LoRA on the base, or a full fine-tune), sidecar, AR.

    ``dtype`` is the user's explicit compute dtype; without it CPU runs float32 and CUDA the card's
    ``backbone.dtype`` (:func:`nla_space.backbone.resolve_dtype`).

    The card's ``av.format`` is ``peft_lora`` (the adapter is attached to a private copy of the base
    model, so it never leaks into a shared backbone) or ``full`` (the AV is its own model; the base
    model for reading activations is shared and loaded on the first text request).
    """
    if card.injection is None:
        raise CheckpointError(f"card {card.id}: kind 'injection' needs an 'injection' section")
    bb_spec = backbone or card.backbone_id
    bb_rev = revision if backbone else card.backbone.revision
    card_dtype = card.backbone.dtype
    fmt = card.av.format
    notes: list[str] = []
    base_loader = None
    if fmt == "peft_lora":
        folder = section_files(card.av, ADAPTER_PATTERNS, f"card {card.id} AV")
        av_bb = load_backbone(bb_spec, revision=bb_rev, device=device, dtype=dtype, default_dtype=card_dtype)
        peft_model = attach_lora(av_bb, folder)
        trained_on = peft_model.peft_config["default"].base_model_name_or_path
        if trained_on and trained_on != bb_spec and not Path(bb_spec).is_dir():
            notes.append(f"the adapter names {trained_on} as its base; running on {bb_spec}")
    elif fmt == "full":
        folder = section_files(card.av, FULL_PATTERNS, f"card {card.id} AV")
        av_bb = load_backbone(str(folder), device=device, dtype=dtype, default_dtype=card_dtype)
        peft_model = None
        base_loader = lambda: shared_backbone(bb_spec, bb_rev, device, dtype, default_dtype=card_dtype)  # noqa: E731
    else:
        raise CheckpointError(f"card {card.id}: av.format must be 'peft_lora' or 'full', got {fmt!r}")
    sidecar = load_sidecar(folder)
    if sidecar is None:
        notes.append("the AV ships no nla_meta.yaml: injection facts come from the card")
    spec = resolve_spec(card.injection, sidecar, f"card {card.id}")
    if sidecar is not None and sidecar.extraction_layer_index is not None:
        want = sidecar.extraction_layer_index + spec.block_offset
        if want not in card.layers:
            raise CheckpointError(f"card {card.id}: the sidecar's block {sidecar.extraction_layer_index} (layer {want}) is not among the card's layers {card.layers}")
    inject_mu = load_inject_mu(folder, card.layers, av_bb.hidden_size) if spec.rule == "center_normalize" else None
    av = InjectionAV(backbone=av_bb, spec=spec, peft_model=peft_model, inject_mu=inject_mu)
    below = [ell for ell in card.layers if ell - spec.block_offset < 0]
    if below:
        raise CheckpointError(f"card {card.id}: layer(s) {below} are below the first block (block_offset {spec.block_offset})")
    for ell in card.layers:  # the loader contract: every prompt has exactly one neighbour-checked marker
        av.prompt(ell)
    if card.reconstructor is None:
        raise CheckpointError(f"card {card.id}: an injection card needs a 'reconstructor' section to score candidates")
    share = (bb_spec, bb_rev, av_bb, peft_model) if peft_model is not None else None
    ar = open_reconstructor(card.reconstructor, device=device, dtype=card_dtype, where=f"card {card.id}", default_base=(bb_spec, bb_rev),
                            share=share, explicit_dtype=dtype)
    missing = [ell for ell in card.layers if not ar.supports(ell)]
    if missing:
        raise CheckpointError(f"card {card.id}: the reconstructor has no head for layer(s) {missing}")
    mus = {}
    if card.reconstructor.kind != "compass":  # μ centers activations; a compass scores in its own space
        mus = {ell: mu for ell in card.layers if (mu := load_reconstructor_mu(card.reconstructor, ar.folder, ell, av.d_vec)) is not None}
    log.info("opened injection card %s (rule %s ×%g from %s)", card.id, spec.rule, spec.scale, spec.sources.get("rule"))
    return OpenInjectionCard(card=card, av=av, reconstructor=ar, mus=mus, base_loader=base_loader, notes=notes)
