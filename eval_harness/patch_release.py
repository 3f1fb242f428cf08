"""Turn a ``train-patch`` run into a shipped patch card: AV folder, μ and pool, calibration, card file.

Steps (each writes atomically; rerunning redoes only what is asked):

1. **AV folder**: the run's ``best/`` (PEFT adapter + ``patch_av.json``) copied to ``--av-folder``.
2. **μ and pool**: the layer-ℓ activations of the corpus's ``mu_pool`` split (never trained on, never
   evaluated), read like typed texts; μ is their mean (``mu.safetensors``), the pool is the vectors
   (``pool.safetensors``, float16) that specificity is measured against (:mod:`nla_space.specificity`).
3. **Calibration** (``--calibrate N``): the first N texts of the corpus's ``val`` split verbalized at
   the card's default strategy and K; each answer's specificity and its 1-in-40 retrieval correctness
   among the N (20 random 40-sets) give the logistic fit and the threshold τ at the target precision
   (:func:`nla_space.specificity.fit_calibration`). Written into the card file's
   ``patch.calibration`` with ``default_tau = τ``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from nla_space.activations import read_rows
from nla_space.backbone import Backbone
from nla_space.cards import Card
from nla_space.errors import NLAInputError
from nla_space.io import atomic_write_json, save_tensors
from nla_space.specificity import POOL_KEY, fit_calibration, retrieval_correct
from nla_space.verbalizers.patch import SPEC_FILE

from .reading_eval import ReadingEval
from .text_corpus import read_corpus

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


@torch.inference_mode()
def write_pool(backbone: Backbone, layer: int, corpus: Path, folder: Path, max_rows: int = 2000) -> dict[str, Any]:
    texts = [r["text"] for r in read_corpus(corpus, "mu_pool")][:max_rows]
    if len(texts) < 8:
        raise NLAInputError(f"{corpus}: the mu_pool split has {len(texts)} rows; need ≥ 8")
    rows = [list(backbone.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    V = read_rows(backbone, layer, rows)
    mu = V.mean(dim=0)
    save_tensors(folder / "mu.safetensors", {"mu": mu})
    save_tensors(folder / "pool.safetensors", {POOL_KEY: V.half()})
    return {"pool_rows": len(texts), "source": f"{corpus} (mu_pool split)"}


def calibrate(oc: Any, rows: list[dict[str, Any]], strategy: str, k: int, target_precision: float, seed: int = 0,
              records: Path | None = None) -> dict[str, Any]:
    """Verbalize the corpus ``rows`` and fit the confidence (module docstring, step 3); returns the
    calibration dict. The per-text records (text, source, answer, specificity, vectors) are kept in
    ``records`` (JSONL) when given, so the fit can be redone without verbalizing again."""
    from tqdm import tqdm

    from nla_space.io import atomic_write_text

    ev = ReadingEval(oc, strategy, k, seed)
    recs = [{**ev.sample(i, r["text"]), "source": r.get("source", "")} for i, r in enumerate(tqdm(rows, desc="calibrating", unit="text"))]
    if records is not None:
        atomic_write_text(records, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    return fit_from_records(recs, oc.mu, strategy, k, target_precision, seed)


def fit_from_records(recs: list[dict[str, Any]], mu: torch.Tensor, strategy: str, k: int, target_precision: float,
                     seed: int = 0) -> dict[str, Any]:
    H = torch.tensor([r["h"] for r in recs])
    V = torch.tensor([r["v"] for r in recs])
    z = torch.tensor([r["specificity"] for r in recs])
    correct = retrieval_correct(H, V, mu, n=40, groups=[r.get("source", "") for r in recs])
    settings = {"strategy": strategy, "k": k, "seed": seed, "texts": len(recs), "target_precision": target_precision,
                "correct": "1-in-40 retrieval among val texts, distractors from the same source first (20 random sets each)"}
    cal = fit_calibration(z, correct, target_precision, settings)
    log.info("calibration: %s", cal)
    return cal.__dict__


def card_dict(card_id: str, aliases: list[str], title: str, description: str, backbone: dict[str, Any], layer: int,
              av_folder: str, calibration: dict[str, Any] | None, default_strategy: str, extra: dict[str, Any],
              guided_beta: float = 1.0) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": card_id, "aliases": aliases, "kind": "patch", "title": title, "description": description, "license": "apache-2.0",
        "backbone": backbone, "layers": [layer], "av": {"folder": av_folder}, "mu_file": "mu.safetensors",
        "default_tau": calibration["tau"] if calibration else 0.6,
        "patch": {"pool_file": "pool.safetensors", "default_strategy": default_strategy, "guided_beta": guided_beta,
                  **({"calibration": calibration} if calibration else {})},
        "anchors": {}, "published": {}, **extra,  # extra (the card file's kept sections) may fill these
    }
    Card.from_dict(data, card_id)  # refuses a malformed card before it is written
    return data


def write_card(path: Path, data: dict[str, Any]) -> None:
    atomic_write_json(path, data)
    log.info("wrote card %s", path)


def read_card_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
