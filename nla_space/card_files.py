"""Where a card's files are, and the small things every card kind reads from them.

A card names its verbalizer and scorer files either as a folder (relative to the repository root)
or as a hub repository at a revision; :func:`card_files` and :func:`section_files` turn either into a
local folder (downloading hub files through :func:`nla_space.hub.snapshot`). From that folder the
openers of the prefix, patch and injection kinds read the mean activation μ that centers scores
(:func:`load_card_mu` for a card's own AV folder, :func:`load_reconstructor_mu` for an injection
card's reconstructor folder) and the optional compass second opinion (:func:`open_compass`). Nothing
here knows how a card is run; it sits below every opener so that none of them imports another.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .backbone import BACKBONE_PATTERNS
from .cards import PACKAGE_ROOT, Card
from .cards.sections import CompassSection, Location, ReconstructorSection
from .compass import DEFAULT_TAU, Compass, CompassScorer, MiniLM
from .errors import CheckpointError, NLAInputError
from .hub import load_state_dict, snapshot

#: Files of a PEFT LoRA adapter repo (no pickles, no code).
ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "nla_meta.yaml", "*.json"]
#: Files of a full-model release (backbone patterns plus the sidecar).
FULL_PATTERNS = [*BACKBONE_PATTERNS, "nla_meta.yaml"]
#: Files of a prefix or patch card's AV repo when the card lists none.
AV_PATTERNS = ["*.json", "*.safetensors", "*.pt"]


def card_files(card: Card) -> Path | None:
    """Local folder holding the card's AV files (downloaded for hub cards), or None if it has none."""
    if card.local_folder is not None:
        return card.local_folder if card.local_folder.is_dir() else None
    if not card.av.repo:
        raise CheckpointError(f"card {card.id}: no 'av.repo' or 'av.folder'")
    return snapshot(card.av.repo, card.av.revision, card.av.files or AV_PATTERNS)


def section_files(section: Location, patterns: list[str], what: str) -> Path:
    """Local folder of a card section: ``folder`` (relative to the ``nla_space`` package) or a hub ``repo``@``revision``."""
    if section.folder:
        p = Path(section.folder).expanduser()
        p = p if p.is_absolute() else PACKAGE_ROOT / p
        if not p.is_dir():
            raise CheckpointError(f"{what}: folder {p} does not exist")
        return p
    if not section.repo:
        raise CheckpointError(f"{what}: no 'repo' or 'folder'")
    return snapshot(section.repo, section.revision, section.files or patterns)


def load_card_mu(folder: Path | None, card: Card, layer: int) -> torch.Tensor | None:
    """μ of ``layer`` from a prefix or patch card's AV folder: the card's ``mu_file``, else ``mu.safetensors``,
    ``mu_l{layer}.pt`` or ``mu_l{layer}.safetensors``; the tensor ``mu.L{layer}`` or ``mu``, or the file's only
    tensor. None when the folder has no such file."""
    if folder is None:
        return None
    names = [card.mu_file] if card.mu_file else []
    names += ["mu.safetensors", f"mu_l{layer}.pt", f"mu_l{layer}.safetensors"]
    for name in names:
        path = folder / name
        if path.is_file():
            tensors = load_state_dict(path)
            for key in (f"mu.L{layer}", "mu"):
                if key in tensors:
                    return tensors[key].float().reshape(-1)
            if len(tensors) == 1:
                return next(iter(tensors.values())).float().reshape(-1)
            raise CheckpointError(f"{path}: no 'mu' tensor")
    return None


def load_reconstructor_mu(section: ReconstructorSection, folder: Path | None, layer: int, d: int) -> torch.Tensor | None:
    """μ of ``layer`` for an injection card: the reconstructor section's ``mu_file`` (``{layer}`` filled in) in the
    reconstructor's folder, tensor ``mu`` (else the first one), of ``d`` values. None when the section names no
    file or the file is absent."""
    if not section.mu_file or folder is None:
        return None
    path = folder / section.mu_file.format(layer=layer)
    if not path.is_file():
        return None
    tensors = load_state_dict(path)
    mu = tensors.get("mu", next(iter(tensors.values()))).float().reshape(-1)
    if mu.numel() != d:
        raise CheckpointError(f"{path}: μ has {mu.numel()} values, the model has d={d}")
    return mu


def compass_scorer(section: CompassSection, folder: Path) -> CompassScorer:
    """The compass a :class:`CompassSection` names, from ``folder``, as a scorer."""
    return CompassScorer(compass=Compass.load(folder / section.file), embed=MiniLM(section.embedder_folder),
                         block_offset=section.block_offset, folder=folder)


def open_compass(card: Card, folder: Path | None, notes: list[str]) -> tuple[CompassScorer | None, float]:
    """The card's ``compass`` section opened from the AV folder, with its τ; a missing file or embedder
    becomes a note (the card still works without its second opinion)."""
    section = card.compass
    if section is None or folder is None:
        return None, DEFAULT_TAU
    tau = section.tau
    try:
        scorer = compass_scorer(section, folder)
    except (CheckpointError, NLAInputError, OSError) as exc:
        notes.append(f"compass rerank unavailable: {exc}")
        return None, tau
    if not any(scorer.supports(ell) for ell in card.layers):
        notes.append(f"compass rerank unavailable: the compass has no map for layer(s) {card.layers}")
        return None, tau
    return scorer, tau
