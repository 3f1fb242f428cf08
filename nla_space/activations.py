"""The one definition of *layer* and *read position*, and the truncated forward that computes them.

Layer index
    ``layer=ℓ`` means ``hidden_states[ℓ]`` of a Hugging Face forward with
    ``output_hidden_states=True``: index 0 is the embedding output (after the model's own embedding
    scale), index ℓ ≥ 1 is the output of decoder block ℓ−1 (``model.layers[ℓ-1]``), before any
    final norm. Valid range: ``0 ≤ ℓ ≤ num_layers``. ℓ = num_layers is the output of the last block
    *before* the final norm, by the same rule as every other ℓ. That is what the block-output
    readers of the NLA releases read at block K = num_layers − 1 (a hook on the block), and it is
    **not** the last entry of HF's tuple, which transformers overwrites with the normed output: a
    card whose reference reads that entry (an SRT prefix card at ℓ = num_layers) refuses the layer
    with that reason (:meth:`~nla_space.verbalizers.base.OpenedCard.check_readable`). Cards that
    name block K (Anthropic NLA, nla-at-home) translate to ℓ = K + 1 in their card file.

Read position
    The last valid token of each row (the last 1 of the attention mask). A request may name another
    token of its text with ``position``, which indexes the text's tokens *as the card reads them*:
    0 is the first token of the text (BOS and any template tokens excluded), a negative position
    counts from the end (−1 is the last token of the text), and None is the card's own read position
    (the last token it reads). Out of range raises :class:`NLAInputError` with ``field="position"``
    (:func:`resolve_position`). Every card kind follows this one convention:

    * readers of raw text (prefix and patch cards, and injection cards whose input is the raw text):
      the state at token p of ``[BOS] + text`` is, in a causal model, the last-token state of
      ``[BOS] + tokens[:p+1]``, and that is how it is computed (:func:`read_ids` cuts the ids after
      token p). So ``position=p`` verbalizes exactly as the text cut after its token p, and
      ``position=-1`` exactly as ``position=None`` (when the last token read is the text's last);
    * cards whose read token is fixed by their prompt template (an injection card that reads the
      text inside its chat template, at the template's last token) refuse any position but None:
      that is the only token their AV was trained to read.

    A verbalization reports the token it read (``Verbalization.position``: the resolved non-negative
    index, None for a raw vector or a template token; ``read_token``: its text piece).

Text input
    ``[BOS] + tokens(text, no special tokens)`` when the backbone has a BOS id, as the targets
    were built by the SRT reference (``scripts/sample_targets.py``, ``docs/references.md``).

Truncated forward
    Runs the embedding and blocks ``0 … ℓ−1`` only: no later blocks, no final norm, no LM head.
    It uses a *view* of the decoder that shares every weight but holds only the first ℓ blocks and
    an identity final norm, so concurrent requests never see a half-modified model. Several layers
    (:func:`hidden_at_layers`) are one truncated forward each.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .backbone import Backbone
from .errors import NLAInputError


def decoder_of(model: Any) -> Any:
    """The decoder stack (``model.model`` for the CausalLM classes we support)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return inner
    if hasattr(model, "get_decoder"):
        dec = model.get_decoder()
        if hasattr(dec, "layers"):
            return dec
    raise TypeError(f"{type(model).__name__}: cannot find the decoder layers")


def check_layer(backbone: Backbone, layer: int) -> int:
    n = backbone.num_layers
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer <= n:
        raise NLAInputError(f"layer {layer!r} is out of range: this backbone has {n} blocks, so 0 ≤ layer ≤ {n} "
                            f"({n}: the last block's output before the final norm)")
    return layer


def truncated_decoder(backbone: Backbone, layer: int) -> Any:
    """A weight-sharing view of the decoder that stops after block ``layer − 1`` (cached per layer)."""
    check_layer(backbone, layer)
    with backbone._lock:
        view = backbone._views.get(layer)
        if view is None:
            full = decoder_of(backbone.model)
            view = copy.copy(full)
            view._modules = dict(full._modules)
            view._modules["layers"] = torch.nn.ModuleList(list(full.layers)[:layer])
            view._modules["norm"] = torch.nn.Identity()
            backbone._views[layer] = view
    return view


