"""A cost plan on paper for reproducing a card at its published size (``python -m eval_harness scale-plan``).

FLOPs are *counted*, not guessed: the card's backbone is built from its published shape
(``backbone.shape`` in the card file: the model's ``config.json`` values) on PyTorch's ``meta``
device, where no memory is allocated and no arithmetic runs, and one forward + backward over a
sequence of the recipe's length is counted by ``torch.utils.flop_counter.FlopCounterMode``. The
backward is the one each recipe runs: with the backbone frozen and a prefix or LoRA trained, the
gradient flows through every block's activations but no base weight gets a gradient; a full
fine-tune (the kitft AVs) also computes the weight gradients.

Memory is counted from the same meta model (parameters × bytes) plus the activations a training
step keeps, from the per-layer estimate of Korthikanti et al., "Reducing Activation Recomputation
in Large Transformer Models" (https://arxiv.org/abs/2205.05198), ``34·s·b·h`` bytes per layer in
16-bit without the attention-score term (fused attention keeps no ``s×s`` matrix), and, for a full
fine-tune, AdamW's 16 bytes per parameter (fp32 master weights, two moments, gradient).

GPU-hours divide the counted FLOPs by a *stated* sustained throughput (default: 40 % of an H100's
989 TFLOP/s dense bf16 peak; ``--mfu`` and ``--peak-tflops`` change it). That throughput is an
assumption, not a measurement of this project's code on an H100.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch

from nla_space.cards import Card

log = logging.getLogger(__name__)

BYTES_BF16 = 2
ADAMW_FULL_BYTES = 16  #: per trained parameter of a full fine-tune: fp32 weight, 2 moments, gradient
H100_BF16_TFLOPS = 989.0  #: dense bf16 peak of an H100 SXM (NVIDIA's datasheet)


@dataclass(frozen=True)
class Recipe:
    """What one reproduction of a card trains on (the cards' published sizes)."""

    targets: int = 30_000  #: (activation, text) pairs
    epochs: int = 3
    seq_tokens: int = 96  #: tokens of one training row (prompt or prefix + target text)
    gen_tokens: int = 64  #: tokens generated per target when the targets are built
    batch: int = 32  #: rows per step (for the activation memory)
    full_finetune: bool = False  #: the AV is the whole model (kitft), not a prefix or a LoRA


@dataclass
class CardPlan:
    card: str
    backbone: str
    params_b: float
    weights_gib: float
    train_step_gib: float
    train_tflop: float  #: the whole training run
    targets_tflop: float  #: building the targets (generation + the read)
    gpu_hours: float  #: training + targets, at the stated throughput
    min_gpus_80gb: int  #: 80 GB GPUs the training step needs by memory alone
    full_finetune: bool  #: trained as a whole model (weights, gradients and AdamW states sharded over the GPUs)


def meta_model(shape: dict[str, Any]) -> Any:
    """The backbone of ``shape`` on the meta device (no memory, no weights), frozen."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {k: v for k, v in shape.items() if k not in ("model_type", "source")}
    cfg = AutoConfig.for_model(shape["model_type"], **kw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def counted_flops(model: Any, tokens: int, backward: str) -> float:
    """FLOPs of one forward (+ backward: ``"none"``, ``"activations"`` or ``"full"``) over ``tokens``."""
    from torch.utils.flop_counter import FlopCounterMode

    d = model.config.hidden_size
    x = torch.zeros(1, tokens, d, device="meta", dtype=torch.bfloat16, requires_grad=backward != "none")
    if backward == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    try:
        with FlopCounterMode(display=False) as fc:
            logits = model(inputs_embeds=x).logits  # (the default cache keeps transformers from inspecting meta position ids)
            if backward != "none":
                logits.float().sum().backward()
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
    return float(fc.get_total_flops())


def plan_card(card: Card, recipe: Recipe, tflops: float) -> CardPlan:
    """The plan of one card whose backbone shape is published in its card file."""
    shape = card.backbone.shape
    if not shape:
        raise ValueError(f"card {card.id}: no backbone.shape in its card file")
    model = meta_model(shape)
    n = sum(p.numel() for p in model.parameters())
    cfg = model.config
    step = counted_flops(model, recipe.seq_tokens, "full" if recipe.full_finetune else "activations")
    fwd_gen = counted_flops(model, recipe.gen_tokens, "none")  # generation with a KV cache costs about one forward of its tokens
    train = step * recipe.targets * recipe.epochs
    targets = 2 * fwd_gen * recipe.targets  # the samples, then the read of each
    weights = n * BYTES_BF16
    acts = 34 * recipe.seq_tokens * recipe.batch * cfg.hidden_size * cfg.num_hidden_layers
    optim = n * ADAMW_FULL_BYTES if recipe.full_finetune else 0
    gib = 1024**3
    need = (weights + acts + optim) / gib
    return CardPlan(card=card.id, backbone=card.backbone_id, params_b=round(n / 1e9, 2), weights_gib=round(weights / gib, 1),
                    train_step_gib=round(need, 1), train_tflop=round(train / 1e12), targets_tflop=round(targets / 1e12),
                    gpu_hours=round((train + targets) / (tflops * 1e12) / 3600, 2), min_gpus_80gb=max(1, -(-int(need) // 76)),
                    full_finetune=recipe.full_finetune)


def plan(cards: list[Card], recipe: Recipe, mfu: float = 0.4, peak_tflops: float = H100_BF16_TFLOPS) -> dict[str, Any]:
    """Plans for ``cards`` (full fine-tune recipe for ``format: full`` AVs) and the assumptions used."""
    tflops = mfu * peak_tflops
    rows = []
    for c in cards:
        full = c.av.format == "full"
        rows.append(asdict(plan_card(c, Recipe(**{**asdict(recipe), "full_finetune": full}), tflops)))
        log.info("planned %s", c.id)
    return {"assumptions": {**asdict(recipe), "sustained_tflops": tflops, "mfu": mfu, "peak_tflops": peak_tflops,
                            "flops": "counted by torch FlopCounterMode on the meta device",
                            "activations": "34·s·b·h bytes per layer (arXiv:2205.05198), fused attention"},
            "cards": rows}


def markdown(result: dict[str, Any]) -> str:
    """The plan as a Markdown table."""
    head = ("| card | backbone | trained | params (B) | weights bf16 (GiB) | train step (GiB) | 80 GB GPUs | train (PFLOP) "
            "| targets (PFLOP) | GPU-hours |\n|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| `{r['card']}` | {r['backbone']} | {'whole model' if r['full_finetune'] else 'prefix / LoRA'} | {r['params_b']} | {r['weights_gib']} | {r['train_step_gib']} | {r['min_gpus_80gb']} "
        f"| {r['train_tflop'] / 1000:,.1f} | {r['targets_tflop'] / 1000:,.1f} | {r['gpu_hours']} |\n" for r in result["cards"])
