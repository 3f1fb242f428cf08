"""The layer sweep: one text verbalized at each of a card's layers, same K, seed, τ and rollout length.

The activations are read first for every swept layer, at the request's read position (the card's
``read_layers``: one truncated forward per layer, each entry equal to a single-layer read); then each
layer walks the card's normal ``verbalize`` with its vector, the text and the position, so an entry of
the sweep equals a single-layer ``verbalize(text=…, layer=ℓ, position=p)`` call with the same parameters
(same candidates, best text and score, same token read).
Only ``timings.extract_s`` differs: the shared read is timed once, in the log.

Layers: by default the card's, in ascending order (a depth sweep; cards list their default first);
requested layers are swept in the order given, duplicates dropped, each checked against the card
before anything runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import NLAInputError
from .policy import ProgressFn, Verbalization
from .verbalizers.base import OpenedCard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerResult:
    """One layer of a sweep: the summary a table shows, and the full verbalization for JSON."""

    layer: int
    depth_pct: int | None  #: the prompt depth the AV was told (injection cards with a depth rule), else None
    best_text: str
    score: float  #: the selection score of the best candidate (centered when the card has μ)
    hedged: bool
    verbalization: Verbalization

    @classmethod
    def of(cls, res: Verbalization, depth_pct: int | None) -> "LayerResult":
        return cls(layer=res.layer, depth_pct=depth_pct, best_text=res.best.text, score=res.score,
                   hedged=res.hedged, verbalization=res)

    def to_dict(self) -> dict[str, Any]:
        """The normal verbalize JSON object (``Verbalization.to_dict``) plus ``depth_pct``."""
        return {**self.verbalization.to_dict(), "depth_pct": self.depth_pct}


def sweep_layers(card: OpenedCard, layers: Sequence[int] | None = None) -> list[int]:
    """The layers a sweep visits: the card's in ascending order, or ``layers`` in the given order
    without duplicates, each checked by the card (a layer it lacks raises :class:`NLAInputError`)."""
    if layers is None:
        return sorted(set(card.layers))
    todo = list(dict.fromkeys(card.check_layer(ell) for ell in layers))
    if not todo:
        raise NLAInputError("no layers to sweep")
    return todo


def sweep(
    card: OpenedCard,
    text: str,
    layers: Sequence[int] | None = None,
    *,
    k: int | None = None,
    tau: float | None = None,
    temperature: float = 1.0,
    max_new_tokens: int | None = None,
    greedy: bool = False,
    seed: int | None = 0,
    progress: ProgressFn | None = None,
    strategy: str | None = None,
    position: int | None = None,
) -> list[LayerResult]:
    """Verbalize ``text`` at each layer of :func:`sweep_layers` with the same parameters.

    ``progress(frac, message)`` is called as each layer's verbalize advances (``frac`` over the whole
    sweep, the message naming the layer). Bad input raises :class:`NLAInputError` as ``verbalize`` does.
    """
    todo = sweep_layers(card, layers)
    n = len(todo)
    step = progress or (lambda frac, msg: None)
    step(0.0, f"reading the activation at {n} layer(s)")
    t0 = time.perf_counter()
    vectors = card.read_layers(text, todo, position)
    log.info("sweep: read %d layer(s) in %.3f s", n, time.perf_counter() - t0)
    out = []
    for i, ell in enumerate(todo):
        def inner(frac: float, msg: str, i: int = i, ell: int = ell) -> None:
            step((i + frac) / n, f"layer {ell} ({i + 1}/{n}): {msg}")

        res = card.verbalize(text=text, vector=vectors[ell], layer=ell, k=k, tau=tau, temperature=temperature,
                             max_new_tokens=max_new_tokens, greedy=greedy, seed=seed, progress=inner, strategy=strategy,
                             position=position)
        out.append(LayerResult.of(res, card.depth_pct(ell)))
        log.info("sweep: layer %d score %.3f %s", ell, res.score, "hedged" if res.hedged else "confident")
    step(1.0, "done")
    return out
