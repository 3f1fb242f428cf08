"""SFT of a prefix activation verbalizer: the "CE" recipe of the reference prefix AVs (SRT
``scripts/train_nla_sft.py``, https://github.com/space-bacon/SRT).

Objective
    Token cross-entropy of the gold ids under teacher forcing after the AV's prefix:
    ``inputs_embeds = cat[av.embeds(v), backbone.embed_tokens(gold)]``; the logits at positions
    ``P_tot−1 … −2`` predict ``gold`` (masked where gold is padding); logits are cast to float32.
    The backbone is frozen (no parameter has ``requires_grad``) but gradients flow *through* it to
    the float32 adapter. Gold ids are the target set's ``token_ids`` (no BOS; **with** the EOS when
    one was sampled — a deliberate deviation from the reference recipe, whose gold texts end without
    an EOS, so its AVs are never taught to stop and their rollouts run to the token limit),
    truncated to ``max_gold_len``.

Optimisation
    AdamW (weight decay 0), gradient clipping 1.0, constant LR (or cosine down to 10 %) after an
    optional linear warmup. Batch order (a permutation seeded ``seed + epoch`` per epoch), log
    rows, checkpoints and stops follow the conventions of :mod:`eval_harness.train.loop`.

Validation (checkpoint selection)
    ``val_bestof{K}_cen``: for each of the first ``val_vectors`` rows of the ``val`` split, K
    samples (T=1, top-p 1, a fixed generator seed per check, so checks are comparable) via
    :func:`nla_space.rollout.sample`, re-encoded by :func:`nla_space.reencode.reencode_ids`, scored
    with :func:`nla_space.scoring.fve_nrm_centered` against μ of the ``mu_pool`` split; the metric is
    the mean over targets of the best of the K centered scores. Also logged: the raw fve_nrm of
    that best candidate and the mean centered score of all samples. Names say "fve_nrm"/"cen";
    nothing here is the reference logs' "fve" (= raw cosine).
    ``val_ce_gain`` (:func:`ce_gain`): teacher-forced CE after a *shifted* v minus CE after the
    row's own v — the direct test that the AV reads v (a falling loss alone can come from the
    prefix learning the text distribution).

Output folder (:mod:`eval_harness.train.run_folder`: claim, resume, kill safety)
    ``log.jsonl`` (one row per logged step: step, epoch, loss, lr, elapsed_s, and val metrics on
    validation steps), ``best/`` (``config.json`` + ``av.safetensors`` via ``PrefixAV.save``, plus
    ``mu.safetensors`` and ``best.json``, written last), ``checkpoint/`` (``adapter.safetensors``,
    ``optimizer.pt`` — a tensors-and-numbers dict read back with ``weights_only=True`` —
    and ``state.json``, written last), ``train_config.json``, ``result.json``. SIGTERM/SIGINT save a
    checkpoint at the next step boundary and stop; ``--resume`` continues from it (:mod:`eval_harness.train.loop`).
"""

from __future__ import annotations

import logging
import math
import os  # noqa: F401  (the fault tests reach os.replace through this module)
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nla_space.activations import pad_rows
from nla_space.backbone import Backbone
from nla_space.errors import NLAInputError
from nla_space.hub import load_state_dict
from nla_space.io import atomic_write, atomic_write_json, save_tensors
from nla_space.reencode import reencode_ids
from nla_space.rollout import sample
from nla_space.scoring import fve_nrm, fve_nrm_centered
from nla_space.verbalizers import NLAConfig, PrefixAV, build_prefix_av
from nla_space.verbalizers.config import INJECT_NORMS

