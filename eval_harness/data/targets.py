"""Build a targets dataset: (activation, text) pairs for one backbone and layer (after SRT ``scripts/sample_targets.py``; ``docs/references.md``).

Two sources of text:

* **self-sampling** (the reference approach): continuations of a single BOS, temperature 1,
  top-p 1, ``seq_len`` new tokens, via :func:`nla_space.rollout.sample` with the BOS *embedding*
  as the prefix. The prompt is therefore never part of the generated ids, so only generated
  positions are searched for EOS — the guard against the BOS==EOS constant-target bug
  (Qwen2.5's BOS id is its EOS id; fixed late in the SRT reference's ``scripts/sample_targets.py``). Token ids are kept up to and including the first generated stop token.
* **corpus windows** (``--corpus FILE.jsonl``, rows ``{"text": ...}``): the first ``seq_len``
  tokens of each row with at least ``min_chars`` characters, in file order.

The target vector of a row is ``hidden_states[layer]`` at the last valid token of
``[BOS] + token_ids`` (:mod:`nla_space.activations`), i.e. at the EOS when one was sampled.

Generation is resumable: every batch becomes one *shard* (``shards/NNNNN.safetensors`` with
``{"v"}`` then ``shards/NNNNN.jsonl``, both atomic; a shard counts once its JSONL exists). Shard
``i`` draws from its own generator seeded with ``seed * 1_000_003 + i``, so an interrupted run
continued with ``--resume`` gives exactly the rows of an uninterrupted one. With N processes (:mod:`eval_harness.distributed`) shard ``i`` is made and written by rank
``i mod N`` (of the shards still missing), and rank 0 finalizes once all are written: the same files
as one process. Finalizing checks the
set's health, assigns the splits (seeded, by sequence, disjoint) and writes the
:mod:`eval_harness.data.dataset` layout.

Health check (refuses the set with :class:`HealthError`; thresholds are options):

* ``dim_std``: mean over dimensions of the per-dimension std across rows — ≥ 0.1 (the reference's
  per-element threshold); a constant set has 0.
* ``norm_std``: std of the row norms — ≥ 1.0 by default (the reference's), lower it for tiny models.
* ``distinct_2``: distinct bigrams / all bigrams over the texts' ids — ≥ 0.2 (looping or
  constant samples fall far below; healthy SmolLM2-135M samples give ≈ 0.87).
* ``duplicate_rows``: fraction of rows whose token ids repeat an earlier row — ≤ 0.5.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from nla_space.activations import check_layer, read_rows
from nla_space.backbone import Backbone
from nla_space.errors import NLAInputError
from nla_space.hub import load_state_dict
from nla_space.io import atomic_write_json, atomic_write_text, save_tensors, jsonl_lines
from nla_space.rollout import sample

from .. import distributed
from .dataset import SPLITS, TargetSet, assign_splits, write_target_set

log = logging.getLogger(__name__)

SHARD_DIR = "shards"


class HealthError(NLAInputError):
    """The target set is degenerate (constant vectors, looping or duplicated texts)."""


@dataclass
class HealthThresholds:
    min_dim_std: float = 0.1
    min_norm_std: float = 1.0
    min_distinct_2: float = 0.2
    max_duplicate_rows: float = 0.5


@dataclass
class TargetsSpec:
    """Everything that determines the rows of a target set (recorded in ``meta.json``)."""

    backbone: str
    layer: int
    n: int
    seq_len: int = 64
    seed: int = 0
    batch_size: int = 64
    corpus: str | None = None
    min_chars: int = 40
    temperature: float = 1.0
    top_p: float = 1.0
    n_val: int = 200
    n_test: int = 200
    n_mu_pool: int = 500
    health: HealthThresholds = field(default_factory=HealthThresholds)

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run must share with the run it continues (``n`` may grow: shard
        ``i``'s rows depend only on these and ``i``)."""
        keys = ("backbone", "layer", "seq_len", "seed", "batch_size", "corpus", "min_chars", "temperature", "top_p")
        return {k: getattr(self, k) for k in keys}


