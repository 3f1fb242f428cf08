"""SFT of a prefix activation verbalizer (the reference "CE" recipe, ``srt.md`` §5).

Objective
    Token cross-entropy of the gold ids under teacher forcing after the AV's prefix:
    ``inputs_embeds = cat[av.embeds(v), backbone.embed_tokens(gold)]``; the logits at positions
    ``P_tot−1 … −2`` predict ``gold`` (masked where gold is padding); logits are cast to float32.
    The backbone is frozen (no parameter has ``requires_grad``) but gradients flow *through* it to
    the float32 adapter. Gold ids are the target set's ``token_ids`` (no BOS; **with** the EOS when
    one was sampled — a deliberate deviation from the reference, whose gold had no EOS so its AV
    never learned to stop, ``srt.md`` §7.6), truncated to ``max_gold_len``.

Optimisation
    AdamW (weight decay 0), gradient clipping 1.0, constant LR (or cosine down to 10 %) after an
    optional linear warmup. Batch order (a permutation seeded ``seed + epoch`` per epoch), log
    rows, checkpoints and stops follow the conventions of :mod:`eval_harness.loop`.

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

Output folder
    ``log.jsonl`` (one row per logged step: step, epoch, loss, lr, elapsed_s, and val metrics on
    validation steps), ``best/`` (``config.json`` + ``av.safetensors`` via ``PrefixAV.save``, plus
    ``mu.safetensors`` and ``best.json``), ``checkpoint/`` (``adapter.safetensors``,
    ``optimizer.pt`` — a tensors-and-numbers dict read back with ``weights_only=True`` —
    and ``state.json`` written last), ``train_config.json``, ``result.json``. SIGTERM/SIGINT save a
    checkpoint at the next step boundary and stop; ``--resume`` continues from it (:mod:`eval_harness.loop`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nla_space.backbone import Backbone
from nla_space.errors import NLAInputError
from nla_space.hub import load_state_dict
from nla_space.io import atomic_write, atomic_write_json, save_tensors
from nla_space.reencode import reencode_ids
from nla_space.rollout import sample
from nla_space.scoring import fve_nrm, fve_nrm_centered
from nla_space.verbalizers import NLAConfig, PrefixAV, build_prefix_av

from .dataset import TargetSet
from .loop import StopFlag as _StopFlag  # noqa: F401  (the name this module's SIGTERM handling had)
from .loop import LoopSettings, SupervisedStep, append_log, claim_out, epoch_schedule, run_steps, start_clock, trim_log

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: float = 3.0
    lr: float = 3e-5
    #: the projection(s) of v (``proj``, ``proj_extra``) train at ``lr × lr_proj_scale``: Adam moves every
    #: entry of the d×d identity-initialised matrix by ≈ lr per step, so at lr 1e-3 noise outgrows the
    #: identity within a few hundred steps (measured: ‖W − I‖₂ = 3.2 after 301 steps)
    lr_proj_scale: float = 1.0
    #: everything else (the static prefix or prefix MLP, layer embeddings) trains at ``lr × lr_prefix_scale``;
    #: 0 freezes it, so every step must go through v (the centered, normalised v has no constant part for
    #: ``proj`` to turn into a generic prefix). Measured on SmolLM2: a prefix learning at 1e-3 or 3e-4 drives
    #: ``val_ce_gain`` from 0.10 at init to ≈ 0 within 50–100 steps (docs/training.md)
    lr_prefix_scale: float = 1.0
    batch_size: int = 16
    num_prefix_tokens: int = 1
    inject_norm: str = "none"  #: see :data:`nla_space.verbalizers.config.INJECT_NORMS`
    max_steps: int | None = None
    warmup_steps: int = 0
    schedule: str = "constant"  #: "constant" or "cosine" (to 10 % of lr at the last step)
    grad_clip: float = 1.0
    max_gold_len: int = 64
    val_every: int = 500
    val_vectors: int = 64
    val_k: int = 8
    val_max_new_tokens: int | None = None  #: default: the target set's seq_len
    val_batch_rows: int = 128
    ce_val_rows: int = 128  #: val rows for ``val_ce_gain`` (teacher forcing only: cheap, so more rows than the rollouts)
    seed: int = 0


# ------------------------------------------------------------------------------------------- loss


def pad_gold(rows: list[list[int]], pad_id: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(B, T)`` gold ids and their 0/1 mask, each row truncated to ``max_len``."""
    rows = [r[:max_len] for r in rows]
    if any(len(r) == 0 for r in rows):
        raise ValueError("a gold row is empty")
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


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


# ------------------------------------------------------------------------------------ checkpoints


def _write_swapped(folder: Path, write: Any) -> None:
    """Fill ``<folder>.new`` with ``write(new)`` (which writes its marker file last), then swap it in
    for ``folder``: a kill at any instant leaves ``folder`` either all old or all new (or, between the
    two renames, absent with a complete ``.new`` beside it; see :func:`_recover_swapped`)."""
    folder = Path(folder)
    new, old = folder.with_name(folder.name + ".new"), folder.with_name(folder.name + ".old")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    write(new)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def _complete_swapped(folder: Path, marker: str) -> Path | None:
    """The newest complete copy among ``folder.new``, ``folder`` and ``folder.old`` (see :func:`_write_swapped`)."""
    for cand in (folder.with_name(folder.name + ".new"), folder, folder.with_name(folder.name + ".old")):
        if (cand / marker).is_file():
            return cand
    return None


