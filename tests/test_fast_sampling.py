"""The speed work in the rollout changes no output (issue 7: "same outputs for a fixed seed").

* :mod:`nla_space.categorical` draws what ``torch.multinomial(probs, 1)`` draws, and leaves the
  generator where torch leaves it;
* :mod:`nla_space.kv_cache` gives attention the values ``DynamicCache`` gives;
* so :func:`nla_space.rollout.sample` with a seeded generator returns the tokens of the plain
  recipe, ``model.generate(do_sample=True)`` after ``torch.manual_seed`` with the same seed, on
  every tiny architecture.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import nla_space.categorical as cat
from nla_space.backbone import from_model
from nla_space.kv_cache import PreallocatedLayer, preallocated_cache
from nla_space.rollout import sample

import tiny


def _torch_draw(probs: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(probs, 1, generator=g).squeeze(-1), g.get_state()


def _fast_draw(probs: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return cat.sample_rows(probs, g), g.get_state()


@pytest.mark.parametrize("scale", [0.0, 0.3, 2.0, 8.0, 40.0])
def test_sample_rows_equals_torch_multinomial_and_advances_the_generator_alike(scale):
    assert cat.exact_sampler_available()
    for seed in range(4):
        logits = torch.randn(16, 5003, generator=torch.Generator().manual_seed(seed)) * scale
        probs = torch.softmax(logits, dim=-1)
        probs[3, :100] = 0.0  # zero-probability entries must never win
        fast, fast_state = _fast_draw(probs, seed)
        ref, ref_state = _torch_draw(probs, seed)
        assert torch.equal(fast, ref), (scale, seed)
        assert torch.equal(fast_state, ref_state)


def test_sample_rows_on_near_ties_and_one_hot_rows():
    # Many entries with the same probability make several candidates pass the screen; the exact
    # re-computation must still pick torch's winner. A one-hot row always draws its hot entry.
    probs = torch.full((8, 4096), 1.0 / 4096)
    probs[0] = 0.0
    probs[0, 17] = 1.0
    probs[1, :2048] *= 1.0 + 1e-7
    probs = probs / probs.sum(dim=1, keepdim=True)
    for seed in range(20):
        fast, fast_state = _fast_draw(probs, seed)
        ref, ref_state = _torch_draw(probs, seed)
        assert torch.equal(fast, ref) and torch.equal(fast_state, ref_state)
        assert int(fast[0]) == 17


def test_race_on_a_uniform_of_exactly_zero_follows_torch_semantics():
    # u == 0 gives q == 0: p / 0 is inf (it wins) or, for p == 0, NaN (torch.argmax takes NaN as the max).
    p = np.full((3, 6), 1 / 6, dtype=np.float32)
    p[1, 2] = 0.0
    p[1] /= p[1].sum()
    u = np.array([[0.5, 0.2, 0.0, 0.9, 0.3, 0.1]] * 3, dtype=np.float64)
    u[2] = [0.5, 0.2, 0.3, 0.9, 0.3, 0.1]
    out = cat.race(p, u)
    q = np.array([[-math.log1p(-x) for x in row] for row in u], dtype=np.float64).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        expect = torch.argmax(torch.from_numpy(p / q), dim=1).numpy()
    assert out.tolist() == expect.tolist() == [2, 2, 5]


def test_a_failed_self_check_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(cat, "_CHECKED", False)
    monkeypatch.setattr(cat, "_draw", lambda *a: pytest.fail("the fast path ran after a failed self-check"))
    probs = torch.softmax(torch.randn(4, 300), dim=-1)
    assert torch.equal(_fast_draw(probs, 5)[0], _torch_draw(probs, 5)[0])


def test_preallocated_layer_returns_what_dynamic_cache_returns_and_refuses_overflow():
    layer = PreallocatedLayer(capacity=5)
    k1, v1 = torch.randn(2, 3, 3, 4), torch.randn(2, 3, 3, 4)
    k2, v2 = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
    layer.update(k1, v1)
    keys, values = layer.update(k2, v2)
    assert torch.equal(keys, torch.cat([k1, k2], dim=-2)) and torch.equal(values, torch.cat([v1, v2], dim=-2))
    assert layer.get_seq_length() == 4
    with pytest.raises(ValueError, match="holds 5 positions"):
        layer.update(torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4))


def test_preallocated_cache_keeps_sliding_window_layers():
    model, _ = tiny.make_model("gemma2", layers=4)
    cache = preallocated_cache(model.config, 16)
    kinds = {type(layer).__name__ for layer in cache.layers}
    assert "PreallocatedLayer" in kinds and len(kinds) == 2  # Gemma-2 alternates sliding and full layers


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_seeded_rollout_equals_plain_generate(arch, temperature):
    model, tok = tiny.make_model(arch, layers=3, hidden=32, seed=3)
    bb = from_model(model, tok)
    prefix = torch.randn(6, 2, 32, generator=torch.Generator().manual_seed(7))
    for seed in (0, 11):
        roll = sample(bb, prefix, 12, temperature=temperature, generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        with torch.inference_mode():
            ref = model.generate(
                inputs_embeds=prefix,
                attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=12,
                pad_token_id=bb.pad_id,
                eos_token_id=bb.stop_ids,
            )
        assert torch.equal(roll.ids, ref[:, : roll.ids.shape[1]]), (arch, temperature, seed)
        assert (ref[:, roll.ids.shape[1] :] == bb.pad_id).all()


def test_bfloat16_cpu_backbone_attends_in_float32_and_stays_close_to_float32():
    from nla_space.cpu_bf16 import ATTENTION as NAME

    model32, tok = tiny.make_model("llama", layers=2, hidden=32, seed=5)
    ids = torch.randint(4, 60, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model32(input_ids=ids).logits
    plain16 = copy.deepcopy(model32).to(torch.bfloat16)  # HF's bfloat16 sdpa, for comparison
    bb16 = from_model(copy.deepcopy(model32).to(torch.bfloat16), tok)
    assert bb16.model.config._attn_implementation == NAME
    assert from_model(model32, tok).model.config._attn_implementation == "sdpa"
    with torch.inference_mode():
        ours = bb16.model(input_ids=ids).logits.float()
        theirs = plain16(input_ids=ids).logits.float()
    assert (ours - ref).abs().max() <= (theirs - ref).abs().max() * 1.5 + 1e-3
    # Cast back to float32 (OpenCard.with_dtype), the model attends with plain sdpa again.
    bb32 = from_model(bb16.model.to(torch.float32), tok)
    assert bb32.model.config._attn_implementation == "sdpa"
    # Gemma-2 (eager for soft-capping) is left alone.
    g, gtok = tiny.make_model("gemma2", layers=2)
    assert from_model(g.to(torch.bfloat16), gtok).model.config._attn_implementation == "eager"


@pytest.mark.parametrize("bad", ["nan", "inf", "negative", "zero_row"])
def test_invalid_probabilities_raise_torchs_error_and_leave_the_generator(bad):
    probs = torch.softmax(torch.randn(3, 40), dim=-1)
    if bad == "nan":
        probs[1, 3] = float("nan")
    elif bad == "inf":
        probs[2, 0] = float("inf")
    elif bad == "negative":
        probs[0, 5] = -0.1
    else:
        probs[1] = 0.0
    g = torch.Generator().manual_seed(3)
    before = g.get_state()
    with pytest.raises(RuntimeError) as ours:
        cat.sample_rows(probs, g)
    with pytest.raises(RuntimeError) as theirs:
        torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3))
    assert str(ours.value) == str(theirs.value)
    assert torch.equal(g.get_state(), before)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3"])
def test_prepacked_bfloat16_linears_give_the_same_bits(arch):
    from nla_space import cpu_bf16

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no oneDNN bfloat16 support")
    model, tok = tiny.make_model(arch, layers=2, hidden=32, seed=2)
    bb = from_model(model.to(torch.bfloat16), tok)
    lins = [m for m in bb.model.modules() if isinstance(m, torch.nn.Linear)]
    assert lins and all(type(m) is cpu_bf16.PackedLinear for m in lins)
    ids = torch.randint(4, 60, (5, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        packed = bb.model(input_ids=ids).logits
        twin = copy.deepcopy(bb.model)  # a copy holds no packed weights: it multiplies as nn.Linear does
        assert torch.equal(twin(input_ids=ids).logits, packed)
        cpu_bf16._unpack(bb.model)
        assert all(type(m) is torch.nn.Linear for m in lins)
        assert torch.equal(bb.model(input_ids=ids).logits, packed)


def test_a_packed_linear_follows_weight_changes_and_autograd():

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no oneDNN bfloat16 support")
    model, tok = tiny.make_model("llama", layers=1, hidden=32, seed=4)
    bb = from_model(model.to(torch.bfloat16), tok)
    lin = bb.model.lm_head
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.mul_(2.0)  # the packed copy is stale now: the layer must use the new weight
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight))
    xg = x.clone().requires_grad_(True)
    lin(xg).float().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad.float()).all()
