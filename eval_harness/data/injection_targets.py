"""Training data for token-injection AVs and ARs: activations at several depths + a description.

Conventions (stated once here; the trainers import them):

Template card
    The trainers reuse one built-in card's recipe: the card file that sets ``trainer_template``
    (:func:`template_card`) gives the AV template, depth grid, trained bands, input rule and parsing
    (its ``injection`` section) and the AR layout (its ``reconstructor`` section); no card fact is
    written here.
Layers
    A depth band ``p`` (default: the template card's ``injection.depth.trained_bands``) maps to the
    block ``K`` of the backbone (``n`` blocks) whose ``K·100/n`` is nearest to
    ``p`` among ``0 ≤ K ≤ n−2`` (ties: the smaller K), and to the layer ``ℓ = K + 1`` (the project's
    ``hidden_states`` index, :mod:`nla_space.activations`; ``ℓ ≤ n−1`` keeps it before the final
    norm). The AV prompt's depth is ``nearest_depth_pct(K, n, grid)`` with the template card's grid,
    exactly what the injection card loader computes; bands that land on the same block are merged.
Activation
    From the base model (no adapter): the text as one user message of the chat template with the
    generation prompt, ``add_special_tokens=True``, the hidden state at the last token
    (:func:`nla_space.verbalizers.injection.input_ids_for_text`, the card's ``input`` rule), i.e.
    ``hidden_states[ℓ]`` of a Hugging Face forward, float32.
Description (the SFT target)
    The backbone's own greedy reply to the same chat-wrapped text (``max_new_tokens`` tokens,
    :func:`nla_space.rollout.sample`, stopped at EOS), decoded without special tokens and stripped.
    No outside API: it describes what the model is about to say, the free proxy of "what the model
    is thinking about at this token" (the stage-2 explanation prompt of Anthropic's data generation,
    ``docs/references.md``). One description per text, used
    at every depth.
Splits
    By text (never by row): ``av_sft`` / ``ar_sft`` / ``rl`` / ``heldout`` from a permutation seeded
    with ``seed`` (fractions recorded in ``meta.json``). μ_ℓ (``mu.safetensors``) is the mean of the
    non-held-out rows, so held-out evals never see their own targets in μ.

Folder layout::

    meta.json            backbone, layers / blocks / depth pcts, input rule, description settings,
                         split fractions + counts + seed, norms, "complete": true (written last)
    vectors.safetensors  {"L{ℓ}": (N, d) float32} one tensor per layer, rows in text order
    mu.safetensors       {"L{ℓ}": (d,)} mean of the non-held-out rows
    texts.jsonl          {"idx", "id", "text", "description", "split"} one row per text
    shards/              resumable work: NNNNN.safetensors then NNNNN.jsonl (atomic; a shard is
                         done once its JSONL exists); shard i = input texts [i·B, (i+1)·B)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nla_space.activations import pad_rows
from nla_space.backbone import Backbone
from nla_space.cards import Card, builtin_cards
from nla_space.cards.sections import BaseModelRef, InjectionSection, ReconstructorSection
from nla_space.errors import CheckpointError, NLAInputError
from nla_space.hub import load_state_dict
from nla_space.io import atomic_write_json, atomic_write_text, save_tensors, jsonl_lines
from nla_space.rollout import sample
from nla_space.verbalizers.injection import InjectionSpec, input_ids_for_text, nearest_depth_pct, resolve_spec

from .. import distributed
from .dataset import assign_splits

log = logging.getLogger(__name__)

SPLIT_NAMES = ("av_sft", "ar_sft", "rl", "heldout")
DEFAULT_FRACTIONS = {"av_sft": 0.3, "ar_sft": 0.3, "rl": 0.3, "heldout": 0.1}
SHARD_DIR = "shards"


def template_card() -> Card:
    """The built-in card that sets ``trainer_template`` (module docstring); exactly one must."""
    found = [c for c in builtin_cards() if c.trainer_template]
    if len(found) != 1 or found[0].injection is None or found[0].reconstructor is None:
        raise CheckpointError(f"exactly one built-in injection card must set trainer_template; found {[c.id for c in found]}")
    return found[0]


def template_section() -> InjectionSection:
    """A deep copy of the template card's ``injection`` section (template, grid, trained bands, input rule, parse)."""
    return copy.deepcopy(template_card().injection)  # type: ignore[return-value]


def trained_bands() -> list[int]:
    """The default depth bands (%): the template card's ``injection.depth.trained_bands``."""
    return list(template_section().depth.trained_bands)


def base_spec() -> InjectionSpec:
    """The template card's spec without a sidecar (only its ``input`` rule and grid are used here)."""
    return resolve_spec(template_section(), None, template_card().id)


