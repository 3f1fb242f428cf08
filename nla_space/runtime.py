"""A card opened for use: backbone + verbalizer + μ, and the one ``verbalize`` path that the CLI,
the app and the harness all walk (text → activation → K samples → re-encode → score → best, hedged).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from . import activations, guided, policy
from .backbone import Backbone, load_backbone, resolve_device, resolve_dtype
from .cards import Card, find_card
from .errors import CheckpointError, NLAInputError
from .hub import load_state_dict, snapshot
from .reencode import reencode_ids
from .rollout import Rollout, request_generator, sample
from .specificity import Specificity
from .verbalizers.config import NLAConfig
from .verbalizers.prefix import PrefixAV, build_prefix_av, find_weights, load_adapter_weights

log = logging.getLogger(__name__)

_BACKBONES: dict[tuple[str, str | None, str, str], Backbone] = {}
_BACKBONES_LOCK = threading.Lock()

ProgressFn = Callable[[float, str], None]


def shared_backbone(
    spec: str,
    revision: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    default_dtype: str | torch.dtype | None = None,
) -> Backbone:
    """Load a backbone once per process and compute dtype (cards on the same backbone share it).

    ``dtype`` is an explicit request, ``default_dtype`` the card's (CUDA only): see
    :func:`nla_space.backbone.resolve_dtype`. A float32 and a bfloat16 copy are distinct entries."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, default_dtype)
    key = (spec, revision, str(dev), str(dt))
    with _BACKBONES_LOCK:
        if key not in _BACKBONES:
            _BACKBONES[key] = load_backbone(spec, revision=revision, device=dev, dtype=dt)
        return _BACKBONES[key]


def _card_files(card: Card) -> Path | None:
    """Local folder holding the card's AV files (downloaded for hub cards), or None if it has none."""
    if card.local_folder is not None:
        return card.local_folder if card.local_folder.is_dir() else None
    repo = card.av.get("repo")
    if not repo:
        raise CheckpointError(f"card {card.id}: no 'av.repo' or 'av.folder'")
    return snapshot(repo, card.av.get("revision"), card.av.get("files") or ["*.json", "*.safetensors", "*.pt"])


def _load_mu(folder: Path | None, card: Card, layer: int) -> torch.Tensor | None:
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


