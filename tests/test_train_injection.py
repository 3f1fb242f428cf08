"""Trainers of token-injection AVs / ARs (eval_harness injection-targets, train-av-lora, train-ar,
train-grpo) on a tiny random Qwen2 with the marker tokenizer: each runs, learns on a toy task,
resumes exactly, and what it saves opens through the normal card loader (``open_card``)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

import tiny
from nla_space.backbone import load_backbone
from nla_space.errors import CheckpointError
from nla_space.runtime import open_card
from nla_space.verbalizers.injection import input_ids_for_text

from eval_harness.data.injection_targets import (InjectionTargetsSpec, base_spec, build_injection_targets, depth_layers,
                                            load_injection_targets)
from eval_harness.train.ar import ARModel, ARTrainConfig, train_ar
from eval_harness.train.av_lora import AVTrainConfig, injection_card, injection_card_dict, train_av
from eval_harness.train.grpo import GRPOConfig, template_rate, train_grpo

LAYERS = 8
WORDS = [w for w in tiny.WORDS if w.isalpha()]


KEYWORDS = ("cat", "dog", "fire", "water")


def _texts(n: int, seed: int = 0) -> list[str]:
    """Four random words then a keyword (the toy task: the description names the keyword)."""
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(4)) + " " + KEYWORDS[i % 4] for i in range(n)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved tiny base model, a texts file and a finished injection target set whose descriptions
    are replaced by a toy task ("the <keyword>", the text's last word) so that a few SFT steps learn them."""
    root = tmp_path_factory.mktemp("inj_train")
    model, tok = tiny.make_marker_model("qwen2", layers=LAYERS, hidden=32, seed=1)
    with torch.no_grad():  # a random LM head (std 0.02) on a normed d=32 state caps logits near ±0.6: scale it so a LoRA can learn peaked outputs
        model.lm_head.weight.mul_(40.0)
    base = root / "base"
    model.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    texts = root / "texts.jsonl"
    texts.write_text("".join(json.dumps({"id": f"x{i}", "text": t}) + "\n" for i, t in enumerate(_texts(40))), encoding="utf-8")
    bb = load_backbone(str(base))
    spec = InjectionTargetsSpec(backbone=str(base), texts_file=str(texts), bands=[10, 47, 80], max_new_tokens=6, batch_size=16,
                                fractions={"av_sft": 0.4, "ar_sft": 0.2, "rl": 0.2, "heldout": 0.2})
    ts = build_injection_targets(bb, spec, root / "targets")
    rows = [json.loads(x) for x in (root / "targets" / "texts.jsonl").read_text(encoding="utf-8").splitlines()]
    for r in rows:
        r["description"] = "the " + r["text"].split()[-1]
    (root / "targets" / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"root": root, "base": base, "model": model, "tok": tok, "texts": texts, "spec": spec, "ts_built": ts}


def _av_cfg(**kw) -> AVTrainConfig:
    d = dict(max_steps=6, batch_size=6, lr=5e-3, val_every=3, lora_r=4, lora_alpha=8, lora_dropout=0.0, val_frac=0.25, val_rows=12)
    d.update(kw)
    return AVTrainConfig(**d)


# ------------------------------------------------------------------ injection-targets


def test_depth_layers_map_the_phi4_bands():
    # Phi-4 (40 blocks): nla-at-home's v2 layer → band map {4:10, 10:25, 16:40, 20:47, 26:63, 32:80, 38:96}
    # (scripts/split_descriptions_v2.py, https://github.com/anicka-net/nla-at-home), layer = block + 1
    assert [(d.block, d.prompt_pct) for d in depth_layers(40)] == [(4, 10), (10, 25), (16, 40), (19, 47), (25, 63), (32, 80), (38, 96)]
    # SmolLM2 (30 blocks): the last band stays before the final norm (block ≤ n − 2)
    assert [d.layer for d in depth_layers(30)] == [4, 8, 13, 15, 20, 25, 29]
    assert [d.layer for d in depth_layers(4)] == [1, 2, 3]  # merged bands


