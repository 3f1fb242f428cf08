"""roundtrip on a tiny injection card and a tiny prefix card; the bootstrap and forced-choice metrics."""

from __future__ import annotations

import json

import pytest
import torch

from nla_space import metrics
from test_policy_eval import injection_env, prefix_env, run, strip  # noqa: F401  (session fixtures)


# ------------------------------------------------------------------ metrics


def _explicit_centered(P: torch.Tensor, T: torch.Tensor, idx: torch.Tensor) -> float:
    Pr, Tr = P[idx].double(), T[idx].double()
    return float(torch.nn.functional.cosine_similarity(Pr - Pr.mean(0), Tr - Tr.mean(0), dim=-1).mean())


def test_weighted_centered_cosine_equals_explicit_resamples():
    g = torch.Generator().manual_seed(0)
    P, T = torch.randn(9, 5, generator=g) + 2, torch.randn(9, 5, generator=g) + 1
    assert metrics.centered_row_cosine(P, T) == pytest.approx(_explicit_centered(P, T, torch.arange(9)))
    torch.testing.assert_close(metrics.weighted_centered_cosine(P, T, torch.ones(1, 9)), torch.tensor([metrics.centered_row_cosine(P, T)], dtype=torch.float64))
    idx = torch.randint(0, 9, (6, 9), generator=g)
    W = torch.zeros(6, 9, dtype=torch.float64).scatter_add_(1, idx, torch.ones(6, 9, dtype=torch.float64))
    got = metrics.weighted_centered_cosine(P, T, W)
    want = torch.tensor([_explicit_centered(P, T, idx[b]) for b in range(6)], dtype=torch.float64)
    torch.testing.assert_close(got, want)


def test_bootstrap_is_seeded_and_contains_the_mean():
    g = torch.Generator().manual_seed(1)
    T = [torch.randn(30, 8, generator=g) for _ in range(2)]
    P = [t + 0.8 * torch.randn(30, 8, generator=g) for t in T]
    a = metrics.bootstrap_centered_cosine(P, T, B=2000, seed=3)
    b = metrics.bootstrap_centered_cosine(P, T, B=2000, seed=3, chunk=300)
    c = metrics.bootstrap_centered_cosine(P, T, B=2000, seed=4)
    assert a == b and a.ci95 != c.ci95
    assert a.ci95[0] < a.mean < a.ci95[1]
    assert a.mean == pytest.approx(sum(metrics.centered_row_cosine(p, t) for p, t in zip(P, T)) / 2)
    m = metrics.bootstrap_mean([metrics.row_cosines(p, t) for p, t in zip(P, T)], B=2000, seed=3)
    assert m.ci95[0] < m.mean < m.ci95[1]


def test_forced_choice_and_retrieval():
    T = torch.eye(4) * 3
    fc = metrics.forced_choice(T + 0.01, T)
    assert fc.top1 == 1.0 and fc.correct > fc.garbage and fc.delta == pytest.approx(fc.correct - fc.garbage)
    assert metrics.forced_choice(torch.roll(T, -1, 0), T).top1 == 0.0
    assert metrics.retrieved(torch.tensor([0.1, 0.9, 0.9]), 1) and not metrics.retrieved(torch.tensor([0.1, 0.9, 0.9]), 2)


# ------------------------------------------------------------------ roundtrip end to end


def rt_args(env, out, *extra) -> list:
    layers = [a for L in env["layers"] for a in ("--layer", L)]
    return ["roundtrip", "--card", env["card"], "--targets", env["targets"], "--n", 5, "--max-new-tokens", 5,
            "--bootstrap", 500, "--out", out, *layers, *extra]


@pytest.mark.parametrize("which", ["prefix", "injection"])
def test_roundtrip_end_to_end(which, prefix_env, injection_env, tmp_path):  # noqa: F811
    env = prefix_env if which == "prefix" else injection_env
    out, out2 = tmp_path / "rt.json", tmp_path / "rt2.json"
    assert run(rt_args(env, out, "--log-samples", tmp_path / "rt.jsonl")) == 0
    res = json.loads(out.read_text())
    assert res["holdout_n"] == 5 and res["layers"] == env["layers"]
    for arm in ("roundtrip", "input_text"):
        a = res["arms"][arm]
        assert len(a["per_layer"]) == len(env["layers"]) and a["n"] == 5
        assert a["mean"] == pytest.approx(sum(a["per_layer"].values()) / len(env["layers"]))
        assert a["ci95"][0] <= a["mean"] <= a["ci95"][1]
        mc = a["mu_pool_centered"]
        assert mc["ci95"][0] <= mc["mean"] <= mc["ci95"][1]
    for v in res["correct_vs_wrong"].values():
        assert v["n_samples"] == 5 and 0 <= v["top1"] <= 1 and 0 <= v["centered"]["top1"] <= 1
    meta = res["meta"]
    assert meta["command"] == "roundtrip" and meta["bootstrap_B"] == 500 and meta["targets_split"] == "test"
    assert len((tmp_path / "rt.jsonl").read_text().splitlines()) == 5
    # same seed → the same numbers (bootstrap included)
    assert run(rt_args(env, out2)) == 0
    a, b = strip(res), strip(json.loads(out2.read_text()))
    assert a == b


def test_roundtrip_resume_equals_uninterrupted_run(prefix_env, tmp_path, monkeypatch):  # noqa: F811
    from eval_harness.evals import roundtrip as rt

    full, out = tmp_path / "full.json", tmp_path / "resumed.json"
    assert run(rt_args(prefix_env, full)) == 0
    real, calls = rt.target_record, []

    def flaky(*a, **kw):
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(rt, "target_record", flaky)
    with pytest.raises(RuntimeError, match="interrupted"):
        run(rt_args(prefix_env, out))
    monkeypatch.setattr(rt, "target_record", real)
    assert run(rt_args(prefix_env, out, "--resume")) == 0
    assert strip(json.loads(full.read_text())) == strip(json.loads(out.read_text()))


def test_roundtrip_other_bootstrap_seed_changes_only_the_ci(prefix_env, tmp_path):  # noqa: F811
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert run(rt_args(prefix_env, a)) == 0
    assert run(rt_args(prefix_env, b, "--bootstrap-seed", 7)) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["arms"]["roundtrip"]["mean"] == rb["arms"]["roundtrip"]["mean"]
    assert ra["arms"]["roundtrip"]["ci95"] != rb["arms"]["roundtrip"]["ci95"]
