"""PEFT LoRA adapters attached to a backbone's model in place (injection AVs, reconstructors, patch AVs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..backbone import Backbone
from ..errors import CheckpointError


def attach_lora(backbone: Backbone, folder: Path, trainable: bool = False) -> Any:
    """Attach the PEFT LoRA adapter in ``folder`` to the backbone's model in place; returns the PeftModel
    (frozen and in eval mode unless ``trainable``)."""
    from peft import PeftModel

    if not (folder / "adapter_config.json").is_file():
        raise CheckpointError(f"{folder}: no adapter_config.json: not a PEFT adapter folder")
    try:
        peft_model = PeftModel.from_pretrained(backbone.model, str(folder), is_trainable=trainable)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{folder}: cannot attach the LoRA adapter ({type(exc).__name__}: {exc})") from exc
    if not trainable:
        freeze(peft_model)
    return peft_model


def freeze(peft_model: Any) -> Any:
    peft_model.eval()
    for p in peft_model.parameters():
        p.requires_grad_(False)
    return peft_model