def trained_ar_section(folder: Path | None = None, backbone: str | None = None, mu_file: str | None = None) -> ReconstructorSection:
    """The ``reconstructor`` section of an AR trained by ``train-ar``: the template card's AR layout (kind,
    template, special tokens, padding, length, read position, head file) at ``folder`` on ``backbone``."""
    return dataclasses.replace(template_card().reconstructor, repo=None, revision=None, files=None, source="",  # type: ignore[type-var]
                               folder=str(Path(folder).resolve()) if folder is not None else None,
                               base=BaseModelRef(id=backbone, revision=None), mu_file=mu_file)


@dataclass(frozen=True)
class DepthLayer:
    band: int  #: requested depth band (%)
    block: int  #: K
    layer: int  #: ℓ = K + 1
    prompt_pct: int  #: nearest_depth_pct(K, n, grid): the depth the AV prompt says


def depth_layers(n_blocks: int, bands: tuple[int, ...] | list[int] | None = None, grid: list[int] | None = None) -> list[DepthLayer]:
    """The bands (default :func:`trained_bands`) mapped to blocks/layers of an ``n_blocks`` backbone (see the
    module docstring); one entry per distinct layer (the first band that reaches it), in depth order."""
    if n_blocks < 2:
        raise NLAInputError(f"a backbone with {n_blocks} block(s) has no layer before the final norm to read")
    bands = trained_bands() if bands is None else bands
    grid = list(grid or base_spec().depth_grid)
    out: dict[int, DepthLayer] = {}
    for p in bands:
        k = min(range(0, n_blocks - 1), key=lambda b: (abs(b * 100.0 / n_blocks - p), b))
        if k + 1 not in out:
            out[k + 1] = DepthLayer(band=int(p), block=k, layer=k + 1, prompt_pct=nearest_depth_pct(k, n_blocks, grid))
    return [out[ell] for ell in sorted(out)]


# ------------------------------------------------------------------------------------ extraction


@torch.inference_mode()
def extract_layers(backbone: Backbone, spec: InjectionSpec, texts: list[str], layers: list[int]) -> dict[int, torch.Tensor]:
    """``{ℓ: (N, d) float32}``: ``hidden_states[ℓ]`` at the last token of each text's input ids
    (:func:`input_ids_for_text`), one right-padded forward for all layers. Call it with any LoRA
    adapter disabled: the activation is the base model's."""
    rows = [input_ids_for_text(backbone.tokenizer, spec, t) for t in texts]
    ids, mask = pad_rows(rows, backbone.pad_id)
    dev = backbone.device
    out = backbone.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), output_hidden_states=True, use_cache=False)
    last = mask.sum(dim=1) - 1
    rng = torch.arange(len(rows))
    return {ell: out.hidden_states[ell][rng, last.to(dev)].float().cpu() for ell in layers}


@torch.inference_mode()
def greedy_reply(backbone: Backbone, spec: InjectionSpec, text: str, max_new_tokens: int) -> str:
    """The backbone's greedy reply to ``text`` (chat-wrapped as the activation input), stripped."""
    ids = torch.tensor([input_ids_for_text(backbone.tokenizer, spec, text)], device=backbone.device)
    roll = sample(backbone, backbone.embed_tokens(ids), max_new_tokens, greedy=True)
    n = int(roll.mask[0].sum())
    return backbone.tokenizer.decode(roll.ids[0, :n].tolist(), skip_special_tokens=True).strip()


# -------------------------------------------------------------------------------------- dataset