def test_injection_targets_layout_splits_and_activations(world):
    ts = load_injection_targets(world["root"] / "targets")
    meta = ts.meta
    assert meta["complete"] and meta["n"] == 40 and meta["layers"] == ts.layers == [2, 5, 7]
    assert sum(meta["split_counts"].values()) == 40 and meta["split_counts"]["heldout"] == 8
    by_split = {s: {ts.texts[i] for i in ts.indices(s)} for s in ("av_sft", "ar_sft", "rl", "heldout")}
    names = list(by_split)
    assert all(not (by_split[a] & by_split[b]) for a in names for b in names if a < b)  # split by text, disjoint
    assert all(isinstance(d, str) for d in world["ts_built"].descriptions)  # greedy replies were written
    # the activation is hidden_states[ℓ] of the base model at the last token of the chat-wrapped text
    model, tok = world["model"], world["tok"]
    for i in (0, 17):
        ids = torch.tensor([input_ids_for_text(tok, base_spec(), ts.texts[i])])
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        for ell in ts.layers:
            torch.testing.assert_close(ts.vectors[ell][i], hs[ell][0, -1].float(), rtol=1e-4, atol=1e-5)
    keep = [i for i, s in enumerate(ts.splits) if s != "heldout"]
    torch.testing.assert_close(ts.mus[5], ts.vectors[5][keep].mean(0))


def test_injection_targets_resume_equals_uninterrupted(world, tmp_path):
    bb = load_backbone(str(world["base"]))
    spec = world["spec"]
    assert build_injection_targets(bb, spec, tmp_path / "t", stop_after_shards=1) is None
    with pytest.raises(Exception, match="--resume"):
        build_injection_targets(bb, spec, tmp_path / "t")
    ts = build_injection_targets(bb, spec, tmp_path / "t", resume=True)
    ref = world["ts_built"]
    assert ts.texts == ref.texts and ts.splits == ref.splits and ts.descriptions == ref.descriptions
    for ell in ref.layers:
        torch.testing.assert_close(ts.vectors[ell], ref.vectors[ell])


# ------------------------------------------------------------------ train-av-lora / train-ar


@pytest.fixture(scope="module")
def trained(world):
    """An SFT AV (40 steps on the toy descriptions) and an AR (30 steps)."""
    ts = load_injection_targets(world["root"] / "targets")
    av_out, ar_out = world["root"] / "av", world["root"] / "ar"
    st_av = train_av(load_backbone(str(world["base"])), ts, av_out, _av_cfg(max_steps=40, val_every=20, lr=1e-2))
    st_ar = train_ar(load_backbone(str(world["base"])), ts, ar_out,
                     ARTrainConfig(max_steps=30, batch_size=8, lr=3e-3, head_lr=1e-2, eval_every=15, lora_r=4, lora_alpha=8))
    return {"ts": ts, "av": av_out, "ar": ar_out, "st_av": st_av, "st_ar": st_ar}


