"""Training of an activation reconstructor (AR: description → activation at a depth), kind ``lora_heads``.

Model
    The backbone with a PEFT LoRA adapter plus one ``Linear(d, d, bias=False)`` head per layer,
    initialised to the identity (as Anthropic's AR value head is, in
    https://github.com/kitft/natural_language_autoencoders), kept in float32. The
    forward is :meth:`nla_space.reconstructors.Reconstructor.forward_hidden`, the card loader's own, with
    the template card's AR layout (:func:`eval_harness.data.injection_targets.trained_ar_section`: its template,
    special tokens, left padding, ≤ ``max_tokens`` keeping the suffix; blocks ``0..K`` with identity
    final norm, read at the last real token), then ``pred = h @ Wᵀ``.
Loss
    Anthropic's normalized MSE :func:`nla_space.reconstructors.nrm_mse` (both vectors scaled to
    √d: ``2(1 − cos)``), mean over the batch.
Data
    ``(description_i, ℓ, v_iℓ)`` for every text of the ``ar_sft`` split at every layer.
Evaluation (checkpoint selection)
    On the ``heldout`` split (first ``eval_texts`` texts, every layer): the centered cosine
    ``cos(pred − μ_ℓ, v − μ_ℓ)`` with the target set's μ (non-held-out mean), its per-layer means,
    the raw cosine, and retrieval top-1 (the true text has the highest centered cosine among the
    evaluated texts at that layer; chance = 1/n). ``best/`` keeps the highest mean centered cosine.
Output
    ``best/``: ``adapter_config.json`` + ``adapter_model.safetensors``, ``value_heads.safetensors``
    (keys = block index ``str(K)``, the layout :func:`nla_space.reconstructors.open_reconstructor`
    reads for ``lora_heads``), ``mu_L{ℓ}.safetensors`` (``{"mu"}``, for a card's ``mu_file``),
    ``nla_meta.yaml`` (role ar), ``best.json`` last; ``checkpoint/``: the LoRA checkpoint of
    :mod:`eval_harness.train.common` plus ``heads.safetensors``; ``log.jsonl`` and stops as
    :mod:`eval_harness.train.loop` describes; claim, resume and kill safety as :mod:`eval_harness.train.run_folder`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from nla_space.backbone import Backbone
from nla_space.errors import NLAInputError
from nla_space.hub import load_state_dict
from nla_space.io import atomic_write_json, save_tensors
from nla_space.reconstructors import ARSpec, Reconstructor, identity_head, nrm_mse
from nla_space.scoring import cosine

from ..data.injection_targets import InjectionTargets, trained_ar_section
from .loop import SupervisedStep, epoch_schedule
from .run_folder import BEST_RECORD, RunFolder
from .common import add_lora, load_lora_checkpoint, write_lora_checkpoint, write_sidecar
from ..settings import resumable_settings, setting

log = logging.getLogger(__name__)

MU_FILE = "mu_L{layer}.safetensors"
HEAD_FILE = "value_heads.safetensors"
HEADS_CHECKPOINT = "heads.safetensors"  #: the heads in ``checkpoint/`` (keyed by layer ℓ)


@dataclass
class ARTrainConfig:
    """The trainer's settings (``train-ar`` generates its options from these fields)."""

    epochs: float = setting(3.0, resumable=True)
    lr: float = setting(1e-4)
    head_lr: float = setting(1e-3)
    batch_size: int = setting(8)
    max_steps: int | None = setting(None, resumable=True)
    grad_clip: float = setting(1.0, option=False)
    lora_r: int = setting(16)
    lora_alpha: int = setting(32)
    lora_dropout: float = setting(0.0)
    target_modules: str = setting("all-linear")
    max_tokens: int = setting(256)
    eval_every: int = setting(50, resumable=True)
    eval_texts: int = setting(64)
    seed: int = setting(0)


class ARModel(torch.nn.Module):
    """The trainable AR: a :class:`Reconstructor` on a LoRA'd backbone + float32 per-layer heads."""

    def __init__(self, backbone: Backbone, peft_model: Any, layers: list[int], max_tokens: int):
        super().__init__()
        d = backbone.hidden_size
        section = dataclasses.replace(trained_ar_section(), max_tokens=max_tokens)
        self.rec = Reconstructor(backbone=backbone, spec=ARSpec.from_section(section, None, "train-ar"), heads=None, peft_model=peft_model)
        self.heads = torch.nn.ParameterDict({str(ell): torch.nn.Parameter(identity_head(d).to(backbone.device)) for ell in layers})

    def predict(self, texts: list[str], layers: list[int]) -> torch.Tensor:
        """``(N, d)`` float32 reconstructions, one forward per distinct layer."""
        out: list[torch.Tensor | None] = [None] * len(texts)
        for ell in sorted(set(layers)):
            idx = [i for i, x in enumerate(layers) if x == ell]
            h = self.rec.forward_hidden([texts[i] for i in idx], ell)
            pred = h.float() @ self.heads[str(ell)].T
            for j, i in enumerate(idx):
                out[i] = pred[j]
        return torch.stack(out)  # type: ignore[arg-type]

    def head_tensors(self) -> dict[str, torch.Tensor]:
        """Heads keyed by block index (``ℓ − 1``), as released ``value_heads.safetensors`` are."""
        return {str(int(ell) - 1): w.detach().float().cpu() for ell, w in self.heads.items()}


