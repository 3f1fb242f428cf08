"""The injection spec: every fact the injection recipe needs, from the card merged with the AV's sidecar.

A card's ``injection`` section states the AV prompt template, the marker, the injection rule and scale,
the depth rule, how the input text is tokenised and how the output is parsed; the ``nla_meta.yaml``
sidecar shipped with an AV (:mod:`nla_space.sidecar`) states some of the same facts and wins where it
speaks. :func:`resolve_spec` merges the two into an :class:`InjectionSpec` and records where each
fact came from; the pure arithmetic of the recipe (the depth a block is told, the injected vector)
lives here beside it, each piece checked against a plain reference computation in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...cards.sections import DEPTH_FORMULAS, INJECTION_RULES, InjectionSection
from ...errors import CheckpointError
from ...sidecar import Sidecar

#: File of the per-layer μ that the ``center_normalize`` rule subtracts (keys ``L{ℓ}``), in the AV folder.
INJECT_MU_FILE = "inject_mu.safetensors"
__all__ = ["DEPTH_FORMULAS", "INJECTION_RULES", "INJECT_MU_FILE", "InjectionSpec", "center_depth_pct", "nearest_depth_pct",
           "resolve_spec", "scale_vector"]


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
    """The injected vector in float32 (rules in :mod:`nla_space.verbalizers.injection`); ``mu`` is needed by
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


@dataclass
class InjectionSpec:
    """Everything the injection recipe needs: a card's :class:`~nla_space.cards.sections.InjectionSection`
    merged with the AV's sidecar by :func:`resolve_spec` (the section states every default); ``sources``
    says where each mergeable fact came from."""

    template: str
    marker: str
    rule: str
    scale: float
    chat_template: bool
    marker_id: int | None
    left_neighbor_id: int | None
    right_neighbor_id: int | None
    left_text: str
    right_text: str
    prompt_add_special_tokens: bool
    depth_formula: str
    depth_grid: list[int]
    block_offset: int
    input_chat_template: bool
    input_add_special_tokens: bool
    input_max_tokens: int
    #: read positions below this were not in the AV's training data (Anthropic: positions ≥ 50); 0 = no note
    input_min_position: int
    open_tag: str | None
    close_tag: str | None
    cut_at: list[str]
    top_p: float
    max_new_tokens: int  #: the default rollout length (the card's ``generation.max_new_tokens``)
    d_model: int | None
    #: the depth bands the adapter was trained on (sidecar ``depth_percentages``), informational
    trained_depths: list[int]
    sources: dict[str, str]

    def validate(self, where: str) -> None:
        if self.rule not in INJECTION_RULES:
            raise CheckpointError(f"{where}: injection rule must be one of {INJECTION_RULES}, got {self.rule!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not 0 < self.scale <= 1e6:
            raise CheckpointError(f"{where}: injection scale must be a positive number, got {self.scale!r}")
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


def resolve_spec(section: InjectionSection, sidecar: Sidecar | None, where: str) -> InjectionSpec:
    """Merge a card's ``injection`` section with the AV's sidecar (the sidecar wins where it speaks).

    The injection rule: the sidecar's ``training.injection_mode`` if stated, else the card's
    ``rule``. The chat wrap: the sidecar's ``training.chat_template`` if stated, else the card's.
    ``sources`` records ``sidecar``, ``card`` (the section holds a value, perhaps its default) or
    ``default`` (neither states it).
    """
    sources: dict[str, str] = {}

    def pick(name: str, side_val: Any, card_val: Any) -> Any:
        sources[name] = "sidecar" if side_val is not None else "card" if card_val is not None else "default"
        return side_val if side_val is not None else card_val

    sc = sidecar or Sidecar(path="")
    template = pick("template", sc.av_template, section.template)
    marker = pick("marker", sc.injection_char, section.marker)
    scale = pick("scale", sc.injection_scale, section.scale)
    rule = pick("rule", sc.injection_mode, section.rule)
    if template is None or marker is None or scale is None or rule is None:
        missing = [n for n, x in (("template", template), ("marker", marker), ("scale", scale), ("rule", rule)) if x is None]
        raise CheckpointError(f"{where}: the card and the sidecar do not state {', '.join(missing)}")
    formula = section.depth.formula
    if sources["template"] == "sidecar" and "{depth_pct}" not in str(template):
        formula = "none"  # the sidecar's depth-free template wins over the card's depth rule
    spec = InjectionSpec(
        template=str(template),
        marker=str(marker),
        rule=str(rule),
        scale=float(scale),
        chat_template=bool(pick("chat_template", sc.chat_template, section.chat_template)),
        marker_id=pick("marker_id", sc.injection_token_id, section.marker_id),
        left_neighbor_id=pick("left_neighbor_id", sc.left_neighbor_id, section.left_neighbor_id),
        right_neighbor_id=pick("right_neighbor_id", sc.right_neighbor_id, section.right_neighbor_id),
        left_text=section.left_text,
        right_text=section.right_text,
        prompt_add_special_tokens=section.prompt_add_special_tokens,
        depth_formula=formula,
        depth_grid=list(section.depth.grid),
        block_offset=section.block_offset,
        input_chat_template=section.input.chat_template,
        input_add_special_tokens=section.input.add_special_tokens,
        input_max_tokens=section.input.max_tokens,
        input_min_position=section.input.min_position,
        open_tag=section.parse.open,
        close_tag=section.parse.close,
        cut_at=list(section.parse.cut_at),
        top_p=section.generation.top_p,
        max_new_tokens=section.generation.max_new_tokens,
        d_model=sc.d_model,
        trained_depths=[int(g) for g in (sc.depth_percentages or [])],
        sources=sources,
    )
    spec.validate(where)
    return spec
