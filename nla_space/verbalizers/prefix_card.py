"""A prefix card opened for use: backbone + prefix AV + μ (kind ``prefix``).

:class:`OpenCard` is the opened prefix card (:mod:`nla_space.verbalizers.prefix`: a learned soft prefix
over a frozen, shared backbone). It reads raw text (:class:`nla_space.verbalizers.base.RawTextCard`)
and supplies the prefix AV's rollout, its round-trip re-encode scoring and its guided-decoding parts;
``verbalize`` and the rest of the interface are :class:`nla_space.verbalizers.base.OpenedCard`'s.
:func:`open_prefix_card` builds one from a card; callers use :func:`nla_space.runtime.open_card`,
which picks the opener for the card's kind.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .. import activations, guided
from ..backbone import cast_model, from_model, resolve_dtype, shared_backbone
from ..card_files import card_files, load_card_mu, open_compass
from ..cards import Card
from ..errors import CheckpointError, NLAInputError
from ..reencode import reencode_ids
from ..rollout import Rollout, eos_inclusive_mask, request_generator, sample
from .base import RawTextCard
from .config import NLAConfig
from .prefix import PrefixAV, build_prefix_av, find_weights, load_adapter_weights


@dataclass
class OpenCard(RawTextCard):
    """A prefix card opened for use: its backbone, prefix AV and μ."""

    av: PrefixAV

    def with_dtype(self, dtype: str | torch.dtype) -> "OpenCard":
        """The same card (same AV, μ, compass) on a copy of its backbone in ``dtype``.

        A loaded backbone is re-read from its source (shared per process); an in-memory one
        (:func:`nla_space.backbone.from_model`) is deep-copied and cast. Used to compare a float32
        and a bfloat16 run on identical adapter weights (:func:`eval_harness.bench.dtype_fidelity`).
        """
        bb = self.backbone
        dt = resolve_dtype(dtype, bb.device)
        if dt == bb.dtype:
            return self
        if bb.source_path is not None:
            twin = shared_backbone(bb.spec, bb.revision, str(bb.device), dt)
        else:
            model = cast_model(copy.deepcopy(bb.model), dtype=dt)
            twin = from_model(model, bb.tokenizer, spec=bb.spec)
        return dataclasses.replace(self, backbone=twin)

    def check_readable(self, layer: int) -> None:
        """Also refuse ℓ = num_layers: the SRT reference reads ``hidden_states[ℓ]``, whose last entry
        transformers replaces with the final-normed state, while ℓ = num_layers here is the raw
        output of the last block (:mod:`nla_space.activations`); a prefix card cannot reproduce it."""
        super().check_readable(layer)
        n = self.backbone.num_layers
        if layer == n:
            raise NLAInputError(f"layer {n} is refused on a prefix (SRT) card: its reference reads hidden_states[{n}], which "
                                f"transformers replaces with the final-normed output, and layer {n} here is the last block's "
                                f"raw output; use a layer ≤ {n - 1}", field="layer")

    @property
    def top_p(self) -> float:
        return float(self.av.cfg.top_p)

    @property
    def av_max_new_tokens(self) -> int:
        """The AV config's ``max_new_tokens`` (for our own AVs, the length of the targets it was trained
        on, so candidates end where its targets ended)."""
        return int(self.av.cfg.max_new_tokens)

    def reconstruct(self, roll: Rollout, layer: int) -> torch.Tensor:
        """The scorer's vectors of a rollout's candidates: the round-trip re-encoding, (n, d) float32."""
        return reencode_ids(self.backbone, layer, roll.ids.to(self.backbone.device), roll.mask.to(self.backbone.device)).float().cpu()

    def reconstruct_texts(self, texts: list[str], layer: int) -> torch.Tensor:
        """Texts re-encoded like candidates (tokenised without special tokens, EOS-free), (n, d) float32."""
        bb = self.backbone
        rows = [[int(i) for i in bb.tokenizer(t, add_special_tokens=False)["input_ids"]] or [bb.pad_id] for t in texts]
        ids, valid = activations.pad_rows(rows, bb.pad_id)
        return self.reconstruct(Rollout(ids=ids, mask=eos_inclusive_mask(ids, bb.stop_ids) * valid), layer)

    def rollout(self, v: torch.Tensor, k: int, temperature: float, max_new_tokens: int, greedy: bool, seed: int | None, layer: int) -> Rollout:
        """K candidates for ``v`` in one batched call (one greedy candidate when ``greedy``)."""
        n = 1 if greedy else k
        dev = self.backbone.device
        gen = request_generator(seed, dev)
        prefix = self.av.embeds(v.to(dev)[None].expand(n, -1), self.backbone, layer)
        return sample(
            self.backbone, prefix, max_new_tokens, temperature=temperature, top_p=self.av.cfg.top_p, greedy=greedy, generator=gen
        )

    @contextlib.contextmanager
    def search_parts(self, v: torch.Tensor, layer: int, k: int, max_new_tokens: int) -> Iterator[tuple[guided.Stepper, guided.Tracker]]:
        """The backbone continuing the soft prefix, and the incremental round-trip re-encode at ℓ."""
        prefix = self.av.embeds(v.to(self.backbone.device)[None], self.backbone, layer)
        yield guided.EmbedsStepper(self.backbone, prefix, max_new_tokens), guided.ReencodeTracker(self.backbone, layer, max_new_tokens)


def open_prefix_card(
    card: Card,
    backbone: str | None = None,
    device: str | None = None,
    revision: str | None = None,
    dtype: str | None = None,
) -> OpenCard:
    """Open a prefix card: load (or share) its backbone, build and load its AV, read its μ and compass.

    ``dtype`` is the user's explicit compute dtype (``--dtype``/``NLA_CPU_DTYPE``); without it the
    backbone runs in float32 on CPU and in the card's ``backbone.dtype`` on CUDA. The AV stays
    float32 and casts its output to the backbone dtype; scores are float32 either way."""
    bb_spec = backbone or card.backbone_id
    bb_rev = revision if backbone else card.backbone.revision
    bb = shared_backbone(bb_spec, bb_rev, device, dtype, default_dtype=card.backbone.dtype)
    folder = card_files(card)
    notes: list[str] = []
    weights = find_weights(folder) if folder is not None else None
    if folder is not None and (folder / "config.json").is_file():
        cfg = NLAConfig.from_json(folder / "config.json")
    else:
        cfg = NLAConfig(
            backbone_id=bb_spec,
            backbone_dtype=card.backbone.dtype or "float32",
            extraction_layer=card.default_layer,
            max_new_tokens=64,
            num_prefix_tokens=card.av.num_prefix_tokens,
        )
    if cfg.extraction_layer not in card.layers:
        card.layers = [cfg.extraction_layer]
    if cfg.d_vector is not None and cfg.d_vector != bb.hidden_size:
        raise CheckpointError(
            f"card {card.id}: d_vector={cfg.d_vector} but the backbone has d={bb.hidden_size}; "
            "scoring re-encodes with the backbone, so the AV must read vectors of the backbone's size"
        )
    av = build_prefix_av(cfg, bb)
    if weights is not None:
        load_adapter_weights(av, weights)
        trained = True
    elif folder is not None and card.source_file is not None and Path(card.source_file).is_dir():
        # A folder given as the card itself (not a built-in card's shipped assets): weights are required.
        raise CheckpointError(f"{folder}: no AV weights (av.safetensors or best_av.pt): not a complete release folder")
    elif card.local_folder is not None:
        trained = False  # an identity-initialised AV runs; every verbalization says so (OpenedCard.card_notes)
    else:
        raise CheckpointError(f"card {card.id}: no AV weights (av.safetensors or best_av.pt) in {folder}")
    av.eval()
    for p in av.parameters():
        p.requires_grad_(False)
    mu = load_card_mu(folder, card, card.default_layer)
    if mu is not None and mu.numel() != bb.hidden_size:
        raise CheckpointError(f"card {card.id}: μ has {mu.numel()} values, the backbone has d={bb.hidden_size}")
    if mu is not None and not torch.isfinite(mu).all():
        raise CheckpointError(f"card {card.id}: μ contains NaN or infinite values")
    compass, compass_tau = open_compass(card, folder, notes)
    return OpenCard(card=card, backbone=bb, av=av, trained=trained, mu=mu, notes=notes, compass=compass, compass_tau=compass_tau)
