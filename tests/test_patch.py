"""The patch verbalizer, guided decoding, specificity and its calibration, on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tiny
from nla_space.activations import read_rows
from nla_space.cards import find_card
from nla_space.errors import CheckpointError, NLAInputError
from nla_space.guided import GuidedSettings, as_rollout, smc, word_starts
from nla_space.kv_cache import preallocated_cache, reorder_cache
from nla_space.policy import resolve_strategy
from nla_space.runtime import open_card
from nla_space.specificity import MIN_TAU, Calibration, Specificity, fit_calibration, retrieval_correct
from nla_space.verbalizers.patch import PatchSpec, ResidualPatch, token_ce
from nla_space.verbalizers.patch_card import PatchStepper

ARCHS = ["llama", "qwen2", "gemma2", "phi3"]


@pytest.fixture(scope="module", params=ARCHS)
def patch_card(request, tmp_path_factory):
    path = tiny.make_patch_card(tmp_path_factory.mktemp(f"patch-{request.param}"), request.param)
    return open_card(find_card(str(path)))


def test_states_recorded_while_writing_are_the_text_read_like_a_typed_text(patch_card) -> None:
    """The invariant guided decoding rests on: the layer-ℓ state the AV's own forward records after each
    token equals reading [BOS] + tokens-so-far through the plain backbone (no extra forward needed)."""
    oc = patch_card
    bb, layer = oc.backbone, oc.card.default_layer
    v = oc.extract("the cat is on the tree", layer)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(4, len(bb.tokenizer), (3, 5), generator=g)
    stepper = PatchStepper(oc, v, max_new_tokens=8, layer=oc.card.default_layer)
    try:
        stepper.start(3)
        for t in range(seq.shape[1]):
            stepper.step(seq[:, t])
            got = stepper.push(seq[:, t])
            want = read_rows(bb, layer, [r[: t + 1].tolist() for r in seq])
            torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    finally:
        stepper.close()


def test_v_enters_at_position_0_and_the_blocks_below_are_untouched(patch_card) -> None:
    oc = patch_card
    bb, layer = oc.backbone, oc.card.default_layer
    rows = [list(bb.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in tiny.SENTENCES[:4]]
    patch = oc.av.patches[layer]
    own = float(token_ce(bb, patch, rows))
    shuffled = float(token_ce(bb, patch, rows, shuffle=torch.tensor([1, 2, 3, 0])))
    assert own != pytest.approx(shuffled)  # the CE depends on which v is written
    # a read at ℓ (truncated forward) does not see the LoRA above ℓ nor the hook of another thread's request
    with patch.apply(torch.zeros(1, bb.hidden_size)):
        import threading

        out = {}
        th = threading.Thread(target=lambda: out.update(v=read_rows(bb, layer, rows)))
        th.start()
        th.join()
    torch.testing.assert_close(out["v"], read_rows(bb, layer, rows))


def test_guided_and_best_of_k_through_the_one_verbalize_flow(patch_card) -> None:
    oc = patch_card
    a = oc.verbalize(text="the king and the queen", k=4, seed=3)  # card default: guided
    b = oc.verbalize(text="the king and the queen", k=4, seed=3, strategy="guided")
    c = oc.verbalize(text="the king and the queen", k=4, seed=3, strategy="best-of-k")
    g = oc.verbalize(text="the king and the queen", seed=3, greedy=True)
    assert a.strategy == "guided" and c.strategy == "best-of-k" and g.strategy == "greedy" and g.k == 1
    assert [x.text for x in a.candidates] == [x.text for x in b.candidates]  # seeded
    assert 1 <= len(a.candidates) <= 4 and len({x.text for x in a.candidates}) == len(a.candidates) or len(a.candidates) <= 4
    for res in (a, c):
        best = res.best
        assert best.specificity is not None and best.specificity == max(x.specificity for x in res.candidates)
        d = res.to_dict()
        assert d["strategy"] == res.strategy and d["criterion"] == "centered"  # no calibration on this card
    with pytest.raises(NLAInputError, match="strategy"):
        oc.verbalize(text="x", k=2, strategy="beam")
    with pytest.raises(NLAInputError, match="contradicts"):
        oc.verbalize(text="x", k=2, strategy="guided", greedy=True)


def test_guided_candidates_are_scored_as_the_search_scored_them(patch_card) -> None:
    """Each returned candidate's specificity (re-read after the search) equals the potential the search
    recorded for it: the search and the final score read the same state."""
    oc = patch_card
    bb, layer = oc.backbone, oc.card.default_layer
    v = oc.extract("paris is a city in france", layer)
    gen = torch.Generator().manual_seed(0)
    stepper = PatchStepper(oc, v, 8, oc.card.default_layer)
    try:
        cands = smc(stepper, stepper, oc.potential(v, layer), GuidedSettings(n=4, max_new_tokens=8), gen, bb.stop_ids, bb.pad_id,
                    word_starts(bb.tokenizer))
    finally:
        stepper.close()
    assert cands and [c[1] for c in cands] == sorted((c[1] for c in cands), reverse=True)
    roll = as_rollout(cands, 4, bb.pad_id)
    z = oc.specificity.z(oc.reconstruct(roll, layer), v)
    torch.testing.assert_close(z, torch.tensor([c[1] for c in cands[:4]]), atol=2e-3, rtol=2e-3)


def test_guided_on_a_prefix_card_uses_the_incremental_reencode(tmp_path) -> None:
    bb_dir = tiny.save_backbone(tmp_path / "bb")
    from nla_space.cards import card_from_folder

    oc = open_card(card_from_folder(tiny.make_card_folder(tmp_path / "card", bb_dir, layer=2)))
    res = oc.verbalize(text="the cat", k=4, seed=0, strategy="guided", max_new_tokens=6)
    assert res.strategy == "guided" and res.candidates
    # the guided potential of the best (re-encoded prefix-free, as best-of-K scores) is its centered/raw score
    assert res.best.score_raw == max(c.score_raw for c in res.candidates) or res.centered


def test_reorder_cache_equals_recomputing_the_reordered_rows(tiny_llama) -> None:
    bb = tiny_llama
    ids = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])
    cache = preallocated_cache(bb.config, 8)
    bb.model(input_ids=ids, past_key_values=cache, use_cache=True)
    index = torch.tensor([2, 2, 0])
    reorder_cache(cache, index)
    nxt = torch.tensor([[20], [21], [22]])
    got = bb.model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1]
    want = bb.model(input_ids=torch.cat([ids[index], nxt], dim=1)).logits[:, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_specificity_and_calibration() -> None:
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(64, 16, generator=g)
    mu = pool.mean(0)
    spec = Specificity.from_pool(pool, mu)
    v = torch.randn(16, generator=g)
    near, far = v + 0.05 * torch.randn(16, generator=g), torch.randn(16, generator=g)
    z = spec.z(torch.stack([near, far]), v)
    assert z[0] > 3 and z[0] > z[1]
    # retrieval: identical h and v rows are always right; with 80 rows the 1-in-40 sets are drawn
    V = torch.randn(80, 16, generator=g)
    assert retrieval_correct(V, V, V.mean(0)).min() == 1.0
    # calibration: correctness rises with z; the chosen tau meets the precision on the fit data
    zz = torch.linspace(-2, 6, 200)
    y = (torch.rand(200, generator=g) < torch.sigmoid(1.5 * zz - 3)).float()
    cal = fit_calibration(zz, y, 0.8, {"test": True})
    assert cal.a > 0 and cal.precision >= 0.8 and 0 < cal.coverage < 1
    conf = cal.confidence_of(zz)
    assert float(y[conf >= cal.tau].mean()) >= 0.8
    assert "confident" in cal.meaning()
    with pytest.raises(CheckpointError, match="unknown"):
        Calibration.from_dict({**cal.__dict__, "extra": 1}, "card")
    with pytest.raises(CheckpointError, match="feature"):
        Calibration.from_dict({**cal.__dict__, "feature": "vibes"}, "card")
    old = {k: v for k, v in cal.__dict__.items() if k != "feature"}  # a card written before features existed
    assert Calibration.from_dict(old, "card").feature == "z"
    # the same fit whatever the feature's scale (fitted standardised)
    small = fit_calibration(zz * 0.01, y, 0.8, {}, feature="margin40")
    assert small.feature == "margin40" and abs(small.a - 100 * cal.a) < 1e-2 * abs(100 * cal.a) and abs(small.b - cal.b) < 1e-3
    # an AV right on nearly every text: τ stops at MIN_TAU (never "confident" below one half)
    wide = torch.linspace(-3, 12, 300)
    easy = (torch.rand(300, generator=g) < torch.sigmoid(2 * wide + 2)).float()
    assert float(easy.mean()) >= 0.8  # every threshold, the lowest included, meets the precision
    lenient = fit_calibration(wide, easy, 0.8, {})
    assert lenient.tau == MIN_TAU and lenient.precision >= 0.8 and 0.8 < lenient.coverage < 1
    assert float(lenient.confidence_of(wide).min()) < MIN_TAU  # those answers are hedged by the floor alone
    with pytest.raises(CheckpointError):
        Specificity.from_pool(torch.randn(3, 16), mu)


def test_margin40_feature_and_confidence_of_rows() -> None:
    """margin40 = c_v − the pool's 97.5 % quantile of cosines; a near copy of v beats it, a stranger does not;
    Specificity.confidence applies the calibration's own feature."""
    g = torch.Generator().manual_seed(1)
    pool = torch.randn(200, 16, generator=g)
    spec = Specificity.from_pool(pool, pool.mean(0))
    v = torch.randn(16, generator=g)
    h = torch.stack([v + 0.05 * torch.randn(16, generator=g), torch.randn(16, generator=g)])
    m = spec.feature("margin40", h, v)
    assert m[0] > 0 > m[1]
    c_v, c_p = spec.cosines(h, v)
    assert torch.allclose(m, c_v - c_p.quantile(0.975, dim=-1))
    assert spec.confidence(h, v) is None
    spec.calibration = Calibration(a=10.0, b=0.0, tau=0.5, precision=1.0, coverage=0.5, n_val=2, settings={}, feature="margin40")
    assert torch.allclose(spec.confidence(h, v), torch.sigmoid(10 * m))


