"""``reading-eval``: does the verbalization say something about *this* input? Measures that the centered
fve alone cannot be gamed into (an unrelated text with the same ending scores like NN retrieval).

Per text (one ``verbalize`` call at the given strategy and K, seed ``seed * 1_000_003 + i``):
the best verbalization, its independent re-encode ``h`` (the decoded text re-tokenised and read
like a typed text, :meth:`~nla_space.runtime.OpenCard.reconstruct_texts`), the text's activation
``v``, the hedge, the confidence, the centered fve and the wall time.

Metrics over the n texts of a run (``METRICS``):

``retrieval_top1``      ``h_i`` ranks its own ``v_i`` first among all n activations (centered cosine,
                        the card's μ): 1-in-n retrieval, chance 1/n
``retrieval_top1_in40`` the same in random sets of 40 (1-in-40; equals ``retrieval_top1`` at n = 40)
``minilm_top1``         in MiniLM-L6 space (an independent sentence embedder), the verbalization is
                        nearest its own source text among the n sources
``confident``           fraction not hedged; ``confident_right`` / ``confident_wrong``: not hedged and
                        retrieval-correct / not; ``precision_confident`` = right / confident
``centered_fve_mean``   the SRT score of the best answers (kept for the cards' tables)
``seconds_per_text``    mean wall time of a verbalize call
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from nla_space.errors import NLAInputError
from nla_space.runtime import OpenCard
from nla_space.scoring import fve_nrm_centered
from nla_space.specificity import retrieval_correct, unit_centered

from .text_corpus import read_corpus

log = logging.getLogger(__name__)

METRICS = ("retrieval_top1", "retrieval_top1_in40", "minilm_top1", "confident", "confident_right", "confident_wrong",
           "precision_confident", "centered_fve_mean", "specificity_mean", "seconds_per_text")


def load_texts(texts: Path | None, corpus: Path | None, split: str, limit: int | None) -> list[str]:
    """The evaluated texts: a JSONL of ``{"text"}`` rows, or a corpus split (held-out splits only)."""
    if (texts is None) == (corpus is None):
        raise NLAInputError("give exactly one of --texts FILE.jsonl or --corpus FILE.jsonl")
    if corpus is not None:
        if split == "train":
            raise NLAInputError("refusing to evaluate on the train split: pick val, test or mu_pool")
        rows = [r["text"] for r in read_corpus(corpus, split)]
    else:
        rows = [r["text"] for r in read_corpus(texts)]
    rows = rows[:limit] if limit else rows
    if len(rows) < 2:
        raise NLAInputError(f"need at least 2 texts, got {len(rows)}")
    return rows


@dataclass
class ReadingEval:
    """One strategy's run over a list of texts; :meth:`sample` is the per-text work, :meth:`aggregate` the metrics."""

    oc: OpenCard
    strategy: str
    k: int
    seed: int = 0
    max_new_tokens: int | None = None
    layer: int | None = None

    def sample(self, i: int, text: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        res = self.oc.verbalize(text=text, layer=self.layer, k=self.k, strategy=self.strategy, seed=self.seed * 1_000_003 + i,
                                max_new_tokens=self.max_new_tokens)
        secs = time.perf_counter() - t0
        layer = res.layer
        v = self.oc.extract(text, layer)
        h = self.oc.reconstruct_texts([res.best.text], layer)[0]
        return {"target": i, "text": text, "verbalization": res.best.text, "hedged": res.hedged, "score": res.score,
                "criterion": res.criterion, "confidence": res.best.confidence, "specificity": res.best.specificity,
                "score_cen": res.best.score_cen, "seconds": round(secs, 3),
                "v": [round(float(x), 5) for x in v], "h": [round(float(x), 5) for x in h]}

    def aggregate(self, recs: Sequence[dict[str, Any]], embed: Any = None) -> dict[str, Any]:
        V = torch.tensor([r["v"] for r in recs])
        H = torch.tensor([r["h"] for r in recs])
        mu = self.oc.mu if self.oc.mu is not None else V.mean(0)
        sims = unit_centered(H, mu) @ unit_centered(V, mu).T
        right = (sims.argmax(dim=1) == torch.arange(len(recs))).float()
        in40 = retrieval_correct(H, V, mu, n=40)
        conf = torch.tensor([not r["hedged"] for r in recs], dtype=torch.float)
        out: dict[str, Any] = {
            "n": len(recs),
            "retrieval_top1": float(right.mean()),
            "retrieval_top1_in40": float(in40.mean()),
            "confident": float(conf.mean()),
            "confident_right": float((conf * in40).mean()),
            "confident_wrong": float((conf * (1 - in40)).mean()),
            "precision_confident": float((conf * in40).sum() / conf.sum()) if conf.sum() > 0 else None,
            "centered_fve_mean": float(fve_nrm_centered(H, V, mu[None]).mean()),
            "specificity_mean": _mean([r["specificity"] for r in recs]),
            "seconds_per_text": _mean([r["seconds"] for r in recs]),
        }
        if embed is not None:
            E_v = embed([r["verbalization"] or " " for r in recs])
            E_s = embed([r["text"] for r in recs])
            out["minilm_top1"] = float(((E_v @ E_s.T).argmax(dim=1) == torch.arange(len(recs))).float().mean())
        else:
            out["minilm_top1"] = None
        for r, ok in zip(recs, in40.tolist()):
            r["retrieval_correct_in40"] = ok
        return out


def _mean(xs: Sequence[Any]) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def examples(recs: Sequence[dict[str, Any]], n: int = 20) -> list[dict[str, Any]]:
    """The first ``n`` records without their vectors: what a reader judges."""
    keep = ("text", "verbalization", "hedged", "confidence", "specificity", "score_cen", "retrieval_correct_in40")
    return [{k: r.get(k) for k in keep} for r in recs[:n]]


def dumps_examples_md(recs: Sequence[dict[str, Any]]) -> str:
    lines = ["| text | verbalization | confidence | badge | right (1-in-40) |", "|---|---|---|---|---|"]
    for r in recs:
        c = r.get("confidence")
        lines.append("| {} | {} | {} | {} | {} |".format(
            json.dumps(r["text"], ensure_ascii=False)[1:-1].replace("|", "\\|"),
            json.dumps(r["verbalization"], ensure_ascii=False)[1:-1].replace("|", "\\|"),
            "-" if c is None else f"{c:.2f}", "hedged" if r["hedged"] else "confident",
            "-" if r.get("retrieval_correct_in40") is None else f"{r['retrieval_correct_in40']:.2f}"))
    return "\n".join(lines) + "\n"
