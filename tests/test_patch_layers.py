"""One patch AV over several layers (issue 23 part 1, :mod:`nla_space.verbalizers.patch`): the LoRA is on
only for blocks ≥ the layer read and only inside the AV's own forward, so reads stay exact at every
layer; the trainer cycles the layers and logs ``val_ce_gain`` per layer."""

from __future__ import annotations

import json
import threading

import pytest
import torch

import tiny
from nla_space.activations import read_rows
from nla_space.backbone import load_backbone
from nla_space.errors import CheckpointError
from nla_space.verbalizers.patch import PatchSpec, ResidualPatch, attach, text_rows, token_ce

ROWS_TEXT = ["the cat is on the tree .", "paris is a city in france", "one two three four five"]


@pytest.fixture()
def multi(tmp_path):
    """A 6-block tiny backbone with a perturbed LoRA on blocks 2 … 5, reading layers 2, 3 and 5."""
    bb_dir = tiny.save_backbone(tmp_path / "bb", "llama", layers=6)
    plain, bb = load_backbone(str(bb_dir)), load_backbone(str(bb_dir))
    spec = PatchSpec(layer=2, layers=[2, 3, 5], r=4, alpha=8)
    pm = attach(bb, spec, trainable=True)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return plain, bb, pm, spec


def _rows(bb):
    return text_rows(bb, ROWS_TEXT, 16)


def test_reads_outside_the_av_forward_see_the_plain_backbone(multi) -> None:
    plain, bb, pm, spec = multi
    for layer in range(bb.num_layers + 1):  # LoRA blocks included: the gate is off outside ResidualPatch.apply
        torch.testing.assert_close(read_rows(bb, layer, _rows(bb)), read_rows(plain, layer, _rows(bb)), rtol=0, atol=0)


@pytest.mark.parametrize("layer", [2, 3, 5])
def test_inside_the_av_forward_the_lora_is_on_from_the_layer_read(multi, layer: int) -> None:
    plain, bb, pm, spec = multi
    rows = _rows(bb)
    patch = ResidualPatch(bb, layer)
    ids = torch.tensor([[bb.bos_id] + rows[0]])
    v = read_rows(plain, layer, rows[:1])
    with patch.apply(v, record=True) as states:
        out = bb.model(input_ids=ids, output_hidden_states=True).hidden_states
    # blocks below the layer are untouched: the recorded layer-ℓ state is the plain read of the same tokens
    torch.testing.assert_close(states[0], read_rows(plain, layer, rows[:1]), rtol=0, atol=1e-6)
    for k in range(1, layer):
        torch.testing.assert_close(out[k][:, 1:], plain.model(input_ids=ids, output_hidden_states=True).hidden_states[k][:, 1:],
                                   rtol=0, atol=1e-6)
    # and the LoRA does act above it: the CE differs from the zero-shot patch (same v, LoRA off)
    with_lora = float(token_ce(bb, patch, rows))
    zero_shot = float(token_ce(plain, ResidualPatch(plain, layer), rows))
    assert abs(with_lora - zero_shot) > 1e-3


def test_another_thread_reading_during_an_av_forward_sees_no_lora(multi) -> None:
    plain, bb, pm, spec = multi
    rows = _rows(bb)
    want = read_rows(plain, 6, rows)
    got: list[torch.Tensor] = []
    patch = ResidualPatch(bb, 2)
    with patch.apply(read_rows(plain, 2, rows[:1])):
        t = threading.Thread(target=lambda: got.append(read_rows(bb, 6, rows)))
        t.start()
        t.join()
    torch.testing.assert_close(got[0], want, rtol=0, atol=0)


def test_spec_layers_must_start_at_layer(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="'layers' must be sorted"):
        PatchSpec.from_dict({"layer": 3, "layers": [5, 3]}, "x")
    with pytest.raises(CheckpointError, match="start at 'layer'"):
        PatchSpec.from_dict({"layer": 2, "layers": [3, 5]}, "x")
    assert PatchSpec.from_dict({"layer": 3, "layers": [3, 5]}, "x").read_layers == [3, 5]
    assert PatchSpec(layer=13).read_layers == [13]