@dataclass
class InjectionTargetsSpec:
    """Everything that determines the rows (recorded in ``meta.json``; a resumed run must match)."""

    backbone: str
    texts_file: str
    bands: list[int] = field(default_factory=trained_bands)
    max_new_tokens: int = 48
    min_chars: int = 10
    max_texts: int | None = None
    batch_size: int = 16
    seed: int = 0
    fractions: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FRACTIONS))

    def identity(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class InjectionTargets:
    folder: Path
    vectors: dict[int, torch.Tensor]  #: {ℓ: (N, d)}
    mus: dict[int, torch.Tensor]  #: {ℓ: (d,)}
    ids: list[str]
    texts: list[str]
    descriptions: list[str]
    splits: list[str]
    meta: dict[str, Any]

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    def depths(self) -> list[DepthLayer]:
        return [DepthLayer(**d) for d in self.meta["depths"]]

    def indices(self, split: str) -> list[int]:
        if split not in SPLIT_NAMES:
            raise ValueError(f"unknown split {split!r}; splits are {SPLIT_NAMES}")
        return [i for i, s in enumerate(self.splits) if s == split]

    def examples(self, split: str) -> list[tuple[int, int]]:
        """(text row, layer) pairs of a split: every text at every layer."""
        return [(i, ell) for i in self.indices(split) for ell in self.layers]

    def __len__(self) -> int:
        return len(self.texts)


def read_texts(path: Path, min_chars: int, max_texts: int | None) -> list[tuple[str, str]]:
    """(id, text) of a JSONL file with ``{"text"[, "id"]}`` rows; short and duplicate texts skipped."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise NLAInputError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({exc})") from exc
            if not isinstance(text, str) or len(text.strip()) < min_chars or text in seen:
                continue
            seen.add(text)
            out.append((str(row.get("id", f"t{lineno:06d}")), text))
            if max_texts is not None and len(out) >= max_texts:
                break
    return out


def split_texts(n: int, fractions: dict[str, float], seed: int) -> list[str]:
    """A seeded split of ``n`` texts: ``heldout``, ``rl``, ``ar_sft`` by rounded fraction, the rest ``av_sft``."""
    bad = set(fractions) - set(SPLIT_NAMES)
    if bad or abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise NLAInputError(f"split fractions must name {SPLIT_NAMES} and sum to 1, got {fractions}")
    return assign_splits(n, fractions, seed, named=("heldout", "rl", "ar_sft"), rest="av_sft")


def _shard_paths(out: Path, i: int) -> tuple[Path, Path]:
    return out / SHARD_DIR / f"{i:05d}.safetensors", out / SHARD_DIR / f"{i:05d}.jsonl"


def build_injection_targets(backbone: Backbone, spec: InjectionTargetsSpec, out: Path, resume: bool = False,
                            stop_after_shards: int | None = None) -> InjectionTargets | None:
    """Extract (or continue extracting) the shards, then finalize ``out``; ``stop_after_shards``
    stops early without finalizing (tests: an interruption) and returns None. With N processes
    (:mod:`eval_harness.distributed`) shard ``i`` of the missing ones is made by rank ``i mod N``
    and rank 0 finalizes (other ranks return None): the files of one process."""
    out = Path(out)
    if (out / "meta.json").is_file():
        raise NLAInputError(f"{out} already holds a finished injection target set")
    spec_path = out / "spec.json"
    if spec_path.is_file():
        if not resume:
            raise NLAInputError(f"{out} holds an unfinished run; pass --resume to continue it or use another --out")
        old = json.loads(spec_path.read_text(encoding="utf-8"))
        if old != spec.identity():
            raise NLAInputError(f"{out}: --resume with different settings {old} vs {spec.identity()}")
    ispec = base_spec()
    depths = depth_layers(backbone.num_layers, spec.bands, ispec.depth_grid)
    layers = [d.layer for d in depths]
    rows = read_texts(Path(spec.texts_file), spec.min_chars, spec.max_texts)
    if len(rows) < 4:
        raise NLAInputError(f"{spec.texts_file}: {len(rows)} usable texts; at least 4 are needed (one per split)")
    n_shards = (len(rows) + spec.batch_size - 1) // spec.batch_size
    missing = [i for i in range(n_shards) if not all(q.is_file() for q in _shard_paths(out, i))]
    distributed.barrier()  # every rank has checked the folder and listed the missing shards before any rank writes
    if not spec_path.is_file() and distributed.world().is_main:
        atomic_write_json(spec_path, spec.identity())
    t0 = time.perf_counter()
    made = 0
    main = distributed.world().is_main
    bar = tqdm(total=len(rows), desc="injection-targets", unit="text", dynamic_ncols=True, disable=not main)
    bar.update(sum(len(rows[i * spec.batch_size : (i + 1) * spec.batch_size]) for i in range(n_shards) if i not in missing))
    for i in distributed.shard(missing):
        vec_path, txt_path = _shard_paths(out, i)
        chunk = rows[i * spec.batch_size : (i + 1) * spec.batch_size]
        if stop_after_shards is not None and made >= stop_after_shards:
            bar.close()
            return None
        texts = [t for _, t in chunk]
        acts = extract_layers(backbone, ispec, texts, layers)
        descs = [greedy_reply(backbone, ispec, t, spec.max_new_tokens) for t in texts]
        save_tensors(vec_path, {f"L{ell}": a for ell, a in acts.items()})
        lines = (json.dumps({"id": tid, "text": t, "description": d}, ensure_ascii=False) for (tid, t), d in zip(chunk, descs))
        atomic_write_text(txt_path, "\n".join(lines) + "\n")  # last: marks the shard done
        made += 1
        bar.update(len(chunk) * distributed.world().size)
    bar.close()
    distributed.barrier()  # every shard is written before rank 0 reads them all
    return finalize(backbone, spec, out, n_shards, depths, time.perf_counter() - t0) if main else None


def finalize(backbone: Backbone, spec: InjectionTargetsSpec, out: Path, n_shards: int, depths: list[DepthLayer], seconds: float) -> InjectionTargets:
    vecs: dict[int, list[torch.Tensor]] = {d.layer: [] for d in depths}
    ids, texts, descs = [], [], []
    for i in range(n_shards):
        vec_path, txt_path = _shard_paths(out, i)
        t = load_state_dict(vec_path)
        for ell in vecs:
            vecs[ell].append(t[f"L{ell}"].float())
        for line in jsonl_lines(txt_path.read_text(encoding="utf-8")):
            if line.strip():
                r = json.loads(line)
                ids.append(r["id"])
                texts.append(r["text"])
                descs.append(r["description"])
    vectors = {ell: torch.cat(v, dim=0) for ell, v in vecs.items()}
    splits = split_texts(len(texts), spec.fractions, spec.seed)
    keep = [i for i, s in enumerate(splits) if s != "heldout"]
    mus = {ell: v[keep].mean(0) for ell, v in vectors.items()}
    empty = sum(1 for d in descs if not d)
    if empty:
        log.warning("%d of %d descriptions are empty (the backbone replied with EOS at once)", empty, len(descs))
    save_tensors(out / "vectors.safetensors", {f"L{ell}": v for ell, v in vectors.items()})
    save_tensors(out / "mu.safetensors", {f"L{ell}": m for ell, m in mus.items()})
    lines = (json.dumps({"idx": i, "id": a, "text": t, "description": d, "split": s}, ensure_ascii=False)
             for i, (a, t, d, s) in enumerate(zip(ids, texts, descs, splits)))
    atomic_write_text(out / "texts.jsonl", "\n".join(lines) + "\n")
    norms = {str(ell): round(float(v.norm(dim=1).median()), 4) for ell, v in vectors.items()}
    meta = {
        "backbone": spec.backbone, "backbone_revision": backbone.revision, "n_blocks": backbone.num_layers,
        "d_model": backbone.hidden_size, "layers": [d.layer for d in depths], "depths": [asdict(d) for d in depths],
        "layer_convention": "hidden_states[ℓ], ℓ = block K + 1 (output of block K, before the final norm)",
        "input_rule": "one user message of the chat template + generation prompt, add_special_tokens=True, last token (base model, no adapter)",
        "description_source": f"the backbone's greedy reply to the chat-wrapped text, max {spec.max_new_tokens} new tokens, stopped at EOS",
        "texts_file": spec.texts_file, "n": len(texts), "empty_descriptions": empty,
        "split_seed": spec.seed, "split_fractions": spec.fractions, "split_counts": {s: splits.count(s) for s in SPLIT_NAMES},
        "mu": "mean of the non-heldout rows per layer", "median_norms": norms,
        "suggested_injection_scale": float(round(torch.cat([v.norm(dim=1) for v in vectors.values()]).median().item(), 2)),
        "suggested_injection_scale_rule": "median L2 norm over all rows of all layers (Anthropic: a round number near the mean norm)",
        "spec": spec.identity(), "extract_s": round(seconds, 2), "seconds_per_text": round(seconds / max(len(texts), 1), 4),
        "complete": True,
    }
    atomic_write_json(out / "meta.json", meta)
    log.info("wrote %d texts × %d layers to %s (%s)", len(texts), len(depths), out, meta["split_counts"])
    return InjectionTargets(out, vectors, mus, ids, texts, descs, splits, meta)


def load_injection_targets(folder: str | Path) -> InjectionTargets:
    """Read a finished injection target set; refuses an unfinished or inconsistent folder."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{folder}: no meta.json: not an injection targets folder (or not finished; rerun with --resume)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if not meta.get("complete") or "depths" not in meta:
        raise CheckpointError(f"{folder}: not a complete injection target set")
    vt = load_state_dict(folder / "vectors.safetensors")
    mt = load_state_dict(folder / "mu.safetensors")
    vectors = {int(ell): vt[f"L{ell}"].float() for ell in meta["layers"]}
    mus = {int(ell): mt[f"L{ell}"].float() for ell in meta["layers"]}
    ids, texts, descs, splits = [], [], [], []
    for line in jsonl_lines((folder / "texts.jsonl").read_text(encoding="utf-8")):
        if line.strip():
            r = json.loads(line)
            ids.append(r["id"])
            texts.append(r["text"])
            descs.append(r["description"])
            splits.append(r["split"])
    if any(v.shape[0] != len(texts) for v in vectors.values()):
        raise CheckpointError(f"{folder}: vectors and texts.jsonl disagree on the number of rows")
    return InjectionTargets(folder, vectors, mus, ids, texts, descs, splits, meta)