def test_calibrated_card_hedges_by_confidence(tmp_path) -> None:
    cal = {"a": 2.0, "b": -4.0, "tau": 0.5, "precision": 0.9, "coverage": 0.4, "n_val": 10, "settings": {}}
    oc = open_card(find_card(str(tiny.make_patch_card(tmp_path, "llama", calibration=cal))))
    res = oc.verbalize(text="one two three", k=3, seed=0)
    assert res.criterion == "confidence" and res.score == res.best.confidence
    assert res.hedged == (res.best.confidence < 0.5)
    assert res.best.confidence == pytest.approx(float(torch.sigmoid(torch.tensor(2.0 * res.best.specificity - 4.0))), abs=1e-6)
    assert "among 40" in res.to_dict()["confidence_meaning"]
    assert not any(n.kind == "out-of-distribution" for n in res.notes)
    # an inner token: the confidence is not calibrated there, and the result says so
    inner = oc.verbalize(text="one two three", k=3, seed=0, position=0)
    assert inner.position == 0 and any(n.kind == "out-of-distribution" for n in inner.notes)
    last = oc.verbalize(text="one two three", k=3, seed=0, position=-1)
    assert not any(n.kind == "out-of-distribution" for n in last.notes)


def test_patch_spec_and_card_refuse_bad_files(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="unknown"):
        PatchSpec.from_dict({"layer": 2, "rank": 4}, "x")
    path = tiny.make_patch_card(tmp_path, "llama")
    card = json.loads(path.read_text())
    (Path(card["av"]["folder"]) / "patch_av.json").write_text('{"layer": 2, "bogus": 1}')
    with pytest.raises(CheckpointError, match="bogus"):
        open_card(find_card(str(path)))
    card["backbone"] = {"id": card["backbone"]["id"]}
    with pytest.raises(NLAInputError, match="backbone"):
        open_card(find_card(str(path)), backbone="other")


def test_resolve_strategy() -> None:
    assert resolve_strategy(None, False, "guided") == "guided"
    assert resolve_strategy(None, True, "guided") == "greedy"
    assert resolve_strategy("best-of-k", False, "guided") == "best-of-k"
    with pytest.raises(NLAInputError):
        resolve_strategy("nope", False, "guided")


def test_residual_patch_refuses_layer_0(tiny_llama) -> None:
    with pytest.raises(CheckpointError):
        ResidualPatch(tiny_llama, 0)
