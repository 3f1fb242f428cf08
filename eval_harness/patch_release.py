"""Turn a ``train-patch`` run into a shipped patch card: AV folder, μ and pool, calibration, card file.

Steps (each writes atomically; rerunning redoes only what is asked):

1. **AV folder**: the run's ``best/`` (PEFT adapter + ``patch_av.json``) copied to ``--av-folder``.
2. **μ and pool**: the layer-ℓ activations of the corpus's ``mu_pool`` split (never trained on, never
   evaluated), read like typed texts; μ is their mean (``mu.safetensors``), the pool is the vectors
   (``pool.safetensors``, float16) that specificity is measured against (:mod:`nla_space.specificity`).
   A card of several layers gets one of each per layer, as the tensors ``mu.L{ℓ}`` and ``pool.L{ℓ}``.
3. **Calibration** (``--calibrate N``): N calibration texts verbalized at the card's default strategy
   and K; each answer's specificity and its 1-in-40 retrieval correctness among the N (20 random
   40-sets, distractors of the same kind first) give the logistic fit and the threshold τ at the
   target precision (:func:`nla_space.specificity.fit_calibration`). The texts are the first N of
   ``--calibration-texts`` (a JSONL of ``{"text", "kind"}`` written like what users type; the shipped
   ``assets/corpora/calibration_84_v1.jsonl``), else of the corpus's ``val`` split. With
   ``--calibration-records`` the fit is redone from a ``reading-eval --log-samples`` file of those
   texts, without verbalizing again. Written into the card file's ``patch.calibration`` with
   ``default_tau = τ``, and the confidence scale's anchors into ``anchors`` (:func:`confidence_anchors`).
   A card of several layers is calibrated at each layer on the same texts (the other layers' fits go to
   ``patch.layer_calibrations``); each layer's records are kept in ``calibration_records.L{ℓ}.jsonl`` of
   the run folder, and a rerun reuses a layer's file whose texts and decoding match (a killed release
   resumes at the first layer not done).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from nla_space.activations import read_rows
from nla_space.backbone import Backbone
from nla_space.cards import Card
from nla_space.cards.sections import PatchSection
from nla_space.errors import NLAInputError
from nla_space.io import atomic_write_json, save_tensors
from nla_space.specificity import POOL_KEY, Calibration, Specificity, fit_calibration, pool_key, retrieval_correct
from nla_space.verbalizers.patch import SPEC_FILE

from .evals.reading_eval import ReadingEval
from .data.text_corpus import read_corpus

log = logging.getLogger(__name__)

AV_FILES = ("adapter_config.json", "adapter_model.safetensors", SPEC_FILE)


def copy_av(run_best: Path, folder: Path) -> None:
    missing = [f for f in AV_FILES if not (run_best / f).is_file()]
    if missing:
        raise NLAInputError(f"{run_best}: missing {missing}: not a finished train-patch best/ folder")
    folder.mkdir(parents=True, exist_ok=True)
    for f in AV_FILES + ("best.json",):
        if (run_best / f).is_file():
            tmp = folder / (f + ".tmp")
            shutil.copyfile(run_best / f, tmp)
            tmp.replace(folder / f)


def pool_fingerprint(backbone: Backbone, layers: list[int], texts: list[str]) -> str:
    """What μ and the pool are a function of: the plain backbone's layer-ℓ states of the pool texts
    (blocks below ℓ carry no LoRA, so the AV does not enter)."""
    key = layers[0] if len(layers) == 1 else layers  # a one-layer card's fingerprint as before several layers existed
    return hashlib.sha256(json.dumps([str(backbone.spec), key, texts], ensure_ascii=False).encode()).hexdigest()


def _stored_fingerprint(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("fingerprint")
    except (OSError, ValueError, RuntimeError):  # missing or unreadable: compute it again
        return None


@torch.inference_mode()
def write_pool(backbone: Backbone, layers: int | list[int], corpus: Path, folder: Path, max_rows: int = 2000) -> dict[str, Any]:
    """μ and the specificity pool of the corpus's mu_pool split at each of ``layers`` into ``folder``
    (one layer: tensors ``mu`` and ``pool``; several: ``mu.L{ℓ}`` and ``pool.L{ℓ}``); kept as they are
    when the folder already holds them for the same backbone, layers and texts (a re-release that only
    refits the calibration then skips the 2-5 min forward pass per layer)."""
    layers = [layers] if isinstance(layers, int) else sorted(set(layers))
    texts = [r["text"] for r in read_corpus(corpus, "mu_pool")][:max_rows]
    if len(texts) < 8:
        raise NLAInputError(f"{corpus}: the mu_pool split has {len(texts)} rows; need ≥ 8")
    info = {"pool_rows": len(texts), "source": f"{corpus} (mu_pool split)"}
    fp = pool_fingerprint(backbone, layers, texts)
    if (folder / "mu.safetensors").is_file() and _stored_fingerprint(folder / "pool.safetensors") == fp:
        log.info("μ and pool in %s already match %s at layer(s) %s: kept", folder, corpus, layers)
        return info
    rows = [list(backbone.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    mus, pools = {}, {}
    for ell in layers:
        V = read_rows(backbone, ell, rows)
        one = len(layers) == 1
        mus["mu" if one else f"mu.L{ell}"] = V.mean(dim=0)
        pools[POOL_KEY if one else pool_key(ell)] = V.half()
    save_tensors(folder / "mu.safetensors", mus)
    save_tensors(folder / "pool.safetensors", pools, metadata={"fingerprint": fp})
    return info


def calibrate(oc: Any, rows: list[dict[str, Any]], strategy: str, k: int, target_precision: float, spec: Specificity,
              seed: int = 0, records: Path | None = None, texts_name: str = "val texts",
              feature: str = "margin40", layer: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Verbalize the corpus ``rows`` at ``layer`` (None: the card's default) and fit the confidence
    (module docstring, step 3); returns the calibration dict. The per-text records (text, source,
    answer, specificity, vectors) are kept in ``records`` (JSONL) when given, so the fit can be redone
    without verbalizing again; records already there for the same texts, layer and decoding are reused."""
    from tqdm import tqdm

    from nla_space.io import atomic_write_text

    recs = _reusable(records, rows, strategy, k, layer)
    if recs is None:
        ev = ReadingEval(oc, strategy, k, seed, layer=layer)
        desc = "calibrating" if layer is None else f"calibrating L{layer}"
        recs = [{**ev.sample(i, r["text"]), "source": r.get("source", "")} for i, r in enumerate(tqdm(rows, desc=desc, unit="text"))]
        recs = [{**r, "strategy": strategy, "k": k} for r in recs]
        if records is not None:
            atomic_write_text(records, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    else:
        log.info("calibration records in %s match: reused", records)
    return fit_from_records(recs, spec, strategy, k, target_precision, seed, texts_name, feature), recs


def _reusable(records: Path | None, rows: list[dict[str, Any]], strategy: str, k: int, layer: int | None) -> list[dict[str, Any]] | None:
    """The records in ``records`` if they are of exactly ``rows``' texts at ``layer`` with this decoding, else None."""
    if records is None or not records.is_file():
        return None
    try:
        recs = [json.loads(line) for line in records.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return None
    same = (len(recs) == len(rows) and all(r.get("text") == row["text"] for r, row in zip(recs, rows))
            and all(r.get("strategy") == strategy and r.get("k") == k for r in recs)
            and (layer is None or all(r.get("layer") == layer for r in recs)))
    return recs if same else None


def fit_from_records(recs: list[dict[str, Any]], spec: Specificity, strategy: str, k: int, target_precision: float,
                     seed: int = 0, texts_name: str = "val texts", feature: str = "margin40") -> dict[str, Any]:
    """Fit the confidence on the per-text records (each answer's ``h`` and its text's ``v``) with the
    card's pool and μ (``spec``): the calibration feature of each answer against retrieval-correctness."""
    H = torch.tensor([r["h"] for r in recs])
    V = torch.tensor([r["v"] for r in recs])
    z = spec.feature(feature, H, V)
    correct = retrieval_correct(H, V, spec.mu, n=40, groups=[r.get("source", "") for r in recs])
    settings = {"strategy": strategy, "k": k, "seed": seed, "texts": len(recs), "target_precision": target_precision,
                "calibration_texts": texts_name,
                "correct": f"1-in-40 retrieval among the {texts_name}, distractors of the same kind first (20 random sets each)"}
    cal = fit_calibration(z, correct, target_precision, settings, feature=feature)
    log.info("calibration: %s", cal)
    return cal.__dict__


def calibration_rows(texts: Path) -> list[dict[str, Any]]:
    """Calibration texts from a JSONL of ``{"text", "kind"}`` rows, as ``{"text", "source"}`` (the kind groups distractors)."""
    rows = []
    for n, line in enumerate(texts.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            r = json.loads(line)
            if not isinstance(r, dict) or not isinstance(r.get("text"), str):
                raise NLAInputError(f"{texts}:{n}: expected a JSON object with a 'text'")
            rows.append({"text": r["text"], "source": str(r.get("kind", ""))})
    return rows


def records_for(path: Path, strategy: str, k: int, rows: list[dict[str, Any]], layer: int | None = None) -> list[dict[str, Any]]:
    """The per-text records of ``strategy``/``k`` (and ``layer``, where records name theirs) in a
    ``reading-eval --log-samples`` file, each given the ``source`` (kind) of its text in ``rows``; every
    row must have its record."""
    kinds = {r["text"]: r["source"] for r in rows}
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    recs = [{**r, "source": kinds[r["text"]]} for r in recs
            if r.get("strategy") == strategy and (strategy == "greedy" or r.get("k") == k) and r.get("text") in kinds
            and (layer is None or r.get("layer", layer) == layer)]
    if len(recs) != len(rows):
        raise NLAInputError(f"{path}: {len(recs)} records of {strategy} K={k} for {len(rows)} calibration texts")
    return recs


def confidence_anchors(recs: list[dict[str, Any]], spec: Specificity, seed: int = 0) -> dict[str, Any]:
    """The confidence scale's floor and ceiling on the calibration texts, for the score plot: the mean
    confidence of an unrelated text's re-encode (each text's activation queried by another text's)
    and of the text itself (its own activation as the answer, the replay)."""
    V = torch.tensor([r["v"] for r in recs])
    other = torch.roll(torch.arange(len(recs)), shifts=1 + seed % max(1, len(recs) - 1))
    floor = spec.confidence(V[other], V)
    ceiling = spec.confidence(V, V)
    return {"random_floor_conf": round(float(floor.mean()), 4), "ceiling_conf": round(float(ceiling.mean()), 4),
            "ceiling_conf_name": "the input text itself (replay)",
            "conf_source": f"mean over the {len(recs)} calibration texts (patch-release)"}


def card_dict(card_id: str, aliases: list[str], title: str, description: str, backbone: dict[str, Any], layer: int | list[int],
              av_folder: str, calibration: dict[str, Any] | None, default_strategy: str, extra: dict[str, Any],
              guided_beta: float = 1.0, layer_calibrations: dict[int, dict[str, Any]] | None = None,
              greedy_repeat_ngram: int = 0) -> dict[str, Any]:
    """The patch card file's JSON, built and checked through :class:`Card` (``extra``: the old card file's kept
    sections, by key, its licence among them: a backbone's terms, e.g. ``gemma``, carry over to a re-release;
    apache-2.0 otherwise); ``layer``: the card's layer or layers (the first is the default), ``calibration``
    the default layer's and ``layer_calibrations`` the others'; ``default_tau`` is the calibration's τ, else
    the card's default."""
    where = f"card {card_id}"
    layers = [layer] if isinstance(layer, int) else list(layer)
    per_layer = {str(ell): Calibration.from_dict(c, f"{where}: 'patch.layer_calibrations.{ell}'")
                 for ell, c in (layer_calibrations or {}).items() if ell != layers[0]}
    patch = PatchSection(pool_file="pool.safetensors", default_strategy=default_strategy, guided_beta=guided_beta,
                         calibration=Calibration.from_dict(calibration, f"{where}: 'patch.calibration'") if calibration else None,
                         layer_calibrations=per_layer, greedy_repeat_ngram=greedy_repeat_ngram)
    card = Card.from_dict({"license": "apache-2.0", **extra, "id": card_id, "aliases": aliases, "kind": "patch", "title": title,
                           "description": description, "backbone": backbone, "layers": layers, "av": {"folder": av_folder},
                           "mu_file": "mu.safetensors", "patch": patch.to_dict()}, where)
    if patch.calibration is not None:
        card.default_tau = patch.calibration.tau
    return card.to_dict()


def write_card(path: Path, data: dict[str, Any]) -> None:
    atomic_write_json(path, data)
    log.info("wrote card %s", path)


def read_card_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