# ---------------------------------------------------------------------------------------- sources


def sample_ids(backbone: Backbone, count: int, seq_len: int, generator: torch.Generator, temperature: float = 1.0, top_p: float = 1.0) -> list[list[int]]:
    """``count`` self-sampled continuations of a bare BOS, EOS-inclusive, without the BOS."""
    if backbone.bos_id is None:
        raise NLAInputError("self-sampling needs a BOS token; this backbone has none (use --corpus)")
    bos = torch.tensor([[backbone.bos_id]], device=backbone.device)
    with torch.inference_mode():
        prefix = backbone.embed_tokens(bos).expand(count, -1, -1)
    roll = sample(backbone, prefix, seq_len, temperature=temperature, top_p=top_p, generator=generator)
    # roll.ids holds generated tokens only: the BOS prompt is never searched for EOS.
    return [roll.ids[i, : int(roll.mask[i].sum())].tolist() for i in range(count)]


def corpus_ids(backbone: Backbone, path: Path, seq_len: int, min_chars: int) -> Iterator[list[int]]:
    """The first ``seq_len`` token ids (no specials) of each usable row of a JSONL corpus."""
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise NLAInputError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({exc})") from exc
            if not isinstance(text, str) or len(text.strip()) < min_chars:
                continue
            ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"][:seq_len]
            if ids:
                yield list(ids)


# -------------------------------------------------------------------------------------- encoding


def encode_ids(backbone: Backbone, layer: int, rows: list[list[int]]) -> torch.Tensor:
    """Target vectors ``(B, d)`` float32: ``hidden_states[layer]`` at the last token of ``[BOS] + ids``."""
    return read_rows(backbone, layer, rows, batch_size=max(1, len(rows)))


# ---------------------------------------------------------------------------------------- health


def distinct_ngrams(rows: list[list[int]], n: int) -> float:
    """Distinct n-grams / all n-grams over every row (1.0 when there are none)."""
    seen: set[tuple[int, ...]] = set()
    total = 0
    for r in rows:
        for j in range(len(r) - n + 1):
            seen.add(tuple(r[j : j + n]))
            total += 1
    return len(seen) / total if total else 1.0


def loop_rate(rows: list[list[int]], n: int = 4, repeats: int = 3) -> float:
    """Fraction of rows in which some n-gram occurs at least ``repeats`` times."""
    if not rows:
        return 0.0
    hits = 0
    for r in rows:
        c = Counter(tuple(r[j : j + n]) for j in range(len(r) - n + 1))
        hits += bool(c) and max(c.values()) >= repeats
    return hits / len(rows)


def health_stats(vectors: torch.Tensor, rows: list[list[int]]) -> dict[str, float]:
    v = vectors.float()
    norms = v.norm(dim=1)
    seen: set[tuple[int, ...]] = set()
    dup = 0
    for r in rows:
        t = tuple(r)
        dup += t in seen
        seen.add(t)
    return {
        "dim_std": float(v.std(dim=0).mean()) if len(v) > 1 else 0.0,
        "norm_mean": float(norms.mean()),
        "norm_std": float(norms.std()) if len(v) > 1 else 0.0,
        "distinct_1": distinct_ngrams(rows, 1),
        "distinct_2": distinct_ngrams(rows, 2),
        "distinct_3": distinct_ngrams(rows, 3),
        "loop_rate": loop_rate(rows),
        "duplicate_rows": dup / max(len(rows), 1),
        "mean_len": sum(map(len, rows)) / max(len(rows), 1),
    }


def check_health(stats: dict[str, float], th: HealthThresholds) -> None:
    """Raise :class:`HealthError` naming every failed check."""
    bad = []
    if stats["dim_std"] < th.min_dim_std:
        bad.append(f"per-dimension std {stats['dim_std']:.4g} < {th.min_dim_std}")
    if stats["norm_std"] < th.min_norm_std:
        bad.append(f"norm std {stats['norm_std']:.4g} < {th.min_norm_std}")
    if stats["distinct_2"] < th.min_distinct_2:
        bad.append(f"distinct-2 ratio {stats['distinct_2']:.3f} < {th.min_distinct_2}")
    if stats["duplicate_rows"] > th.max_duplicate_rows:
        bad.append(f"duplicate rows {stats['duplicate_rows']:.3f} > {th.max_duplicate_rows}")
    if bad:
        raise HealthError(
            "unhealthy target set (constant targets, looping or duplicated samples): " + "; ".join(bad)
            + ". For a chat model whose bare-BOS samples loop, use --corpus; for a tiny test model lower the thresholds."
        )