def _log(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "log.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]


def test_av_sft_loss_decreases_and_writes_a_sidecar(world, trained):
    rows = [r for r in _log(trained["av"]) if r["loss"] is not None]
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    val = [r for r in _log(trained["av"]) if "val_loss" in r]
    assert val[-1]["val_loss"] < val[0]["val_loss"] and "val_gap" in val[-1]
    best = trained["av"] / "best"
    sc = yaml.safe_load((best / "nla_meta.yaml").read_text(encoding="utf-8"))
    assert sc["role"] == "av" and sc["training"]["injection_mode"] == "normalize" and sc["training"]["chat_template"] is True
    assert sc["depth_percentages"] == sorted(d.prompt_pct for d in trained["ts"].depths())
    assert "{depth_pct}" in sc["prompt_templates"]["av"] and sc["tokens"]["injection_char"] == "★"
    assert json.loads((best / "val_text_ids.json").read_text()) and (best / "adapter_model.safetensors").is_file()
    adapter = json.loads((best / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(world["base"])  # the backbone as given, as the loader compares


def test_ar_loss_decreases_and_heldout_centered_cosine_improves(trained):
    rows = _log(trained["ar"])
    losses = [r["loss"] for r in rows if r["loss"] is not None]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    evals = [r for r in rows if "eval_cen_cos" in r]
    # the toy descriptions take 4 values, so only the raw direction (the layer mean) is learnable from them
    assert evals[-1]["eval_raw_cos"] > evals[0]["eval_raw_cos"]
    assert {"eval_top1", "eval_top1_chance", "eval_raw_cos"} <= set(evals[-1])
    # best.json's held-out centered cosine is cos(pred − μ, v − μ) of the AR as the loader opens it
    from nla_space.cards.sections import ReconstructorSection
    from nla_space.reconstructors import open_reconstructor
    from nla_space.scoring import cosine

    ts, best = trained["ts"], json.loads((trained["ar"] / "best" / "best.json").read_text())
    ar = open_reconstructor(ReconstructorSection.from_dict({"kind": "lora_heads", "folder": str(trained["ar"] / "best"),
                                                            "base": {"id": str(ts.meta["backbone"])}, "padding_side": "left"}, "test"))
    held = ts.indices("heldout")
    cen = torch.cat([cosine(ar.encode([ts.descriptions[i] for i in held], ell) - ts.mus[ell], ts.vectors[ell][held] - ts.mus[ell])
                     for ell in ts.layers])
    assert abs(float(cen.mean()) - best["eval_cen_cos"]) < 1e-4


def test_saved_av_and_ar_open_through_the_card_loader(world, trained, tmp_path):
    ts = trained["ts"]
    card = injection_card(trained["av"] / "best", trained["ar"] / "best", str(world["base"]), ts.layers, mu_file="mu_L{layer}.safetensors")
    oc = open_card(card, device="cpu")
    assert oc.av.spec.sources["rule"] == "sidecar" and oc.av.spec.rule == "normalize"
    assert set(oc.mus) == set(ts.layers)  # centered scores through the card's mu_file
    # the activation the card reads is the one the AV was trained on
    torch.testing.assert_close(oc.extract(ts.texts[0], 5), ts.vectors[5][0], rtol=1e-4, atol=1e-5)
    res = oc.verbalize(vector=ts.vectors[5][0].numpy(), layer=5, k=3, seed=0, max_new_tokens=8)
    assert res.centered and len(res.candidates) == 3
    # the AV learnt to stop: its greedy rollout writes the close tag (the card's stop sequence)
    from nla_space.verbalizers.injection import find_subsequence

    i = trained["ts"].indices("av_sft")[0]
    roll = oc.rollout(ts.vectors[2][i], 1, 1.0, 12, True, 0, 2)
    assert find_subsequence(roll.ids[0].tolist(), list(oc.av.close_ids)) >= 0
    assert 0 < int(roll.mask[0].sum()) <= 8
    # the loaded AR equals the trained one on the same texts
    bb = load_backbone(str(world["base"]))
    from peft import PeftModel

    from nla_space.hub import load_state_dict

    pm = PeftModel.from_pretrained(bb.model, str(trained["ar"] / "best"))
    arm = ARModel(bb, pm, ts.layers, 256)
    heads = load_state_dict(trained["ar"] / "best" / "value_heads.safetensors")
    with torch.no_grad():
        for ell in ts.layers:
            arm.heads[str(ell)].copy_(heads[str(ell - 1)])
        texts = ["the cat", "a red king of france"]
        torch.testing.assert_close(oc.reconstructor.encode(texts, 7), arm.predict(texts, [7, 7]), rtol=1e-4, atol=1e-4)
    # and the card JSON opens by path
    path = tmp_path / "card.json"
    path.write_text(json.dumps(injection_card_dict(trained["av"] / "best", trained["ar"] / "best", str(world["base"]), ts.layers)))
    assert open_card(str(path), device="cpu").layers == ts.layers


def test_av_and_ar_resume_equal_uninterrupted(world, tmp_path):
    ts = load_injection_targets(world["root"] / "targets")
    train_av(load_backbone(str(world["base"])), ts, tmp_path / "full", _av_cfg(max_steps=4, val_every=2))
    train_av(load_backbone(str(world["base"])), ts, tmp_path / "part", _av_cfg(max_steps=2, val_every=2))
    with pytest.raises(Exception, match="--resume"):
        train_av(load_backbone(str(world["base"])), ts, tmp_path / "part", _av_cfg(max_steps=4, val_every=2))
    st = train_av(load_backbone(str(world["base"])), ts, tmp_path / "part", _av_cfg(max_steps=4, val_every=2), resume=True)
    assert st["step"] == 4
    from nla_space.hub import load_state_dict

    a = load_state_dict(tmp_path / "full" / "checkpoint" / "adapter.safetensors")
    b = load_state_dict(tmp_path / "part" / "checkpoint" / "adapter.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert [r["step"] for r in _log(tmp_path / "part")] == [0, 1, 2, 3, 4]
    cfg = ARTrainConfig(max_steps=4, batch_size=8, lr=3e-3, head_lr=1e-2, eval_every=2, lora_r=4, lora_alpha=8)
    train_ar(load_backbone(str(world["base"])), ts, tmp_path / "arf", cfg)
    train_ar(load_backbone(str(world["base"])), ts, tmp_path / "arp", ARTrainConfig(**{**cfg.__dict__, "max_steps": 2}))
    train_ar(load_backbone(str(world["base"])), ts, tmp_path / "arp", cfg, resume=True)
    a = load_state_dict(tmp_path / "arf" / "checkpoint" / "heads.safetensors")
    b = load_state_dict(tmp_path / "arp" / "checkpoint" / "heads.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ train-grpo


def _grpo_cfg(**kw) -> GRPOConfig:
    d = dict(steps=4, batch=2, group_size=4, max_new_tokens=8, temperature=1.0, lr=1e-3, eval_every=2, eval_items=4, seed=0)
    d.update(kw)
    return GRPOConfig(**d)


def test_grpo_contrastive_ar_logs_the_hacking_watch_and_resumes(world, trained, tmp_path):
    ts = trained["ts"]
    full = train_grpo(load_backbone(str(world["base"])), ts, trained["av"] / "best", tmp_path / "g", _grpo_cfg(), ar_folder=trained["ar"] / "best")
    assert full["step"] == 4
    rows = _log(tmp_path / "g")
    keys = {"reward", "cos_true", "cos_wrong", "top1_vs_wrong", "closed_rate", "mean_len", "distinct_1", "distinct_2", "template_rate", "kl"}
    assert keys <= set(rows[1]) and rows[0]["step"] == 0 and "eval_top1_vs_wrong" in rows[0]
    assert rows[1]["closed_rate"] > 0.5  # the SFT AV learnt to write the close tag
    sc = yaml.safe_load((tmp_path / "g" / "best" / "nla_meta.yaml").read_text(encoding="utf-8"))
    assert sc["stage"] == "grpo" and sc["training"]["grpo"]["kl_coef"] == 0.02
    # resume: 2 steps + 2 resumed steps = 4 uninterrupted steps
    train_grpo(load_backbone(str(world["base"])), ts, trained["av"] / "best", tmp_path / "h", _grpo_cfg(steps=2), ar_folder=trained["ar"] / "best")
    train_grpo(load_backbone(str(world["base"])), ts, trained["av"] / "best", tmp_path / "h", _grpo_cfg(), ar_folder=trained["ar"] / "best", resume=True)
    from nla_space.hub import load_state_dict

    a = load_state_dict(tmp_path / "g" / "checkpoint" / "adapter.safetensors")
    b = load_state_dict(tmp_path / "h" / "checkpoint" / "adapter.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    # the GRPO AV still opens through the card loader
    card = injection_card(tmp_path / "g" / "best", trained["ar"] / "best", str(world["base"]), ts.layers)
    assert open_card(card, device="cpu").verbalize(vector=ts.vectors[5][0].numpy(), layer=5, k=2, max_new_tokens=6).k == 2


def test_grpo_reencode_scorer_and_base_reference_run(world, trained, tmp_path):
    st = train_grpo(load_backbone(str(world["base"])), trained["ts"], trained["av"] / "best", tmp_path / "r",
                    _grpo_cfg(steps=2, scorer="reencode", ref="base", centered=False))
    assert st["step"] == 2 and _log(tmp_path / "r")[-1]["reward"] is not None


def test_grpo_moves_a_toy_reward_up(world, trained, tmp_path):
    """Toy reward: the fraction of a sample's tokens with an even id. GRPO must raise it."""

    def even_reward(texts, ids, closed, v, v_wrong, layer):
        r = torch.tensor([sum(1 for t in row if t % 2 == 0) / max(len(row), 1) for row in ids])
        return {"reward": r}

    st = train_grpo(load_backbone(str(world["base"])), trained["ts"], trained["av"] / "best", tmp_path / "toy",
                    _grpo_cfg(steps=16, batch=2, group_size=8, lr=1e-2, kl_coef=0.0, eval_every=100, eval_items=0),
                    reward_fn=even_reward)
    rewards = [r["reward"] for r in _log(tmp_path / "toy") if "reward" in r]
    assert st["step"] == 16
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.1, rewards


def test_template_rate_counts_prefixes_shared_across_activations():
    rows = [[1, 2, 3], [1, 2, 3], [4, 5], [1, 2, 3]]
    assert template_rate(rows, [0, 0, 1, 2], prefix=2) == 0.75
    assert template_rate(rows, [0, 0, 1, 0], prefix=2) == 0.0


def test_the_four_commands_run_from_the_cli(world, tmp_path):
    """`python -m eval_harness injection-targets / train-av-lora / train-ar / train-grpo` end to end (2 steps each)."""
    from eval_harness.cli import main

    base, t = str(world["base"]), tmp_path
    assert main(["injection-targets", "--backbone", base, "--texts", str(world["texts"]), "--out", str(t / "tg"), "--bands", "10,47,80",
                 "--max-new-tokens", "4", "--fractions", "av_sft=0.4,ar_sft=0.2,rl=0.2,heldout=0.2"]) == 0
    assert main(["train-av-lora", "--targets", str(t / "tg"), "--out", str(t / "av"), "--max-steps", "2", "--batch-size", "4",
                 "--lora-r", "4", "--lora-alpha", "8", "--val-rows", "4"]) == 0
    assert main(["train-ar", "--targets", str(t / "tg"), "--out", str(t / "ar"), "--max-steps", "2", "--lora-r", "4", "--lora-alpha", "8",
                 "--eval-texts", "4"]) == 0
    assert main(["train-grpo", "--targets", str(t / "tg"), "--sft", str(t / "av" / "best"), "--ar", str(t / "ar" / "best"),
                 "--out", str(t / "g"), "--steps", "2", "--batch", "2", "--group-size", "2", "--max-new-tokens", "4",
                 "--eval-items", "2"]) == 0
    assert (t / "g" / "best" / "nla_meta.yaml").is_file()
    assert main(["train-av-lora", "--targets", str(t / "nope"), "--out", str(t / "x")]) == 2  # a clear one-line error


def test_sft_loss_and_policy_logprobs_match_a_plain_forward():
    """The batched, right-padded, head-on-targets-only losses equal one plain HF forward per row."""
    import torch.nn.functional as F

    from nla_space.backbone import from_model
    from eval_harness.train.av_lora import make_av, make_sidecar, sft_loss, target_ids
    from eval_harness.train.grpo import rollout_group, token_logprobs

    m, tok = tiny.make_marker_model("qwen2", layers=LAYERS, hidden=32, seed=1)
    bb = from_model(m, tok)
    av = make_av(bb, make_sidecar(bb, "★", "normalize", 3.0, [10], {}))
    torch.manual_seed(0)
    v, layers = torch.randn(3, 32), [2, 5, 7]
    tg = [target_ids(av, "the cat", 8), target_ids(av, "a red dog is here now", 8), target_ids(av, "", 8)]
    assert tg[2] == list(av.close_ids)
    tot, n = 0.0, 0
    with torch.no_grad():
        got = sft_loss(av, v, layers, tg)
        for vi, ell, t in zip(v, layers, tg):
            e = torch.cat([av.inputs_embeds(vi, ell)[0], bb.embed_tokens(torch.tensor(t))])
            P = e.shape[0] - len(t)
            tot += float(F.cross_entropy(m(inputs_embeds=e[None]).logits[0, P - 1 : -1], torch.tensor(t), reduction="sum"))
            n += len(t)
    assert abs(float(got) - tot / n) < 1e-5
    roll, rows, texts, closed = rollout_group(av, v[0], 5, 3, GRPOConfig(max_new_tokens=6), torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp = token_logprobs(av, v[0], 5, roll)
        e = av.inputs_embeds(v[0], 5)[0]
        for i in range(3):
            k = int(roll.mask[i].sum())
            ids = roll.ids[i, :k]
            lg = m(inputs_embeds=torch.cat([e, bb.embed_tokens(ids)])[None]).logits[0, e.shape[0] - 1 : e.shape[0] - 1 + k]
            torch.testing.assert_close(lp[i, :k], torch.log_softmax(lg, -1).gather(-1, ids[:, None])[:, 0], rtol=1e-5, atol=1e-5)
            assert float(lp[i, k:].abs().sum()) == 0.0 and rows[i] == ids.tolist()


def test_center_normalize_rule_trains_saves_mu_and_opens_through_the_card_loader(world, trained, tmp_path):
    """``--rule center_normalize``: the AV injects (v − μ_ℓ) at the scale; its folder carries the
    per-layer μ (the target set's), the loader reads it, and GRPO keeps it in its best/."""
    from nla_space.verbalizers.injection import INJECT_MU_FILE, scale_vector

    ts = trained["ts"]
    st = train_av(load_backbone(str(world["base"])), ts, tmp_path / "av", _av_cfg(max_steps=2, val_every=2, rule="center_normalize"))
    best = tmp_path / "av" / "best"
    assert st["step"] == 2 and (best / INJECT_MU_FILE).is_file()
    side = yaml.safe_load((best / "nla_meta.yaml").read_text(encoding="utf-8"))
    assert side["training"]["injection_mode"] == "center_normalize" and side["extraction"]["inject_mu_file"] == INJECT_MU_FILE
    oc = open_card(injection_card(best, trained["ar"] / "best", str(world["base"]), ts.layers), device="cpu")
    assert oc.av.spec.rule == "center_normalize"
    for ell in ts.layers:
        torch.testing.assert_close(oc.av.inject_mu[ell], ts.mus[ell])
    v, ell = ts.vectors[5][0], 5
    ids, pos = oc.av.prompt(ell)
    row = oc.av.inputs_embeds(v, ell)[0, pos]
    want = (v - ts.mus[ell]) * (oc.av.spec.scale / (v - ts.mus[ell]).norm())
    torch.testing.assert_close(row, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(row, scale_vector(v, "center_normalize", oc.av.spec.scale, ts.mus[ell]))
    assert oc.verbalize(vector=v.numpy(), layer=ell, k=2, seed=0, max_new_tokens=4).candidates
    g = train_grpo(load_backbone(str(world["base"])), ts, best, tmp_path / "g", _grpo_cfg(steps=1, eval_every=1, eval_items=2),
                   ar_folder=trained["ar"] / "best")
    assert g["step"] == 1 and (tmp_path / "g" / "best" / INJECT_MU_FILE).is_file()
    # an AV folder that names the rule but lost its μ file is refused with a clear error
    (best / INJECT_MU_FILE).unlink()
    with pytest.raises(CheckpointError, match="inject_mu"):
        open_card(injection_card(best, trained["ar"] / "best", str(world["base"]), ts.layers), device="cpu")
    with pytest.raises(ValueError, match="μ"):
        scale_vector(v, "center_normalize", 1.0)
