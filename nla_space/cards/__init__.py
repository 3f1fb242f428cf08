"""Verbalizer cards: one JSON data file per card in this folder, or a local folder laid out like a release.

A card file holds every card-specific fact, so the code never branches on a model name:

``id``            hub id of the verbalizer (or ``nla-space/…`` for ours), also accepted by ``--card``
``aliases``       short names for ``--card``
``kind``          ``"prefix"`` (SRT family), ``"injection"`` (token-injection AVs) or ``"patch"`` (v written at its
                  own layer, LoRA above it) — the verbalizer class to build (:data:`nla_space.runtime.CARD_KINDS`)
``backbone``      ``{"id", "revision", "dtype", "shape"}``; ``id`` may be ``embedded:NAME``; ``shape`` (optional)
                  holds the architecture config fields a random-weight model of the same size needs
                  (``bench --random-weights``), with the ``source`` they were read from
``layers``        the layers the AV supports (``hidden_states`` index, see :mod:`nla_space.activations`)
``av``            where the weights are: ``{"repo", "revision", "files"}`` on the hub, or ``{"folder"}``
                  relative to the repository root (the shipped ``assets/``)
``mu_file``       file (inside the AV folder) holding μ; optional
``default_tau``   hedging threshold on the centered scale
``anchors``       the card's floor/ceiling on the centered scale, with the ceiling's name
``published``     numbers from the card, each table with its ``source``
``injection``     (kind ``injection``) marker, template, injection rule and scale, depth rule, parsing;
                  see :mod:`nla_space.verbalizers.injection`
``reconstructor`` (kind ``injection``) the AR that scores candidates; see :mod:`nla_space.reconstructors`
``patch``         (kind ``patch``) ``pool_file``, ``default_strategy``, ``calibration``; see
                  :mod:`nla_space.verbalizers.patch_card` and :mod:`nla_space.specificity`
``compass``       optional ``{"file", "block_offset", "tau"}``: a compass (:mod:`nla_space.compass`) in the AV
                  folder whose rerank of the same candidates is reported beside the oracle (re-encode) pick;
                  ``tau`` is on the compass's cosine scale (default 0.30)

A local folder is a card too: ``config.json`` (NLAConfig) + ``av.safetensors`` or ``best_av.pt``,
optionally ``mu.safetensors`` / ``mu_l{ℓ}.pt`` and a ``card.json`` with any of the fields above.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, NLAInputError

CARDS_DIR = Path(__file__).resolve().parent
REPO_ROOT = CARDS_DIR.parent.parent
DEFAULT_CARD = "embedded"


@dataclass
class Card:
    id: str
    kind: str = "prefix"
    title: str = ""
    aliases: list[str] = field(default_factory=list)
    backbone: dict[str, Any] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)
    av: dict[str, Any] = field(default_factory=dict)
    mu_file: str | None = None
    default_tau: float = 0.6
    anchors: dict[str, Any] = field(default_factory=dict)
    published: dict[str, Any] = field(default_factory=dict)
    #: kind "injection" only: the injection recipe and the reconstructor (see nla_space.verbalizers.injection)
    injection: dict[str, Any] = field(default_factory=dict)
    reconstructor: dict[str, Any] = field(default_factory=dict)
    compass: dict[str, Any] = field(default_factory=dict)
    #: kind "patch" only: pool file, default strategy, calibration (see nla_space.verbalizers.patch_card)
    patch: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    license: str = ""
    source_file: str | None = None

    @property
    def default_layer(self) -> int:
        return self.layers[0]

    @property
    def backbone_id(self) -> str:
        return str(self.backbone.get("id", ""))

    @property
    def local_folder(self) -> Path | None:
        folder = self.av.get("folder")
        if folder is None:
            return None
        p = Path(folder)
        return p if p.is_absolute() else REPO_ROOT / p

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> "Card":
        known = set(cls.__dataclass_fields__)
        try:
            card = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise CheckpointError(f"{source}: not a card ({exc})") from exc
        card.source_file = source
        if not isinstance(card.layers, list) or not card.layers or not all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 4096 for x in card.layers):
            raise CheckpointError(f"{source}: 'layers' must be a non-empty list of integers")
        if isinstance(card.default_tau, bool) or not isinstance(card.default_tau, (int, float)) or not 0 <= card.default_tau <= 1:
            raise CheckpointError(f"{source}: 'default_tau' must be in [0, 1]")
        for name in ("id", "kind", "title", "description", "license"):
            if not isinstance(getattr(card, name), str):
                raise CheckpointError(f"{source}: '{name}' must be a string, got {getattr(card, name)!r}")
        for name in ("backbone", "av", "anchors", "published", "injection", "reconstructor", "compass", "patch"):
            if not isinstance(getattr(card, name), dict):
                raise CheckpointError(f"{source}: '{name}' must be a JSON object, got {getattr(card, name)!r}")
        if not isinstance(card.aliases, list) or not all(isinstance(a, str) for a in card.aliases):
            raise CheckpointError(f"{source}: 'aliases' must be a list of strings")
        tau_c = card.compass.get("tau", 0.3)
        if isinstance(tau_c, bool) or not isinstance(tau_c, (int, float)) or not -1 <= tau_c <= 1:
            raise CheckpointError(f"{source}: 'compass.tau' must be a cosine in [-1, 1], got {tau_c!r}")
        if card.mu_file is not None and not isinstance(card.mu_file, str):
            raise CheckpointError(f"{source}: 'mu_file' must be a file name, got {card.mu_file!r}")
        return card


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read card JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: a card must be a JSON object")
    return data


def builtin_cards() -> list[Card]:
    """Every card shipped in this folder, in file-name order."""
    return [Card.from_dict(_read_json(p), str(p)) for p in sorted(CARDS_DIR.glob("*.json"))]


def card_from_folder(folder: Path) -> Card:
    """A card for a local folder laid out like an SRT release."""
    from ..verbalizers.config import NLAConfig

    cfg = NLAConfig.from_json(folder / "config.json")
    extra = _read_json(folder / "card.json") if (folder / "card.json").is_file() else {}
    data: dict[str, Any] = {
        "id": str(folder),
        "kind": "prefix",
        "title": folder.name,
        "backbone": {"id": cfg.backbone_id, "revision": None, "dtype": cfg.backbone_dtype},
        "layers": [cfg.extraction_layer],
    }
    data.update(extra)
    data["av"] = {"folder": str(folder.resolve())}
    return Card.from_dict(data, str(folder))


def find_card(name: str | None) -> Card:
    """Resolve ``--card``: a built-in id or alias, a local release folder, or a card JSON file."""
    name = (name or DEFAULT_CARD).strip()
    for card in builtin_cards():
        if name == card.id or name in card.aliases:
            return card
    p = Path(name).expanduser()
    if p.is_file() and p.suffix == ".json":  # a card file (any kind), e.g. a local injection card
        return Card.from_dict(_read_json(p), str(p))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise NLAInputError(f"{p} is a folder but has no config.json: not a verbalizer card")
        return card_from_folder(p)
    known = ", ".join(sorted({c.id for c in builtin_cards()} | {a for c in builtin_cards() for a in c.aliases}))
    raise NLAInputError(f"unknown card {name!r}; known cards: {known}; or give a local card folder")