@dataclass
class OpenCard:
    card: Card
    backbone: Backbone
    av: PrefixAV
    trained: bool
    mu: torch.Tensor | None
    notes: list[str] = field(default_factory=list)
    #: the card's compass (:class:`nla_space.compass.CompassScorer`), reranking beside the oracle pick; None without one
    compass: Any = None
    compass_tau: float = 0.30
    #: the card's contrastive scorer and calibration (:mod:`nla_space.specificity`); None without a pool
    specificity: Specificity | None = None
    #: the decoding strategy of a request that names none (:data:`nla_space.guided.STRATEGIES`)
    default_strategy: str = "best-of-k"
    #: β of guided decoding's potential exp(β φ), and whether word-boundary prefixes are candidates (:mod:`nla_space.guided`)
    guided_beta: float = guided.DEFAULT_BETA
    guided_prefixes: bool = True

    @property
    def layers(self) -> list[int]:
        return list(self.card.layers)

    def with_dtype(self, dtype: str | torch.dtype) -> "OpenCard":
        """The same card (same AV, μ, compass) on a copy of its backbone in ``dtype``.

        A loaded backbone is re-read from its source (shared per process); an in-memory one
        (:func:`nla_space.backbone.from_model`) is deep-copied and cast. Used to compare a float32
        and a bfloat16 run on identical adapter weights (:func:`eval_harness.bench.dtype_fidelity`).
        """
        import copy

        from .backbone import from_model

        bb = self.backbone
        dt = resolve_dtype(dtype, bb.device)
        if dt == bb.dtype:
            return self
        if bb.source_path is not None:
            twin = shared_backbone(bb.spec, bb.revision, str(bb.device), dt)
        else:
            model = copy.deepcopy(bb.model).to(dtype=dt)
            twin = from_model(model, bb.tokenizer, spec=bb.spec)
        return dataclasses.replace(self, backbone=twin)

    def check_layer(self, layer: int | None) -> int:
        layer = self.card.default_layer if layer is None else layer
        if layer not in self.card.layers:
            raise NLAInputError(f"card {self.card.id} supports layer(s) {self.card.layers}, not {layer!r}")
        return activations.check_layer(self.backbone, layer)

    def check_vector(self, vector: Any) -> torch.Tensor:
        v = torch.as_tensor(vector).float().reshape(-1) if vector is not None else None
        if v is None or v.numel() != self.av.d_vec:
            n = None if v is None else v.numel()
            raise NLAInputError(f"the vector has {n} values; this backbone needs {self.av.d_vec}")
        if not torch.isfinite(v).all():
            raise NLAInputError("the vector contains NaN or infinite values")
        return v

    # -- the interface the harness uses for every card kind (OpenInjectionCard has the same methods) --

    #: what :meth:`reconstruct` returns: activations, scored against ``v`` (μ-centered when there is a μ)
    scorer_space = "activation"
    scorer_name = "backbone self-re-encode"

    @property
    def top_p(self) -> float:
        return float(self.av.cfg.top_p)

    @property
    def default_max_new_tokens(self) -> int:
        """Rollout length when a request names none: the AV config's ``max_new_tokens`` (for our own AVs,
        the length of the targets it was trained on, so candidates end where its targets ended)."""
        return max(1, min(policy.MAX_NEW_TOKENS, int(self.av.cfg.max_new_tokens)))

    def extract(self, text: str, layer: int) -> torch.Tensor:
        """The activation (float32, (d,)) of ``text`` at ``layer`` (:func:`nla_space.activations.extract`)."""
        return activations.extract(self.backbone, text, layer)

    def extract_layers(self, text: str, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """The activations of ``text`` at several layers (one truncated forward each); each equals :meth:`extract`."""
        return activations.extract_layers(self.backbone, text, layers)

    def depth_pct(self, layer: int) -> int | None:
        """The prompt depth the AV is told for ``layer``: a prefix AV is told none."""
        return None

    def candidate_texts(self, roll: Rollout) -> list[str]:
        """Each row's valid tokens decoded without special tokens."""
        tok = self.backbone.tokenizer
        return [tok.decode([int(t) for t in roll.ids[i, : int(roll.mask[i].sum())]], skip_special_tokens=True) for i in range(roll.ids.shape[0])]

    def reconstruct(self, roll: Rollout, layer: int) -> torch.Tensor:
        """The scorer's vectors of a rollout's candidates: the round-trip re-encoding, (n, d) float32."""
        return reencode_ids(self.backbone, layer, roll.ids.to(self.backbone.device), roll.mask.to(self.backbone.device)).float().cpu()

    def reconstruct_texts(self, texts: list[str], layer: int) -> torch.Tensor:
        """Texts re-encoded like candidates (tokenised without special tokens, EOS-free), (n, d) float32."""
        from .rollout import eos_inclusive_mask

        bb = self.backbone
        rows = [[int(i) for i in bb.tokenizer(t, add_special_tokens=False)["input_ids"]] or [bb.pad_id] for t in texts]
        ids, valid = activations.pad_rows(rows, bb.pad_id)
        return self.reconstruct(Rollout(ids=ids, mask=eos_inclusive_mask(ids, bb.stop_ids) * valid), layer)

    def score_target(self, v: torch.Tensor, layer: int) -> torch.Tensor:
        """What reconstructions are compared with: the activation itself."""
        return v.float()

    def rollout(self, v: torch.Tensor, k: int, temperature: float, max_new_tokens: int, greedy: bool, seed: int | None, layer: int) -> Rollout:
        """K candidates for ``v`` in one batched call (one greedy candidate when ``greedy``)."""
        n = 1 if greedy else k
        dev = self.backbone.device
        gen = request_generator(seed, dev)
        prefix = self.av.embeds(v.to(dev)[None].expand(n, -1), self.backbone, layer)
        return sample(
            self.backbone, prefix, max_new_tokens, temperature=temperature, top_p=self.av.cfg.top_p, greedy=greedy, generator=gen
        )

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
        """Verbalize ``text``'s activation at ``layer`` (default: the card's), or a raw ``vector``; a
        ``vector`` given with its ``text`` is that text's activation, read already (the layer sweep).
        ``strategy``: ``best-of-k``, ``guided`` or ``greedy`` (default: the card's)."""
        tau = self.card.default_tau if tau is None else tau
        max_new_tokens = self.default_max_new_tokens if max_new_tokens is None else max_new_tokens
        policy.check_params(k, tau, temperature, max_new_tokens, seed)
        strategy = policy.resolve_strategy(strategy, greedy, self.default_strategy)
        greedy = strategy == "greedy"
        layer = self.check_layer(layer)

        def score(roll: Rollout, v: torch.Tensor) -> tuple[list[policy.Candidate], int, bool]:
            h = self.reconstruct(roll, layer)
            cands, best = policy.best_of_k(roll, self.decode_ids, h, v, self.mu, self.specificity)
            return cands, best, self.mu is not None

        def roll(v: torch.Tensor) -> Rollout:
            if strategy == "guided":
                return self.guided(v, k, temperature, max_new_tokens, seed, layer)
            return self.rollout(v, k, temperature, max_new_tokens, greedy, seed, layer)

        calib = self.specificity.calibration if self.specificity is not None else None
        return policy.run(
            card=self.card.id, trained=self.trained, layer=layer, k=k, tau=tau, temperature=temperature,
            greedy=greedy, seed=seed, notes=self.notes,
            read=lambda: self.check_vector(vector) if vector is not None else self.extract(text, layer),
            roll=roll, score=score, progress=progress, second_opinion=self._compass_opinion(layer),
            strategy=strategy, confidence_meaning=calib.meaning() if calib is not None else None,
        )

    def decode_ids(self, ids: list[int]) -> str:
        return self.backbone.tokenizer.decode(ids, skip_special_tokens=True)

    # -- guided decoding (nla_space.guided): a kind supplies its stepper, tracker and potential --

    def stepper(self, v: torch.Tensor, layer: int, max_new_tokens: int) -> guided.Stepper:
        return guided.EmbedsStepper(self.backbone, self.av.embeds(v.to(self.backbone.device)[None], self.backbone, layer), max_new_tokens)

    def tracker(self, layer: int, n: int, max_new_tokens: int) -> guided.Tracker:
        return guided.ReencodeTracker(self.backbone, layer, max_new_tokens)

    def potential(self, v: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """φ of guided decoding: the specificity where the card has a pool, else :func:`nla_space.guided.fve_potential`."""
        if self.specificity is not None:
            spec = self.specificity
            return lambda h: spec.z(h, v)
        return guided.fve_potential(v, self.mu)

    @contextlib.contextmanager
    def search_parts(self, v: torch.Tensor, layer: int, k: int, max_new_tokens: int) -> Iterator[tuple[guided.Stepper, guided.Tracker]]:
        """The stepper and tracker of one guided search (released when it ends)."""
        yield self.stepper(v, layer, max_new_tokens), self.tracker(layer, k, max_new_tokens)

    def guided(self, v: torch.Tensor, k: int, temperature: float, max_new_tokens: int, seed: int | None, layer: int) -> Rollout:
        """The K best distinct candidates of a guided search (:func:`nla_space.guided.smc`)."""
        settings = guided.GuidedSettings(n=k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=self.top_p,
                                         beta=self.guided_beta, prefixes=self.guided_prefixes)
        with self.search_parts(v, layer, k, max_new_tokens) as (stepper, tracker):
            return guided.search(stepper, tracker, self.potential(v), settings, seed, self.backbone)

    def _compass_opinion(self, layer: int) -> Callable[[list[policy.Candidate], torch.Tensor], dict[str, Any]] | None:
        if self.compass is None or not self.compass.supports(layer):
            return None
        from .compass import opinion

        return lambda cands, v: opinion(self.compass, [c.text for c in cands], v, layer, self.compass_tau)


#: card kind → ``module:function`` that opens it (imported on first use, so kinds may import this module)
OPEN_PREFIX = "nla_space.runtime:open_card"
CARD_KINDS: dict[str, str] = {
    "prefix": OPEN_PREFIX,
    "injection": "nla_space.verbalizers.injection:open_injection_card",
    "patch": "nla_space.verbalizers.patch_card:open_patch_card",
}


def open_card(
    card: str | Card | None = None,
    backbone: str | None = None,
    device: str | None = None,
    revision: str | None = None,
    dtype: str | None = None,
) -> OpenCard:
    """Open a card: resolve it, load (or share) its backbone, build and load its AV, read its μ.

    ``dtype`` is the user's explicit compute dtype (``--dtype``/``NLA_CPU_DTYPE``); without it the
    backbone runs in float32 on CPU and in the card's ``backbone.dtype`` on CUDA. The AV stays
    float32 and casts its output to the backbone dtype; scores are float32 either way."""
    card = card if isinstance(card, Card) else find_card(card)
    opener = CARD_KINDS.get(card.kind)
    if opener is None:
        raise NLAInputError(f"card {card.id}: kind {card.kind!r} is not supported by this version (kinds: {', '.join(CARD_KINDS)})")
    if opener != OPEN_PREFIX:
        module, name = opener.split(":")
        return getattr(importlib.import_module(module), name)(card, backbone=backbone, device=device, revision=revision, dtype=dtype)
    bb_spec = backbone or card.backbone_id
    bb_rev = revision if backbone else card.backbone.get("revision")
    bb = shared_backbone(bb_spec, bb_rev, device, dtype, default_dtype=card.backbone.get("dtype"))
    folder = _card_files(card)
    notes: list[str] = []
    weights = find_weights(folder) if folder is not None else None
    if folder is not None and (folder / "config.json").is_file():
        cfg = NLAConfig.from_json(folder / "config.json")
    else:
        cfg = NLAConfig(
            backbone_id=bb_spec,
            backbone_dtype=str(card.backbone.get("dtype") or "float32"),
            extraction_layer=card.default_layer,
            max_new_tokens=64,
            num_prefix_tokens=int(card.av.get("num_prefix_tokens", 1)),
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
        trained = False
        notes.append("untrained: no AV weights are shipped for this card yet; an identity-initialised AV is running")
    else:
        raise CheckpointError(f"card {card.id}: no AV weights (av.safetensors or best_av.pt) in {folder}")
    av.eval()
    for p in av.parameters():
        p.requires_grad_(False)
    mu = _load_mu(folder, card, card.default_layer)
    if mu is not None and mu.numel() != bb.hidden_size:
        raise CheckpointError(f"card {card.id}: μ has {mu.numel()} values, the backbone has d={bb.hidden_size}")
    if mu is not None and not torch.isfinite(mu).all():
        raise CheckpointError(f"card {card.id}: μ contains NaN or infinite values")
    if mu is None:
        notes.append("no μ for this card: scores are raw fve_nrm, not centered")
    compass, compass_tau = _open_compass(card, folder, notes)
    return OpenCard(card=card, backbone=bb, av=av, trained=trained, mu=mu, notes=notes, compass=compass, compass_tau=compass_tau)


def _open_compass(card: Card, folder: Path | None, notes: list[str]) -> tuple[Any, float]:
    """The card's ``compass`` section opened from the AV folder; a missing file or embedder becomes a
    note (the card still works without its second opinion)."""
    from .compass import DEFAULT_TAU, open_compass_scorer

    section = card.compass
    if not section or folder is None:
        return None, DEFAULT_TAU
    tau = float(section.get("tau", DEFAULT_TAU))
    try:
        scorer = open_compass_scorer(section, folder)
    except (CheckpointError, NLAInputError, OSError) as exc:
        notes.append(f"compass rerank unavailable: {exc}")
        return None, tau
    if not any(scorer.supports(ell) for ell in card.layers):
        notes.append(f"compass rerank unavailable: the compass has no map for layer(s) {card.layers}")
        return None, tau
    return scorer, tau
