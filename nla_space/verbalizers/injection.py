"""Token-injection activation verbalizers: Anthropic's NLA AVs and the nla-at-home LoRA AVs.

The recipe (``kitft_nla.md`` §1.3, ``nla_at_home.md`` §1.3–1.9), written once here:

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
    norm becomes ``scale``). ``multiply``: ``v · scale`` (nla-at-home's legacy v1 rule).
    ``center_normalize`` (this project's, for backbones whose activations share one dominant
    direction, e.g. SmolLM2: raw cosines between texts 0.88–0.99): ``(v − μ_ℓ) · scale /
    max(‖v − μ_ℓ‖₂, 1e-12)`` with the AV's own per-layer ``μ_ℓ`` from ``inject_mu.safetensors``
    (keys ``L{ℓ}``) in the AV folder (:data:`INJECT_MU_FILE`). The result
    is cast to the embedding dtype and **replaces** the marker's row of the embedded prompt. The
    other rows are the model's own input embeddings (so Gemma's √d scale applies to them); the
    injected row is not multiplied by the embedding scale (as in training, where a hook replaces the
    embedding module's output).
Depth
    Depth-conditioned AVs get ``depth_pct`` from the block index K (see below) and the model's block
    count n: ``grid`` snaps ``K·100/n`` to the card's grid (nearest; ties go to the earlier grid
    value: nla-at-home's ``nearest_depth_pct``; the grid is the card's, the sidecar's
    ``depth_percentages`` only says which bands were trained), ``center`` is
    ``round(100·(K+0.5)/n)`` (the nla-at-home Qwen demos: 73 for K=20, n=28), ``none`` uses no
    depth.
Layer
    Cards list ``hidden_states`` indices ℓ (:mod:`nla_space.activations`); these releases name the
    block K, and ℓ = K + ``block_offset`` (1). The activation is read from the **base** model: with
    the LoRA adapter disabled (peft ``disable_adapter()``), or from the separate base model of a
    full fine-tune.
Input text
    The text as one user message of the chat template (nla-at-home) or raw with the tokenizer's own
    special tokens (Anthropic), read at its last token; a text longer than ``max_tokens`` is refused
    (the reference right-truncates, which cuts off the generation prompt).
Parsing
    Sampling stops a row once it has written the token ids of the close tag (a stop sequence of
    :func:`nla_space.rollout.sample`; the reference has no stopping criterion and relies on the cut
    below, so the parsed text is the same). Cut each sample at the first occurrence of the token
    ids of the close tag, decode without special tokens, drop everything up to an opening tag if
    the model wrote one, cut the text at the first of the close tag and the card's extra markers,
    strip.

Scoring is a reconstructor's (:mod:`nla_space.reconstructors`: candidates → vectors, scored
against the activation) or a compass's (:class:`nla_space.compass.CompassScorer`: candidates →
sentence embeddings, scored against the compass target); selection and hedging are the same
:mod:`nla_space.policy` code as for prefix AVs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .. import activations, policy
from ..backbone import Backbone, load_backbone
from ..cards import REPO_ROOT, Card
from ..errors import CheckpointError, NLAInputError
from ..hub import load_state_dict, snapshot
from ..rollout import Rollout, request_generator, sample
from ..sidecar import Sidecar, load_sidecar

from .lora import attach_lora  # noqa: F401  (reconstructors import it from here)

log = logging.getLogger(__name__)

#: Files of a PEFT LoRA adapter repo (no pickles, no code).
ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "nla_meta.yaml", "*.json"]
#: Files of a full-model release (backbone patterns plus the sidecar).
FULL_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken", "nla_meta.yaml"]

INJECTION_RULES = ("normalize", "multiply", "center_normalize")

#: File of the per-layer μ that the ``center_normalize`` rule subtracts (keys ``L{ℓ}``), in the AV folder.
INJECT_MU_FILE = "inject_mu.safetensors"
DEPTH_FORMULAS = ("grid", "center", "none")

ProgressFn = Callable[[float, str], None]


# ---------------------------------------------------------------------------------------------
# Pure pieces (each tested against a plain reference computation)
# ---------------------------------------------------------------------------------------------


def nearest_depth_pct(block: int, n_layers: int, grid: list[int]) -> int:
    """``block·100/n_layers`` snapped to the nearest grid value (ties: the earlier grid value)."""
    if not grid:
        raise ValueError("empty depth grid")
    pct = block * 100.0 / n_layers
    best = grid[0]
    for g in grid[1:]:
        if abs(g - pct) < abs(best - pct):
            best = g
    return int(best)


def center_depth_pct(block: int, n_layers: int) -> int:
    """``round(100·(block + 0.5)/n_layers)`` (Python rounding)."""
    return int(round(100.0 * (block + 0.5) / n_layers))


def scale_vector(v: torch.Tensor, rule: str, scale: float, mu: torch.Tensor | None = None) -> torch.Tensor:
    """The injected vector in float32 (rules in the module docstring); ``mu`` is needed by
    ``center_normalize`` only."""
    v = v.float()
    if rule == "center_normalize":
        if mu is None:
            raise ValueError("the center_normalize rule needs the AV's μ for this layer")
        v = v - mu.to(v.device).float()
    if rule in ("normalize", "center_normalize"):
        return v * (scale / v.norm().clamp_min(1e-12))
    if rule == "multiply":
        return v * scale
    raise ValueError(f"unknown injection rule {rule!r}; expected one of {INJECTION_RULES}")


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


# ---------------------------------------------------------------------------------------------
# The spec: card facts merged with the sidecar
# ---------------------------------------------------------------------------------------------


@dataclass
class InjectionSpec:
    """Everything the injection recipe needs; ``sources`` says where each fact came from."""

    template: str
    marker: str
    rule: str
    scale: float
    chat_template: bool
    marker_id: int | None = None
    left_neighbor_id: int | None = None
    right_neighbor_id: int | None = None
    left_text: str = ">"
    right_text: str = "</"
    prompt_add_special_tokens: bool = False
    depth_formula: str = "none"
    depth_grid: list[int] = field(default_factory=list)
    block_offset: int = 1
    input_chat_template: bool = True
    input_add_special_tokens: bool = True
    input_max_tokens: int = 512
    #: read positions below this were not in the AV's training data (Anthropic: positions ≥ 50); 0 = no note
    input_min_position: int = 0
    open_tag: str | None = None
    close_tag: str | None = "</explanation>"
    cut_at: list[str] = field(default_factory=list)
    top_p: float = 1.0
    max_new_tokens: int = 64  #: the default rollout length (the card's ``generation.max_new_tokens``)
    d_model: int | None = None
    #: the depth bands the adapter was trained on (sidecar ``depth_percentages``), informational
    trained_depths: list[int] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        if self.rule not in INJECTION_RULES:
            raise CheckpointError(f"{where}: injection rule must be one of {INJECTION_RULES}, got {self.rule!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not 0 < self.scale <= 1e6:
            raise CheckpointError(f"{where}: injection scale must be a positive number, got {self.scale!r}")
        if self.depth_formula not in DEPTH_FORMULAS:
            raise CheckpointError(f"{where}: depth formula must be one of {DEPTH_FORMULAS}, got {self.depth_formula!r}")
        if self.depth_formula == "grid" and not self.depth_grid:
            raise CheckpointError(f"{where}: depth formula 'grid' needs a non-empty depth grid")
        if "{injection_char}" not in self.template:
            raise CheckpointError(f"{where}: the AV template has no {{injection_char}} placeholder")
        if self.depth_formula != "none" and "{depth_pct}" not in self.template:
            raise CheckpointError(f"{where}: depth formula {self.depth_formula!r} but the template has no {{depth_pct}}")

    def depth_pct(self, block: int, n_layers: int) -> int | None:
        if self.depth_formula == "grid":
            return nearest_depth_pct(block, n_layers, self.depth_grid)
        if self.depth_formula == "center":
            return center_depth_pct(block, n_layers)
        return None

    def render(self, depth_pct: int | None) -> str:
        """The AV prompt text (before any chat wrapping), byte-exact from the template."""
        return self.template.format(injection_char=self.marker, depth_pct="" if depth_pct is None else int(depth_pct))


def resolve_spec(section: dict[str, Any], sidecar: Sidecar | None, where: str) -> InjectionSpec:
    """Merge a card's ``injection`` section with the AV's sidecar (the sidecar wins where it speaks).

    The injection rule: the sidecar's ``training.injection_mode`` if stated, else the card's
    ``rule``. The chat wrap: the sidecar's ``training.chat_template`` if stated, else the card's.
    """
    sources: dict[str, str] = {}

    def pick(name: str, side_val: Any, card_key: str, default: Any = None) -> Any:
        if side_val is not None:
            sources[name] = "sidecar"
            return side_val
        if card_key in section and section[card_key] is not None:
            sources[name] = "card"
            return section[card_key]
        sources[name] = "default"
        return default

    sc = sidecar or Sidecar(path="")
    depth = section.get("depth") or {}
    inp = section.get("input") or {}
    parse = section.get("parse") or {}
    gen = section.get("generation") or {}
    template = pick("template", sc.av_template, "template")
    marker = pick("marker", sc.injection_char, "marker")
    scale = pick("scale", sc.injection_scale, "scale")
    rule = pick("rule", sc.injection_mode, "rule")
    if template is None or marker is None or scale is None or rule is None:
        missing = [n for n, x in (("template", template), ("marker", marker), ("scale", scale), ("rule", rule)) if x is None]
        raise CheckpointError(f"{where}: the card and the sidecar do not state {', '.join(missing)}")
    grid = depth.get("grid") or []
    formula = str(depth.get("formula", "none"))
    if sources["template"] == "sidecar" and "{depth_pct}" not in str(template):
        formula = "none"  # the sidecar's depth-free template wins over the card's depth rule
    spec = InjectionSpec(
        template=str(template),
        marker=str(marker),
        rule=str(rule),
        scale=float(scale),
        chat_template=bool(pick("chat_template", sc.chat_template, "chat_template", False)),
        marker_id=pick("marker_id", sc.injection_token_id, "marker_id"),
        left_neighbor_id=pick("left_neighbor_id", sc.left_neighbor_id, "left_neighbor_id"),
        right_neighbor_id=pick("right_neighbor_id", sc.right_neighbor_id, "right_neighbor_id"),
        left_text=str(section.get("left_text", ">")),
        right_text=str(section.get("right_text", "</")),
        prompt_add_special_tokens=bool(section.get("prompt_add_special_tokens", False)),
        depth_formula=formula,
        depth_grid=[int(g) for g in grid],
        block_offset=int(section.get("block_offset", 1)),
        input_chat_template=bool(inp.get("chat_template", True)),
        input_add_special_tokens=bool(inp.get("add_special_tokens", True)),
        input_max_tokens=int(inp.get("max_tokens", 512)),
        input_min_position=int(inp.get("min_position", 0)),
        open_tag=parse.get("open"),
        close_tag=parse.get("close", "</explanation>"),
        cut_at=list(parse.get("cut_at", [])),
        top_p=float(gen.get("top_p", 1.0)),
        max_new_tokens=int(gen.get("max_new_tokens", 64)),
        d_model=sc.d_model,
        trained_depths=[int(g) for g in (sc.depth_percentages or [])],
        sources=sources,
    )
    spec.validate(where)
    return spec


# ---------------------------------------------------------------------------------------------
# Tokenisation: the prompt, the marker, the input text
# ---------------------------------------------------------------------------------------------


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
    """The token ids whose last position holds the activation of ``text`` (see the module docstring)."""
    if not isinstance(text, str) or not text.strip():
        raise NLAInputError("the text is empty: type something to verbalize")
    s = chat_wrap(tokenizer, text) if spec.input_chat_template else text
    ids = encode(tokenizer, s, add_special_tokens=spec.input_add_special_tokens)
    if not ids:
        raise NLAInputError("the text produced no tokens")
    if len(ids) > spec.input_max_tokens:
        raise NLAInputError(f"the text is {len(ids)} tokens long (with its template); the limit is {spec.input_max_tokens} tokens")
    return ids


# ---------------------------------------------------------------------------------------------
# The verbalizer
# ---------------------------------------------------------------------------------------------


@dataclass
class InjectionAV:
    """An injection AV: its model (a base with a LoRA adapter, or a full fine-tune) and its spec."""

    backbone: Backbone
    spec: InjectionSpec
    peft_model: Any = None
    #: per-layer μ subtracted by the ``center_normalize`` rule (``load_inject_mu``); None otherwise
    inject_mu: dict[int, torch.Tensor] | None = None
    _prompts: dict[int | None, tuple[list[int], int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        tok = self.backbone.tokenizer
        self.marker_id = check_marker_token(tok, self.spec)
        self.left_id, self.right_id = neighbor_ids(tok, self.spec)
        if self.spec.d_model is not None and self.spec.d_model != self.backbone.hidden_size:
            raise CheckpointError(f"the sidecar says d_model={self.spec.d_model}, the model has {self.backbone.hidden_size}")
        close = self.spec.close_tag
        self.close_ids = encode(tok, close, add_special_tokens=False) if close else []

    @property
    def d_vec(self) -> int:
        return self.backbone.hidden_size

    def block(self, layer: int) -> int:
        return layer - self.spec.block_offset

    def depth_pct(self, layer: int) -> int | None:
        return self.spec.depth_pct(self.block(layer), self.backbone.num_layers)

    def prompt(self, layer: int) -> tuple[list[int], int]:
        """(prompt ids, marker position) for ``layer``, checked once per depth and cached."""
        pct = self.depth_pct(layer)
        if pct not in self._prompts:
            ids = prompt_ids(self.backbone.tokenizer, self.spec, pct)
            self._prompts[pct] = (ids, find_marker(ids, self.marker_id, self.left_id, self.right_id))
        return self._prompts[pct]

    def inputs_embeds(self, v: torch.Tensor, layer: int) -> torch.Tensor:
        """The prompt embedded by the model, the marker row replaced by the scaled ``v``: (1, T, d)."""
        ids, pos = self.prompt(layer)
        dev = self.backbone.device
        emb = self.backbone.embed_tokens(torch.tensor([ids], device=dev)).clone()
        mu = None
        if self.spec.rule == "center_normalize":
            if not self.inject_mu or layer not in self.inject_mu:
                raise CheckpointError(f"the center_normalize rule needs μ for layer {layer} ({INJECT_MU_FILE} in the AV folder)")
            mu = self.inject_mu[layer]
        emb[0, pos] = scale_vector(v.to(dev), self.spec.rule, self.spec.scale, mu).to(emb.dtype)
        return emb

    @contextlib.contextmanager
    def adapter_off(self) -> Iterator[None]:
        """The base model: the LoRA adapter disabled (no-op for a full fine-tune)."""
        if self.peft_model is None:
            yield
        else:
            with self.peft_model.disable_adapter():
                yield

    def cut(self, roll: Rollout) -> Rollout:
        """Each row cut (masked) before the first occurrence of the close tag's token ids."""
        mask = roll.mask.clone()
        if self.close_ids:
            for i in range(roll.ids.shape[0]):
                n = int(mask[i].sum())
                j = find_subsequence([int(t) for t in roll.ids[i, :n]], self.close_ids)
                if j >= 0:
                    mask[i, j:] = 0
        return Rollout(ids=roll.ids, mask=mask)

    def decode(self, ids: list[int]) -> str:
        text = self.backbone.tokenizer.decode(ids, skip_special_tokens=True)
        return clip_text(text, self.spec.open_tag, self.spec.close_tag, self.spec.cut_at)