# ---------------------------------------------------------------------------------------- shards


def _shard_paths(out: Path, i: int) -> tuple[Path, Path]:
    d = out / SHARD_DIR
    return d / f"{i:05d}.safetensors", d / f"{i:05d}.jsonl"


def _write_shard(out: Path, i: int, vectors: torch.Tensor, rows: list[list[int]], texts: list[str]) -> None:
    vec_path, txt_path = _shard_paths(out, i)
    save_tensors(vec_path, {"v": vectors})
    lines = (json.dumps({"text": t, "token_ids": r}, ensure_ascii=False) for t, r in zip(texts, rows))
    atomic_write_text(txt_path, "\n".join(lines) + "\n")  # written last: marks the shard complete


def _read_shard(out: Path, i: int) -> tuple[torch.Tensor, list[list[int]], list[str]]:
    vec_path, txt_path = _shard_paths(out, i)
    v = load_state_dict(vec_path)["v"].float()
    rows, texts = [], []
    for line in jsonl_lines(txt_path.read_text(encoding="utf-8")):
        if line.strip():
            d = json.loads(line)
            rows.append(d["token_ids"])
            texts.append(d["text"])
    return v, rows, texts


def _missing_shards(out: Path, n_shards: int) -> list[int]:
    return [i for i in range(n_shards) if not all(p.is_file() for p in _shard_paths(out, i))]


# ----------------------------------------------------------------------------------------- build


