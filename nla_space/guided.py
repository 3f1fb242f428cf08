"""Activation-guided decoding: sequential Monte Carlo over the AV's proposals, steered by the score.

Best-of-K samples K texts blind and scores them at the end. Guided decoding scores every partial
text while it is written and moves the search toward the ones that point back to ``v``:

* ``n`` particles (the request's K) each propose their next token from the AV itself (same
  temperature and top-p as best-of-K), so the AV's distribution is the prior and fluency is kept;
* after each token the particle's text so far is re-encoded at ℓ — incrementally, by a
  :class:`Tracker` (KV-cached and truncated at ℓ; on a patch card the states come free from the
  AV's own forward) — and its potential ``φ`` (the card's specificity, :mod:`nla_space.specificity`,
  or the centered fve on a card without a pool) is computed;
* weights are ``exp(β · (φ_t − φ_{t−1}))``; when the effective sample size of the live particles
  falls under half their number they are resampled (multinomial, from the request's generator),
  KV caches reordered with them; a particle that writes a stop token is finished and frozen;
* every finished text, every live text at the end and (``prefixes``) every word-boundary prefix of
  at least ``min_tokens`` tokens seen on the way is a candidate with its potential; the K best
  distinct candidates are returned as a :class:`~nla_space.rollout.Rollout`, which the card then
  scores exactly as it scores best-of-K (one verbalize flow for both strategies).

Fluency prior (a card's ``guided_fluency_weight`` w > 0). The search above favours whatever points
back to ``v``, and on a small AV that is often topic words without grammar. With the prior the
card adds the AV's greedy reading (with its repetition guard) to the K candidates as an anchor
(:func:`with_anchor`), and picks the answer by ``z + w · fluency``, where ``fluency`` is each
candidate's mean token log-probability under the plain backbone without ``v``
(:mod:`nla_space.policy`, "Fluency prior"). The plain backbone is not the fluency judge of
``reading-eval`` (another model family), so the prior cannot simply fit the judge. w is chosen on
validation texts (``docs/training_patch.md``). It costs one greedy rollout and one forward of the
K + 1 candidates.

The compute is that of best-of-K with the same K (one forward of K rows per token, plus the
tracker, plus one extra forward for the last token); ``eval_harness reading-eval`` reports both
strategies' quality and wall time on the same texts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from .activations import pad_rows, truncated_decoder
from .backbone import Backbone
from .kv_cache import preallocated_cache, reorder_cache
from .policy import STRATEGIES, score_vectors  # noqa: F401  (STRATEGIES: re-exported)
from .rollout import Rollout, pick_next, request_generator

log = logging.getLogger(__name__)

#: β of the potential ``exp(β φ)``: φ is a z-score (specificity), so 1 nat per pool standard deviation
DEFAULT_BETA = 1.0


class Stepper(Protocol):
    """The AV as a token-by-token model over ``n`` rows that can be resampled."""

    def start(self, n: int) -> torch.Tensor:
        """Prefill; the logits ``(n, V)`` of each row's first token."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ``(n,)``; the logits ``(n, V)`` of the next."""

    def reorder(self, index: torch.Tensor) -> None:
        """Row ``i`` becomes what row ``index[i]`` was."""


class Tracker(Protocol):
    """The score-space vector of each row's text so far, updated one token at a time."""

    def push(self, tokens: torch.Tensor) -> torch.Tensor:
        """The text of each row extended by ``tokens`` ``(n,)``; its vectors ``(n, d)``."""

    def reorder(self, index: torch.Tensor) -> None: ...