def test_training_over_several_layers_logs_each_layer_and_warm_starts(tmp_path) -> None:
    from eval_harness.train.patch import PatchTrainConfig, train_patch

    bb_dir = tiny.save_backbone(tmp_path / "bb", "llama", layers=4)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "split": ["train", "train", "val"][i % 3]}) + "\n" for i, t in enumerate(tiny.SENTENCES * 4)))
    one = PatchTrainConfig(layer=(2,), steps=2, batch_size=4, eval_every=2, val_rows=6, r=4, alpha=8, lr=0.01)
    train_patch(load_backbone(str(bb_dir)), corpus, tmp_path / "one", one)
    cfg = PatchTrainConfig(layer=(3, 1, 2), steps=3, batch_size=4, eval_every=3, val_rows=6, r=4, alpha=8, lr=0.01,
                           init_from=str(tmp_path / "one" / "best"))
    assert cfg.layers == (1, 2, 3) and [cfg.layer_at(s) for s in range(4)] == [1, 2, 3, 1]
    train_patch(load_backbone(str(bb_dir)), corpus, tmp_path / "multi", cfg)
    rows = [json.loads(ln) for ln in (tmp_path / "multi" / "log.jsonl").read_text().splitlines()]
    for key in ("val_ce_gain_L1", "val_ce_gain_L2", "val_ce_gain_L3"):
        assert key in rows[0] and key in rows[-1]
    mean = sum(rows[-1][f"val_ce_L{ell}"] for ell in (1, 2, 3)) / 3
    assert rows[-1]["val_ce"] == pytest.approx(mean, abs=1e-5)
    spec = json.loads((tmp_path / "multi" / "best" / "patch_av.json").read_text())
    assert spec["layer"] == 1 and spec["layers"] == [1, 2, 3]
    # the warm start copied the layer-2 AV's blocks: at step 0 layer 2 reads as that AV did at its step 2
    first = json.loads((tmp_path / "one" / "log.jsonl").read_text().splitlines()[-1])
    assert rows[0]["val_ce_L2"] == pytest.approx(first["val_ce"], abs=1e-5)


# --------------------------------------------------------------------------- greedy repetition guard


def _max_ngram_count(row: list[int], n: int = 3) -> int:
    from collections import Counter

    c = Counter(tuple(row[j : j + n]) for j in range(len(row) - n + 1))
    return max(c.values()) if c else 0


def test_block_repeats_bans_only_a_third_occurrence() -> None:
    from nla_space.rollout import block_repeats

    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6, 0, 0]])
    logits = torch.zeros(1, 10)
    out = block_repeats(logits, ids, 8, 3, protected=[])
    assert out[0, 7] == float("-inf") and torch.isfinite(out[0, [0, 1, 2, 3, 4, 5, 6, 8, 9]]).all()  # (5, 6, 7) twice already
    assert torch.isfinite(block_repeats(logits, ids, 8, 3, protected=[7])).all()  # a stop token is never blocked
    assert torch.isfinite(block_repeats(logits, ids, 5, 3, protected=[])).all()  # (6, 7, 5) once so far: allowed


def test_a_guarded_greedy_rollout_holds_no_3gram_three_times(tmp_path) -> None:
    from nla_space.rollout import sample

    bb = load_backbone(str(tiny.save_backbone(tmp_path / "bb", "llama", layers=2)))
    torch.manual_seed(0)
    prefix = torch.randn(4, 1, bb.hidden_size)
    plain = sample(bb, prefix, 40, greedy=True, stop_ids=[])
    guarded = sample(bb, prefix, 40, greedy=True, stop_ids=[], repeat_ngram=3)
    assert max(_max_ngram_count(r) for r in plain.ids.tolist()) >= 3  # a tiny random model loops greedily
    assert max(_max_ngram_count(r) for r in guarded.ids.tolist()) <= 2
    first = next(j for j in range(40) if _max_ngram_count(plain.ids[0, : j + 1].tolist()) >= 3)
    assert guarded.ids[0, :first].tolist() == plain.ids[0, :first].tolist()  # identical until the guard acts


