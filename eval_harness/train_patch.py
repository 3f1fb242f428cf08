"""Train a patch AV (:mod:`nla_space.verbalizers.patch`) with token CE on natural text windows.

Data: a text corpus (:mod:`eval_harness.text_corpus`), ``train`` split for steps, the first
``val_rows`` of ``val`` for validation. No target vectors are stored: ``v`` of a text is its
layer-ℓ state at its last token, read from the same forward that computes the loss.

Validation (every ``eval_every`` steps, and step 0 before any training)
    ``val_ce``: CE (nats/token) of ``text + [EOS]`` given its own ``v``; ``val_ce_shuffled``: the
    same rows given another row's ``v`` (row b gets row b+1's); ``val_ce_gain`` = shuffled − own,
    the part of the CE that ``v`` explains: 0 for an AV that ignores ``v``. The best step by
    ``val_ce`` is kept in ``best/`` (a loadable AV folder: PEFT adapter + ``patch_av.json``).

Steps, logs, checkpoints, stops and resumes follow :mod:`eval_harness.loop`; the checkpoint and
``best/`` are each swapped in whole (a kill leaves the old or the new one, never a mix).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from nla_space.backbone import Backbone
from nla_space.errors import NLAInputError
from nla_space.hub import load_state_dict
from nla_space.io import atomic_write, atomic_write_json, save_tensors
from nla_space.verbalizers.patch import SPEC_FILE, PatchSpec, ResidualPatch, attach, text_rows, token_ce

from .loop import LoopSettings, SupervisedStep, append_log, claim_out, start_clock, trim_log
from .loop import run_steps
from .text_corpus import read_corpus
from .train import _complete_swapped, _recover_swapped, _write_swapped

log = logging.getLogger(__name__)


@dataclass
class PatchTrainConfig:
    """The trainer's settings (``train-patch`` generates its options from these fields)."""

    layer: int
    steps: int = 3000
    batch_size: int = 16
    lr: float = 3e-4
    warmup_steps: int = 50
    grad_clip: float = 1.0
    eval_every: int = 100
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


def save_av_folder(folder: Path, pm: Any, spec: PatchSpec, extra: dict[str, Any]) -> None:
    """A loadable patch AV folder, swapped in whole: PEFT adapter, ``patch_av.json``, JSON extras."""
    def write(new: Path) -> None:
        pm.save_pretrained(str(new))
        for name, data in extra.items():
            atomic_write_json(new / name, data)
        atomic_write_json(new / SPEC_FILE, spec.to_dict())  # last: marks a complete folder

    _write_swapped(folder, write)


def _lora_state(pm: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(pm).items()}


def save_checkpoint(folder: Path, pm: Any, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    def write(new: Path) -> None:
        save_tensors(new / "adapter.safetensors", _lora_state(pm))
        atomic_write(new / "optimizer.pt", lambda tmp: torch.save(opt.state_dict(), tmp))
        atomic_write_json(new / "state.json", state)

    _write_swapped(folder, write)


def load_checkpoint(folder: Path, pm: Any, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from peft import set_peft_model_state_dict

    found = _complete_swapped(folder, "state.json")
    if found is None:
        raise NLAInputError(f"--resume: no checkpoint in {folder}")
    set_peft_model_state_dict(pm, load_state_dict(found / "adapter.safetensors"))
    opt.load_state_dict(torch.load(found / "optimizer.pt", map_location="cpu", weights_only=True))
    return json.loads((found / "state.json").read_text(encoding="utf-8"))


def train_patch(backbone: Backbone, corpus: Path, out: Path, cfg: PatchTrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) a patch AV on ``backbone`` (a private copy: the LoRA is attached in place)."""
    out = Path(out)
    log_path = claim_out(out, resume)
    for name in ("checkpoint", "best"):
        _recover_swapped(out / name, "state.json" if name == "checkpoint" else SPEC_FILE)
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
    state: dict[str, Any] = {"step": 0, "best": None, "best_step": None, "elapsed_s": 0.0}
    if resume and (_complete_swapped(out / "checkpoint", "state.json") is not None):
        state = load_checkpoint(out / "checkpoint", pm, opt)
        trim_log(log_path, state["step"])
        log.info("resumed at step %d", state["step"])
    atomic_write_json(out / "train_config.json", {"corpus": str(corpus), "backbone": backbone.spec, **asdict(cfg),
                                                 "n_train_rows": len(train_rows), "n_val_rows": len(val_rows),
                                                 "trainable_params": sum(p.numel() for p in params)})

    def run_val(step: int) -> dict[str, float]:
        t = time.perf_counter()
        pm.eval()
        res = val_ce(backbone, patch, val_rows, cfg.batch_size)
        pm.train()
        res["val_s"] = round(time.perf_counter() - t, 2)
        if state["best"] is None or res["val_ce"] < state["best"]:
            state["best"], state["best_step"] = res["val_ce"], step
            save_av_folder(out / "best", pm, spec, {"best.json": {"step": step, **res, "corpus": str(corpus)}})
        return res

    t0 = start_clock(state)
    if state["step"] == 0:
        append_log(log_path, {"step": 0, "epoch": 0.0, "loss": None, "lr": 0.0, "elapsed_s": 0.0, **run_val(0)})
    pm.train()
    sgd = SupervisedStep(train_rows, cfg.batch_size, cfg.seed, opt, params, cfg.grad_clip,
                         lambda batch: token_ce(backbone, patch, batch), lambda s: lr_at(cfg, s))
    return run_steps(LoopSettings(out, cfg.steps, cfg.eval_every, "train-patch"), state, t0, sgd, run_val,
                     lambda: save_checkpoint(out / "checkpoint", pm, opt, state), sgd.postfix(state))
