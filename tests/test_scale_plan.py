"""The cost plan on paper (``scale-plan``, :mod:`eval_harness.scale_plan`): counted FLOPs agree with
the textbook count, and the table in docs/scale.md is the tool's output."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval_harness.cmd_scale_plan import SEED_CARDS
from eval_harness.scale_plan import Recipe, counted_flops, markdown, meta_model, plan
from nla_space.cards import find_card

ROOT = Path(__file__).resolve().parent.parent


def test_counted_forward_flops_match_two_per_weight_per_token() -> None:
    shape = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 4, "vocab_size": 1000, "tie_word_embeddings": False}
    m = meta_model(shape)
    T = 8
    matmul_params = sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    fwd = counted_flops(m, T, "none")
    assert fwd == pytest.approx(2 * matmul_params * T, rel=0.02)  # plus the small attention-score matmuls
    assert counted_flops(m, T, "activations") == pytest.approx(2 * fwd, rel=0.05)  # activation grads only
    assert counted_flops(m, T, "full") == pytest.approx(3 * fwd, rel=0.05)  # and the weight grads


def test_the_table_in_docs_is_the_tools_output() -> None:
    table = markdown(plan([find_card(c) for c in SEED_CARDS], Recipe()))
    assert table in (ROOT / "docs" / "scale.md").read_text(encoding="utf-8")