from ..data.dataset import TargetSet
from .loop import StopFlag as _StopFlag  # noqa: F401  (the name this module's SIGTERM handling had)
from .loop import SupervisedStep, epoch_schedule
from .run_folder import ADAPTER_FILE, BEST_RECORD, OPTIMIZER_FILE, STATE_FILE, RunFolder
from ..settings import resumable_settings, setting

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """The trainer's settings (``train`` generates its options from these fields)."""

    epochs: float = setting(3.0, resumable=True)
    lr: float = setting(3e-5)
    #: the projection(s) of v (``proj``, ``proj_extra``) train at ``lr × lr_proj_scale``: Adam moves every
    #: entry of the d×d identity-initialised matrix by ≈ lr per step, so at lr 1e-3 noise outgrows the
    #: identity within a few hundred steps (measured: ‖W − I‖₂ = 3.2 after 301 steps)
    lr_proj_scale: float = setting(1.0, "the v projection trains at lr × this (default 1; 0.1 keeps the identity init from drowning in noise)")
    #: everything else (the static prefix or prefix MLP, layer embeddings) trains at ``lr × lr_prefix_scale``;
    #: 0 freezes it, so every step must go through v (the centered, normalised v has no constant part for
    #: ``proj`` to turn into a generic prefix). Measured on SmolLM2: a prefix learning at 1e-3 or 3e-4 drives
    #: ``val_ce_gain`` from 0.10 at init to ≈ 0 within 50–100 steps (docs/training.md)
    lr_prefix_scale: float = setting(1.0, "the prefix trains at lr × this (default 1; 0 freezes it so training must use v)")
    batch_size: int = setting(16)
    num_prefix_tokens: int = setting(1)
    inject_norm: str = setting("none", "'embed': normalise v to the mean embedding-row norm before proj; 'center_embed': subtract "
                               "the targets' μ first (stored in the AV); default none, as the reference", choices=INJECT_NORMS)
    max_steps: int | None = setting(None, "overrides --epochs", resumable=True)
    warmup_steps: int = setting(0)
    schedule: str = setting("constant", "LR after warmup (cosine ends at 10 %%)", choices=("constant", "cosine"))
    grad_clip: float = setting(1.0, option=False)
    max_gold_len: int = setting(64)
    val_every: int = setting(500, resumable=True)
    val_vectors: int = setting(64, "val rows used per check")
    val_k: int = setting(8, "best-of-K for the val metric (default 8)")
    val_max_new_tokens: int | None = setting(None, option=False)  #: default: the target set's seq_len
    val_batch_rows: int = setting(128, "rollout rows per sampling call")
    #: val rows for ``val_ce_gain`` (teacher forcing only: cheap, so more rows than the rollouts)
    ce_val_rows: int = setting(128, "val rows for val_ce_gain (teacher-forced CE, own v vs shifted v)")
    seed: int = setting(0)


# ------------------------------------------------------------------------------------------- loss


