"""A local folder laid out like a published injection AV release is a card, with no hand-written JSON.

Two layouts are recognised (SRT prefix folders, ``config.json`` as NLAConfig, are
:func:`nla_space.cards.card_from_folder`):

* **nla-at-home LoRA AV** (https://github.com/anicka-net/nla-at-home): ``adapter_config.json`` +
  adapter weights, usually with an ``nla_meta.yaml`` sidecar. The backbone is the adapter's
  ``base_model_name_or_path``.
* **Anthropic NLA full fine-tune** (https://github.com/kitft/natural_language_autoencoders): a model
  folder (``config.json`` + safetensors) with an ``nla_meta.yaml`` whose role is ``av``. The base
  model must then be named (``card.json``'s ``backbone``, below): a full fine-tune does not say it.

What the folder does not state comes from the built-in injection card on the same backbone (its
recipe, parsing, generation settings and reconstructor), else from the trainer template card (the
card whose ``trainer_template`` is set) without its reconstructor. The sidecar's
``extraction_layer_index`` K gives the layer K + ``block_offset``. An optional ``card.json`` in the
folder, with any card field, wins over all of it (as in SRT folders): a folder on a backbone no
built-in card shares names its reconstructor there, and is refused with that advice otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..io import read_json_object
from ..sidecar import SIDECAR_NAME, load_sidecar

#: card fields a template card lends a folder card (its own identity and records stay behind)
LENT_FIELDS = ("kind", "backbone", "layers", "default_tau", "anchors", "injection", "reconstructor", "compass", "license")


def is_injection_folder(folder: Path) -> bool:
    """A LoRA adapter folder, or a model folder with a sidecar (the layouts of the module docstring)."""
    return (folder / "adapter_config.json").is_file() or ((folder / "config.json").is_file() and (folder / SIDECAR_NAME).is_file())


def _template(base: str | None, builtin: list[Any]) -> tuple[Any | None, bool]:
    """The built-in injection card on ``base`` (True: its reconstructor fits), else the trainer template."""
    injection = [c for c in builtin if c.kind == "injection"]
    for card in injection:
        if base is not None and card.backbone_id == base:
            return card, True
    return next((c for c in injection if c.trainer_template), None), False


def injection_folder_card_dict(folder: Path, builtin: list[Any]) -> tuple[dict[str, Any], str]:
    """The card fields of an injection AV folder (module docstring) and the name refusals give it."""
    lora = (folder / "adapter_config.json").is_file()
    base = None
    if lora:
        base = read_json_object(folder / "adapter_config.json", "an adapter config").get("base_model_name_or_path") or None
    extra = read_json_object(folder / "card.json", "card JSON") if (folder / "card.json").is_file() else {}
    named_base = (extra.get("backbone") or {}).get("id") if isinstance(extra.get("backbone"), dict) else None
    template, fits = _template(named_base or base, builtin)
    data: dict[str, Any] = {}
    if template is not None:
        lent = template.to_dict()
        data = {k: lent[k] for k in LENT_FIELDS if k in lent}
        if not fits:  # another backbone: its scorer, layers and anchors do not apply
            for key in ("reconstructor", "compass", "layers", "anchors"):
                data.pop(key, None)
    data.update({"id": str(folder), "kind": "injection", "title": folder.name})
    if base is not None and (template is None or not fits):
        data["backbone"] = {"id": base, "revision": None, "dtype": (data.get("backbone") or {}).get("dtype", "bfloat16")}
    sidecar = load_sidecar(folder)
    block_offset = int((data.get("injection") or {}).get("block_offset", 1))
    if sidecar is not None and sidecar.extraction_layer_index is not None:
        data["layers"] = [sidecar.extraction_layer_index + block_offset]
    data.update(extra)
    data["av"] = {"folder": str(folder.resolve()), "format": "peft_lora" if lora else "full"}
    where = str(folder / "card.json") if extra else str(folder)
    if "backbone" not in data:
        raise CheckpointError(f"{folder}: a full fine-tune names no base model: add a card.json with "
                              "{\"backbone\": {\"id\": ...}} (and a 'reconstructor' section)")
    if "reconstructor" not in data:
        raise CheckpointError(f"{folder}: an AV on {data['backbone']['id']}, which no built-in card shares, so nothing says how to "
                              "score its candidates: add a card.json with a 'reconstructor' section (see nla_space/cards/*.json)")
    if "layers" not in data:
        raise CheckpointError(f"{folder}: the sidecar states no extraction_layer_index: add a card.json with 'layers'")
    return data, where
