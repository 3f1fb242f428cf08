"""PEFT LoRA adapters attached to a backbone's model in place (injection AVs, reconstructors, patch AVs)."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Iterator

from ..backbone import Backbone
from ..errors import CheckpointError, NLAInputError


def check_not_offloaded(backbone: Backbone) -> None:
    """A LoRA cannot be attached to weights accelerate offloaded to disk (they are meta tensors
    until a forward): refuse by name (:mod:`nla_space.placement`)."""
    placed = getattr(backbone.model, "hf_device_map", None) or {}
    on_gpu = any(v not in ("cpu", "disk") for v in placed.values())
    # with a GPU in the map, accelerate also offloads "cpu" blocks (meta weights, moved in per forward)
    disk = sorted(k for k, v in placed.items() if v == "disk" or (on_gpu and v == "cpu"))
    if disk:
        raise NLAInputError(f"this card attaches a LoRA, which cannot sit on offloaded weights ({', '.join(disk[:3])}"
                            f"{', …' if len(disk) > 3 else ''}): give the device map GPUs or CPU memory for every block "
                            "(raise $NLA_MAX_MEMORY, or add GPUs); with GPUs, blocks on the CPU are offloaded too, so a LoRA card needs "
                            "every block on a GPU")


def attach_lora(backbone: Backbone, folder: Path, trainable: bool = False) -> Any:
    """Attach the PEFT LoRA adapter in ``folder`` to the backbone's model in place; returns the PeftModel
    (frozen and in eval mode unless ``trainable``)."""
    from peft import PeftModel

    check_not_offloaded(backbone)
    if not (folder / "adapter_config.json").is_file():
        raise CheckpointError(f"{folder}: no adapter_config.json: not a PEFT adapter folder")
    try:
        with quiet_peft():
            peft_model = PeftModel.from_pretrained(backbone.model, str(folder), is_trainable=trainable)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{folder}: cannot attach the LoRA adapter ({type(exc).__name__}: {exc})") from exc
    if not trainable:
        freeze(peft_model)
    return peft_model


def new_lora(backbone: Backbone, config: Any) -> Any:
    """A fresh PEFT LoRA (``config``: a ``peft.LoraConfig``) on the backbone's model, in place. The adapter
    records the backbone's id (``backbone.spec``, e.g. ``embedded:gemma3-270m``) as its base, not the local
    cache folder the model was loaded from: the base a card's loader compares with, and no machine path in
    a shipped ``adapter_config.json``."""
    from peft import get_peft_model

    check_not_offloaded(backbone)
    with quiet_peft():
        pm = get_peft_model(backbone.model, config)
    for cfg in pm.peft_config.values():
        cfg.base_model_name_or_path = backbone.spec
    return pm


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """PEFT calls a transformers method deprecated in 5.x (``is_gradient_checkpointing``); the warning
    would land on the CLI's stderr, whose contract is one ``error:`` line on bad input."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def freeze(peft_model: Any) -> Any:
    peft_model.eval()
    for p in peft_model.parameters():
        p.requires_grad_(False)
    return peft_model
