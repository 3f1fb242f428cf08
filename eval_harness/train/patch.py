"""Train a patch AV (:mod:`nla_space.verbalizers.patch`) with token CE on natural text windows.

Data: a text corpus (:mod:`eval_harness.data.text_corpus`), ``train`` split for steps, the first
``val_rows`` of ``val`` for validation. No target vectors are stored: ``v`` of a text is its
layer-ℓ state at its last token, read from the same forward that computes the loss.

Several layers (``--layer 3 5 7 …``, one adapter; :class:`~nla_space.verbalizers.patch.PatchSpec`)
    Step ``s`` writes ``v`` at layer ``layers[s mod n]`` (the whole batch at one layer; the LoRA on
    for blocks ≥ that layer), so a resumed run sees the same layers. Validation reports the
    metrics below per layer (``val_ce_L5`` …) and, unsuffixed, their mean over the layers, which
    chooses ``best/``. ``--init-from`` starts the LoRA from a trained patch AV folder of the same
    ``r``/modules whose blocks are a subset (e.g. a layer-13 AV warm-starting blocks 13 … N−1).

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

    layer: tuple[int, ...] = setting(help="the layer(s) the AV reads: 13, or 3 5 7 9 11 13 15 for one adapter over several", many=True)
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
    init_from: str | None = setting(None, help="a patch AV folder to start the LoRA from (its blocks a subset of these)")

    def __post_init__(self) -> None:
        layers = (self.layer,) if isinstance(self.layer, int) else self.layer
        self.layer = tuple(sorted(set(int(x) for x in layers)))
        if not self.layer:
            raise NLAInputError("--layer: give at least one layer")

    @property
    def layers(self) -> tuple[int, ...]:
        return self.layer

    def spec(self) -> PatchSpec:
        return PatchSpec(layer=self.layers[0], layers=list(self.layers) if len(self.layers) > 1 else None, r=self.r,
                         alpha=self.alpha, max_text_tokens=self.max_text_tokens)

    def layer_at(self, step: int) -> int:
        """The layer step ``step`` (0-based) writes ``v`` at."""
        return self.layers[step % len(self.layers)]


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


def val_ce_layers(backbone: Backbone, patches: dict[int, ResidualPatch], rows: list[list[int]], batch: int) -> dict[str, float]:
    """:func:`val_ce` at each layer; one layer gives its metrics unsuffixed, several give them per
    layer (``_L{ℓ}``) and their mean unsuffixed."""
    if len(patches) == 1:
        return val_ce(backbone, next(iter(patches.values())), rows, batch)
    per = {ell: val_ce(backbone, p, rows, batch) for ell, p in patches.items()}
    out: dict[str, float] = {}
    for key in ("val_ce", "val_ce_shuffled", "val_ce_gain"):
        out[key] = round(sum(r[key] for r in per.values()) / len(per), 5)
        out.update({f"{key}_L{ell}": r[key] for ell, r in per.items()})
    return out


def init_lora_from(pm: Any, folder: Path) -> int:
    """Copy the adapter weights of the patch AV in ``folder`` into ``pm``'s matching tensors;
    returns how many were copied (refuses a folder with tensors ``pm`` lacks, or of other shapes)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    files = list(folder.glob("adapter_model.safetensors"))
    if not files:
        raise NLAInputError(f"--init-from {folder}: no adapter_model.safetensors")
    src = load_file(str(files[0]))
    own = get_peft_model_state_dict(pm)
    extra = sorted(set(src) - set(own))
    bad = sorted(k for k in src if k in own and own[k].shape != src[k].shape)
    if extra or bad:
        raise NLAInputError(f"--init-from {folder}: its adapter does not fit this one (missing here: {extra[:3]}, other shapes: {bad[:3]})")
    set_peft_model_state_dict(pm, {**{k: v.detach().clone() for k, v in own.items()}, **src})
    return len(src)


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
    patches = {ell: ResidualPatch(backbone, ell) for ell in cfg.layers}
    train_rows = [r for r in text_rows(backbone, [x["text"] for x in read_corpus(corpus, "train")], cfg.max_text_tokens) if r]
    val_rows = [r for r in text_rows(backbone, [x["text"] for x in read_corpus(corpus, "val")], cfg.max_text_tokens) if r][: cfg.val_rows]
    if len(train_rows) < cfg.batch_size or len(val_rows) < 2:
        raise NLAInputError(f"{corpus}: {len(train_rows)} train and {len(val_rows)} val rows; need ≥ {cfg.batch_size} and ≥ 2")
    torch.manual_seed(cfg.seed)
    pm = attach(backbone, spec, trainable=True)
    if cfg.init_from:
        log.info("LoRA initialised from %s (%d tensors)", cfg.init_from, init_lora_from(pm, Path(cfg.init_from)))
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    state = run.start({"corpus": str(corpus), "backbone": backbone.spec, **asdict(cfg), "n_train_rows": len(train_rows),
                       "n_val_rows": len(val_rows), "trainable_params": sum(p.numel() for p in params)},
                      lambda folder: load_lora_checkpoint(folder, pm, opt), may_change=resumable_settings(PatchTrainConfig))

    def evaluate(step: int) -> dict[str, Any]:
        pm.eval()
        res: dict[str, Any] = val_ce_layers(backbone, patches, val_rows, cfg.batch_size)
        pm.train()
        return res

    def write_best(folder: Path, step: int, res: dict[str, Any]) -> None:
        write_av_folder(folder, pm, spec, {BEST_RECORD: {"step": step, **res, "corpus": str(corpus)}})

    pm.train()
    sgd = SupervisedStep(train_rows, cfg.batch_size, cfg.seed, opt, params, cfg.grad_clip,
                         lambda batch, step: token_ce(backbone, patches[cfg.layer_at(step)], batch), lambda s: lr_at(cfg, s),
                         units=lambda batch: sum(len(r) + 1 for r in batch))  # the loss is a mean over text + EOS tokens
    return run.loop(total=cfg.steps, eval_every=cfg.eval_every, desc="train-patch", step=sgd,
                    validate=run.validation(evaluate, "val_ce", higher_is_better=False, write_best=write_best),
                    write_checkpoint=lambda folder: write_lora_checkpoint(folder, pm, opt, state),
                    postfix=sgd.postfix(state), first_row={"epoch": 0.0, "loss": None, "lr": 0.0})