@torch.no_grad()
def evaluate_ar(model: ARModel, ts: InjectionTargets, texts: list[int], batch: int) -> dict[str, float]:
    """Held-out centered / raw cosine and retrieval top-1 (see the module docstring)."""
    res: dict[str, float] = {}
    cen_all, raw_all, top1_all = [], [], []
    for ell in ts.layers:
        preds = []
        for j in range(0, len(texts), batch):
            chunk = texts[j : j + batch]
            preds.append(model.predict([ts.descriptions[i] for i in chunk], [ell] * len(chunk)).cpu())
        pred = torch.cat(preds)
        gold = ts.vectors[ell][texts]
        mu = ts.mus[ell]
        pc, gc = pred - mu, gold - mu
        cen = cosine(pc, gc)
        sim = torch.nn.functional.normalize(pc, dim=-1) @ torch.nn.functional.normalize(gc, dim=-1).T
        top1 = (sim.argmax(dim=1) == torch.arange(len(texts))).float()
        res[f"eval_cen_cos_L{ell}"] = round(float(cen.mean()), 5)
        cen_all.append(cen)
        raw_all.append(cosine(pred, gold))
        top1_all.append(top1)
    res["eval_cen_cos"] = float(torch.cat(cen_all).mean())
    res["eval_raw_cos"] = float(torch.cat(raw_all).mean())
    res["eval_top1"] = float(torch.cat(top1_all).mean())
    res["eval_top1_chance"] = 1.0 / len(texts)
    res["eval_n"] = len(texts)
    return res


def write_ar_folder(folder: Path, model: ARModel, ts: InjectionTargets, extra: dict[str, Any] | None = None) -> None:
    """The ``lora_heads`` layout the reconstructor loader reads, plus μ files, a sidecar and the
    JSON ``extra`` files, in this order."""
    model.rec.peft_model.save_pretrained(str(folder))
    save_tensors(folder / HEAD_FILE, model.head_tensors())
    for ell, mu in ts.mus.items():
        save_tensors(folder / MU_FILE.format(layer=ell), {"mu": mu})
    bb = model.rec.backbone
    write_sidecar(folder, {"kind": "nla_model", "schema_version": 2, "role": "ar", "variant": "universal",
                           "d_model": bb.hidden_size, "n_layers": bb.num_layers, "prompt_templates": {"ar": model.rec.spec.template},
                           "extraction": {"mse_scale": None}, "head_blocks": sorted(int(k) for k in model.head_tensors()),
                           "training": {"method": "lora_heads_nrm_mse", "corpus": str(ts.folder)}})
    for name, data in (extra or {}).items():
        atomic_write_json(folder / name, data)


def train_ar(backbone: Backbone, ts: InjectionTargets, out: Path, cfg: ARTrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) the AR; returns the final state. The LoRA is attached to ``backbone``'s model
    in place: pass a private copy (``load_backbone``), not a shared one."""
    if ts.meta.get("d_model") != backbone.hidden_size:
        raise NLAInputError(f"the target set has d={ts.meta.get('d_model')}, the backbone d={backbone.hidden_size}")
    run = RunFolder(out, "train-ar", resume=resume)
    train_rows = ts.examples("ar_sft")
    eval_txt = ts.indices("heldout")[: cfg.eval_texts]
    if not train_rows or len(eval_txt) < 2:
        raise NLAInputError(f"{ts.folder}: need a non-empty ar_sft split and ≥ 2 heldout texts")
    pm = add_lora(backbone, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules, cfg.seed)
    model = ARModel(backbone, pm, ts.layers, cfg.max_tokens)
    lora_params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": lora_params, "lr": cfg.lr}, {"params": list(model.heads.parameters()), "lr": cfg.head_lr}],
                            weight_decay=0.0)
    spe, total = epoch_schedule(len(train_rows), cfg.batch_size, cfg.epochs, cfg.max_steps)

    def load(folder: Path) -> None:
        load_lora_checkpoint(folder, pm, opt)
        with torch.no_grad():
            for k, w in load_state_dict(folder / HEADS_CHECKPOINT).items():
                model.heads[k].copy_(w)

    state = run.start({"targets": str(ts.folder), "backbone": backbone.spec, **asdict(cfg), "layers": ts.layers,
                       "steps_per_epoch": spe, "total_steps": total, "n_train_rows": len(train_rows), "n_eval_texts": len(eval_txt)},
                      load, may_change=resumable_settings(ARTrainConfig) | {"total_steps"})

    def write_checkpoint(folder: Path) -> None:
        write_lora_checkpoint(folder, pm, opt, state, {HEADS_CHECKPOINT: {k: w.detach() for k, w in model.heads.items()}})

    def evaluate(step: int) -> dict[str, Any]:
        pm.eval()
        res: dict[str, Any] = evaluate_ar(model, ts, eval_txt, cfg.batch_size)
        pm.train()
        return res

    def write_best(folder: Path, step: int, res: dict[str, Any]) -> None:
        write_ar_folder(folder, model, ts, {BEST_RECORD: {"step": step, **res, "targets": str(ts.folder)}})

    def loss_fn(batch: list[tuple[int, int]], step: int) -> torch.Tensor:
        pred = model.predict([ts.descriptions[i] for i, _ in batch], [ell for _, ell in batch])
        gold = torch.stack([ts.vectors[ell][i] for i, ell in batch]).to(pred.device)
        return nrm_mse(pred, gold).mean()

    pm.train()
    sgd = SupervisedStep(train_rows, cfg.batch_size, cfg.seed, opt, lora_params + list(model.heads.parameters()), cfg.grad_clip, loss_fn)
    return run.loop(total=total, eval_every=cfg.eval_every, desc="train-ar", step=sgd,
                    validate=run.validation(evaluate, "eval_cen_cos", higher_is_better=True, write_best=write_best, time_key="eval_s"),
                    write_checkpoint=write_checkpoint, postfix=sgd.postfix(state, loss_fmt=".4f"), first_row={"epoch": 0.0, "loss": None})
