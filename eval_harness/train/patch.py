"""Train a patch AV (:mod:`nla_space.verbalizers.patch`) with token CE on natural text windows.

Data: a text corpus (:mod:`eval_harness.data.text_corpus`), ``train`` split for steps, the first
``val_rows`` of ``val`` for validation. No target vectors are stored: ``v`` of a text is its
layer-ℓ state at its last token, read from the same forward that computes the loss.

Validation (every ``eval_every`` steps, and step 0 before any training)
    ``val_ce``: CE (nats/token) of ``text + [EOS]`` given its own ``v``; ``val_ce_shuffled``: the
    same rows given another row's ``v`` (row b gets row b+1's); ``val_ce_gain`` = shuffled − own,
    the part of the CE that ``v`` explains: 0 for an AV that ignores ``v``. The best step by
    ``val_ce`` is kept in ``best/`` (a loadable AV folder: PEFT adapter + ``patch_av.json``).

Steps, logs, checkpoints, stops and resumes follow :mod:`eval_harness.train.loop`; the run folder
(claim, resume, the checkpoint and ``best/`` each swapped in whole) is :mod:`eval_harness.train.run_folder`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from nla_space.backbone import Backbone
from nla_space.errors import NLAInputError
from nla_space.io import atomic_write_json
from nla_space.verbalizers.patch import SPEC_FILE, PatchSpec, ResidualPatch, attach, text_rows, token_ce

from .loop import SupervisedStep
from .run_folder import BEST_RECORD, RunFolder
from ..data.text_corpus import read_corpus
from .common import load_lora_checkpoint, write_lora_checkpoint
from ..settings import resumable_settings, setting

log = logging.getLogger(__name__)


@dataclass
class PatchTrainConfig:
    """The trainer's settings (``train-patch`` generates its options from these fields)."""

    layer: int
    steps: int = setting(3000, resumable=True)
    batch_size: int = 16
    lr: float = 3e-4
    warmup_steps: int = 50
    grad_clip: float = 1.0
    eval_every: int = setting(100, resumable=True)
    val_rows: int = 128
    r: int = 16
    alpha: int = 32
    max_text_tokens: int = 64
    seed: int = 0

    def spec(self) -> PatchSpec:
        return PatchSpec(layer=self.layer, r=self.r, alpha=self.alpha, max_text_tokens=self.max_text_tokens)


def lr_at(cfg: PatchTrainConfig, step: int) -> float:
    """Linear warm-up, then cosine to 10 % of ``lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


@torch.no_grad()
def val_ce(backbone: Backbone, patch: ResidualPatch, rows: list[list[int]], batch: int) -> dict[str, float]:
    own = shuf = 0.0
    n = 0
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        if len(chunk) < 2:
            break
        perm = torch.roll(torch.arange(len(chunk)), 1)
        own += float(token_ce(backbone, patch, chunk)) * len(chunk)
        shuf += float(token_ce(backbone, patch, chunk, shuffle=perm)) * len(chunk)
        n += len(chunk)
    own, shuf = own / max(n, 1), shuf / max(n, 1)
    return {"val_ce": round(own, 5), "val_ce_shuffled": round(shuf, 5), "val_ce_gain": round(shuf - own, 5)}


def write_av_folder(folder: Path, pm: Any, spec: PatchSpec, extra: dict[str, Any]) -> None:
    """A loadable patch AV folder: PEFT adapter, JSON extras, ``patch_av.json`` last (its marker)."""
    pm.save_pretrained(str(folder))
    for name, data in extra.items():
        atomic_write_json(folder / name, data)
    atomic_write_json(folder / SPEC_FILE, spec.to_dict())


def train_patch(backbone: Backbone, corpus: Path, out: Path, cfg: PatchTrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) a patch AV on ``backbone`` (a private copy: the LoRA is attached in place)."""
    run = RunFolder(out, "train-patch", resume=resume, best_marker=SPEC_FILE)
    spec = cfg.spec()
    patch = ResidualPatch(backbone, cfg.layer)
    train_rows = [r for r in text_rows(backbone, [x["text"] for x in read_corpus(corpus, "train")], cfg.max_text_tokens) if r]
    val_rows = [r for r in text_rows(backbone, [x["text"] for x in read_corpus(corpus, "val")], cfg.max_text_tokens) if r][: cfg.val_rows]
    if len(train_rows) < cfg.batch_size or len(val_rows) < 2:
        raise NLAInputError(f"{corpus}: {len(train_rows)} train and {len(val_rows)} val rows; need ≥ {cfg.batch_size} and ≥ 2")
    torch.manual_seed(cfg.seed)
    pm = attach(backbone, spec, trainable=True)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    state = run.start({"corpus": str(corpus), "backbone": backbone.spec, **asdict(cfg), "n_train_rows": len(train_rows),
                       "n_val_rows": len(val_rows), "trainable_params": sum(p.numel() for p in params)},
                      lambda folder: load_lora_checkpoint(folder, pm, opt), may_change=resumable_settings(PatchTrainConfig))

    def evaluate(step: int) -> dict[str, Any]:
        pm.eval()
        res: dict[str, Any] = val_ce(backbone, patch, val_rows, cfg.batch_size)
        pm.train()
        return res

    def write_best(folder: Path, step: int, res: dict[str, Any]) -> None:
        write_av_folder(folder, pm, spec, {BEST_RECORD: {"step": step, **res, "corpus": str(corpus)}})

    pm.train()
    sgd = SupervisedStep(train_rows, cfg.batch_size, cfg.seed, opt, params, cfg.grad_clip,
                         lambda batch: token_ce(backbone, patch, batch), lambda s: lr_at(cfg, s))
    return run.loop(total=cfg.steps, eval_every=cfg.eval_every, desc="train-patch", step=sgd,
                    validate=run.validation(evaluate, "val_ce", higher_is_better=False, write_best=write_best),
                    write_checkpoint=lambda folder: write_lora_checkpoint(folder, pm, opt, state),
                    postfix=sgd.postfix(state), first_row={"epoch": 0.0, "loss": None, "lr": 0.0})
