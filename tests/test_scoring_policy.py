"""Scores, centering, best-of-K selection, τ hedging, the JSON contract and the EOS-inclusive mask."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from nla_space import policy, scoring
from nla_space.errors import NLAInputError
from nla_space.policy import Candidate, Note, Verbalization, best_of_k, check_params, score_vectors, select_best
from nla_space.rollout import Rollout, eos_inclusive_mask

#: the CLI reference (moved there from the README), which documents the ``--json`` keys
USAGE_DOC = Path(__file__).resolve().parent.parent / "docs" / "usage.md"


def readme_json_keys() -> tuple[set[str], set[str]]:
    """The top-level and candidate keys docs/usage.md documents for ``--json``."""
    m = re.search(r"`--json` prints `([^`]*)`", USAGE_DOC.read_text(encoding="utf-8"))
    assert m, "docs/usage.md no longer documents the --json keys"
    spec = " ".join(m.group(1).split())
    best = re.search(r"best \{([^}]*)\}", spec)
    assert best
    top = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", spec)
    return {k.strip() for k in top.split(",") if k.strip()}, {k.strip() for k in best.group(1).split(",")}


README_KEYS, CANDIDATE_KEYS = readme_json_keys()


def test_fve_nrm_hand_computed():
    v = torch.tensor([1.0, 0.0])
    assert float(scoring.fve_nrm(torch.tensor([1.0, 0.0]), v)) == pytest.approx(1.0)
    assert float(scoring.fve_nrm(torch.tensor([-2.0, 0.0]), v)) == pytest.approx(0.0)
    assert float(scoring.fve_nrm(torch.tensor([0.0, 3.0]), v)) == pytest.approx(0.5)
    assert float(scoring.fve_nrm(torch.tensor([1.0, 1.0]), v)) == pytest.approx(0.5 * (1 + 1 / math.sqrt(2)))
    # scale-invariant, float32 even from float16 input, broadcast over rows
    h = torch.tensor([[3.0, 4.0], [4.0, -3.0]], dtype=torch.float16)
    got = scoring.fve_nrm(h, torch.tensor([[3.0, 4.0]]))
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx([1.0, 0.5])


def test_centered_hand_computed():
    mu = torch.tensor([1.0, 1.0])
    # h − μ = (0, 1), v − μ = (1, 0): orthogonal → ½
    assert float(scoring.fve_nrm_centered(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0]), mu)) == pytest.approx(0.5)
    # raw cosine of (1, 2) and (2, 1) is 4/5 → 0.9
    assert float(scoring.fve_nrm(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0]))) == pytest.approx(0.9)
    # h − μ = (−1, 0), v − μ = (1, 0): opposite → 0
    assert float(scoring.fve_nrm_centered(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 1.0]), mu)) == pytest.approx(0.0)


def test_anisotropy_mu_rho_pairwise():
    pool = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert scoring.anisotropy_mu(pool).tolist() == [2.0, 3.0]
    with pytest.raises(ValueError):
        scoring.anisotropy_mu(torch.zeros(0, 2))
    assert scoring.rho(0.6, 0.5, 0.7) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        scoring.rho(0.6, 0.5, 0.5)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    expect = torch.tensor([[1.0, 0.0, 0.5 * (1 + 1 / math.sqrt(2))], [0.5, 0.5, 0.5 * (1 + 1 / math.sqrt(2))]])
    torch.testing.assert_close(scoring.pairwise_fve(a, b), expect)


def _anisotropic_case():
    """Every vector shares a large common component μ; raw cosine prefers the candidate that is
    mostly μ, the centered score prefers the one whose deviation from μ matches v's."""
    mu = torch.tensor([10.0, 0.0, 0.0])
    v = mu + torch.tensor([0.0, 1.0, 0.0])
    h = torch.stack([
        mu + torch.tensor([0.0, 0.0, 0.5]),  # close to v in raw terms, deviation orthogonal
        mu * 0.3 + torch.tensor([0.0, 2.0, 0.0]),  # deviation along v's, but far in raw terms
    ])
    return h, v, mu


def test_centering_changes_the_argmax():
    h, v, mu = _anisotropic_case()
    raw, cen = score_vectors(h, v, mu)
    assert int(raw.argmax()) == 0 and int(cen.argmax()) == 1
    assert select_best(raw, cen) == 1
    assert select_best(raw, None) == 0
    raw_only, none = score_vectors(h, v, None)
    assert none is None
    torch.testing.assert_close(raw_only, raw)


def _rollout(rows: list[list[int]], stop: list[int]) -> Rollout:
    ids = torch.tensor(rows)
    return Rollout(ids=ids, mask=eos_inclusive_mask(ids, stop))


def test_best_of_k_builds_candidates_and_picks_centered():
    h, v, mu = _anisotropic_case()
    roll = _rollout([[5, 6, 3, 0], [7, 8, 9, 10]], stop=[3])
    cands, best = best_of_k(roll, lambda ids: " ".join(map(str, ids)), h, v, mu)
    assert best == 1
    assert [c.token_ids for c in cands] == [[5, 6, 3], [7, 8, 9, 10]]  # EOS kept, padding dropped
    assert cands[0].text == "5 6 3"
    raw, cen = score_vectors(h, v, mu)
    assert [c.score_raw for c in cands] == pytest.approx(raw.tolist())
    assert [c.score_cen for c in cands] == pytest.approx(cen.tolist())
    cands_raw, best_raw = best_of_k(roll, str, h, v, None)
    assert best_raw == 0 and all(c.score_cen is None for c in cands_raw)