def pad_gold(rows: list[list[int]], pad_id: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(B, T)`` gold ids and their 0/1 mask, each row truncated to ``max_len``."""
    rows = [r[:max_len] for r in rows]
    if any(len(r) == 0 for r in rows):
        raise ValueError("a gold row is empty")
    return pad_rows(rows, pad_id)


def sft_loss(av: PrefixAV, backbone: Backbone, v: torch.Tensor, gold: torch.Tensor, gold_mask: torch.Tensor) -> torch.Tensor:
    """Mean token CE of ``gold`` (B, T) under teacher forcing after ``av.embeds(v)``."""
    dev = backbone.device
    gold, gold_mask = gold.to(dev), gold_mask.to(dev)
    prefix = av.embeds(v.to(dev), backbone)
    p_tot = prefix.shape[1]
    with torch.no_grad():
        gold_emb = backbone.embed_tokens(gold)
    x = torch.cat([prefix, gold_emb], dim=1)
    attn = torch.cat([torch.ones(gold.shape[0], p_tot, dtype=torch.long, device=dev), gold_mask], dim=1)
    logits = backbone.model(inputs_embeds=x, attention_mask=attn, use_cache=False).logits
    pred = logits[:, p_tot - 1 : -1].float()
    ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), gold.reshape(-1), reduction="none").view_as(gold)
    m = gold_mask.float()
    return (ce * m).sum() / m.sum()


# ------------------------------------------------------------------------------------- validation


@torch.inference_mode()
def ce_gain(av: PrefixAV, backbone: Backbone, vectors: torch.Tensor, gold: list[list[int]], max_len: int, batch: int = 16) -> dict[str, float]:
    """Does the AV read v? Teacher-forced CE of each row's gold text after its own v, and after the
    next row's v (a cyclic shift, so every text is paired with another target); ``val_ce_gain`` =
    shifted − own, in nats per token. An AV that ignores v scores ≈ 0 however low its CE."""
    if vectors.shape[0] < 2:
        raise ValueError("ce_gain needs at least two rows")
    shifted = torch.roll(vectors, -1, dims=0)
    own, other, n = 0.0, 0.0, 0
    for i in range(0, vectors.shape[0], batch):
        ids, mask = pad_gold(gold[i : i + batch], backbone.pad_id, max_len)
        w = float(mask.sum())
        own += float(sft_loss(av, backbone, vectors[i : i + batch], ids, mask)) * w
        other += float(sft_loss(av, backbone, shifted[i : i + batch], ids, mask)) * w
        n += w
    return {"val_ce": own / n, "val_ce_shifted": other / n, "val_ce_gain": (other - own) / n}


@torch.inference_mode()
def validate(av: PrefixAV, backbone: Backbone, layer: int, vectors: torch.Tensor, mu: torch.Tensor, k: int, max_new_tokens: int, seed: int, batch_rows: int = 64) -> dict[str, float]:
    """Best-of-K centered fve_nrm of the AV on ``vectors`` (N, d); see the module docstring."""
    was_training = av.training
    av.eval()
    dev = backbone.device
    per_call = max(1, batch_rows // k)
    best_cen, best_raw, mean_cen = [], [], []
    gen = torch.Generator(device=dev).manual_seed(seed)
    for i in range(0, vectors.shape[0], per_call):
        v = vectors[i : i + per_call].to(dev).float()
        vv = v.repeat_interleave(k, dim=0)
        roll = sample(backbone, av.embeds(vv, backbone), max_new_tokens, temperature=1.0, top_p=1.0, generator=gen)
        h = reencode_ids(backbone, layer, roll.ids, roll.mask)
        cen = fve_nrm_centered(h, vv, mu.to(dev)[None]).view(-1, k)
        raw = fve_nrm(h, vv).view(-1, k)
        j = cen.argmax(dim=1)
        rows = torch.arange(cen.shape[0])
        best_cen += cen[rows, j].tolist()
        best_raw += raw[rows, j].tolist()
        mean_cen += cen.mean(dim=1).tolist()
    av.train(was_training)
    n = len(best_cen)
    return {
        f"val_bestof{k}_cen": sum(best_cen) / n,
        f"val_bestof{k}_raw_of_best": sum(best_raw) / n,
        "val_sample_mean_cen": sum(mean_cen) / n,
        "val_n": n,
    }


# ------------------------------------------------------------------------------------------ train


def _lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, total - cfg.warmup_steps)
        frac = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))
    return cfg.lr


def train(backbone: Backbone, targets: TargetSet, out: Path, cfg: TrainConfig, layer: int | None = None, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) an AV on ``targets``; returns the final state (best metric, steps, times)."""
    layer = targets.layer if layer is None else layer
    if layer != targets.layer:
        raise NLAInputError(f"--layer {layer} differs from the target set's layer {targets.layer}")
    train_idx, val_idx = targets.indices("train"), targets.indices("val")[: cfg.val_vectors]
    if not train_idx:
        raise NLAInputError(f"{targets.folder}: the train split is empty")
    for name in ("lr_proj_scale", "lr_prefix_scale"):
        if not getattr(cfg, name) >= 0:
            raise NLAInputError(f"--{name.replace('_', '-')} must be ≥ 0, got {getattr(cfg, name)}")
    if cfg.schedule not in ("constant", "cosine"):
        raise NLAInputError(f"unknown LR schedule {cfg.schedule!r}")
    if not val_idx:
        raise NLAInputError(f"{targets.folder}: the val split is empty")
    if targets.vectors.shape[1] != backbone.hidden_size:
        raise NLAInputError(f"targets have d={targets.vectors.shape[1]}, the backbone d={backbone.hidden_size}")
    run = RunFolder(out, "train", resume=resume, best_marker=BEST_RECORD)
    mu = targets.mu()
    seq_len = int(targets.meta.get("seq_len", cfg.max_gold_len))
    val_tokens = cfg.val_max_new_tokens or seq_len
    torch.manual_seed(cfg.seed)

    ncfg = NLAConfig(
        backbone_id=backbone.spec,
        backbone_dtype=str(backbone.dtype).replace("torch.", ""),
        extraction_layer=layer,
        max_new_tokens=val_tokens,
        num_prefix_tokens=cfg.num_prefix_tokens,
        inject_norm=cfg.inject_norm,
    )
    av = build_prefix_av(ncfg, backbone, mu=mu if cfg.inject_norm == "center_embed" else None)
    av.train()
    proj = [p for n, p in av.named_parameters() if n.startswith(("proj.", "proj_extra."))]
    rest = [p for n, p in av.named_parameters() if not n.startswith(("proj.", "proj_extra."))]
    groups = [{"params": proj, "lr_scale": cfg.lr_proj_scale}] + ([{"params": rest, "lr_scale": cfg.lr_prefix_scale}] if rest else [])
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    spe, total = epoch_schedule(len(train_idx), cfg.batch_size, cfg.epochs, cfg.max_steps)
    vkey = f"val_bestof{cfg.val_k}_cen"

    def load(folder: Path) -> None:
        av.load_state_dict({k: t.float() for k, t in load_state_dict(folder / ADAPTER_FILE).items()}, strict=True)
        opt.load_state_dict(torch.load(folder / OPTIMIZER_FILE, map_location=av.proj.weight.device, weights_only=True))

    state = run.start({
        "targets": str(targets.folder), "backbone": backbone.spec, "layer": layer, **asdict(cfg),
        "steps_per_epoch": spe, "total_steps": total, "n_train": len(train_idx), "n_val_used": len(val_idx),
        "val_metric": vkey, "nla_config": ncfg.to_dict(),
    }, load, may_change=resumable_settings(TrainConfig) | {"total_steps"})

    def write_checkpoint(folder: Path) -> None:
        save_tensors(folder / ADAPTER_FILE, av.adapter_state())
        atomic_write(folder / OPTIMIZER_FILE, lambda tmp: torch.save(opt.state_dict(), tmp))
        atomic_write_json(folder / STATE_FILE, state)

    val_v = targets.vectors[val_idx]
    ce_idx = targets.indices("val")[: max(2, cfg.ce_val_rows)]
    ce_v, ce_gold = targets.vectors[ce_idx], [targets.token_ids[i] for i in ce_idx]

    def evaluate(step: int) -> dict[str, Any]:
        res: dict[str, Any] = validate(av, backbone, layer, val_v, mu, cfg.val_k, val_tokens, cfg.seed, cfg.val_batch_rows)
        was_training = av.training
        av.eval()
        res.update({k: round(x, 5) for k, x in ce_gain(av, backbone, ce_v, ce_gold, cfg.max_gold_len).items()})
        av.train(was_training)
        return res

    def write_best(folder: Path, step: int, res: dict[str, Any]) -> None:
        av.save(folder)
        save_tensors(folder / "mu.safetensors", {"mu": mu})
        atomic_write_json(folder / BEST_RECORD, {"step": step, **res, "targets": str(targets.folder)})

    def loss_fn(rows: list[int], step: int) -> torch.Tensor:
        gold, gmask = pad_gold([targets.token_ids[r] for r in rows], backbone.pad_id, cfg.max_gold_len)
        return sft_loss(av, backbone, targets.vectors[rows], gold, gmask)

    def units(rows: list[int]) -> float:  # the loss is a mean over gold tokens
        return float(pad_gold([targets.token_ids[r] for r in rows], backbone.pad_id, cfg.max_gold_len)[1].sum())

    sgd = SupervisedStep(train_idx, cfg.batch_size, cfg.seed, opt, av.parameters(), cfg.grad_clip, loss_fn, lambda s: _lr_at(cfg, s, total),
                         units=units)
    return run.loop(total=total, eval_every=cfg.val_every, desc="train", step=sgd,
                    validate=run.validation(evaluate, vkey, higher_is_better=True, write_best=write_best),
                    write_checkpoint=write_checkpoint, postfix=sgd.postfix(state, best_fmt=".4f"),
                    first_row={"epoch": 0.0, "loss": None, "lr": 0.0})
