"""The SFT trainer on tiny random backbones: loss goes down, resume is exact, the best AV opens as a card."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from eval_harness.targets import HealthThresholds, TargetsSpec, build_targets
from eval_harness.train import TrainConfig, pad_gold, sft_loss, train
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
    av = build_prefix_av(NLAConfig(extraction_layer=2, num_prefix_tokens=2), bb)
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

    import eval_harness.train as tr

    bb, ts = setup
    calls = {"n": 0}

    def loss_then_sigterm(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return sft_loss(*a, **kw)

    monkeypatch.setattr(tr, "sft_loss", loss_then_sigterm)
    state = tr.train(bb, ts, tmp_path / "c", _cfg())
    assert state["stopped_early"] and state["step"] == 2
    assert json.loads((tmp_path / "c" / "checkpoint" / "state.json").read_text())["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is not tr._StopFlag._handle


def test_lr_schedule():
    from eval_harness.train import _lr_at

    cfg = TrainConfig(lr=1.0, warmup_steps=2, schedule="cosine")
    assert _lr_at(cfg, 0, 12) == 0.5 and _lr_at(cfg, 2, 12) == pytest.approx(1.0)
    assert _lr_at(cfg, 12, 12) == pytest.approx(0.1) and _lr_at(cfg, 7, 12) == pytest.approx(0.55)
    assert _lr_at(TrainConfig(lr=0.3), 100, 12) == 0.3
