"""The targets dataset: (activation, text) pairs with a recorded split, stored safely.

Folder layout (written by ``python -m eval_harness targets``; read by every eval and trainer):

``meta.json``           backbone spec + revision, layer, seed, sampling settings, counts, health
                        stats, split sizes, ``"complete": true`` once finalized
``vectors.safetensors`` ``{"v": (N, d) float32}`` — v_i = ``hidden_states[layer]`` at the last valid
                        token of ``[BOS] + text_i`` (:mod:`nla_space.activations`)
``texts.jsonl``         one row per sequence, in row order:
                        ``{"idx": i, "text": str, "token_ids": [...], "split": name}``;
                        ``token_ids`` are the text's ids without BOS (EOS included when one was sampled)
``mu.safetensors``      ``{"mu": (d,)}`` = mean of the ``mu_pool`` split's vectors

Splits (disjoint, by sequence): ``train``, ``val``, ``test`` (held out: evals read only these),
``mu_pool`` (μ and the NN-retrieval pool).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nla_space.errors import CheckpointError
from nla_space.hub import load_state_dict
from nla_space.io import atomic_write_json, atomic_write_text, save_tensors, jsonl_lines
from nla_space.scoring import anisotropy_mu

SPLITS = ("train", "val", "test", "mu_pool")


@dataclass
class TargetSet:
    folder: Path
    vectors: torch.Tensor  #: (N, d) float32
    texts: list[str]
    token_ids: list[list[int]]
    splits: list[str]  #: split name per row
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def layer(self) -> int:
        return int(self.meta["layer"])

    def indices(self, split: str) -> list[int]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
        return [i for i, s in enumerate(self.splits) if s == split]

    def mu(self) -> torch.Tensor:
        """μ from the μ pool (never from evaluated targets)."""
        idx = self.indices("mu_pool")
        if not idx:
            raise CheckpointError(f"{self.folder}: the mu_pool split is empty")
        return anisotropy_mu(self.vectors[idx])


def assign_splits(n: int, fractions: dict[str, float], seed: int, named: tuple[str, ...] = ("test", "mu_pool", "val"),
                  rest: str = "train") -> list[str]:
    """A seeded random split of ``n`` rows: the splits in ``named`` take their rounded fraction of a
    seeded permutation, in that order; the rest goes to ``rest``."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    names = [rest] * n
    start = 0
    for name in named:
        count = int(round(fractions.get(name, 0.0) * n))
        for i in order[start : start + count]:
            names[i] = name
        start += count
    return names


def write_target_set(folder: Path, vectors: torch.Tensor, texts: list[str], token_ids: list[list[int]], splits: list[str], meta: dict[str, Any]) -> TargetSet:
    """Write a complete target set atomically (meta last, so ``complete`` marks a finished folder)."""
    folder = Path(folder)
    n = vectors.shape[0]
    if not (len(texts) == len(token_ids) == len(splits) == n):
        raise ValueError("vectors, texts, token_ids and splits must have the same length")
    bad = set(splits) - set(SPLITS)
    if bad:
        raise ValueError(f"unknown split names {bad}")
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / "vectors.safetensors", {"v": vectors.float()})
    rows = (json.dumps({"idx": i, "text": t, "token_ids": ids, "split": s}, ensure_ascii=False)
            for i, (t, ids, s) in enumerate(zip(texts, token_ids, splits)))
    atomic_write_text(folder / "texts.jsonl", "\n".join(rows) + "\n")
    ts = TargetSet(folder, vectors.float(), list(texts), [list(x) for x in token_ids], list(splits), dict(meta))
    if "mu_pool" in splits:
        save_tensors(folder / "mu.safetensors", {"mu": ts.mu()})
    counts = {s: splits.count(s) for s in SPLITS}
    ts.meta.update({"n": n, "d": int(vectors.shape[1]), "split_counts": counts, "complete": True})
    atomic_write_json(folder / "meta.json", ts.meta)
    return ts


def load_target_set(folder: str | Path) -> TargetSet:
    """Read a finished target set; refuses an unfinished, damaged or inconsistent folder with a
    :class:`CheckpointError` naming the file and the problem."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{folder}: no meta.json — not a targets folder (or not finished)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: not readable JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: expected a JSON object")
    if not meta.get("complete"):
        raise CheckpointError(f"{folder}: the target set is not complete (interrupted? rerun `targets --resume`)")
    layer = meta.get("layer")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise CheckpointError(f"{meta_path}: 'layer' must be a non-negative integer, got {layer!r}")
    tensors = load_state_dict(folder / "vectors.safetensors")
    if "v" not in tensors:
        raise CheckpointError(f"{folder / 'vectors.safetensors'}: no 'v' tensor (keys: {sorted(tensors)[:5]})")
    v = tensors["v"]
    if v.ndim != 2 or not v.is_floating_point():
        raise CheckpointError(f"{folder / 'vectors.safetensors'}: 'v' must be a 2-D float tensor, got shape {tuple(v.shape)} {v.dtype}")
    if not torch.isfinite(v).all():
        raise CheckpointError(f"{folder / 'vectors.safetensors'}: 'v' holds NaN or infinite values (not finite)")
    vectors = v.float()
    texts, ids, splits = [], [], []
    texts_path = folder / "texts.jsonl"
    try:
        lines = jsonl_lines(texts_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{texts_path}: cannot read ({exc})") from exc
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            try:
                row = json.loads(line)
                text, tok, split = row["text"], row["token_ids"], row["split"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{texts_path}:{lineno}: not a row {{text, token_ids, split}} (truncated? {exc})") from exc
            if split not in SPLITS:
                raise CheckpointError(f"{texts_path}:{lineno}: unknown split {split!r}; splits are {SPLITS}")
            texts.append(text)
            ids.append(tok)
            splits.append(split)
    if len(texts) != vectors.shape[0]:
        raise CheckpointError(f"{folder}: {vectors.shape[0]} vectors but {len(texts)} texts")
    return TargetSet(folder, vectors, texts, ids, splits, meta)