def hidden_at_layers(
    backbone: Backbone,
    layers: Sequence[int],
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """``hidden_states[ℓ]`` for every position, ``(B, T, d)``, for each ℓ in ``layers``: one truncated
    forward per layer, each reading its view's ``last_hidden_state``.

    Not one forward with ``output_hidden_states=True`` on the deepest view: transformers records
    hidden states with hooks on the decoder's layer modules, which the view shares with the full
    model, and asking a view for them made later full-model ``output_hidden_states`` calls return
    every layer twice (tested)."""
    wanted = sorted({check_layer(backbone, ell) for ell in layers})
    if not wanted:
        raise ValueError("no layers requested")
    out = {}
    for ell in wanted:
        view = truncated_decoder(backbone, ell)
        out[ell] = view(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                        use_cache=False).last_hidden_state
    return out


def hidden_at_layer(
    backbone: Backbone,
    layer: int,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """``hidden_states[layer]`` for every position, ``(B, T, d)``, by the truncated forward."""
    return hidden_at_layers(backbone, [layer], input_ids, attention_mask, inputs_embeds)[layer]


def last_valid_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a (B, T) mask (right or left padding)."""
    T = attention_mask.shape[1]
    pos = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), pos, torch.full_like(pos, -1)).max(dim=1).values


def read_last_valid(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden state at the read position of each row: ``(B, T, d) → (B, d)``."""
    idx = last_valid_index(attention_mask)
    if (idx < 0).any():
        raise ValueError("a row of the attention mask has no valid token")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


def encode_text(backbone: Backbone, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids ``[BOS] + tokens(text)`` as a (1, T) tensor; refuses empty or over-long text."""
    if not isinstance(text, str) or not text.strip():
        raise NLAInputError("the text is empty: type something to verbalize")
    ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
    if backbone.bos_id is not None:
        ids = [backbone.bos_id] + list(ids)
    limit = min(backbone.max_positions, max_tokens or backbone.max_positions)
    if len(ids) > limit:
        raise NLAInputError(f"the text is {len(ids)} tokens long; the limit is {limit} tokens")
    if not ids:
        raise NLAInputError("the text produced no tokens")
    return torch.tensor([ids], dtype=torch.long)


@dataclass(frozen=True)
class ReadToken:
    """The token a text is read at: ``index`` into the text's tokens (see "Read position"; None when
    it is a template token, not one of the text's), its text ``piece``, and whether it is the last
    token the card would read without a position (``inner=False``)."""

    index: int | None
    piece: str
    inner: bool = False


def resolve_position(position: int | None, n_tokens: int) -> int:
    """``position`` as a non-negative index into ``n_tokens`` text tokens (None: the last one);
    :class:`NLAInputError` (``field="position"``) when it is not an integer in ``[−n, n−1]``."""
    if n_tokens < 1:
        raise NLAInputError("the text produced no tokens", field="text")
    if position is None:
        return n_tokens - 1
    if not isinstance(position, int) or isinstance(position, bool):
        raise NLAInputError(f"position must be an integer, got {position!r}", field="position")
    if not -n_tokens <= position < n_tokens:
        raise NLAInputError(f"position {position} is out of range: the text has {n_tokens} token(s), so "
                            f"{-n_tokens} ≤ position ≤ {n_tokens - 1}", field="position")
    return position % n_tokens


def read_ids(backbone: Backbone, text: str, position: int | None = None, max_tokens: int | None = None) -> tuple[torch.Tensor, ReadToken]:
    """``[BOS] + tokens(text)`` cut after the token read (1, T′), and that token (module docstring, "Read position")."""
    ids = encode_text(backbone, text, max_tokens)
    start = 1 if backbone.bos_id is not None else 0
    p = resolve_position(position, ids.shape[1] - start)
    at = start + p
    return ids[:, : at + 1], ReadToken(p, backbone.tokenizer.decode([int(ids[0, at])]), inner=at < ids.shape[1] - 1)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(ids, mask)`` (B, T) long tensors of token rows (an empty row becomes one pad, masked)."""
    T = max(1, max((len(r) for r in rows), default=1))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for j, r in enumerate(rows):
        if len(r):
            ids[j, : len(r)] = torch.tensor(list(r))
            mask[j, : len(r)] = 1
    return ids, mask


@torch.inference_mode()
def read_rows(backbone: Backbone, layer: int, rows: list[list[int]], batch_size: int = 64) -> torch.Tensor:
    """The activations ``(B, d)`` (float32, CPU) of token rows read like a text: ``[BOS] + row``,
    right-padded, read at each row's last token (empty rows read the BOS alone)."""
    prefix = [backbone.bos_id] if backbone.bos_id is not None else []
    out = []
    for i in range(0, len(rows), batch_size):
        ids, mask = pad_rows([prefix + list(r) or [backbone.pad_id] for r in rows[i : i + batch_size]], backbone.pad_id)
        ids, mask = ids.to(backbone.device), mask.to(backbone.device)
        out.append(read_last_valid(hidden_at_layer(backbone, layer, input_ids=ids, attention_mask=mask), mask).float().cpu())
    return torch.cat(out, dim=0)


@torch.inference_mode()
def extract_layers(backbone: Backbone, text: str, layers: Sequence[int], max_tokens: int | None = None,
                   position: int | None = None) -> dict[int, torch.Tensor]:
    """The activation ``v`` (float32, shape (d,)) of ``text`` at each of ``layers``, read at its token
    ``position`` (None: the last; :func:`read_ids`, :func:`hidden_at_layers`)."""
    ids, _ = read_ids(backbone, text, position, max_tokens)
    ids = ids.to(backbone.device)
    mask = torch.ones_like(ids)
    hidden = hidden_at_layers(backbone, layers, input_ids=ids, attention_mask=mask)
    return {ell: read_last_valid(h, mask)[0].float().cpu() for ell, h in hidden.items()}


def extract(backbone: Backbone, text: str, layer: int, max_tokens: int | None = None, position: int | None = None) -> torch.Tensor:
    """The activation ``v`` (float32, shape (d,)) of ``text`` at ``layer``, read at its token ``position`` (None: the last)."""
    return extract_layers(backbone, text, [layer], max_tokens, position)[layer]


@torch.inference_mode()
def token_states(backbone: Backbone, text: str, layer: int, max_tokens: int | None = None) -> tuple[list[str], torch.Tensor]:
    """Each text token's string and hidden state (float32, (n, d)) at ``layer``, from one forward of
    ``[BOS] + text``; the BOS is left out, so row p is (up to float rounding) the state read at ``position=p``."""
    ids = encode_text(backbone, text, max_tokens).to(backbone.device)
    hidden = hidden_at_layer(backbone, layer, input_ids=ids, attention_mask=torch.ones_like(ids))[0]
    start = 1 if backbone.bos_id is not None else 0
    pieces = [backbone.tokenizer.decode([int(i)]) for i in ids[0, start:]]
    return pieces, hidden[start:].float().cpu()
