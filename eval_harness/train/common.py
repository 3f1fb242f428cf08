"""What several trainers share, beside their run folder (:mod:`eval_harness.train.run_folder`).

Settings
    Each trainer's settings are one dataclass of :mod:`eval_harness.settings` fields.
LoRA adapters (``train-av-lora``, ``train-ar``, ``train-grpo``, ``train-patch``)
    A PEFT LoRA attached to the backbone's model in place, its float32 state, and its checkpoint
    files: ``adapter.safetensors``, the trainer's extra tensor files, ``optimizer.pt`` (read back with
    ``weights_only=True``) and ``state.json`` last.
Injection AV folders (``train-av-lora``, ``train-grpo``)
    The :class:`~nla_space.verbalizers.injection.InjectionAV` the card loader would build from a
    sidecar, and the loadable folder: PEFT files, ``nla_meta.yaml``, the ``center_normalize`` μ,
    JSON extras (the caller lists ``best.json`` last: it marks the folder complete).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from nla_space.backbone import Backbone
from nla_space.errors import CheckpointError, NLAInputError
from nla_space.hub import load_state_dict
from nla_space.io import atomic_write, atomic_write_json, atomic_write_text, save_tensors
from nla_space.sidecar import SIDECAR_NAME, Sidecar
from nla_space.verbalizers.injection import INJECT_MU_FILE, InjectionAV, resolve_spec
from nla_space.verbalizers.lora import new_lora

from ..data.injection_targets import template_section
from .run_folder import ADAPTER_FILE, OPTIMIZER_FILE, STATE_FILE

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------- LoRA


def add_lora(backbone: Backbone, r: int, alpha: int, dropout: float, target_modules: str, seed: int) -> Any:
    """A trainable PEFT LoRA on the backbone's model (in place; the base weights stay frozen);
    ``target_modules`` is a comma list of module names, or peft's ``all-linear``."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    targets: Any = target_modules if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",") if t.strip()]
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return new_lora(backbone, cfg)


def lora_state(pm: Any) -> dict[str, torch.Tensor]:
    """The adapter's weights, float32 copies on the CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(pm).items()}


def load_lora_state(pm: Any, tensors: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    res = set_peft_model_state_dict(pm, tensors)
    unexpected = getattr(res, "unexpected_keys", []) or []
    if unexpected:
        raise CheckpointError(f"adapter checkpoint has unexpected keys {unexpected[:3]}")


def write_lora_checkpoint(folder: Path, pm: Any, opt: torch.optim.Optimizer, state: dict[str, Any],
                          extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """The LoRA trainers' checkpoint files in ``folder``: adapter, the ``extra`` tensor files
    (name → tensors), optimizer, and ``state.json`` last."""
    save_tensors(folder / ADAPTER_FILE, lora_state(pm))
    for name, tensors in (extra or {}).items():
        save_tensors(folder / name, tensors)
    atomic_write(folder / OPTIMIZER_FILE, lambda tmp: torch.save(opt.state_dict(), tmp))
    atomic_write_json(folder / STATE_FILE, state)


def load_lora_checkpoint(folder: Path, pm: Any, opt: torch.optim.Optimizer) -> None:
    """The adapter and optimizer of :func:`write_lora_checkpoint`, loaded in place. A checkpoint kept
    without its ``optimizer.pt`` (committed between sessions to stay small) resumes with fresh AdamW
    moments, with a warning: the steps and the LR schedule continue, the update is not the one an
    uninterrupted run makes."""
    load_lora_state(pm, load_state_dict(folder / ADAPTER_FILE))
    if not (folder / OPTIMIZER_FILE).is_file():
        log.warning("%s has no %s: resuming with fresh AdamW moments", folder, OPTIMIZER_FILE)
        return
    opt.load_state_dict(torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True))


# --------------------------------------------------------------------------- injection AV folder


def write_sidecar(folder: Path, data: dict[str, Any]) -> None:
    atomic_write_text(Path(folder) / SIDECAR_NAME, yaml.safe_dump(data, allow_unicode=True, sort_keys=False))


def make_av(backbone: Backbone, sidecar: dict[str, Any], peft_model: Any = None,
            inject_mu: dict[int, torch.Tensor] | None = None) -> InjectionAV:
    """The :class:`InjectionAV` the card loader would build from this sidecar (same spec merge);
    ``inject_mu`` is the per-layer μ of the ``center_normalize`` rule."""
    spec = resolve_spec(template_section(), Sidecar.from_dict(sidecar, "<training sidecar>"), "training")
    if spec.rule == "center_normalize" and not inject_mu:
        raise NLAInputError("the center_normalize rule needs the per-layer μ of the target set")
    return InjectionAV(backbone=backbone, spec=spec, peft_model=peft_model, inject_mu=inject_mu)


def write_av_folder(folder: Path, pm: Any, sidecar: dict[str, Any], extra: dict[str, Any],
                    inject_mu: dict[int, torch.Tensor] | None = None) -> None:
    """A loadable injection AV folder: PEFT adapter files, the ``center_normalize`` rule's per-layer
    μ, ``nla_meta.yaml``, then the JSON ``extra`` files in order."""
    pm.save_pretrained(str(folder))
    if inject_mu:
        save_tensors(folder / INJECT_MU_FILE, {f"L{ell}": m.float() for ell, m in inject_mu.items()})
    write_sidecar(folder, sidecar)
    for name, data in extra.items():
        atomic_write_json(folder / name, data)