def build_targets(backbone: Backbone, spec: TargetsSpec, out: Path, resume: bool = False, stop_after_shards: int | None = None) -> TargetSet | None:
    """Generate (or continue) the shards, then finalize the target set in ``out``.

    ``stop_after_shards`` stops after that many shards *in this call* without finalizing (tests
    use it to simulate an interruption); it returns None then, as it does on ranks other than 0.
    """
    out = Path(out)
    check_layer(backbone, spec.layer)
    if spec.n < 1 or spec.seq_len < 1 or spec.batch_size < 1:
        raise NLAInputError("--n, --seq-len and --batch-size must be positive")
    reserved = spec.n_val + spec.n_test + spec.n_mu_pool
    if reserved >= spec.n:
        raise NLAInputError(f"--n {spec.n} leaves no training rows after val+test+mu_pool = {reserved}")
    spec_path = out / "spec.json"
    if (out / "meta.json").is_file() and not resume:
        raise NLAInputError(f"{out} already holds a target set (use another --out, or --resume)")
    if spec_path.is_file():
        old = json.loads(spec_path.read_text(encoding="utf-8"))
        if not resume:
            raise NLAInputError(f"{out} holds an unfinished run; pass --resume to continue it or use another --out")
        if old != spec.identity():
            raise NLAInputError(f"{out}: --resume with different settings {old} vs {spec.identity()}")
    n_shards = (spec.n + spec.batch_size - 1) // spec.batch_size
    missing = _missing_shards(out, n_shards)
    distributed.barrier()  # every rank has checked the folder and listed the missing shards before any rank writes
    if not spec_path.is_file() and distributed.world().is_main:
        atomic_write_json(spec_path, spec.identity())
    todo = distributed.shard(missing)
    corpus_rows: list[list[int]] = []
    if spec.corpus is not None and todo:
        it = corpus_ids(backbone, Path(spec.corpus), spec.seq_len, spec.min_chars)
        corpus_rows = [r for r in (next(it, None) for _ in range((max(todo) + 1) * spec.batch_size)) if r is not None]
    main = distributed.world().is_main
    t0 = time.perf_counter()
    base_s = _previous_timing(out).get("generate_s", 0.0)
    made = 0
    bar = tqdm(total=spec.n, initial=min((n_shards - len(missing)) * spec.batch_size, spec.n), desc="targets", unit="seq",
               dynamic_ncols=True, disable=not main)
    for i in todo:
        if stop_after_shards is not None and made >= stop_after_shards:
            bar.close()
            return None
        count = min(spec.batch_size, spec.n - i * spec.batch_size)
        if spec.corpus is None:
            gen = torch.Generator(device=backbone.device).manual_seed(spec.seed * 1_000_003 + i)
            rows = sample_ids(backbone, count, spec.seq_len, gen, spec.temperature, spec.top_p)
        else:
            rows = corpus_rows[i * spec.batch_size : i * spec.batch_size + count]
            if len(rows) < count:
                raise NLAInputError(f"{spec.corpus}: only {i * spec.batch_size + len(rows)} usable rows (≥ {spec.min_chars} chars), --n is {spec.n}")
        vectors = encode_ids(backbone, spec.layer, rows)
        texts = [backbone.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
        _write_shard(out, i, vectors, rows, texts)  # by the rank that made it: each shard is its own atomic files
        if main:
            atomic_write_json(out / "timing.json", {"generate_s": round(base_s + time.perf_counter() - t0, 2)})
        made += 1
        bar.update(count * distributed.world().size)
    bar.close()
    distributed.barrier()  # every shard is written before rank 0 reads them all
    return finalize(backbone, spec, out, n_shards) if main else None


def finalize(backbone: Backbone, spec: TargetsSpec, out: Path, n_shards: int) -> TargetSet:
    vecs, rows, texts = [], [], []
    for i in range(n_shards):
        v, r, t = _read_shard(out, i)
        vecs.append(v)
        rows += r
        texts += t
    vectors = torch.cat(vecs, dim=0)
    stats = health_stats(vectors, rows)
    log.info("health: %s", {k: round(v, 4) for k, v in stats.items()})
    check_health(stats, spec.health)
    n = vectors.shape[0]
    fractions = {"val": spec.n_val / n, "test": spec.n_test / n, "mu_pool": spec.n_mu_pool / n}
    splits = assign_splits(n, fractions, spec.seed)
    eos_rows = sum(1 for r in rows if r and r[-1] in backbone.stop_ids)
    timing = _previous_timing(out)
    timing["seconds_per_seq"] = round(timing.get("generate_s", 0.0) / max(n, 1), 4)
    meta = {
        "backbone": spec.backbone,
        "backbone_revision": backbone.revision,
        "backbone_source": backbone.source_path,
        "layer": spec.layer,
        "seed": spec.seed,
        "source": "corpus" if spec.corpus else "self-sample",
        "corpus": spec.corpus,
        "sampling": {"prompt": "bare BOS", "bos_id": backbone.bos_id, "temperature": spec.temperature, "top_p": spec.top_p,
                     "max_new_tokens": spec.seq_len, "stop_ids": backbone.stop_ids, "eos_search": "generated positions only"}
        if not spec.corpus else {"window_tokens": spec.seq_len, "min_chars": spec.min_chars},
        "seq_len": spec.seq_len,
        "batch_size": spec.batch_size,
        "read_position": "last valid token of [BOS] + token_ids (EOS-inclusive)",
        "rows_ending_in_eos": eos_rows,
        "health": stats,
        "health_thresholds": asdict(spec.health),
        "split_seed": spec.seed,
        "timing": timing,
    }
    ts = write_target_set(out, vectors, texts, rows, splits, meta)
    log.info("wrote %d targets to %s (%s)", n, out, ts.meta["split_counts"])
    return ts


def _previous_timing(out: Path) -> dict[str, float]:
    path = out / "timing.json"
    return json.loads(path.read_text()) if path.is_file() else {}


__all__ = ["TargetsSpec", "HealthThresholds", "HealthError", "build_targets", "encode_ids", "sample_ids", "health_stats", "check_health", "SPLITS"]
