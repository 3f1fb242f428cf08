"""Token-injection activation verbalizers: Anthropic's NLA AVs and the nla-at-home LoRA AVs.

Two public releases use this recipe: Anthropic's natural language autoencoders
(https://github.com/kitft/natural_language_autoencoders, full fine-tunes such as
https://huggingface.co/kitft/nla-qwen2.5-7b-L20-av) and nla-at-home
(https://github.com/anicka-net/nla-at-home, LoRA adapters such as
https://huggingface.co/anicka/nla-phi4-universal-av-v2). The recipe, written once here and split by
concern into :mod:`.spec` (the facts and the arithmetic), :mod:`.prompt` (token ids), :mod:`.av`
(the model with the activation injected) and :mod:`.card` (the opened card):

Prompt
    The card's (or sidecar's) template, filled with ``{injection_char}`` (the marker) and, for
    depth-conditioned AVs, ``{depth_pct}``. With ``chat_template`` it is the content of one
    **user** message, rendered with ``add_generation_prompt=True`` and encoded without added
    special tokens (the template carries its own); without it, it is encoded raw with
    ``prompt_add_special_tokens``.
Marker position
    The marker must encode to exactly one token (the card's / sidecar's id). A position ``p`` is
    valid only when ``ids[p-1]`` is the left neighbour id and ``ids[p+1]`` the right one (the ``>``
    of ``<concept>`` and the ``</`` of ``</concept>``), and ``p`` is neither first nor last; the
    prompt must hold exactly one valid position, else :class:`CheckpointError`. Neighbour ids come
    from the sidecar, else the card, else the last / first token of ``left_text`` / ``right_text``.
Injection rule
    ``normalize``: ``v · scale / max(‖v‖₂, 1e-12)`` (norm in float32; the direction survives, the
    norm becomes ``scale``). ``multiply``: ``v · scale`` (the rule of nla-at-home's first Qwen
    adapters). ``center_normalize`` (this project's, for backbones whose activations share one
    dominant direction, e.g. SmolLM2: raw cosines between texts 0.88–0.99): ``(v − μ_ℓ) · scale /
    max(‖v − μ_ℓ‖₂, 1e-12)`` with the AV's own per-layer ``μ_ℓ`` from ``inject_mu.safetensors``
    (keys ``L{ℓ}``) in the AV folder (:data:`INJECT_MU_FILE`). The result
    is cast to the embedding dtype and **replaces** the marker's row of the embedded prompt. The
    other rows are the model's own input embeddings (so Gemma's √d scale applies to them); the
    injected row is not multiplied by the embedding scale (as in training, where a hook replaces the
    embedding module's output).
Depth
    Depth-conditioned AVs get ``depth_pct`` from the block index K (see below) and the model's block
    count n: ``grid`` snaps ``K·100/n`` to the card's grid (nearest; ties go to the earlier grid
    value, as nla-at-home's trainers do; the grid is the card's, the sidecar's
    ``depth_percentages`` only says which bands were trained), ``center`` is
    ``round(100·(K+0.5)/n)`` (what nla-at-home's Qwen demos tell the AV: 73 for K=20, n=28),
    ``none`` uses no depth.
Layer
    Cards list ``hidden_states`` indices ℓ (:mod:`nla_space.activations`); these releases name the
    block K, and ℓ = K + ``block_offset`` (1). The activation is read from the **base** model: with
    the LoRA adapter disabled (peft ``disable_adapter()``), or from the separate base model of a
    full fine-tune.
Input text
    The text as one user message of the chat template (nla-at-home) or raw with the tokenizer's own
    special tokens (Anthropic), read at its last token; a text longer than ``max_tokens`` is refused
    (nla-at-home's extractor right-truncates instead, which cuts off the generation prompt). A raw
    text may be read at another of its tokens (``position``, :mod:`nla_space.activations`); a
    chat-wrapped one only at the template's last token (:mod:`.card`).
Parsing
    Sampling stops a row once it has written the token ids of the close tag (a stop sequence of
    :func:`nla_space.rollout.sample`; the releases' own inference code has no stopping criterion and
    relies on the cut below, so the parsed text is the same). Cut each sample at the first occurrence
    of the token ids of the close tag, decode without special tokens, drop everything up to an
    opening tag if the model wrote one, cut the text at the first of the close tag and the card's
    extra markers, strip.

Scoring is a reconstructor's (:mod:`nla_space.reconstructors`: candidates → vectors, scored
against the activation) or a compass's (:class:`nla_space.compass.CompassScorer`: candidates →
sentence embeddings, scored against the compass target); selection and hedging are the same
:mod:`nla_space.policy` code as for prefix AVs.
"""

from .av import InjectionAV, load_inject_mu
from .card import OpenInjectionCard, open_injection_card
from .prompt import (
    as_id_list,
    chat_wrap,
    check_marker_token,
    clip_text,
    encode,
    find_marker,
    find_subsequence,
    input_ids_for_text,
    neighbor_ids,
    prompt_ids,
    text_token_indices,
)
from .spec import (
    DEPTH_FORMULAS,
    INJECT_MU_FILE,
    INJECTION_RULES,
    InjectionSpec,
    center_depth_pct,
    nearest_depth_pct,
    resolve_spec,
    scale_vector,
)

__all__ = [
    "DEPTH_FORMULAS",
    "INJECTION_RULES",
    "INJECT_MU_FILE",
    "InjectionAV",
    "InjectionSpec",
    "OpenInjectionCard",
    "as_id_list",
    "center_depth_pct",
    "chat_wrap",
    "check_marker_token",
    "clip_text",
    "encode",
    "find_marker",
    "find_subsequence",
    "input_ids_for_text",
    "load_inject_mu",
    "nearest_depth_pct",
    "neighbor_ids",
    "open_injection_card",
    "prompt_ids",
    "resolve_spec",
    "scale_vector",
    "text_token_indices",
]
