"""Activation reconstructors on tiny random models, each against a plain transformers/peft reference."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import tiny
from nla_space import policy
from nla_space.errors import CheckpointError
from nla_space.io import save_tensors
from nla_space.cards.sections import ReconstructorSection
from nla_space.reconstructors import AR_TEMPLATE, Reconstructor, head_layer_keys, identity_head, nrm_mse, open_reconstructor
from nla_space.rollout import Rollout
from nla_space.scoring import cosine, fve_nrm

TEXTS = ["the cat is red", "  a small dog on the old road near the river . ", "music"]


def _open(section: dict):
    """A reconstructor opened on the CPU from a card's ``reconstructor`` section given as JSON data."""
    return open_reconstructor(ReconstructorSection.from_dict(section, "test"), device="cpu", dtype="float32")


def _template(t: str) -> str:
    return AR_TEMPLATE.format(explanation=t.strip())


@pytest.fixture(scope="module")
def base():
    model, tok = tiny.make_marker_model("qwen2", layers=4, hidden=32, seed=5)
    return model, tok


def _ref_hidden(model, tok, text: str, layer: int, add_special_tokens: bool = True) -> torch.Tensor:
    ids = torch.tensor([tok(text, add_special_tokens=add_special_tokens)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0, -1].float()


@pytest.fixture(scope="module")
def anthropic_ar(base, tmp_path_factory):
    """An Anthropic-layout AR: blocks 0..K=2 only, no final-norm / lm_head weights, value head, sidecar."""
    from safetensors.torch import save_file

    model, tok = base
    folder = tmp_path_factory.mktemp("kitft_ar")
    cfg = model.config.to_dict()  # truncate the config as prepare_critic_checkpoint does (arrays sliced)
    cfg["num_hidden_layers"] = 3
    if cfg.get("layer_types"):
        cfg["layer_types"] = cfg["layer_types"][:3]
    (folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    tok.save_pretrained(str(folder))
    keep = {k: v.contiguous() for k, v in model.state_dict().items()
            if not (k.startswith("model.layers.3.") or k in ("model.norm.weight", "lm_head.weight"))}
    save_file(keep, str(folder / "model.safetensors"), metadata={"format": "pt"})
    torch.manual_seed(6)
    w = torch.eye(32) + torch.randn(32, 32) / 10
    save_tensors(folder / "value_head.safetensors", {"weight": w})
    (folder / "nla_meta.yaml").write_text(yaml.safe_dump({
        "kind": "nla_model", "schema_version": 2, "role": "ar", "d_model": 32, "extraction_layer_index": 2,
        "extraction": {"injection_scale": None, "mse_scale": math.sqrt(32)},
        "prompt_templates": {"ar": AR_TEMPLATE}, "critic": {"extraction_layer_index": 2}}), encoding="utf-8")
    return folder, w


def test_anthropic_ar_is_blocks_0_to_k_then_value_head(base, anthropic_ar):
    model, tok = base
    folder, w = anthropic_ar
    ar = _open({"kind": "value_head", "folder": str(folder)})
    assert ar.heads is not None and sorted(ar.heads) == [3] and ar.backbone.num_layers == 3
    assert ar.spec.mse_scale == pytest.approx(math.sqrt(32))
    got = ar.encode(TEXTS, 3)  # one right-padded batch
    ref = torch.stack([_ref_hidden(model, tok, _template(t), 3) for t in TEXTS]) @ w.T
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert not ar.supports(2)


def test_identity_value_head_reads_the_raw_block_output(base, anthropic_ar):
    model, tok = base
    folder, _ = anthropic_ar
    ar = _open({"kind": "value_head", "folder": str(folder)})
    ar.heads = {3: identity_head(32)}
    torch.testing.assert_close(ar.encode(TEXTS[:1], 3)[0], _ref_hidden(model, tok, _template(TEXTS[0]), 3), rtol=1e-4, atol=1e-4)


def _lora(model, folder: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False))
    pm.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def lora_setup(base, tmp_path_factory):
    model, tok = base
    root = tmp_path_factory.mktemp("lora_ar")
    bdir = root / "base"
    model.save_pretrained(str(bdir))
    tok.save_pretrained(str(bdir))
    ar = _lora(model, root / "ar", seed=7)
    torch.manual_seed(8)
    heads = {"0": torch.randn(32, 32) / 6, "2": torch.randn(32, 32) / 6}  # block keys → layers 1, 3
    save_tensors(ar / "value_heads.safetensors", heads)
    return bdir, ar, heads


def _ref_lora(model, folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()


def test_nla_at_home_ar_left_padding_equals_each_text_alone(base, lora_setup):
    model, tok = base
    bdir, folder, heads = lora_setup
    sec = {"kind": "lora_heads", "folder": str(folder), "base": {"id": str(bdir)}, "padding_side": "left",
           "head_file": "value_heads.safetensors", "max_tokens": 256}
    ar = _open(sec)
    assert sorted(ar.heads) == [1, 3]
    ids, mask = ar.batch(TEXTS)
    assert mask[:, -1].all() and not mask[:, 0].all()  # left padded
    pm = _ref_lora(model, folder)
    for layer in (1, 3):
        got = ar.encode(TEXTS, layer)
        ref = torch.stack([_ref_hidden(pm, tok, _template(t), layer) for t in TEXTS]) @ heads[str(layer - 1)].T
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # the LoRA matters: the base model alone gives something else
    plain = _ref_hidden(model, tok, _template(TEXTS[0]), 3) @ heads["2"].T
    assert not torch.allclose(ar.encode(TEXTS[:1], 3)[0], plain, atol=1e-3)


def test_hook_ar_reads_the_first_marker(base, lora_setup):
    model, tok = base
    bdir, folder, _ = lora_setup
    sec = {"kind": "lora_marker", "folder": str(folder), "base": {"id": str(bdir)}, "read": "marker", "marker": "㈎",
           "add_special_tokens": False}
    ar = _open(sec)
    assert ar.heads is None and ar.supports(3)
    pm = _ref_lora(model, folder)
    ref = torch.stack([_ref_hidden(pm, tok, _template(t) + "㈎", 3, add_special_tokens=False) for t in TEXTS])
    torch.testing.assert_close(ar.encode(TEXTS, 3), ref, rtol=1e-4, atol=1e-4)


def test_long_explanations_keep_the_read_suffix(base, anthropic_ar):
    _, tok = base
    folder, _ = anthropic_ar
    ar = _open({"kind": "value_head", "folder": str(folder), "max_tokens": 24})
    ids = ar.prompt_ids("the cat " * 50)
    tail = tok("</text> <summary>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 24 and ids[-len(tail):] == tail


def test_nrm_mse_is_two_one_minus_cos_and_ranks_like_fve():
    torch.manual_seed(0)
    v = torch.randn(64)
    preds = torch.randn(6, 64) + 0.5 * v
    mse = nrm_mse(preds, v.expand_as(preds))
    torch.testing.assert_close(mse, 2 * (1 - cosine(preds, v[None])), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mse, 4 * (1 - fve_nrm(preds, v[None])), rtol=1e-5, atol=1e-5)
    # the shared best-of-K policy with AR vectors as h picks Anthropic's best (lowest MSE)
    roll = Rollout(ids=torch.arange(12).reshape(6, 2), mask=torch.ones(6, 2, dtype=torch.long))
    cands, best = policy.best_of_k(roll, lambda ids: str(ids), preds, v, None)
    assert best == int(mse.argmin())
    # other scales: mean_d (p̂-ĝ)² = (s²/d)·2(1-cos)
    torch.testing.assert_close(nrm_mse(preds, v.expand_as(preds), 150.0), (150.0**2 / 64) * mse, rtol=1e-4, atol=1e-4)


def test_head_keys_and_bad_sections():
    heads = head_layer_keys({"4": torch.eye(2), "value_head.10.weight": torch.eye(2)})
    assert sorted(heads) == [5, 11]
    with pytest.raises(CheckpointError, match="block index"):
        head_layer_keys({"head": torch.eye(2)})
    with pytest.raises(CheckpointError, match="kind"):
        ReconstructorSection.from_dict({"kind": "mystery", "folder": "."}, "test")


def test_wrong_head_shape_is_refused(base, anthropic_ar):
    folder, _ = anthropic_ar
    ar = _open({"kind": "value_head", "folder": str(folder)})
    with pytest.raises(CheckpointError, match="shape"):
        Reconstructor(backbone=ar.backbone, spec=ar.spec, heads={3: torch.eye(4)})
