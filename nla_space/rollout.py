"""Batched autoregressive sampling from soft prefixes, and the EOS-inclusive mask.

One call samples every row of a batch (best-of-K = the prefix repeated K times). It uses a KV
cache allocated once (:mod:`nla_space.kv_cache`), computes the LM head for the last position only,
and stops as soon as every row has produced a stop token. Randomness comes from an explicit
``torch.Generator``, so a request's output depends on its seed alone, not on other requests. Each
step's draw is ``torch.multinomial``'s, computed faster on CPU (:mod:`nla_space.categorical`): a
seed samples the same tokens as ``model.generate(do_sample=True)`` after ``torch.manual_seed``
with the same logits processors (tested).

Repetition guard (``repeat_ngram=n``): a row may contain each n-gram of its own tokens at most
twice; a token that would write an n-gram a third time is not picked (its logit is set to −inf
before the pick; stop tokens are never blocked). It is how a greedy rollout is kept out of a loop
("X, X, X, …") without banning the repeats natural text makes.

Mask convention (the SRT eval scripts', e.g. ``scripts/centered_eval.py``; ``docs/references.md``): a row is valid up to **and including** its first stop token;
positions after it hold ``pad_id`` and are masked. A row without a stop token is valid throughout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .backbone import Backbone
from .categorical import sample_rows
from .kv_cache import preallocated_cache


@dataclass
class Rollout:
    ids: torch.Tensor  #: (B, T) new tokens only, ``pad_id`` after a row's stop token
    mask: torch.Tensor  #: (B, T) EOS-inclusive validity mask (long)

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)

    def text_rows(self, stop_ids: Sequence[int]) -> list[list[int]]:
        """Each row's valid tokens with its trailing stop tokens dropped: the candidate as a typed text."""
        stops = set(int(s) for s in stop_ids)
        rows = []
        for i in range(self.ids.shape[0]):
            row = [int(t) for t in self.ids[i, : int(self.mask[i].sum())]]
            while row and row[-1] in stops:
                row.pop()
            rows.append(row)
        return rows


def request_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """The generator of one request: seeded by ``seed``, or freshly when it is None."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) if seed is not None else int(torch.seed() % (2**63)))
    return gen


def eos_inclusive_mask(ids: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """1 up to and including the first stop token of each row, 0 after it."""
    if not stop_ids:
        return torch.ones_like(ids)
    is_stop = torch.isin(ids, torch.tensor(stop_ids, device=ids.device))
    stops_before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()
    return (stops_before == 0).long()


REPEAT_MAX = 2  #: occurrences of one n-gram a guarded row may hold


def block_repeats(logits: torch.Tensor, out_ids: torch.Tensor, t: int, n: int, protected: list[int]) -> torch.Tensor:
    """``logits`` with −inf at each row's tokens that would make the n-gram ending at step ``t``
    occur more than :data:`REPEAT_MAX` times among the row's tokens ``out_ids[:, :t]``."""
    if t < n - 1:
        return logits
    rows = out_ids[:, :t].tolist()
    cloned = False
    for b, row in enumerate(rows):
        ctx = row[t - n + 1 :] if n > 1 else []
        counts: dict[int, int] = {}
        for j in range(len(row) - n + 1):
            if row[j : j + n - 1] == ctx:
                nxt = row[j + n - 1]
                counts[nxt] = counts.get(nxt, 0) + 1
        banned = [tok for tok, c in counts.items() if c >= REPEAT_MAX and tok not in protected]
        if banned:
            if not cloned:  # only when a row has something to block (most steps have nothing)
                logits, cloned = logits.clone(), True
            logits[b, banned] = float("-inf")
    return logits


def pick_next(logits: torch.Tensor, temperature: float, top_p: float, greedy: bool, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row: argmax when ``greedy`` (or T = 0), else a draw at ``temperature`` within ``top_p``."""
    if greedy or temperature < torch.finfo(torch.float32).tiny:  # a T that is 0 in float32 is T = 0
        return logits.argmax(dim=-1)
    logits = logits.float()
    if temperature != 1.0:  # x / 1.0 == x: skipping it changes no bit and saves a pass over (B, vocab)
        scaled = logits / temperature
        if not torch.isfinite(scaled.amax(dim=-1)).all():
            # T so small that x / T overflows: divide the max-shifted logits instead (the same softmax,
            # whose limit is the argmax); only taken when the plain division is not finite
            scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
        logits = scaled
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return sample_rows(probs, generator)


@torch.inference_mode()
def sample(
    backbone: Backbone,
    prefix: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    stop_ids: list[int] | None = None,
    stop_sequences: list[list[int]] | None = None,
    repeat_ngram: int = 0,
) -> Rollout:
    """Continue the soft ``prefix`` (B, P, d), already in the backbone's dtype and scale.

    ``stop_ids`` defaults to the backbone's; ``[]`` forces fixed-length rollouts (benchmarks).
    ``stop_sequences`` also end a row when its last generated tokens equal one of them (e.g. the
    ids of ``</explanation>``); the row stays valid through the end of the sequence.
    ``repeat_ngram``: the repetition guard's n (0: off; see the module docstring).
    """
    model = backbone.model
    B, P, _ = prefix.shape
    device = prefix.device
    stops = backbone.stop_ids if stop_ids is None else list(stop_ids)
    stop = torch.tensor(stops or [-1], device=device)
    pad = backbone.pad_id
    out_ids = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    seqs = [torch.tensor(q, device=device) for q in (stop_sequences or []) if len(q) > 0]
    mask = torch.ones(B, P + max_new_tokens, dtype=torch.long, device=device)
    cache = preallocated_cache(model.config, P + max_new_tokens)
    # The LM head on the last prefix position only. Given as an index tensor, HF gathers that position
    # into a contiguous (B, 1, d) block; ``logits_to_keep=1`` passes a strided slice, which a bf16
    # CPU matmul cannot fold into one GEMM: it broadcast the (d, vocab) weight to (B, d, vocab) (a
    # 3.6 GB copy for K=64 on SmolLM2, ~6 s; measured with the torch profiler).
    last = torch.tensor([P - 1], device=device)
    out = model(inputs_embeds=prefix, attention_mask=mask[:, :P], past_key_values=cache, use_cache=True, logits_to_keep=last)
    steps = 0
    for t in range(max_new_tokens):
        logits = out.logits[:, -1, :]
        if repeat_ngram > 0:
            logits = block_repeats(logits, out_ids, t, repeat_ngram, stops)
        nxt = pick_next(logits, temperature, top_p, greedy, generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        out_ids[:, t] = nxt
        done_now = torch.isin(nxt, stop)
        for q in seqs:
            if t + 1 >= len(q):
                done_now |= (out_ids[:, t + 1 - len(q) : t + 1] == q).all(dim=1)
        done_now &= ~finished
        lengths[done_now] = t + 1
        finished |= done_now
        steps = t + 1
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask[:, : P + t + 1],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    ids = out_ids[:, :steps]
    mask = (torch.arange(steps, device=device)[None, :] < lengths[:, None]).long()
    return Rollout(ids=ids, mask=mask)