def _verbalization(scores_raw, scores_cen, tau, centered=True) -> Verbalization:
    cands = [Candidate(text=f"c{i}", token_ids=[i], score_raw=r, score_cen=c) for i, (r, c) in enumerate(zip(scores_raw, scores_cen))]
    raw_t = torch.tensor(scores_raw)
    cen_t = torch.tensor(scores_cen) if centered else None
    return Verbalization(card="x", layer=3, k=len(cands), tau=tau, trained=True, greedy=False, temperature=1.0,
                         seed=0, centered=centered, candidates=cands, best_index=select_best(raw_t, cen_t),
                         timings={"total_s": 0.123456}, notes=[Note("card", "n")])


@pytest.mark.parametrize(
    "tau,hedged",
    [(0.0, False), (0.5, False), (0.625, False), (0.62500001, True), (0.7, True), (1.0, True)],
)
def test_hedged_iff_best_centered_score_below_tau(tau, hedged):
    res = _verbalization([0.9, 0.8, 0.6], [0.5, 0.625, 0.55], tau)
    assert res.best_index == 1 and res.score == 0.625
    assert res.hedged is hedged


def test_raw_fallback_without_mu():
    res = _verbalization([0.9, 0.8, 0.6], [None, None, None], tau=0.85, centered=False)
    assert res.best_index == 0 and res.score == 0.9 and not res.hedged
    assert _verbalization([0.9, 0.8, 0.6], [None, None, None], tau=0.95, centered=False).hedged


def test_readme_keys_parsed():
    assert {"card", "layer", "k", "tau", "hedged", "best", "candidates", "timings"} <= README_KEYS
    assert CANDIDATE_KEYS == {"text", "token_ids", "score_raw", "score_cen", "specificity", "confidence", "fluency"}


def test_to_dict_json_contract():
    res = _verbalization([0.9, 0.8, 0.6], [0.5, 0.625, 0.55], tau=0.7)
    d = res.to_dict()
    assert set(d) == README_KEYS
    assert set(d["best"]) == CANDIDATE_KEYS and all(set(c) == CANDIDATE_KEYS for c in d["candidates"])
    assert d["best"] == d["candidates"][d["best_index"]] and d["best"]["text"] == "c1"
    assert d["hedged"] is True and d["score"] == 0.625 and d["centered"] is True
    assert d["timings"] == {"total_s": 0.1235}
    assert json.loads(json.dumps(d, allow_nan=False)) == d


@pytest.mark.parametrize(
    "row,expect",
    [
        ([5, 6, 7, 8], [1, 1, 1, 1]),  # no EOS: valid throughout
        ([3, 0, 0, 0], [1, 0, 0, 0]),  # EOS first
        ([5, 6, 3, 0], [1, 1, 1, 0]),  # EOS mid, inclusive
        ([5, 3, 6, 3], [1, 1, 0, 0]),  # several EOS: the first ends the row
        ([5, 4, 6, 3], [1, 1, 0, 0]),  # any stop id counts (two stop ids)
        ([5, 6, 7, 3], [1, 1, 1, 1]),  # EOS last
    ],
)
def test_eos_inclusive_mask(row, expect):
    ids = torch.tensor([row])
    assert eos_inclusive_mask(ids, [3, 4]).tolist() == [expect]


def test_eos_inclusive_mask_batch_and_no_stop_ids():
    ids = torch.tensor([[5, 3, 3], [3, 5, 5], [5, 5, 5]])
    assert eos_inclusive_mask(ids, [3]).tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert eos_inclusive_mask(ids, []).tolist() == [[1, 1, 1]] * 3


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), "k must"),
        (dict(k=-3), "k must"),
        (dict(k=policy.MAX_K + 1), "k must"),
        (dict(k=2.0), "k must"),
        (dict(k=True), "k must"),
        (dict(tau=-0.01), "tau must"),
        (dict(tau=1.01), "tau must"),
        (dict(tau=float("nan")), "tau must"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=policy.MAX_NEW_TOKENS + 1), "max_new_tokens"),
        (dict(seed=-1), "seed must"),
        (dict(seed=2**63), "seed must"),
        (dict(seed=1.5), "seed must"),
    ],
)
def test_check_params_refuses(kwargs, match):
    params = dict(k=4, tau=0.5, temperature=1.0, max_new_tokens=8) | kwargs
    with pytest.raises(NLAInputError, match=match):
        check_params(**params)


@pytest.mark.parametrize("k,tau", [(1, 0.0), (policy.MAX_K, 1.0), (16, 0.7)])
def test_check_params_accepts_bounds(k, tau):
    check_params(k, tau, 1.0, 1)
    check_params(k, tau, 0.0, policy.MAX_NEW_TOKENS, seed=2**63 - 1)
    check_params(k, tau, 0.0, 1, seed=None)
