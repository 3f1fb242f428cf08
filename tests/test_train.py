"""The SFT trainer on tiny random backbones: loss goes down, resume is exact, the best AV opens as a card."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from eval_harness.data.targets import HealthThresholds, TargetsSpec, build_targets
from eval_harness.train.prefix import TrainConfig, pad_gold, sft_loss, train
from nla_space.backbone import load_backbone
from nla_space.hub import load_state_dict
from nla_space.verbalizers import NLAConfig, build_prefix_av


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return tiny.save_backbone(tmp_path_factory.mktemp("bb"))


@pytest.fixture(scope="module")
def setup(tiny_folder, tmp_path_factory):
    bb = load_backbone(str(tiny_folder))
    spec = TargetsSpec(backbone=str(tiny_folder), layer=2, n=40, seq_len=6, seed=0, batch_size=20,
                       n_val=4, n_test=4, n_mu_pool=8, health=HealthThresholds(min_dim_std=1e-4, min_norm_std=0.0))
    ts = build_targets(bb, spec, tmp_path_factory.mktemp("t") / "targets")
    return bb, ts


def _cfg(**kw) -> TrainConfig:
    base = dict(lr=3e-2, batch_size=8, num_prefix_tokens=2, max_steps=6, val_every=3, val_vectors=2, val_k=4, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_decreases_and_only_adapter_trains(setup, tmp_path):
    bb, ts = setup
    av = build_prefix_av(NLAConfig(backbone_id="tiny", backbone_dtype="float32", extraction_layer=2, num_prefix_tokens=2), bb)
    rows = ts.indices("train")[:8]
    toy = bb.tokenizer("the cat is on the house", add_special_tokens=False)["input_ids"]
    gold, mask = pad_gold([toy[: 3 + i % 4] for i in range(8)], bb.pad_id, 64)
    v = ts.vectors[rows]
    opt = torch.optim.AdamW(av.parameters(), lr=1e-1, weight_decay=0.0)
    losses = []
    for _ in range(30):
        loss = sft_loss(av, bb, v, gold, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.2, losses
    assert all(p.grad is None for p in bb.model.parameters())
    assert av.proj.weight.grad is not None


def test_train_resume_and_open_card(setup, tiny_folder, tmp_path):
    from nla_space.runtime import open_card

    bb, ts = setup
    full = train(bb, ts, tmp_path / "a", _cfg())
    assert full["step"] == 6 and not full["stopped_early"]
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(7))
    assert "val_bestof4_cen" in log[0] and "val_bestof4_cen" in log[3] and log[1]["loss"] > 0
    assert not any(k.startswith("val_fve") or k == "fve" for r in log for k in r)

    # interrupted after 3 steps, resumed to 6: the same adapter as the uninterrupted run
    part = train(bb, ts, tmp_path / "b", _cfg(max_steps=3))
    assert part["step"] == 3
    with pytest.raises(Exception, match="--resume"):
        train(bb, ts, tmp_path / "b", _cfg())
    resumed = train(bb, ts, tmp_path / "b", _cfg(), resume=True)
    assert resumed["step"] == 6
    wa = load_state_dict(tmp_path / "a" / "checkpoint" / "adapter.safetensors")
    wb = load_state_dict(tmp_path / "b" / "checkpoint" / "adapter.safetensors")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    log_b = [json.loads(x)["step"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert log_b == list(range(7))

    # the best AV is a card folder: config.json + av.safetensors + mu.safetensors
    oc = open_card(str(tmp_path / "a" / "best"), backbone=str(tiny_folder))
    assert oc.trained and oc.mu is not None and oc.av.cfg.num_prefix_tokens == 2
    out = oc.verbalize(text="the cat is on the house", k=4, max_new_tokens=5, seed=0)
    assert out.centered and 0.0 <= out.score <= 1.0


def test_sigterm_saves_checkpoint(setup, tmp_path, monkeypatch):
    import os
    import signal

    import eval_harness.train.prefix as tr

    bb, ts = setup
    calls = {"n": 0}

    def loss_then_sigterm(*a, **kw):
        calls["n"] += torch.is_grad_enabled()  # training steps only (validation's ce_gain calls it too)
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return sft_loss(*a, **kw)

    monkeypatch.setattr(tr, "sft_loss", loss_then_sigterm)
    state = tr.train(bb, ts, tmp_path / "c", _cfg())
    assert state["stopped_early"] and state["step"] == 2
    assert json.loads((tmp_path / "c" / "checkpoint" / "state.json").read_text())["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is not tr._StopFlag._handle


def test_ce_gain_is_zero_when_v_is_ignored_and_grows_when_v_decides_the_text(setup):
    from eval_harness.train.prefix import ce_gain

    bb, ts = setup
    rows = ts.indices("train")[:8]
    v = ts.vectors[rows]
    a = bb.tokenizer("the cat is on the house", add_special_tokens=False)["input_ids"]
    b = bb.tokenizer("a dog ran far away", add_special_tokens=False)["input_ids"]
    gold_rows = [a if i % 2 == 0 else b for i in range(8)]  # the text is decided by which v it came with
    av = build_prefix_av(NLAConfig(backbone_id="tiny", backbone_dtype="float32", extraction_layer=2, num_prefix_tokens=2, inject_norm="center_embed"), bb, mu=ts.mu())
    with torch.no_grad():
        av.proj.weight.zero_()
    blind = ce_gain(av, bb, v, gold_rows, 64)
    assert blind["val_ce_gain"] == pytest.approx(0.0, abs=1e-6) and blind["val_ce"] > 0
    av = build_prefix_av(NLAConfig(backbone_id="tiny", backbone_dtype="float32", extraction_layer=2, num_prefix_tokens=2, inject_norm="center_embed"), bb, mu=ts.mu())
    gold, mask = pad_gold(gold_rows, bb.pad_id, 64)
    opt = torch.optim.AdamW(av.parameters(), lr=5e-2, weight_decay=0.0)
    for _ in range(40):
        loss = sft_loss(av, bb, v, gold, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert ce_gain(av, bb, v, gold_rows, 64)["val_ce_gain"] > 0.05  # measured ≈ 0.09 on this tiny random model


def test_center_embed_injects_the_direction_of_v_minus_mu_and_round_trips(setup, tiny_folder, tmp_path):
    from nla_space.runtime import open_card

    bb, ts = setup
    mu = ts.mu()
    av = build_prefix_av(NLAConfig(backbone_id="tiny", backbone_dtype="float32", extraction_layer=2, num_prefix_tokens=1, inject_norm="center_embed"), bb, mu=mu)
    x = torch.nn.functional.normalize(torch.randn(3, mu.numel(), generator=torch.Generator().manual_seed(0)), dim=-1) * mu.norm()
    want = torch.nn.functional.normalize(x, dim=-1) * av.embed_row_norm  # identity proj at init: the slot is the unit v − μ, rescaled
    for scale in (1.0, 5.0):
        assert torch.allclose(av.inject(mu + scale * x)[:, 0], want, atol=1e-6)
    uncentered = torch.nn.functional.normalize(mu + x, dim=-1) * av.embed_row_norm
    assert (uncentered - want).norm(dim=-1).min() > 0.1 * av.embed_row_norm  # so the check above tells v − μ from v
    with pytest.raises(ValueError, match="takes no mu"):
        build_prefix_av(NLAConfig(backbone_id="tiny", backbone_dtype="float32", extraction_layer=2, inject_norm="embed"), bb, mu=mu)

    state = train(bb, ts, tmp_path / "ce", _cfg(inject_norm="center_embed", max_steps=3, val_every=3))
    assert state["step"] == 3
    oc = open_card(str(tmp_path / "ce" / "best"), backbone=str(tiny_folder))
    assert oc.av.cfg.inject_norm == "center_embed" and torch.equal(oc.av.inject_mu, mu)
    log = [json.loads(x) for x in (tmp_path / "ce" / "log.jsonl").read_text().splitlines()]
    assert {"val_ce", "val_ce_shifted", "val_ce_gain"} <= set(log[0]) and "val_ce_gain" in log[-1]


def test_lr_scales_slow_or_freeze_the_projection_or_the_prefix(setup, tmp_path):
    bb, ts = setup
    train(bb, ts, tmp_path / "frozen_proj", _cfg(max_steps=3, val_every=3, lr_proj_scale=0.0))
    w = load_state_dict(tmp_path / "frozen_proj" / "checkpoint" / "adapter.safetensors")
    assert torch.equal(w["proj.weight"], torch.eye(w["proj.weight"].shape[0]))  # lr × 0: still the identity init
    bos = bb.model.get_input_embeddings().weight[bb.bos_id].detach().float()
    assert not torch.allclose(w["prefix_embeds"], bos.expand_as(w["prefix_embeds"]))  # the prefix trained at lr
    train(bb, ts, tmp_path / "frozen_prefix", _cfg(max_steps=3, val_every=3, lr_prefix_scale=0.0))
    w = load_state_dict(tmp_path / "frozen_prefix" / "checkpoint" / "adapter.safetensors")
    assert torch.equal(w["prefix_embeds"], bos.expand_as(w["prefix_embeds"]))  # frozen at its BOS-row init
    assert not torch.equal(w["proj.weight"], torch.eye(w["proj.weight"].shape[0]))
    with pytest.raises(Exception, match="lr-proj-scale"):
        train(bb, ts, tmp_path / "neg", _cfg(lr_proj_scale=-1.0))
    with pytest.raises(Exception, match="lr-prefix-scale"):
        train(bb, ts, tmp_path / "neg2", _cfg(lr_prefix_scale=-1.0))


def test_lr_schedule():
    from eval_harness.train.prefix import _lr_at

    cfg = TrainConfig(lr=1.0, warmup_steps=2, schedule="cosine")
    assert _lr_at(cfg, 0, 12) == 0.5 and _lr_at(cfg, 2, 12) == pytest.approx(1.0)
    assert _lr_at(cfg, 12, 12) == pytest.approx(0.1) and _lr_at(cfg, 7, 12) == pytest.approx(0.55)
    assert _lr_at(TrainConfig(lr=0.3), 100, 12) == 0.3
