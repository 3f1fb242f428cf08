"""Verbalizer cards: one JSON data file per card in this folder, or a local folder laid out like a release.

A card file holds every card-specific fact, so the code never branches on a model name. Its keys are
the fields of :class:`Card`; each section is a typed class of :mod:`nla_space.cards.sections` (the one
place its defaults are stated), and a key no class declares is refused, naming the file and the key:

``id``            hub id of the verbalizer (or ``nla-space/…`` for ours), also accepted by ``--card``
``aliases``       short names for ``--card``
``kind``          ``"prefix"`` (SRT family), ``"injection"`` (token-injection AVs) or ``"patch"`` (v written at its
                  own layer, LoRA above it) — the verbalizer class to build (:data:`nla_space.runtime.CARD_KINDS`)
``title``, ``description``, ``license``   text
``backbone``      :class:`~.sections.BackboneSection`; ``id`` may be ``embedded:NAME``
``layers``        the layers the AV supports (``hidden_states`` index, see :mod:`nla_space.activations`); the first is the default
``av``            :class:`~.sections.AVSection`: ``{"repo", "revision", "files"}`` on the hub, or ``{"folder"}``
                  relative to the ``nla_space`` package (the shipped ``assets/``)
``mu_file``       file (inside the AV folder) holding μ; optional
``default_tau``   hedging threshold on the card's score scale
``anchors``       :class:`~.sections.AnchorsSection`: the card's floor/ceiling, with the ceiling's name
``published``     free-form: numbers from the card's source, each table with its ``source``
``injection``     (kind ``injection``) :class:`~.sections.InjectionSection`; see :mod:`nla_space.verbalizers.injection`
``reconstructor`` (kind ``injection``) :class:`~.sections.ReconstructorSection`; see :mod:`nla_space.reconstructors`
``patch``         (kind ``patch``) :class:`~.sections.PatchSection`; see :mod:`nla_space.verbalizers.patch_card`
``compass``       optional :class:`~.sections.CompassSection`: a compass second opinion in the AV folder
``training``      free-form: how the card's AV was trained (recipe, data, cost, held-out numbers)
``heldout``       free-form: held-out evaluation records kept with the card
``trainer_template``  the harness trainers reuse this card's injection recipe and reconstructor layout
                  (:func:`eval_harness.data.injection_targets.template_card`); exactly one built-in card sets it

Adding a card is adding one JSON file here. A local folder is a card too: an SRT release (``config.json``
(NLAConfig) + ``av.safetensors`` or ``best_av.pt``, optionally ``mu.safetensors`` / ``mu_l{ℓ}.pt``), or an
injection AV release laid out like nla-at-home's or Anthropic's (:mod:`nla_space.cards.folders`); either
may hold a ``card.json`` with any of the fields above.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..errors import CheckpointError, NLAInputError
from ..io import read_json_object
from .folders import injection_folder_card_dict, is_injection_folder
from .sections import (AnchorsSection, AVSection, BackboneSection, CompassSection, InjectionSection, PatchSection,
                       ReconstructorSection, Section)

#: The package's own folder (``nla_space/`` in a checkout, ``site-packages/nla_space`` when installed),
#: found through ``importlib.resources``: card files are in ``cards/``, the shipped AVs, corpora,
#: results and the leaderboard in ``assets/`` (package data, so a non-editable install works from
#: any directory). A card's ``av.folder`` is relative to it.
PACKAGE_ROOT = Path(str(importlib.resources.files("nla_space")))
CARDS_DIR = PACKAGE_ROOT / "cards"
ASSETS_DIR = PACKAGE_ROOT / "assets"
#: A checkout's root: only for what exists only in a checkout (the git commit of a results file).
REPO_ROOT = PACKAGE_ROOT.parent
DEFAULT_CARD = "embedded"


@dataclass(kw_only=True)
class Card(Section):
    """One card (module docstring for the keys); ``source_file`` is where it was read from, not a key."""

    EMIT: ClassVar[tuple[str, ...]] = ("kind", "default_tau")
    id: str
    kind: str = "prefix"
    title: str = ""
    aliases: list[str] = field(default_factory=list)
    description: str = ""
    license: str = ""
    backbone: BackboneSection
    layers: list[int]
    av: AVSection = field(default_factory=AVSection)
    mu_file: str | None = None
    default_tau: float = 0.6
    anchors: AnchorsSection = field(default_factory=AnchorsSection)
    published: dict[str, Any] = field(default_factory=dict)
    injection: InjectionSection | None = None
    reconstructor: ReconstructorSection | None = None
    compass: CompassSection | None = None
    patch: PatchSection | None = None
    training: dict[str, Any] = field(default_factory=dict)
    heldout: dict[str, Any] = field(default_factory=dict)
    trainer_template: bool = False
    source_file: str | None = field(default=None, metadata={"json": False})

    @property
    def default_layer(self) -> int:
        return self.layers[0]

    @property
    def backbone_id(self) -> str:
        return self.backbone.id

    @property
    def default_strategy(self) -> str:
        """The decoding of a request that names none: the patch section's, else best-of-K."""
        return self.patch.default_strategy if self.patch is not None else "best-of-k"

    @property
    def local_folder(self) -> Path | None:
        if self.av.folder is None:
            return None
        p = Path(self.av.folder)
        return p if p.is_absolute() else PACKAGE_ROOT / p

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None, key: str | None = None) -> "Card":  # type: ignore[override]
        """The card of a card file's JSON object; ``where`` names the file (refusals name it and the key)."""
        card = super().from_dict(data, str(where or "<card>"), "" if key is None else key)
        card.source_file = where
        return card

    def check(self, where: str, key: str) -> None:
        if not self.layers or not all(0 <= x <= 4096 for x in self.layers):
            raise CheckpointError(f"{where}: 'layers' must be a non-empty list of integers in [0, 4096]")
        if not 0 <= self.default_tau <= 1:
            raise CheckpointError(f"{where}: 'default_tau' must be in [0, 1], got {self.default_tau!r}")


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, "card JSON")


