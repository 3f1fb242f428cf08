"""Candidate selection and τ hedging.

Candidates come from a decoding strategy (best-of-K sampling, guided decoding, or one greedy
candidate: :data:`STRATEGIES`); all are re-encoded and scored raw and (when the card
has μ) centered. On a card that ships a specificity pool (:mod:`nla_space.specificity`) each also gets
its specificity ``z`` and calibrated confidence; ``best`` is then the argmax of ``z`` and the answer
is hedged when its confidence is under τ. Otherwise ``best`` is the argmax of the centered score (raw
when no μ) and the answer is hedged when that score is under τ. The scorer is a parameter so that
reconstructor-scored cards use the same policy.

Fluency prior (guided decoding on a card that sets one, :mod:`nla_space.guided`): each candidate also
gets ``fluency``, the mean log-probability per token of its text under the plain backbone (no ``v``:
how likely the sentence is as a sentence), and the selection score becomes
``z + fluency_weight · fluency``; the weight is the card's, chosen on validation texts. The hedge still
reads the chosen answer's own confidence, so a more fluent but less specific answer is hedged as such.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from .errors import NLAInputError
from .rollout import Rollout
from .scoring import fve_nrm, fve_nrm_centered
from .specificity import Specificity

#: the decoding strategies (``guided`` is :mod:`nla_space.guided`)
STRATEGIES = ("best-of-k", "guided", "greedy")

#: Largest K the CLI and the app accept.
MAX_K = 256
#: K of a sampling strategy (best-of-K, guided) when the request names none
DEFAULT_K = 16
MAX_NEW_TOKENS = 256

#: ``progress(fraction, message)``: how a verbalize or a sweep reports its advance
ProgressFn = Callable[[float, str], None]

#: What a :class:`Note` is about (renderers choose by kind, never by the wording):
#: ``untrained`` repeats ``trained=False``, ``uncentered`` repeats ``centered=False`` (both have their own
#: badge), ``depth`` is the prompt depth the AV was told (a sweep's depth column), ``out-of-distribution``
#: a request outside what the AV was trained on, ``card`` anything else the card says.
NOTE_KINDS = ("untrained", "uncentered", "depth", "out-of-distribution", "card")


@dataclass(frozen=True)
class Note:
    """One note of a verbalization: its :data:`NOTE_KINDS` kind and the sentence a person reads."""

    kind: str
    text: str

    def __post_init__(self) -> None:
        if self.kind not in NOTE_KINDS:
            raise ValueError(f"note kind must be one of {NOTE_KINDS}, got {self.kind!r}")

    def __str__(self) -> str:
        return self.text


@dataclass
class Candidate:
    text: str
    token_ids: list[int]
    score_raw: float
    score_cen: float | None
    #: contrastive specificity z and its calibrated confidence (cards with a pool; :mod:`nla_space.specificity`)
    specificity: float | None = None
    confidence: float | None = None
    #: mean log-probability per token under the plain backbone (module docstring, "Fluency prior"); None when not computed
    fluency: float | None = None


@dataclass
class Verbalization:
    """The result of one verbalization; :meth:`to_dict` is the JSON contract of CLI, API and app."""

    card: str
    layer: int
    k: int
    tau: float
    trained: bool
    greedy: bool
    temperature: float
    seed: int | None
    centered: bool
    candidates: list[Candidate]
    best_index: int
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[Note] = field(default_factory=list)
    #: a second opinion over the same candidates (the compass rerank, :func:`nla_space.compass.opinion`), or None
    compass: dict[str, Any] | None = None
    strategy: str = "best-of-k"
    #: what "confident" means on this card (calibrated cards), for the badge
    confidence_meaning: str | None = None
    #: the token read, as an index into the text's tokens (:mod:`nla_space.activations`, "Read position");
    #: None for a raw vector, or when the card reads a token of its own template rather than of the text
    position: int | None = None
    #: the text piece of the token read (None for a raw vector)
    read_token: str | None = None
    #: the weight of the fluency prior in the selection score (0: none; module docstring)
    fluency_weight: float = 0.0

    @property
    def best(self) -> Candidate:
        return self.candidates[self.best_index]

    @property
    def criterion(self) -> str:
        """What :attr:`score` is: ``confidence`` (calibrated cards), ``centered`` or ``raw`` fve."""
        if self.best.confidence is not None:
            return "confidence"
        return "centered" if self.centered and self.best.score_cen is not None else "raw"

    @property
    def score(self) -> float:
        """The score used for hedging: the calibrated confidence where the card has one, else the
        centered fve when available, else the raw fve."""
        b = self.best
        if b.confidence is not None:
            return b.confidence
        return b.score_cen if self.centered and b.score_cen is not None else b.score_raw

    @property
    def hedged(self) -> bool:
        return self.score < self.tau

    def to_dict(self) -> dict[str, Any]:
        return {
            "card": self.card,
            "layer": self.layer,
            "k": self.k,
            "tau": self.tau,
            "trained": self.trained,
            "greedy": self.greedy,
            "strategy": self.strategy,
            "temperature": self.temperature,
            "seed": self.seed,
            "centered": self.centered,
            "hedged": self.hedged,
            "score": self.score,
            "criterion": self.criterion,
            "confidence_meaning": self.confidence_meaning,
            "best_index": self.best_index,
            "best": asdict(self.best),
            "candidates": [asdict(c) for c in self.candidates],
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "notes": [asdict(n) for n in self.notes],
            "compass": self.compass,
            "position": self.position,
            "read_token": self.read_token,
            "fluency_weight": self.fluency_weight,
        }


Scorer = Callable[[Rollout], torch.Tensor]


def score_vectors(h: torch.Tensor, v: torch.Tensor, mu: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw and centered fve_nrm of each re-encoded row of ``h`` (K, d) against ``v`` (d,)."""
    v = v.to(h.device).float()
    raw = fve_nrm(h, v[None])
    cen = fve_nrm_centered(h, v[None], mu.to(h.device)[None]) if mu is not None else None
    return raw, cen