def test_the_card_setting_reaches_the_greedy_rollout(tmp_path, monkeypatch) -> None:
    from nla_space.runtime import open_card
    from nla_space.verbalizers import patch_card

    card = tiny.make_patch_card(tmp_path / "card", layer=2, default_strategy="greedy")
    for guard in ("0", "3"):
        monkeypatch.setenv(patch_card.REPEAT_ENV, guard)
        patch_card._OPENED.clear()
        assert open_card(str(card)).repeat_ngram == int(guard)
    monkeypatch.delenv(patch_card.REPEAT_ENV)
    data = json.loads(card.read_text())
    data["patch"]["greedy_repeat_ngram"] = 3
    card.write_text(json.dumps(data))
    assert open_card(str(card)).repeat_ngram == 3


def test_judge_perplexity_is_the_judges_token_ce(tmp_path) -> None:
    from eval_harness.evals.fluency import FluencyJudge, has_loop, repeat_rate

    judge = FluencyJudge(str(tiny.save_backbone(tmp_path / "judge", "llama", layers=2)))
    bb = judge.bb
    texts = ["the cat is on the tree .", "a dog", ""]
    got = judge.perplexity(texts, batch_size=2)
    ids = torch.tensor([[bb.bos_id] + list(bb.tokenizer(texts[0], add_special_tokens=False)["input_ids"])])
    logits = bb.model(input_ids=ids).logits.float()
    want = float(torch.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])))
    assert got[0] == pytest.approx(want, rel=1e-4) and got[1] > 1 and got[2] is None  # padding changes nothing; empty: none
    assert has_loop([1, 2, 3, 1, 2, 3, 1, 2, 3]) and not has_loop([1, 2, 3, 1, 2, 3, 4])
    assert repeat_rate([[1, 2, 3] * 3, [4, 5, 6]]) == 0.5


def test_a_checkpoint_kept_without_its_optimizer_resumes_with_fresh_moments(tmp_path, caplog) -> None:
    from eval_harness.train.patch import PatchTrainConfig, train_patch

    bb_dir = tiny.save_backbone(tmp_path / "bb", "llama", layers=4)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "split": ["train", "train", "val"][i % 3]}) + "\n" for i, t in enumerate(tiny.SENTENCES * 4)))
    cfg = dict(layer=(1, 2), batch_size=4, eval_every=2, val_rows=6, r=4, alpha=8, lr=0.01)
    train_patch(load_backbone(str(bb_dir)), corpus, tmp_path / "run", PatchTrainConfig(steps=2, **cfg))
    (tmp_path / "run" / "checkpoint" / "optimizer.pt").unlink()  # what a session commits to stay small
    with caplog.at_level("WARNING"):
        state = train_patch(load_backbone(str(bb_dir)), corpus, tmp_path / "run", PatchTrainConfig(steps=4, **cfg), resume=True)
    assert state["step"] == 4 and "fresh AdamW moments" in caplog.text


# --------------------------------------------------------------------------- a card of several layers


