"""A card's backbone *shape* with random weights, for timing at real sizes without a download.

The shape is card data: ``backbone.shape`` in the card file holds the architecture config fields
(``model_type``, widths, depth, heads, vocabulary, tying) and the ``source`` they were read from.
:func:`random_weights_card` builds that model from its config with random initialisation, in the
requested dtype and device, puts a freshly initialised prefix AV with the card's prefix length on
it, and returns an :class:`~nla_space.runtime.OpenCard` the bench times like any other
(``python -m eval_harness bench --card srt-qwen2.5-7b --random-weights --device cuda``). Random
weights give the same FLOPs and bytes as the real ones; rollouts are forced to a fixed length, so
what the text says does not matter. ``layers`` truncates the depth (a smoke run on a small machine).
"""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace
from typing import Any

import torch

from nla_space.backbone import from_model, resolve_device, resolve_dtype
from nla_space.cards import Card, find_card
from nla_space.errors import NLAInputError
from nla_space.runtime import OpenCard
from nla_space.verbalizers.config import NLAConfig
from nla_space.verbalizers.prefix import build_prefix_av

log = logging.getLogger(__name__)

#: keys of ``backbone.shape`` that are not config fields
_NOT_CONFIG = ("model_type", "source")


def shape_config(shape: dict[str, Any], layers: int | None = None) -> Any:
    """The ``transformers`` config of a ``backbone.shape`` (depth cut to ``layers`` if given)."""
    from transformers import AutoConfig

    if "model_type" not in shape:
        raise NLAInputError("backbone.shape needs a model_type")
    fields = {k: v for k, v in shape.items() if k not in _NOT_CONFIG}
    if layers is not None:
        if layers < 1:
            raise NLAInputError(f"--layers must be ≥ 1, got {layers}")
        fields["num_hidden_layers"] = min(int(layers), int(fields.get("num_hidden_layers", layers)))
    try:
        return AutoConfig.for_model(shape["model_type"], **fields)
    except (ValueError, KeyError, TypeError) as exc:
        raise NLAInputError(f"backbone.shape is not a valid {shape['model_type']} config: {exc}") from exc


def parameter_count(shape: dict[str, Any]) -> int:
    """Parameters of the shape's model, counted on the meta device (nothing is allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape_config(shape))
    return sum(p.numel() for p in model.parameters())


def _card_with_shape(name: str) -> Card:
    card = find_card(name)
    if not card.backbone.shape:
        from nla_space.cards import builtin_cards

        with_shape = [c.aliases[0] if c.aliases else c.id for c in builtin_cards() if c.backbone.shape]
        raise NLAInputError(f"card {card.id} has no backbone.shape; cards with one: {', '.join(with_shape)}")
    return card


def random_weights_card(name: str, device: str | None = None, dtype: str | None = None, layers: int | None = None,
                        seed: int = 0) -> OpenCard:
    """The card's backbone shape with random weights (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    card = _card_with_shape(name)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, card.backbone.dtype)
    cfg = shape_config(card.backbone.shape or {}, layers)
    torch.manual_seed(seed)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dt)
    model.generation_config.pad_token_id = 0
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=None, bos_token_id=None)
    bb = from_model(model, tokenizer, spec=f"random-weights:{card.id}")
    layer = min(card.default_layer, bb.num_layers - 1)  # hidden_states[num_layers] is after the final norm
    av_cfg = NLAConfig(
        backbone_id=bb.spec,
        backbone_dtype=bb.dtype_name,
        extraction_layer=layer,
        max_new_tokens=64,
        num_prefix_tokens=card.av.num_prefix_tokens,
    )
    av = build_prefix_av(av_cfg, bb).eval()
    for p in av.parameters():
        p.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("random-weight %s shape: %.2fB parameters, %d layers, %s on %s", card.id, n_params / 1e9, bb.num_layers,
             bb.dtype_name, dev)
    shaped = dataclasses.replace(card, layers=[layer])
    return OpenCard(card=shaped, backbone=bb, av=av, trained=False, mu=None,
                    notes=[f"random weights in the shape of {card.backbone_id} ({(card.backbone.shape or {}).get('source', '')})"])
