"""Token ids of the injection recipe: the AV prompt and its marker, the input text, and the parsed output.

The AV prompt is the spec's template, optionally wrapped as one user message of the tokenizer's chat
template; it must hold exactly one marker token between the stated neighbour tokens
(:func:`find_marker`), and that position is where the activation is written. The input text is
tokenised the way the AV's training activations were read (:func:`input_ids_for_text`). A sample is
cut at the close tag's token ids (:func:`find_subsequence`) and its decoded text clipped at the tags
and markers the card names (:func:`clip_text`). Everything here maps ids and strings to ids and
strings; no model runs.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import CheckpointError, NLAInputError
from .spec import InjectionSpec


def as_id_list(x: Any) -> list[int]:
    """``apply_chat_template``/``encode`` results as a plain ``list[int]`` (transformers ≥ 5 may
    return a ``BatchEncoding`` or a nested list)."""
    if hasattr(x, "keys") and "input_ids" in x:
        x = x["input_ids"]
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if x and isinstance(x[0], list):
        if len(x) != 1:
            raise ValueError("expected one sequence")
        x = x[0]
    return [int(i) for i in x]


def chat_wrap(tokenizer: Any, content: str) -> str:
    """``content`` as one user message, with the generation prompt (no system message)."""
    if not getattr(tokenizer, "chat_template", None):
        raise CheckpointError("the card needs a chat template but the tokenizer has none")
    out = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    if not isinstance(out, str):
        raise CheckpointError(f"apply_chat_template(tokenize=False) returned {type(out).__name__}, not a string")
    return out


def encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return as_id_list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def check_marker_token(tokenizer: Any, spec: InjectionSpec) -> int:
    """The marker's token id, checked: it encodes to exactly one token, not UNK, equal to the stated id."""
    ids = encode(tokenizer, spec.marker, add_special_tokens=False)
    if len(ids) != 1:
        raise CheckpointError(f"the marker {spec.marker!r} encodes to {len(ids)} tokens {ids}, not exactly one")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk:
        raise CheckpointError(f"the marker {spec.marker!r} is the unknown token for this tokenizer")
    if spec.marker_id is not None and ids[0] != spec.marker_id:
        raise CheckpointError(
            f"the marker {spec.marker!r} encodes to id {ids[0]}, but the {spec.sources.get('marker_id', 'card')} says {spec.marker_id}"
        )
    return ids[0]


def neighbor_ids(tokenizer: Any, spec: InjectionSpec) -> tuple[int, int]:
    """(left, right) neighbour ids: stated ids, else the last / first token of ``left_text`` / ``right_text``."""
    left = spec.left_neighbor_id
    right = spec.right_neighbor_id
    if left is None:
        lt = encode(tokenizer, spec.left_text, add_special_tokens=False)
        if not lt:
            raise CheckpointError(f"left neighbour text {spec.left_text!r} encodes to nothing")
        left = lt[-1]
    if right is None:
        rt = encode(tokenizer, spec.right_text, add_special_tokens=False)
        if not rt:
            raise CheckpointError(f"right neighbour text {spec.right_text!r} encodes to nothing")
        right = rt[0]
    return int(left), int(right)


def find_marker(ids: list[int], marker_id: int, left: int, right: int) -> int:
    """The one valid marker position (neighbour-checked); :class:`CheckpointError` otherwise."""
    hits = [p for p, t in enumerate(ids) if t == marker_id]
    valid = [p for p in hits if 0 < p < len(ids) - 1 and ids[p - 1] == left and ids[p + 1] == right]
    if len(valid) != 1:
        seen = [(p, ids[p - 1] if p > 0 else None, ids[p + 1] if p + 1 < len(ids) else None) for p in hits]
        raise CheckpointError(
            f"marker check failed: expected exactly one marker id {marker_id} between neighbours "
            f"{left} and {right}, found {len(valid)} valid of {len(hits)} occurrence(s) "
            f"(position, left, right) = {seen}; the template, tokenizer or sidecar do not match"
        )
    return valid[0]


def prompt_ids(tokenizer: Any, spec: InjectionSpec, depth_pct: int | None) -> list[int]:
    text = spec.render(depth_pct)
    if spec.chat_template:
        return encode(tokenizer, chat_wrap(tokenizer, text), add_special_tokens=False)
    return encode(tokenizer, text, add_special_tokens=spec.prompt_add_special_tokens)


def input_ids_for_text(tokenizer: Any, spec: InjectionSpec, text: str) -> list[int]:
    """The token ids whose last position holds the activation of ``text`` (the input-text rule of
    :mod:`nla_space.verbalizers.injection`)."""
    if not isinstance(text, str) or not text.strip():
        raise NLAInputError("the text is empty: type something to verbalize")
    s = chat_wrap(tokenizer, text) if spec.input_chat_template else text
    ids = encode(tokenizer, s, add_special_tokens=spec.input_add_special_tokens)
    if not ids:
        raise NLAInputError("the text produced no tokens")
    if len(ids) > spec.input_max_tokens:
        raise NLAInputError(f"the text is {len(ids)} tokens long (with its template); the limit is {spec.input_max_tokens} tokens")
    return ids


def text_token_indices(tokenizer: Any, spec: InjectionSpec, text: str, ids: list[int]) -> list[int]:
    """Which of ``ids`` (:func:`input_ids_for_text`) are the text's own tokens, not template or special tokens:
    those whose characters overlap the text in the encoded string (a fast tokenizer's offsets), else the
    text's own encoding found in ``ids``, else every id."""
    s = chat_wrap(tokenizer, text) if spec.input_chat_template else text
    body = text.strip()
    start = s.find(body)
    end = start + len(body)
    if getattr(tokenizer, "is_fast", False) and start >= 0:
        enc = tokenizer(s, add_special_tokens=spec.input_add_special_tokens, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if as_id_list(enc["input_ids"]) == ids:
            own = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
            if own:
                return own
    sub = encode(tokenizer, text, add_special_tokens=False)
    at = find_subsequence(ids, sub)
    return list(range(at, at + len(sub))) if at >= 0 else list(range(len(ids)))


def find_subsequence(ids: list[int], sub: list[int]) -> int:
    """First index of ``sub`` in ``ids``, or -1."""
    n = len(sub)
    if n == 0:
        return -1
    for i in range(len(ids) - n + 1):
        if ids[i : i + n] == sub:
            return i
    return -1


def clip_text(text: str, open_tag: str | None, close_tag: str | None, cut_at: list[str]) -> str:
    """Drop up to an opening tag (if present), cut at the first close tag / extra marker, strip."""
    if open_tag and open_tag in text:
        text = text.split(open_tag, 1)[1]
    cut = len(text)
    for m in ([close_tag] if close_tag else []) + list(cut_at):
        i = text.find(m) if m else -1
        if 0 <= i < cut:
            cut = i
    return text[:cut].strip()