def _recover_swapped(folder: Path, marker: str) -> None:
    """Finish a swap a kill interrupted: put the newest complete copy in place as ``folder``."""
    found = _complete_swapped(folder, marker)
    if found is not None and found != folder:
        log.warning("recovering %s from %s (the run was killed while saving it)", folder, found)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(found, folder)


def save_checkpoint(folder: Path, av: PrefixAV, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Adapter, optimizer and ``state.json`` (last), swapped in together: a kill at any instant leaves
    one complete checkpoint whose three files belong to the same step."""
    def write(new: Path) -> None:
        save_tensors(new / "adapter.safetensors", av.adapter_state())
        atomic_write(new / "optimizer.pt", lambda tmp: torch.save(opt.state_dict(), tmp))
        atomic_write_json(new / "state.json", state)  # last: marks a complete checkpoint

    _write_swapped(folder, write)


def _complete_checkpoint(folder: Path) -> Path | None:
    return _complete_swapped(folder, "state.json")


def load_checkpoint(folder: Path, av: PrefixAV, opt: torch.optim.Optimizer) -> dict[str, Any]:
    folder = Path(folder)
    found = _complete_checkpoint(folder)
    if found is None:
        raise NLAInputError(f"--resume: no checkpoint in {folder}")
    if found != folder:
        log.warning("resuming from %s (the run was killed while saving its checkpoint)", found)
    folder = found
    av.load_state_dict({k: t.float() for k, t in load_state_dict(folder / "adapter.safetensors").items()}, strict=True)
    opt.load_state_dict(torch.load(folder / "optimizer.pt", map_location=av.proj.weight.device, weights_only=True))
    return json.loads((folder / "state.json").read_text(encoding="utf-8"))


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
    out = Path(out)
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
    log_path = out / "log.jsonl"

    state: dict[str, Any] = {"step": 0, "best": None, "best_step": None, "elapsed_s": 0.0}
    if resume:
        state = load_checkpoint(out / "checkpoint", av, opt)
        _recover_swapped(out / "best", "best.json")
        trim_log(log_path, state["step"])
        log.info("resumed at step %d (best %s at %s)", state["step"], state["best"], state["best_step"])
    else:
        claim_out(out, resume=False)
    atomic_write_json(out / "train_config.json", {
        "targets": str(targets.folder), "backbone": backbone.spec, "layer": layer, **asdict(cfg),
        "steps_per_epoch": spe, "total_steps": total, "n_train": len(train_idx), "n_val_used": len(val_idx),
        "val_metric": vkey, "nla_config": ncfg.to_dict(),
    })
    val_v = targets.vectors[val_idx]
    ce_idx = targets.indices("val")[: max(2, cfg.ce_val_rows)]
    ce_v, ce_gold = targets.vectors[ce_idx], [targets.token_ids[i] for i in ce_idx]

    def run_val(step: int) -> dict[str, float]:
        t = time.perf_counter()
        res = validate(av, backbone, layer, val_v, mu, cfg.val_k, val_tokens, cfg.seed, cfg.val_batch_rows)
        was_training = av.training
        av.eval()
        res.update({k: round(x, 5) for k, x in ce_gain(av, backbone, ce_v, ce_gold, cfg.max_gold_len).items()})
        av.train(was_training)
        res["val_s"] = round(time.perf_counter() - t, 2)
        if state["best"] is None or res[vkey] > state["best"]:
            state["best"], state["best_step"] = res[vkey], step
            def write_best(new: Path) -> None:  # one unit: the weights never sit beside another step's best.json
                av.save(new)
                save_tensors(new / "mu.safetensors", {"mu": mu})
                atomic_write_json(new / "best.json", {"step": step, **res, "targets": str(targets.folder)})

            _write_swapped(out / "best", write_best)
            log.info("step %d: new best %s = %.4f", step, vkey, res[vkey])
        return res

    t0 = start_clock(state)
    if state["step"] == 0 and not resume:
        res = run_val(0)
        append_log(log_path, {"step": 0, "epoch": 0.0, "loss": None, "lr": 0.0, "elapsed_s": round(time.perf_counter() - t0, 2), **res})

    def loss_fn(rows: list[int]) -> torch.Tensor:
        gold, gmask = pad_gold([targets.token_ids[r] for r in rows], backbone.pad_id, cfg.max_gold_len)
        return sft_loss(av, backbone, targets.vectors[rows], gold, gmask)

    sgd = SupervisedStep(train_idx, cfg.batch_size, cfg.seed, opt, av.parameters(), cfg.grad_clip, loss_fn, lambda s: _lr_at(cfg, s, total))
    return run_steps(LoopSettings(out, total, cfg.val_every, "train"), state, t0, sgd, run_val,
                     lambda: save_checkpoint(out / "checkpoint", av, opt, state), sgd.postfix(state, best_fmt=".4f"))