def selection_score(c: Candidate, fluency_weight: float = 0.0) -> float:
    """What a candidate is ranked by, as :func:`select_best` ranks them: its specificity when it has
    one, else its centered score, else its raw score; plus ``fluency_weight`` × its fluency when it has one."""
    base = c.specificity if c.specificity is not None else c.score_cen if c.score_cen is not None else c.score_raw
    return base + (fluency_weight * c.fluency if c.fluency is not None and fluency_weight else 0.0)


def select_best(raw: torch.Tensor, cen: torch.Tensor | None, spec: torch.Tensor | None = None,
                fluency: torch.Tensor | None = None, fluency_weight: float = 0.0) -> int:
    """argmax of the specificity when there is one, else of the centered score, else of the raw score,
    plus ``fluency_weight`` × ``fluency`` when given (per candidate: :func:`selection_score`)."""
    base = (spec if spec is not None else cen if cen is not None else raw).float()
    if fluency is not None and fluency_weight:
        base = base + fluency_weight * fluency.to(base.device).float()
    return int(base.argmax())


def best_of_k(
    rollout: Rollout,
    decode: Callable[[list[int]], str],
    h: torch.Tensor,
    v: torch.Tensor,
    mu: torch.Tensor | None,
    specificity: Specificity | None = None,
    fluency: torch.Tensor | None = None,
    fluency_weight: float = 0.0,
) -> tuple[list[Candidate], int]:
    """Build scored candidates from a rollout and its re-encoded vectors (and, with the fluency prior, each
    row's ``fluency``); return them and the best index."""
    raw, cen = score_vectors(h, v, mu)
    z = specificity.z(h, v) if specificity is not None else None
    conf = specificity.confidence(h, v) if specificity is not None else None
    cands = []
    for i in range(rollout.ids.shape[0]):
        n = int(rollout.mask[i].sum())
        ids = [int(t) for t in rollout.ids[i, :n]]
        s_cen = float(cen[i]) if cen is not None else None
        cands.append(Candidate(text=decode(ids), token_ids=ids, score_raw=float(raw[i]), score_cen=s_cen,
                               specificity=float(z[i]) if z is not None else None,
                               confidence=float(conf[i]) if conf is not None else None,
                               fluency=float(fluency[i]) if fluency is not None else None))
    return cands, select_best(raw, cen, z, fluency, fluency_weight)