def test_a_several_layer_release_gives_each_layer_its_own_mu_pool_and_calibration(tmp_path, capsys) -> None:
    """patch-release --layers 3 1 2 on a run over layers 1-3: one card, default layer 3 first, μ/pool per
    layer (mu.L{ℓ}, pool.L{ℓ}), a calibration per layer, resumable per layer; requests at each layer use
    that layer's patch, μ, scorer and τ; the AV's layers must cover the card's."""
    from safetensors import safe_open

    from eval_harness.cli import main
    from eval_harness.train.patch import PatchTrainConfig, train_patch
    from nla_space.cards import find_card
    from nla_space.runtime import open_card

    bb_dir = tiny.save_backbone(tmp_path / "bb", "llama", layers=4)
    corpus = tmp_path / "corpus.jsonl"
    splits = ["train", "train", "val", "mu_pool"]
    corpus.write_text("".join(json.dumps({"text": t, "split": splits[i % 4]}) + "\n" for i, t in enumerate(tiny.SENTENCES * 6)))
    cfg = PatchTrainConfig(layer=(1, 2, 3), steps=3, batch_size=4, eval_every=3, val_rows=6, r=4, alpha=8, lr=0.01)
    train_patch(load_backbone(str(bb_dir)), corpus, tmp_path / "run", cfg)
    card_file, av = tmp_path / "card.json", tmp_path / "av"
    args = ["patch-release", "--run", str(tmp_path / "run"), "--corpus", str(corpus), "--av-folder", str(av),
            "--card-file", str(card_file), "--card-id", "local/tiny-multi", "--backbone", str(bb_dir), "--layers", "3", "1", "2",
            "--calibrate", "10", "--strategy", "greedy", "--k", "1", "--target-precision", "0.5", "--title", "t", "--description", "d"]
    assert main(args) == 0
    card = json.loads(card_file.read_text())
    assert card["layers"] == [3, 1, 2] and set(card["patch"]["layer_calibrations"]) == {"1", "2"}
    with safe_open(str(av / "pool.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["pool.L1", "pool.L2", "pool.L3"]
    with safe_open(str(av / "mu.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["mu.L1", "mu.L2", "mu.L3"]
    for ell in (1, 2, 3):
        recs = (tmp_path / "run" / f"calibration_records.L{ell}.jsonl").read_text().splitlines()
        assert len(recs) == 10 and all(json.loads(r)["layer"] == ell for r in recs)
    # a rerun reuses every layer's records (nothing verbalized: the records files are not rewritten)
    stamp = {ell: (tmp_path / "run" / f"calibration_records.L{ell}.jsonl").stat().st_mtime_ns for ell in (1, 2, 3)}
    assert main(args) == 0
    assert stamp == {ell: (tmp_path / "run" / f"calibration_records.L{ell}.jsonl").stat().st_mtime_ns for ell in (1, 2, 3)}
    assert json.loads(card_file.read_text())["patch"] == card["patch"]

    oc = open_card(find_card(str(card_file)))
    assert oc.card.default_layer == 3 and set(oc.av.patches) == {1, 2, 3}
    cal = card["patch"]["layer_calibrations"]
    for ell in (1, 2, 3):
        spec = oc.specificity_at(ell)
        assert spec is not None and torch.equal(spec.mu, oc.mu_at(ell))
        want = card["patch"]["calibration"] if ell == 3 else cal[str(ell)]
        assert spec.calibration.a == want["a"] and oc.tau_at(ell) == want["tau"]
        res = oc.verbalize(text="the cat is on the tree", layer=ell, strategy="greedy")
        assert res.layer == ell and res.tau == oc.tau_at(ell) and res.criterion == "confidence"
        h = oc.reconstruct_texts([res.best.text], ell)
        assert res.best.confidence == pytest.approx(float(spec.confidence(h, oc.read("the cat is on the tree", ell))[0]), abs=1e-4)
    assert not torch.equal(oc.mu_at(1), oc.mu_at(3))
    # reading-eval at every layer, with a same-group retrieval: one run per strategy and layer
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t, "topic": "ab"[i % 2]}) + "\n" for i, t in enumerate(tiny.SENTENCES[:6])))
    out = tmp_path / "res.json"
    assert main(["reading-eval", "--card", str(card_file), "--texts", str(texts), "--strategies", "greedy", "--layers", "all",
                 "--group-by", "topic", "--no-minilm", "--no-judge", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"greedy_L1", "greedy_L2", "greedy_L3"} and res["meta"]["layers"] == [1, 2, 3]
    for ell in (1, 2, 3):
        r = res["results"][f"greedy_L{ell}"]
        assert r["layer"] == ell and 0 <= r["retrieval_in40_same_group"] <= 1 and all(e["layer"] == ell for e in r["examples"])
    assert main(["reading-eval", "--card", str(card_file), "--texts", str(texts), "--strategies", "greedy", "--layers", "1,7",
                 "--no-minilm", "--no-judge", "--out", str(tmp_path / "bad.json")]) == 2
    assert main(["reading-eval", "--card", str(card_file), "--texts", str(texts), "--strategies", "greedy", "--group-by", "colour",
                 "--no-minilm", "--no-judge", "--out", str(tmp_path / "bad.json")]) == 2
    assert "no 'colour' field" in capsys.readouterr().err
    # a card naming a layer its AV does not read is refused
    bad = {**card, "id": "local/bad", "layers": [3, 0]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="reads layer"):
        open_card(find_card(str(tmp_path / "bad.json")))


# --------------------------------------------------------------------------- guided decoding's fluency prior


def test_the_fluency_prior_adds_the_greedy_anchor_and_ranks_by_z_plus_weighted_fluency(tmp_path) -> None:
    """With patch.guided_fluency_weight w > 0 a guided answer has K + 1 candidates (the greedy reading
    last), each with its mean token log-probability under the plain backbone, and the best is the
    argmax of z + w · fluency; w = 0 is the search alone (no anchor, no fluency)."""
    from nla_space.cards import find_card
    from nla_space.lm_score import mean_logprobs
    from nla_space.policy import selection_score
    from nla_space.runtime import open_card

    path = tiny.make_patch_card(tmp_path)
    card = json.loads(path.read_text())
    plain = open_card(find_card(str(path))).verbalize(text="the cat is on the tree", k=3, seed=0, strategy="guided")
    assert all(c.fluency is None for c in plain.candidates) and plain.fluency_weight == 0.0
    card["id"], card["patch"]["guided_fluency_weight"] = "local/patch-fluent", 2.0
    (tmp_path / "fluent.json").write_text(json.dumps(card))
    oc = open_card(find_card(str(tmp_path / "fluent.json")))
    res = oc.verbalize(text="the cat is on the tree", k=3, seed=0, strategy="guided")
    greedy = oc.verbalize(text="the cat is on the tree", strategy="greedy", seed=0)
    assert res.fluency_weight == 2.0 and res.to_dict()["fluency_weight"] == 2.0
    assert [c.token_ids for c in res.candidates[:-1]] == [c.token_ids for c in plain.candidates]
    assert res.candidates[-1].token_ids == greedy.best.token_ids
    bb = oc.backbone
    rows = [[t for t in c.token_ids if t not in bb.stop_ids] for c in res.candidates]
    want = [-20.0 if x is None else x for x in mean_logprobs(bb, rows)]
    assert [c.fluency for c in res.candidates] == pytest.approx(want, abs=1e-5)
    scores = [c.specificity + 2.0 * c.fluency for c in res.candidates]
    assert res.best_index == max(range(len(scores)), key=scores.__getitem__)
    assert selection_score(res.best, 2.0) == pytest.approx(max(scores))
    # best-of-K and greedy are untouched by the prior
    assert oc.verbalize(text="the cat is on the tree", k=3, seed=0, strategy="best-of-k").fluency_weight == 0.0
    card["patch"]["guided_fluency_weight"] = -1.0
    (tmp_path / "bad.json").write_text(json.dumps({**card, "id": "local/bad"}))
    with pytest.raises(CheckpointError, match="guided_fluency_weight"):
        find_card(str(tmp_path / "bad.json"))