class ReencodeTracker:
    """Incremental backbone re-encode at ℓ of the generated tokens (prefix-free, no BOS: the SRT
    convention of :mod:`nla_space.reencode`): one truncated forward per token with its own KV cache."""

    def __init__(self, backbone: Backbone, layer: int, capacity: int):
        self.view = truncated_decoder(backbone, layer)
        self.cache = preallocated_cache(backbone.config, capacity + 1)
        self.length = 0

    def push(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens[:, None]
        self.length += 1
        mask = torch.ones(ids.shape[0], self.length, dtype=torch.long, device=ids.device)
        out = self.view(input_ids=ids, attention_mask=mask, past_key_values=self.cache, use_cache=True)
        return out.last_hidden_state[:, -1].float()

    def reorder(self, index: torch.Tensor) -> None:
        reorder_cache(self.cache, index)


class TextTracker:
    """Any scorer of whole texts (e.g. an AR reconstructor), re-run on every row's decoded text at
    each step: correct for every card kind, and as slow as K re-scorings per token."""

    def __init__(self, decode: Callable[[list[int]], str], encode_texts: Callable[[list[str]], torch.Tensor], n: int):
        self.decode, self.encode = decode, encode_texts
        self.hist: list[list[int]] = [[] for _ in range(n)]

    def push(self, tokens: torch.Tensor) -> torch.Tensor:
        for row, t in zip(self.hist, tokens.tolist()):
            row.append(int(t))
        return self.encode([self.decode(r) for r in self.hist]).float()

    def reorder(self, index: torch.Tensor) -> None:
        self.hist = [list(self.hist[int(i)]) for i in index]


class EmbedsStepper:
    """The backbone continuing a soft prefix ``(n, P, d)`` (prefix and injection AVs), KV-cached."""

    def __init__(self, backbone: Backbone, prefix: torch.Tensor, max_new_tokens: int):
        self.model, self.prefix = backbone.model, prefix
        self.cache = preallocated_cache(backbone.config, prefix.shape[1] + max_new_tokens + 1)
        self.length = 0

    def start(self, n: int) -> torch.Tensor:
        prefix = self.prefix.expand(n, -1, -1) if self.prefix.shape[0] == 1 else self.prefix
        self.length = prefix.shape[1]
        mask = torch.ones(n, self.length, dtype=torch.long, device=prefix.device)
        last = torch.tensor([self.length - 1], device=prefix.device)
        return self.model(inputs_embeds=prefix, attention_mask=mask, past_key_values=self.cache, use_cache=True,
                          logits_to_keep=last).logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.length += 1
        mask = torch.ones(tokens.shape[0], self.length, dtype=torch.long, device=tokens.device)
        return self.model(input_ids=tokens[:, None], attention_mask=mask, past_key_values=self.cache, use_cache=True,
                          logits_to_keep=1).logits[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        reorder_cache(self.cache, index)


@dataclass
class GuidedSettings:
    n: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = DEFAULT_BETA
    prefixes: bool = True
    min_tokens: int = 3


def word_starts(tokenizer: Any) -> torch.Tensor:
    """A bool per vocabulary id: the token starts a new word (leading space/newline marker)."""
    cached = getattr(tokenizer, "_nla_word_starts", None)
    if cached is not None:
        return cached
    toks = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    flags = torch.tensor([bool(t) and t[0] in ("Ġ", "▁", "Ċ", " ", "\n") for t in toks], dtype=torch.bool)
    try:
        tokenizer._nla_word_starts = flags
    except AttributeError:  # a tokenizer that refuses attributes: recompute next time
        pass
    return flags


@torch.inference_mode()
def smc(stepper: Stepper, tracker: Tracker, potential: Callable[[torch.Tensor], torch.Tensor], s: GuidedSettings,
        generator: torch.Generator, stop_ids: list[int], pad_id: int, starts_word: torch.Tensor) -> list[tuple[list[int], float]]:
    """Run the search (module docstring); returns ``(token ids, potential)`` of every distinct
    candidate, best first. Ended texts carry their stop token as the last id."""
    n, T = s.n, s.max_new_tokens
    logits = stepper.start(n)
    dev = logits.device
    stops = torch.tensor(stop_ids or [-1], device=dev)
    hist = torch.full((n, T), pad_id, dtype=torch.long, device=dev)
    alive = torch.ones(n, dtype=torch.bool, device=dev)
    logw = torch.zeros(n, device=dev)
    prev = torch.full((n,), float("-inf"), device=dev)  # φ of the text so far (none yet)
    found: dict[tuple[int, ...], float] = {}
    starts_word = starts_word.to(dev)

    def keep(row: int, length: int, value: float, extra: int | None = None) -> None:
        ids = tuple(int(x) for x in hist[row, :length]) + ((extra,) if extra is not None else ())
        if length >= 1 and value > found.get(ids, float("-inf")):
            found[ids] = value

    for t in range(T):
        nxt = pick_next(logits, s.temperature, s.top_p, False, generator)
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
        hist[:, t] = nxt
        ended = torch.isin(nxt, stops) & alive
        for i in torch.nonzero(ended).flatten().tolist():
            keep(i, t, float(prev[i]), extra=int(nxt[i]))
        if s.prefixes and t >= s.min_tokens:
            boundary = alive & ~ended & starts_word[nxt.clamp(0, starts_word.numel() - 1)]
            for i in torch.nonzero(boundary).flatten().tolist():
                keep(i, t, float(prev[i]))
        alive &= ~ended
        if not bool(alive.any()):
            break
        logits = stepper.step(nxt)
        phi = potential(tracker.push(nxt)).to(dev)
        gain = torch.where(torch.isfinite(prev), phi - prev, torch.zeros_like(phi))
        logw = torch.where(alive, logw + s.beta * gain, torch.full_like(logw, float("-inf")))
        prev = torch.where(alive, phi, prev)
        if t == T - 1:
            for i in torch.nonzero(alive).flatten().tolist():
                keep(i, T, float(prev[i]))
            break
        live = torch.nonzero(alive).flatten()
        w = torch.softmax(logw[live], dim=0)
        if float(1.0 / (w ** 2).sum()) < 0.5 * live.numel():
            parents = live[torch.multinomial(w.cpu(), live.numel(), replacement=True, generator=_cpu_gen(generator)).to(dev)]
            index = torch.arange(n, device=dev)
            index[live] = parents
            hist, prev, logits = hist[index], prev[index], logits[index]
            stepper.reorder(index)
            if tracker is not stepper:  # a patch AV is both: its cache must move once
                tracker.reorder(index)
            logw[live] = 0.0
    return sorted(((list(k), v) for k, v in found.items()), key=lambda kv: -kv[1])


def _cpu_gen(generator: torch.Generator) -> torch.Generator:
    """torch.multinomial on CPU weights needs a CPU generator: derive one from the request's."""
    if generator.device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator().manual_seed(seed)


def as_rollout(cands: list[tuple[list[int], float]], k: int, pad_id: int) -> Rollout:
    """The ``k`` best candidates as a right-padded rollout (valid through a final stop token)."""
    ids, mask = pad_rows([row for row, _ in cands[:k]] or [[pad_id]], pad_id)
    return Rollout(ids=ids, mask=mask)


def with_anchor(found: Rollout, anchor: Rollout, pad_id: int) -> Rollout:
    """``found``'s rows plus ``anchor``'s (the greedy reading: the fluency prior's anchor), right-padded to one width."""
    rows = [[int(t) for t in r.ids[i, : int(r.mask[i].sum())]] for r in (found, anchor) for i in range(r.ids.shape[0])]
    ids, mask = pad_rows(rows, pad_id)
    return Rollout(ids=ids.to(found.ids.device), mask=mask.to(found.ids.device))


def fve_potential(target: torch.Tensor, mu: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """φ for a card without a specificity pool: 10 × the centered (raw without μ) fve against
    ``target``, so that β = 1 weighs a 0.1 fve step like one pool standard deviation."""
    return lambda h: 10.0 * score_vectors(h, target.to(h.device), mu)[1 if mu is not None else 0]


def search(stepper: Stepper, tracker: Tracker, potential: Callable[[torch.Tensor], torch.Tensor], s: GuidedSettings,
           seed: int | None, backbone: Backbone) -> Rollout:
    """One guided search for a request: its generator, :func:`smc`, the ``s.n`` best as a rollout."""
    cands = smc(stepper, tracker, potential, s, request_generator(seed, backbone.device), backbone.stop_ids, backbone.pad_id,
                word_starts(backbone.tokenizer))
    return as_rollout(cands, s.n, backbone.pad_id)