class Timer:
    """Accumulates wall-clock seconds per named phase."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def phase(self, name: str) -> "_Phase":
        return _Phase(self, name)


class _Phase:
    def __init__(self, timer: Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timer.times[self.name] = self.timer.times.get(self.name, 0.0) + time.perf_counter() - self.t0


def run(
    *,
    card: str,
    trained: bool,
    layer: int,
    k: int,
    tau: float,
    temperature: float,
    greedy: bool,
    seed: int | None,
    notes: list[Note],
    read: Callable[[], torch.Tensor],
    roll: Callable[[torch.Tensor], Rollout],
    score: Callable[[Rollout, torch.Tensor], tuple[list[Candidate], int, bool]],
    progress: ProgressFn | None = None,
    score_label: str = "re-encoding and scoring",
    second_opinion: Callable[[list[Candidate], torch.Tensor], dict[str, Any]] | None = None,
    strategy: str = "best-of-k",
    confidence_meaning: str | None = None,
    position: int | None = None,
    read_token: str | None = None,
    fluency_weight: float = 0.0,
) -> Verbalization:
    """The one verbalize flow every card kind walks: read v, sample, score, pick, time it.

    ``read()`` gives v; ``roll(v)`` the candidates; ``score(rollout, v)`` returns the scored
    candidates, the best index and whether the scores are centered. ``second_opinion(candidates,
    v)``, when given, reranks the same candidates another way (the compass) and is reported beside
    the oracle pick, never instead of it. Parameters are checked by the caller (:func:`check_params`)
    before anything runs; ``position``/``read_token`` say which token ``read()`` reads (resolved by the caller).
    """
    timer = Timer()
    step = progress or (lambda frac, msg: None)
    step(0.0, "reading the activation")
    with timer.phase("extract_s"):
        v = read()
    step(0.1, "guided search" if strategy == "guided" else f"sampling {1 if greedy else k} candidate(s)")
    with timer.phase("sample_s"):
        rollout = roll(v)
    step(0.7, score_label)
    with timer.phase("score_s"):
        cands, best, centered = score(rollout, v)
    second = None
    if second_opinion is not None:
        step(0.9, "compass rerank")
        with timer.phase("compass_s"):
            second = second_opinion(cands, v)
    timer.times["total_s"] = sum(timer.times.values())
    step(1.0, "done")
    return Verbalization(
        card=card,
        layer=layer,
        k=1 if greedy else k,
        tau=float(tau),
        trained=trained,
        greedy=greedy,
        temperature=float(temperature),
        seed=seed,
        centered=centered,
        candidates=cands,
        best_index=best,
        timings=timer.times,
        notes=list(notes),
        compass=second,
        strategy=strategy,
        confidence_meaning=confidence_meaning,
        position=position,
        read_token=read_token,
        fluency_weight=float(fluency_weight),
    )


def resolve_strategy(strategy: str | None, greedy: bool, default: str) -> str:
    """The decoding strategy of a request: ``greedy=True`` means ``"greedy"``; None means the card's default."""
    if greedy:
        if strategy not in (None, "greedy"):
            raise NLAInputError(f"greedy=True contradicts strategy={strategy!r}")
        return "greedy"
    strategy = default if strategy is None else strategy
    if strategy not in STRATEGIES:
        raise NLAInputError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    return strategy


def resolve_decoding(strategy: str | None, greedy: bool, default: str, k: int | None) -> tuple[str, int]:
    """A request's strategy (:func:`resolve_strategy`) and its number of candidates: ``k`` as given,
    :data:`DEFAULT_K` when None, 1 for greedy.

    Greedy writes one candidate, so a request whose decoding is greedy and that asks for K > 1 is
    refused rather than answered with one candidate in silence; the message names the strategies
    that use K and says whether greedy was asked for or is the card's ``default``."""
    decoding = resolve_strategy(strategy, greedy, default)
    return decoding, _resolve_k(k, decoding, strategy is not None or greedy)


def _resolve_k(k: int | None, strategy: str, strategy_named: bool) -> int:
    if k is None:
        return 1 if strategy == "greedy" else DEFAULT_K
    if strategy == "greedy" and isinstance(k, int) and not isinstance(k, bool) and k > 1:
        why = "the request asks for greedy decoding" if strategy_named else "greedy is this card's default decoding"
        raise NLAInputError(f"k={k} asks for {k} candidates, but {why}, which writes one: add strategy 'best-of-k' "
                            f"(--strategy best-of-k) to sample {k}, or 'guided' to search with {k}; or leave k out",
                            field="k")
    return k


def check_params(k: int, tau: float, temperature: float, max_new_tokens: int, seed: int | None = None) -> None:
    """Refuse parameters outside the stated ranges with a readable message."""
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        raise NLAInputError(f"seed must be an integer from 0 to 2**63 - 1, got {seed!r}")

    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise NLAInputError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
    if not isinstance(tau, (int, float)) or not math.isfinite(tau) or not 0.0 <= tau <= 1.0:
        raise NLAInputError(f"tau must be a number in [0, 1], got {tau!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or not 0.0 <= temperature <= 5.0:
        raise NLAInputError(f"temperature must be a number in [0, 5], got {temperature!r}")
    if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise NLAInputError(f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS}, got {max_new_tokens!r}")