def section_files(section: dict[str, Any], patterns: list[str], what: str) -> Path:
    """Local folder of a card section: ``folder`` (relative to the repo root) or a hub ``repo``@``revision``."""
    if section.get("folder"):
        p = Path(section["folder"]).expanduser()
        p = p if p.is_absolute() else REPO_ROOT / p
        if not p.is_dir():
            raise CheckpointError(f"{what}: folder {p} does not exist")
        return p
    repo = section.get("repo")
    if not repo:
        raise CheckpointError(f"{what}: no 'repo' or 'folder'")
    return snapshot(repo, section.get("revision"), section.get("files") or patterns)


@dataclass
class OpenInjectionCard:
    """An injection card opened for use; :meth:`verbalize` has :class:`nla_space.runtime.OpenCard`'s signature."""

    card: Card
    av: InjectionAV
    reconstructor: Any
    mus: dict[int, torch.Tensor]
    base_loader: Callable[[], Backbone] | None = None
    trained: bool = True
    notes: list[str] = field(default_factory=list)
    _base: Backbone | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def layers(self) -> list[int]:
        return list(self.card.layers)

    @property
    def mu(self) -> torch.Tensor | None:
        """μ of the default layer (None when the card ships none)."""
        return self.mus.get(self.card.default_layer)

    @property
    def backbone(self) -> Backbone:
        """The model the activations are read from: the AV's own base (LoRA) or the base model (full FT)."""
        if self.base_loader is None:
            return self.av.backbone
        if self._base is None:
            self._base = self.base_loader()
            if self._base.hidden_size != self.av.d_vec:
                raise CheckpointError(f"card {self.card.id}: base model d={self._base.hidden_size}, AV d={self.av.d_vec}")
        return self._base

    def check_layer(self, layer: int | None) -> int:
        layer = self.card.default_layer if layer is None else layer
        if layer not in self.card.layers:
            raise NLAInputError(f"card {self.card.id} supports layer(s) {self.card.layers}, not {layer!r}")
        if layer - self.av.spec.block_offset < 0:
            raise NLAInputError(f"layer {layer} is below the card's first block")
        return activations.check_layer(self.av.backbone, layer)

    def check_vector(self, vector: Any) -> torch.Tensor:
        v = torch.as_tensor(vector).float().reshape(-1) if vector is not None else None
        if v is None or v.numel() != self.av.d_vec:
            n = None if v is None else v.numel()
            raise NLAInputError(f"the vector has {n} values; this model needs {self.av.d_vec}")
        if not torch.isfinite(v).all():
            raise NLAInputError("the vector contains NaN or infinite values")
        return v

    def extract(self, text: str, layer: int) -> torch.Tensor:
        """The activation (float32, (d,)) of ``text`` at ``layer``, from the base model (adapter off)."""
        return self._extract(text, [layer])[layer]

    def extract_layers(self, text: str, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """The activations of ``text`` at several layers from the base model (one truncated forward each); each equals
        :meth:`extract` (held under the card's lock: the adapter switch is model state)."""
        with self._lock:
            return self._extract(text, layers)

    def depth_pct(self, layer: int) -> int | None:
        """The prompt depth (%) the AV is told for ``layer``, or None when the card's prompt has none."""
        return self.av.depth_pct(layer)

    @torch.inference_mode()
    def _extract(self, text: str, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        bb = self.backbone
        ids = torch.tensor([input_ids_for_text(bb.tokenizer, self.av.spec, text)], device=bb.device)
        mask = torch.ones_like(ids)
        ctx = self.av.adapter_off() if bb is self.av.backbone else contextlib.nullcontext()
        with ctx:
            hidden = activations.hidden_at_layers(bb, layers, input_ids=ids, attention_mask=mask)
        return {ell: activations.read_last_valid(h, mask)[0].float().cpu() for ell, h in hidden.items()}

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
        return self.av.cut(roll)

    # -- the interface the harness uses for every card kind (nla_space.runtime.OpenCard has the same) --

    @property
    def top_p(self) -> float:
        return float(self.av.spec.top_p)

    @property
    def default_max_new_tokens(self) -> int:
        """Rollout length when a request names none: the card's ``generation.max_new_tokens``."""
        return max(1, min(policy.MAX_NEW_TOKENS, self.av.spec.max_new_tokens))

    @property
    def scorer_space(self) -> str:
        """``activation`` for an AR (scored against v, μ-centered when there is a μ), ``embedding`` for a compass."""
        return str(getattr(self.reconstructor, "space", "activation"))

    @property
    def scorer_name(self) -> str:
        return str(self.card.reconstructor.get("kind", "reconstructor"))

    def candidate_texts(self, roll: Rollout) -> list[str]:
        """Each row's valid tokens parsed as the card says (:meth:`InjectionAV.decode`)."""
        return [self.av.decode([int(t) for t in roll.ids[i, : int(roll.mask[i].sum())]]) for i in range(roll.ids.shape[0])]

    def reconstruct_texts(self, texts: list[str], layer: int) -> torch.Tensor:
        """The scorer's vectors of ``texts`` (AR reconstructions, or a compass's sentence embeddings), float32 CPU."""
        return self.reconstructor.encode(list(texts), layer).float().cpu()

    def reconstruct(self, roll: Rollout, layer: int) -> torch.Tensor:
        return self.reconstruct_texts(self.candidate_texts(roll), layer)

    def score_target(self, v: torch.Tensor, layer: int) -> torch.Tensor:
        """What reconstructions are compared with: v for an AR, the compass target t* for a compass."""
        return self.reconstructor.target(v.float(), layer).float().cpu()

    @torch.inference_mode()
    def verbalize(
        self,
        text: str | None = None,
        vector: Any = None,
        layer: int | None = None,
        k: int = 16,
        tau: float | None = None,
        temperature: float = 1.0,
        max_new_tokens: int | None = None,
        greedy: bool = False,
        seed: int | None = None,
        progress: ProgressFn | None = None,
        strategy: str | None = None,
    ) -> policy.Verbalization:
        """As :meth:`nla_space.runtime.OpenCard.verbalize`; ``text`` with ``vector`` means ``vector`` is
        the text's activation, read already (:func:`nla_space.sweep.sweep`), and the text only adds notes.
        ``strategy="guided"`` re-scores every particle's decoded text with the reconstructor at each
        token (:class:`nla_space.guided.TextTracker`): correct, and slower than on a prefix or patch card."""
        tau = self.card.default_tau if tau is None else tau
        max_new_tokens = self.default_max_new_tokens if max_new_tokens is None else max_new_tokens
        policy.check_params(k, tau, temperature, max_new_tokens, seed)
        strategy = policy.resolve_strategy(strategy, greedy, "best-of-k")
        greedy = strategy == "greedy"
        layer = self.check_layer(layer)
        notes = list(self.notes)
        if text is not None and self.av.spec.input_min_position:  # with a vector too: the text it was read from
            n_tok = len(input_ids_for_text(self.backbone.tokenizer, self.av.spec, text))
            if n_tok - 1 < self.av.spec.input_min_position:
                notes.append(f"read position {n_tok - 1} < {self.av.spec.input_min_position}: the AV was trained on later positions (out of distribution)")
        pct = self.av.depth_pct(layer)
        if pct is not None:
            notes.append(f"prompt depth {pct}% (block {self.av.block(layer)} of {self.av.backbone.num_layers})")
            if self.av.spec.trained_depths and pct not in self.av.spec.trained_depths:
                notes.append(f"depth {pct}% is not among the adapter's trained bands {self.av.spec.trained_depths}")
        mu = self.mus.get(layer)

        def score(roll: Rollout, v: torch.Tensor) -> tuple[list[policy.Candidate], int, bool]:
            h = self.reconstructor.encode(self.candidate_texts(roll), layer)
            target = self.reconstructor.target(v.to(h.device), layer)
            cands, best = policy.best_of_k(roll, self.av.decode, h, target, mu)
            return cands, best, mu is not None

        with self._lock:  # the LoRA on/off switch is model state: one request at a time
            return policy.run(
                card=self.card.id, trained=self.trained, layer=layer, k=k, tau=tau, temperature=temperature,
                greedy=greedy, seed=seed, notes=notes,
                read=lambda: self.check_vector(vector) if vector is not None else self.extract(text, layer),
                roll=lambda v: (self.guided(v, k, temperature, max_new_tokens, seed, layer) if strategy == "guided"
                                else self.rollout(v, k, temperature, max_new_tokens, greedy, seed, layer)),
                score=score, progress=progress, score_label="reconstructing and scoring", strategy=strategy,
            )

    def guided(self, v: torch.Tensor, k: int, temperature: float, max_new_tokens: int, seed: int | None, layer: int) -> Rollout:
        """Guided decoding (:func:`nla_space.guided.smc`) over the AV's prompt, potential = 10 × the
        centered (raw without μ) fve of each partial explanation's reconstruction."""
        from .. import guided

        bb = self.av.backbone
        stepper = guided.EmbedsStepper(bb, self.av.inputs_embeds(v, layer), max_new_tokens)
        tracker = guided.TextTracker(self.av.decode, lambda texts: self.reconstructor.encode(texts, layer), k)
        potential = guided.fve_potential(self.reconstructor.target(v.float(), layer), self.mus.get(layer))
        settings = guided.GuidedSettings(n=k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=self.av.spec.top_p)
        return self.av.cut(guided.search(stepper, tracker, potential, settings, seed, bb))


def load_inject_mu(folder: Path, layers: list[int], d: int) -> dict[int, torch.Tensor]:
    """The AV's per-layer injection μ (``INJECT_MU_FILE``, keys ``L{ℓ}``) for every layer in ``layers``."""
    path = Path(folder) / INJECT_MU_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: the center_normalize rule needs {INJECT_MU_FILE} (per-layer μ, keys L{{layer}})")
    tensors = load_state_dict(path)
    out = {}
    for ell in layers:
        t = tensors.get(f"L{ell}")
        if t is None:
            raise CheckpointError(f"{path}: no μ for layer {ell} (has {sorted(tensors)})")
        t = t.float().reshape(-1)
        if t.numel() != d or not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: μ of layer {ell} must be {d} finite values")
        out[ell] = t
    return out


def _load_mu(section: dict[str, Any], folder: Path | None, layer: int, d: int) -> torch.Tensor | None:
    name = section.get("mu_file")
    if not name or folder is None:
        return None
    path = folder / str(name).format(layer=layer)
    if not path.is_file():
        return None
    tensors = load_state_dict(path)
    mu = tensors.get("mu", next(iter(tensors.values()))).float().reshape(-1)
    if mu.numel() != d:
        raise CheckpointError(f"{path}: μ has {mu.numel()} values, the model has d={d}")
    return mu


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
    from ..reconstructors import open_reconstructor
    from ..runtime import shared_backbone

    if not card.injection:
        raise CheckpointError(f"card {card.id}: kind 'injection' needs an 'injection' section")
    bb_spec = backbone or card.backbone_id
    bb_rev = revision if backbone else card.backbone.get("revision")
    card_dtype = card.backbone.get("dtype")
    fmt = card.av.get("format", "peft_lora")
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
    for ell in card.layers:  # the loader contract: every prompt has exactly one neighbour-checked marker
        av.prompt(ell)
    if not card.reconstructor:
        raise CheckpointError(f"card {card.id}: an injection card needs a 'reconstructor' section to score candidates")
    share = (bb_spec, bb_rev, av_bb, peft_model) if peft_model is not None else None
    ar = open_reconstructor(card.reconstructor, device=device, dtype=card_dtype, where=f"card {card.id}", default_base=(bb_spec, bb_rev),
                            share=share, explicit_dtype=dtype)
    missing = [ell for ell in card.layers if not ar.supports(ell)]
    if missing:
        raise CheckpointError(f"card {card.id}: the reconstructor has no head for layer(s) {missing}")
    mus = {}
    if card.reconstructor.get("kind") != "compass":  # μ centers activations; a compass scores in its own space
        mus = {ell: mu for ell in card.layers if (mu := _load_mu(card.reconstructor, ar.folder, ell, av.d_vec)) is not None}
    if not mus:
        notes.append("no μ for this card: scores are raw fve_nrm of the reconstruction, not centered")
    log.info("opened injection card %s (rule %s ×%g from %s)", card.id, spec.rule, spec.scale, spec.sources.get("rule"))
    return OpenInjectionCard(card=card, av=av, reconstructor=ar, mus=mus, base_loader=base_loader, notes=notes)