def builtin_cards() -> list[Card]:
    """Every card shipped in this folder, in file-name order."""
    return [Card.from_dict(_read_json(p), str(p)) for p in sorted(CARDS_DIR.glob("*.json"))]


def cards_table(cards: list[Card] | None = None) -> str:
    """The Markdown table of the cards (default: every built-in card), generated from the card files:
    id and aliases, kind, backbone (with what its weights are), layer(s), where the AV weights come from,
    licence. The table in docs/cards.md and the About tab are this output."""
    from ..backbone import EMBEDDED_BACKBONES

    lines = ["| card (aliases) | kind | backbone | layer(s) ℓ | AV weights | licence |", "|---|---|---|---|---|---|"]
    for c in builtin_cards() if cards is None else cards:
        name = f"[`{c.id}`](https://huggingface.co/{c.id})" if c.av.repo else f"`{c.id}`"
        if c.aliases:
            name += " (" + ", ".join(f"`{a}`" for a in c.aliases) + ")"
        backbone = f"`{c.backbone_id}`"
        if c.backbone_id.startswith("embedded:"):
            info = EMBEDDED_BACKBONES.get(c.backbone_id.split(":", 1)[1], {})
            backbone += f": {info.get('hub_equivalent', '?')}, {info.get('weights', '')}"
        weights = f"shipped, `nla_space/{c.av.folder}`" if c.av.folder else f"Hub, `{c.av.repo or c.id}`"
        lines.append(f"| {name} | {c.kind} | {backbone} | {', '.join(map(str, c.layers))} | {weights} | {c.license or '—'} |")
    lines.append("")
    lines.append("ℓ is a `hidden_states` index of a Hugging Face forward (0 = embeddings), read at the last token of "
                 "`[BOS] + text` (`nla_space/activations.py`). Regenerate with `nla-space cards --markdown`.")
    return "\n".join(lines)


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
    card = Card.from_dict(data, str(folder / "card.json") if extra else str(folder))
    card.source_file = str(folder)
    return card


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
        if is_injection_folder(p):
            data, where = injection_folder_card_dict(p, builtin_cards())
            card = Card.from_dict(data, where)
            card.source_file = str(p)
            return card
        if not (p / "config.json").is_file():
            raise NLAInputError(f"{p} is a folder but has no config.json (an SRT release) nor adapter_config.json or "
                                "nla_meta.yaml (an injection AV release): not a verbalizer card")
        return card_from_folder(p)
    known = ", ".join(sorted({c.id for c in builtin_cards()} | {a for c in builtin_cards() for a in c.aliases}))
    raise NLAInputError(f"unknown card {name!r}; known cards: {known}; or give a local card folder")
