"""The one declared interface of an opened card, and everything every card kind shares.

An opened card reads a text's activation v at one of its layers, has its AV write candidate
sentences from v (best-of-K sampling, guided decoding or one greedy candidate), scores them, and
picks and hedges the answer. :class:`OpenedCard` implements that once — :meth:`~OpenedCard.verbalize`
(every strategy, walked through :func:`nla_space.policy.run`), :meth:`~OpenedCard.check_layer`,
:meth:`~OpenedCard.check_vector`, :attr:`~OpenedCard.layers`, :attr:`~OpenedCard.default_max_new_tokens`,
the guided entry point :meth:`~OpenedCard.guided` and the read position — and each kind supplies only
its own pieces, the abstract methods:

* reading: :meth:`~OpenedCard.read_layers` (v at several layers, at a read position),
  :meth:`~OpenedCard.read_token` (which token that is, without running the model) and
  :meth:`~OpenedCard.token_states` (every text token's state, read as the card reads v: the heat map);
* writing: :meth:`~OpenedCard.rollout` (K candidates) and :meth:`~OpenedCard.search_parts` (the stepper
  and tracker of a guided search, :mod:`nla_space.guided`);
* scoring: :meth:`~OpenedCard.reconstruct`, :meth:`~OpenedCard.reconstruct_texts`,
  :meth:`~OpenedCard.score_target`, :meth:`~OpenedCard.decode_ids` and μ per layer
  (:meth:`~OpenedCard.mu_at`);
* facts: :attr:`~OpenedCard.d_vec`, :attr:`~OpenedCard.top_p`, :attr:`~OpenedCard.av_max_new_tokens`.

The read position (``position``) is defined once, in :mod:`nla_space.activations`. Readers of raw
text with a shared backbone (prefix and patch cards) get their reading pieces from
:class:`RawTextCard`.

Kinds: ``prefix`` (:mod:`nla_space.verbalizers.prefix_card`), ``patch``
(:mod:`nla_space.verbalizers.patch_card`), ``injection`` (:mod:`nla_space.verbalizers.injection.card`).
**Adding a kind** is its own module — a subclass of :class:`OpenedCard` (or of :class:`RawTextCard`)
and an opener with the signature of :class:`nla_space.runtime.CardOpener` — plus one line in
:data:`nla_space.runtime.CARD_KINDS`. Nothing else (CLI, app, sweep, harness) names a kind's class.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Sequence

import torch

from .. import activations, guided, policy
from ..activations import ReadToken
from ..backbone import Backbone
from ..cards import Card
from ..compass import CompassScorer, opinion
from ..errors import NLAInputError
from ..lm_score import mean_logprobs
from ..policy import Note, ProgressFn
from ..rollout import Rollout
from ..specificity import Specificity

__all__ = ["OpenedCard", "RawTextCard", "ReadToken"]


class OpenedCard(abc.ABC):
    """A card opened for use: the interface the CLI, the app, the sweep and the harness use for every kind.

    Subclasses are dataclasses holding at least ``card``, ``trained``, ``notes`` (the card's own
    free-text notes) and a ``backbone`` (the model v is read from); the attributes below with a
    value are defaults a kind may replace with a field."""

    card: Card
    trained: bool
    notes: list[str]
    #: the model v is read from
    backbone: Backbone
    #: μ of the card's default layer (:meth:`mu_at` gives every layer's)
    mu: torch.Tensor | None

    #: the card's compass (:class:`nla_space.compass.CompassScorer`), reranking beside the oracle pick
    compass: CompassScorer | None = None
    compass_tau: float = 0.30
    #: the card's contrastive scorer and calibration (:mod:`nla_space.specificity`)
    specificity: Specificity | None = None
    #: the decoding strategy of a request that names none (:data:`nla_space.policy.STRATEGIES`)
    default_strategy: str = "best-of-k"
    #: β of guided decoding's potential exp(β φ), and whether word-boundary prefixes are candidates
    guided_beta: float = guided.DEFAULT_BETA
    guided_prefixes: bool = True
    #: the weight of guided decoding's fluency prior (0: off; :mod:`nla_space.guided`, "Fluency prior")
    guided_fluency_weight: float = 0.0
    #: what :meth:`reconstruct` returns: ``activation`` (scored against v, μ-centered when there is a μ)
    #: or ``embedding`` (a compass's sentence space)
    scorer_space: str = "activation"
    scorer_name: str = "backbone self-re-encode"
    #: the progress message while candidates are scored
    score_label: str = "re-encoding and scoring"

    # ------------------------------------------------------------------ what a kind supplies

    @property
    @abc.abstractmethod
    def d_vec(self) -> int:
        """The number of values of v."""

    @property
    @abc.abstractmethod
    def top_p(self) -> float:
        """Nucleus mass of the AV's sampling (best-of-K and guided)."""

    @property
    @abc.abstractmethod
    def av_max_new_tokens(self) -> int:
        """The AV's own rollout length (what it was trained to write)."""

    @abc.abstractmethod
    def read_layers(self, text: str, layers: Sequence[int], position: int | None = None) -> dict[int, torch.Tensor]:
        """v (float32 CPU, (d,)) of ``text`` at each of ``layers``, read at ``position``; each entry equals a
        one-layer read."""

    @abc.abstractmethod
    def read_token(self, text: str, position: int | None = None) -> ReadToken:
        """The token :meth:`read_layers` reads for ``position`` (tokenizing only); refuses a bad position."""

    @abc.abstractmethod
    def token_states(self, text: str, layer: int) -> tuple[list[str], torch.Tensor]:
        """Each text token's piece and state ((n, d) float32 CPU) at ``layer``, read as the card reads v (BOS and
        template tokens left out); on a card that takes positions, row p is (up to float rounding) the
        state :meth:`read_layers` reads at ``position=p``."""

    @abc.abstractmethod
    def mu_at(self, layer: int) -> torch.Tensor | None:
        """μ of ``layer`` (centers scores; None when the card has none for it)."""

    @abc.abstractmethod
    def rollout(self, v: torch.Tensor, k: int, temperature: float, max_new_tokens: int, greedy: bool, seed: int | None,
                layer: int) -> Rollout:
        """K candidates for ``v`` in one batched call (one when ``greedy``), valid tokens masked."""

    @abc.abstractmethod
    def search_parts(self, v: torch.Tensor, layer: int, k: int,
                     max_new_tokens: int) -> ContextManager[tuple[guided.Stepper, guided.Tracker]]:
        """The stepper and tracker of one guided search (released when it ends)."""

    @abc.abstractmethod
    def reconstruct(self, roll: Rollout, layer: int) -> torch.Tensor:
        """The scorer's vectors ((n, d) float32 CPU) of a rollout's candidates."""

    @abc.abstractmethod
    def reconstruct_texts(self, texts: list[str], layer: int) -> torch.Tensor:
        """The scorer's vectors of ``texts``, made as for candidates."""

    @abc.abstractmethod
    def score_target(self, v: torch.Tensor, layer: int) -> torch.Tensor:
        """What reconstructions are compared with."""

    @abc.abstractmethod
    def decode_ids(self, ids: list[int]) -> str:
        """A candidate's text from its valid token ids."""

    # ------------------------------------------------------------------ defaults a kind may replace

    @property
    def av_backbone(self) -> Backbone:
        """The model the AV writes with (its tokenizer, stop and pad ids): the backbone unless the kind says otherwise."""
        return self.backbone

    def depth_pct(self, layer: int) -> int | None:
        """The prompt depth (%) the AV is told for ``layer``; None when it is told none."""
        return None

    def finish(self, roll: Rollout) -> Rollout:
        """The AV's written rows as candidates (an injection AV cuts them at its close tag)."""
        return roll

    def request_notes(self, text: str | None, layer: int, position: int | None) -> list[Note]:
        """Notes about one request (its depth, an unusual read position), beside the card's own."""
        return []

    def serialized(self) -> ContextManager[Any]:
        """Held for a whole request: a card whose requests switch model state returns a lock."""
        return contextlib.nullcontext()

    def fluency_of(self, roll: Rollout) -> torch.Tensor | None:
        """Each candidate's mean token log-probability under the plain backbone without ``v`` ((n,), the
        fluency prior of :mod:`nla_space.policy`); None where the kind cannot run its backbone plain."""
        return None

    def specificity_at(self, layer: int) -> Specificity | None:
        """The contrastive scorer and calibration at ``layer`` (:attr:`specificity`; a kind reading several
        layers with one each replaces this)."""
        return self.specificity

    def tau_at(self, layer: int) -> float:
        """The hedge threshold of a request at ``layer`` that names none: the card's ``default_tau``."""
        return self.card.default_tau

    def check_readable(self, layer: int) -> None:
        """Refuse a card layer its model cannot read (:func:`nla_space.activations.check_layer`)."""
        activations.check_layer(self.av_backbone, layer)

    # ------------------------------------------------------------------ implemented once

    @property
    def layers(self) -> list[int]:
        return list(self.card.layers)

    @property
    def default_max_new_tokens(self) -> int:
        """Rollout length when a request names none: the AV's own, within :data:`nla_space.policy.MAX_NEW_TOKENS`."""
        return max(1, min(policy.MAX_NEW_TOKENS, int(self.av_max_new_tokens)))

    def check_layer(self, layer: int | None) -> int:
        """``layer`` (None: the card's default) if the card lists it and its model can read it."""
        layer = self.card.default_layer if layer is None else layer
        if layer not in self.card.layers:
            raise NLAInputError(f"card {self.card.id} supports layer(s) {self.card.layers}, not {layer!r}", field="layer")
        self.check_readable(layer)
        return layer

    def check_vector(self, vector: Any) -> torch.Tensor:
        """``vector`` as a float32 (d,) tensor, refused unless it has :attr:`d_vec` finite values."""
        v = torch.as_tensor(vector).float().reshape(-1) if vector is not None else None
        if v is None or v.numel() != self.d_vec:
            n = None if v is None else v.numel()
            raise NLAInputError(f"the vector has {n} values; this card needs {self.d_vec}", field="vector")
        if not torch.isfinite(v).all():
            raise NLAInputError("the vector contains NaN or infinite values", field="vector")
        return v

    def read(self, text: str, layer: int, position: int | None = None) -> torch.Tensor:
        """v (float32 CPU, (d,)) of ``text`` at ``layer``, read at ``position`` (:mod:`nla_space.activations`)."""
        return self.read_layers(text, [layer], position)[layer]

    def extract(self, text: str, layer: int) -> torch.Tensor:
        """:meth:`read` at the card's read position (the name the harness and older callers use)."""
        return self.read(text, layer)

    def extract_layers(self, text: str, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """:meth:`read_layers` at the card's read position."""
        return self.read_layers(text, layers)

    def candidate_texts(self, roll: Rollout) -> list[str]:
        """Each row's valid tokens decoded (:meth:`decode_ids`)."""
        return [self.decode_ids([int(t) for t in roll.ids[i, : int(roll.mask[i].sum())]]) for i in range(roll.ids.shape[0])]

    def potential(self, v: torch.Tensor, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """φ of guided decoding: the specificity where the card has a pool, else
        :func:`nla_space.guided.fve_potential` against :meth:`score_target` with :meth:`mu_at`."""
        spec = self.specificity_at(layer)
        if spec is not None:
            return lambda h: spec.z(h, v)
        return guided.fve_potential(self.score_target(v, layer), self.mu_at(layer))

    def guided(self, v: torch.Tensor, k: int, temperature: float, max_new_tokens: int, seed: int | None, layer: int) -> Rollout:
        """The K best distinct candidates of a guided search (:func:`nla_space.guided.search`)."""
        settings = guided.GuidedSettings(n=k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=self.top_p,
                                         beta=self.guided_beta, prefixes=self.guided_prefixes)
        with self.search_parts(v, layer, k, max_new_tokens) as (stepper, tracker):
            return self.finish(guided.search(stepper, tracker, self.potential(v, layer), settings, seed, self.av_backbone))

    def card_notes(self, layer: int) -> list[Note]:
        """The card's notes at ``layer``: untrained, uncentered, then its own."""
        notes = []
        if not self.trained:
            notes.append(Note("untrained", "untrained: this card's AV has no trained weights, so its candidates are "
                                           "not readings of the activation"))
        if self.mu_at(layer) is None:
            notes.append(Note("uncentered", f"no μ for layer {layer}: scores are raw fve_nrm, not centered"))
        return notes + [Note("card", n) for n in self.notes]

    @torch.inference_mode()
    def verbalize(
        self,
        text: str | None = None,
        vector: Any = None,
        layer: int | None = None,
        k: int | None = None,
        tau: float | None = None,
        temperature: float = 1.0,
        max_new_tokens: int | None = None,
        greedy: bool = False,
        seed: int | None = None,
        progress: ProgressFn | None = None,
        strategy: str | None = None,
        position: int | None = None,
    ) -> policy.Verbalization:
        """Verbalize ``text``'s activation at ``layer`` (default: the card's) read at ``position``
        (:mod:`nla_space.activations`; None: the card's read position), or a raw ``vector``. A
        ``vector`` given with its ``text`` is that text's activation, read already at ``position``
        (the layer sweep); the text then only names the token read and adds notes. ``strategy``:
        ``best-of-k``, ``guided`` or ``greedy`` (default: the card's). ``k``: candidates of a sampling
        strategy (None: :data:`~nla_space.policy.DEFAULT_K`); a K > 1 with greedy decoding is refused
        (:func:`~nla_space.policy.resolve_decoding`)."""
        layer = self.check_layer(layer)
        tau = self.tau_at(layer) if tau is None else tau
        max_new_tokens = self.default_max_new_tokens if max_new_tokens is None else max_new_tokens
        strategy, k = policy.resolve_decoding(strategy, greedy, self.default_strategy, k)
        policy.check_params(k, tau, temperature, max_new_tokens, seed)
        greedy = strategy == "greedy"
        specificity = self.specificity_at(layer)
        if text is None and position is not None:
            raise NLAInputError("a position names a token of a text; a raw vector has none", field="position")
        token = self.read_token(text, position) if text is not None else None
        notes = self.card_notes(layer) + self.request_notes(text, layer, position)
        if token is not None and token.inner and specificity is not None and specificity.calibration is not None:
            notes.append(Note("out-of-distribution", f"read at an inner token ({token.index}): the confidence was calibrated on "
                                                     "whole texts read at their last token, so here it is not a calibrated "
                                                     "probability (an inner token's state is dominated by the words just before it)"))
        mu = self.mu_at(layer)

        def read() -> torch.Tensor:
            return self.check_vector(vector) if vector is not None else self.read(text, layer, position)

        weight = self.guided_fluency_weight if strategy == "guided" else 0.0

        def roll(v: torch.Tensor) -> Rollout:
            if strategy == "guided":
                found = self.guided(v, k, temperature, max_new_tokens, seed, layer)
                if weight > 0:  # the greedy reading joins the candidates as the fluency prior's anchor
                    anchor = self.rollout(v, 1, temperature, max_new_tokens, True, seed, layer)
                    return guided.with_anchor(found, anchor, self.av_backbone.pad_id)
                return found
            return self.rollout(v, k, temperature, max_new_tokens, greedy, seed, layer)

        def score(roll: Rollout, v: torch.Tensor) -> tuple[list[policy.Candidate], int, bool]:
            h = self.reconstruct(roll, layer)
            fluency = self.fluency_of(roll) if weight > 0 else None
            cands, best = policy.best_of_k(roll, self.decode_ids, h, self.score_target(v, layer), mu, specificity,
                                           fluency=fluency, fluency_weight=weight if fluency is not None else 0.0)
            return cands, best, mu is not None

        calib = specificity.calibration if specificity is not None else None
        with self.serialized():
            return policy.run(
                card=self.card.id, trained=self.trained, layer=layer, k=k, tau=tau, temperature=temperature,
                greedy=greedy, seed=seed, notes=notes, read=read, roll=roll, score=score, progress=progress,
                score_label=self.score_label, second_opinion=self._compass_opinion(layer), strategy=strategy,
                confidence_meaning=calib.meaning() if calib is not None else None,
                position=token.index if token is not None else None, read_token=token.piece if token is not None else None,
                fluency_weight=weight,
            )

    def _compass_opinion(self, layer: int) -> Callable[[list[policy.Candidate], torch.Tensor], dict[str, Any]] | None:
        compass = self.compass
        if compass is None or not compass.supports(layer):
            return None
        return lambda cands, v: opinion(compass, [c.text for c in cands], v, layer, self.compass_tau)


@dataclass
class RawTextCard(OpenedCard):
    """A card that reads raw text (``[BOS] + text``) with a backbone it holds, μ of its one layer, and
    optionally a compass and a specificity pool: the prefix and patch kinds."""

    card: Card
    backbone: Backbone
    av: Any
    trained: bool
    mu: torch.Tensor | None
    notes: list[str] = field(default_factory=list)
    # the interface's optional attributes as dataclass fields, with the interface's own defaults
    compass: CompassScorer | None = OpenedCard.compass
    compass_tau: float = OpenedCard.compass_tau
    specificity: Specificity | None = OpenedCard.specificity
    default_strategy: str = OpenedCard.default_strategy
    guided_beta: float = OpenedCard.guided_beta
    guided_prefixes: bool = OpenedCard.guided_prefixes
    guided_fluency_weight: float = OpenedCard.guided_fluency_weight

    @property
    def d_vec(self) -> int:
        return int(self.av.d_vec)

    def mu_at(self, layer: int) -> torch.Tensor | None:
        """The card's μ at its default layer (the layer it was measured at), None elsewhere."""
        return self.mu if layer == self.card.default_layer else None

    def read_layers(self, text: str, layers: Sequence[int], position: int | None = None) -> dict[int, torch.Tensor]:
        """One truncated forward per layer of ``[BOS] + text`` cut after the token read (:func:`nla_space.activations.extract_layers`)."""
        return activations.extract_layers(self.backbone, text, layers, position=position)

    def read_token(self, text: str, position: int | None = None) -> ReadToken:
        return activations.read_ids(self.backbone, text, position)[1]

    def token_states(self, text: str, layer: int) -> tuple[list[str], torch.Tensor]:
        return activations.token_states(self.backbone, text, layer)

    def decode_ids(self, ids: list[int]) -> str:
        return self.backbone.tokenizer.decode(ids, skip_special_tokens=True)

    def fluency_of(self, roll: Rollout) -> torch.Tensor:
        """Mean log-probability of each candidate's tokens (stop tokens dropped) read as ``[BOS] + tokens`` by the
        backbone's own LM head: the plain model (a patch AV's LoRA is off outside its forward; a prefix AV is
        not on the backbone). An empty candidate gets −20 nats/token."""
        lps = mean_logprobs(self.backbone, roll.text_rows(self.backbone.stop_ids))
        return torch.tensor([-20.0 if lp is None else lp for lp in lps])

    def score_target(self, v: torch.Tensor, layer: int) -> torch.Tensor:
        """What reconstructions are compared with: the activation itself."""
        return v.float()
