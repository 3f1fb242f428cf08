"""centered-eval, rerank-eval and oracle-ceiling on a tiny llama card folder and a tiny target set."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import tiny

LAYER = 2
N_ROWS = 40


def make_target_set(folder: Path, backbone_dir: Path, seed: int = 0) -> Path:
    """A target set from random word sentences; test rows interleaved with the other splits."""
    from eval_harness.data.dataset import write_target_set
    from nla_space.activations import extract
    from nla_space.backbone import shared_backbone

    bb = shared_backbone(str(backbone_dir))
    rng = random.Random(seed)
    words = [w for w in tiny.WORDS if w.isalpha()]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(N_ROWS)]
    cycle = ["train", "test", "mu_pool", "mu_pool", "test", "val", "mu_pool", "train"]
    splits = [cycle[i % len(cycle)] for i in range(N_ROWS)]
    vectors = torch.stack([extract(bb, t, LAYER) for t in texts])
    ids = [bb.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    write_target_set(folder, vectors, texts, ids, splits, {"backbone": str(backbone_dir), "layer": LAYER, "seed": seed})
    return folder


def make_card_folder(folder: Path, backbone_dir: Path) -> Path:
    """A release-like card folder: config.json + av.safetensors (+ mu.safetensors) for the tiny backbone."""
    from nla_space.backbone import shared_backbone
    from nla_space.verbalizers import NLAConfig, build_prefix_av

    bb = shared_backbone(str(backbone_dir))
    cfg = NLAConfig(backbone_id=str(backbone_dir), backbone_dtype="float32", extraction_layer=LAYER, max_new_tokens=8, num_prefix_tokens=2)
    av = build_prefix_av(cfg, bb)
    torch.manual_seed(1)
    with torch.no_grad():
        av.proj.weight.add_(0.05 * torch.randn_like(av.proj.weight))
    av.save(folder)
    return folder


@pytest.fixture(scope="session")
def eval_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalenv")
    bdir = tiny.save_backbone(root / "backbone", "llama")
    card = make_card_folder(root / "card", bdir)
    targets = make_target_set(root / "targets", bdir)
    return {"root": root, "backbone": bdir, "card": card, "targets": targets}


_run = tiny.run_harness
_strip = tiny.strip_run_meta


def _centered(env, out: Path, *extra) -> list:
    return ["centered-eval", "--card", env["card"], "--targets", env["targets"], "--M", 6, "--K", 8,
            "--pool-size", 2000, "--max-new-tokens", 6, "--out", out, *extra]


def test_centered_eval_runs_and_orders(eval_env, tmp_path):
    out = tmp_path / "ce.json"
    log = tmp_path / "samples.jsonl"
    assert _run(_centered(eval_env, out, "--log-samples", log)) == 0
    res = json.loads(out.read_text())
    for key in ("adapter_raw_greedy_mean", "adapter_cen_greedy_mean", "adapter_raw_sampled_mean", "adapter_cen_sampled_mean",
                "adapter_raw_bestofK_mean", "adapter_cen_bestofK_mean", "adapter_raw_top5ofK_mean", "adapter_cen_top5ofK_mean",
                "nn_raw_mean", "nn_raw_p50", "nn_cen_mean", "nn_cen_p50", "random_raw_mean", "random_cen_mean",
                "anisotropy_mu_norm", "kcurve_oracle_top1_cen", "nn_reencode_cen_mean"):
        assert key in res, key
    for kind in ("raw", "cen"):
        assert res[f"adapter_{kind}_bestofK_mean"] >= res[f"adapter_{kind}_top5ofK_mean"] >= res[f"adapter_{kind}_sampled_mean"] - 1e-9
    curve = [res["kcurve_oracle_top1_cen"][k] for k in ("1", "2", "4", "8")]
    assert all(b >= a - 1e-12 for a, b in zip(curve, curve[1:]))
    assert curve[-1] == pytest.approx(res["adapter_cen_bestofK_mean"])
    meta = res["meta"]
    for key in ("card", "backbone", "backbone_revision", "layer", "M", "K", "pool_size", "seed", "git_commit", "packages",
                "device", "wall_time_s", "targets_split", "mu_source"):
        assert key in meta, key
    assert meta["M"] == 6 and meta["K"] == 8 and meta["targets_split"] == "test"
    assert meta["pool_size"] == 15  # the whole mu_pool split of the tiny set
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == 6 and len(lines[0]["texts"]) == 8
    assert not (out.parent / (out.name + ".partial.jsonl")).exists()


def test_targets_come_from_test_split_only(eval_env, tmp_path):
    from eval_harness.data.dataset import load_target_set
    from eval_harness.evals.common import eval_targets, pool_rows

    ts = load_target_set(eval_env["targets"])
    rows = eval_targets(ts, 100)
    assert rows == ts.indices("test") and all(ts.splits[r] == "test" for r in rows)
    assert set(pool_rows(ts, 2000)) == set(ts.indices("mu_pool"))
    assert not set(rows) & set(pool_rows(ts, 2000))
    out = tmp_path / "ce.json"
    log = tmp_path / "s.jsonl"
    assert _run(_centered(eval_env, out, "--log-samples", log)) == 0
    seen = [json.loads(x)["target"] for x in log.read_text().splitlines()]
    assert seen == ts.indices("test")[:6]


def test_resume_matches_uninterrupted(eval_env, tmp_path, monkeypatch):
    from eval_harness.evals import common as evals

    full = tmp_path / "full.json"
    assert _run(_centered(eval_env, full)) == 0

    part = tmp_path / "part.json"
    real = evals.sample_target
    calls = {"n": 0}

    def dies_after_three(*a, **kw):
        if calls["n"] == 3:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(evals, "sample_target", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        _run(_centered(eval_env, part))
    partial = part.parent / (part.name + ".partial.jsonl")
    assert len(partial.read_text().splitlines()) == 1 + 3
    assert not part.exists()
    monkeypatch.setattr(evals, "sample_target", real)
    assert _run(_centered(eval_env, part, "--resume")) == 0
    a, b = _strip(json.loads(full.read_text())), _strip(json.loads(part.read_text()))
    assert a == b
    assert not partial.exists()


def test_resume_refuses_other_settings(eval_env, tmp_path, monkeypatch):
    from eval_harness.evals import common as evals

    out = tmp_path / "r.json"

    def boom(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(evals, "sample_target", boom)
    with pytest.raises(KeyboardInterrupt):
        _run(_centered(eval_env, out))
    monkeypatch.undo()
    args = _centered(eval_env, out, "--resume")
    args[args.index("--K") + 1] = 4
    assert _run(args) == 2


def test_limit_and_bad_input(eval_env, tmp_path):
    out = tmp_path / "l.json"
    assert _run(_centered(eval_env, out, "--limit", 2)) == 0
    res = json.loads(out.read_text())
    assert res["M"] == 2 and res["meta"]["limit"] == 2 and res["meta"]["M_requested"] == 6
    bad = _centered(eval_env, out)
    bad[bad.index("--K") + 1] = 0
    assert _run(bad) == 2
    assert _run(["centered-eval", "--card", eval_env["card"], "--targets", tmp_path / "nope", "--out", out]) == 2


def test_rerank_eval(eval_env, tmp_path):
    out = tmp_path / "rr.json"
    assert _run(["rerank-eval", "--card", eval_env["card"], "--targets", eval_env["targets"], "--M", 5, "--K", 8,
                 "--max-new-tokens", 6, "--out", out]) == 0
    res = json.loads(out.read_text())
    for key in ("greedy_cen_mean", "greedy_raw_mean", "sampled_cen_mean", "sampled_raw_mean", "kcurve_oracle_top1_cen",
                "kcurve_oracle_top1_raw", "logp_rerank_cen_mean", "logp_rerank_raw_mean", "logp_rerank_vs_greedy",
                "nn_anchor_rerank_cen_mean", "nn_anchor_baseline_cen_mean", "nn_anchor_baseline_raw_mean",
                "spearman_logp_vs_oracle_cen_mean", "spearman_logp_vs_oracle_cen_p50",
                "spearman_logp_vs_oracle_cen_p05", "spearman_logp_vs_oracle_cen_p95"):
        assert key in res, key
    assert list(res["kcurve_oracle_top1_cen"]) == ["1", "2", "4", "8"]
    for kind in ("cen", "raw"):
        c = list(res[f"kcurve_oracle_top1_{kind}"].values())
        assert all(b >= a - 1e-12 for a, b in zip(c, c[1:]))
        assert res[f"logp_rerank_{kind}_mean"] <= c[-1] + 1e-12
    assert res["logp_rerank_vs_greedy"] == pytest.approx(res["logp_rerank_cen_mean"] - res["greedy_cen_mean"])
    assert -1 <= res["spearman_logp_vs_oracle_cen_mean"] <= 1
    assert res["meta"]["command"] == "rerank-eval"


def test_logprob_matches_manual_teacher_forcing(eval_env):
    """sequence_logprob equals the product of per-step probabilities of a plain forward."""
    from eval_harness.evals.common import sequence_logprob
    from nla_space.rollout import eos_inclusive_mask
    from nla_space.runtime import open_card

    oc = open_card(str(eval_env["card"]))
    v = torch.randn(oc.backbone.hidden_size)
    ids = torch.tensor([[5, 9, 3, 0], [7, 8, 11, 12]])  # 3 = <eos>: the first row stops there
    mask = eos_inclusive_mask(ids, oc.backbone.stop_ids)
    got = sequence_logprob(oc, v, ids, mask, LAYER)
    for r in range(2):
        n = int(mask[r].sum())
        lps = []
        for t in range(n):
            prefix = oc.av.embeds(v[None], oc.backbone, LAYER)
            x = torch.cat([prefix, oc.backbone.embed_tokens(ids[r : r + 1, :t])], dim=1)
            logits = oc.backbone.model(inputs_embeds=x).logits[0, -1]
            lps.append(torch.log_softmax(logits.float(), -1)[ids[r, t]])
        assert float(got[r]) == pytest.approx(float(torch.stack(lps).mean()), abs=1e-4)


def test_oracle_ceiling(eval_env, tmp_path):
    out = tmp_path / "oc.json"
    assert _run(["oracle-ceiling", "--backbone", eval_env["backbone"], "--layer", LAYER, "--targets", eval_env["targets"],
                 "--n-targets", 5, "--paraphrase-k", 3, "--paraphrase-max-new", 5, "--out", out]) == 0
    res = json.loads(out.read_text())
    for name in ("replay", "replay_cen", "random_floor", "random_floor_cen", "nn_in_pool", "nn_in_pool_cen",
                 "paraphrase_all", "paraphrase_all_cen", "paraphrase_best", "paraphrase_best_cen",
                 "paraphrase_mean_per_src", "paraphrase_mean_per_src_cen"):
        for f in ("cos_mean", "cos_p05", "cos_p50", "cos_p95", "fve_mean", "fve_p50", "n"):
            assert f"{name}_{f}" in res, f"{name}_{f}"
    assert res["paraphrase_all_n"] == 15 and res["paraphrase_best_n"] == 5
    assert res["paraphrase_best_cen_fve_mean"] >= res["paraphrase_mean_per_src_cen_fve_mean"] - 1e-12
    assert res["replay_fve_mean"] == pytest.approx(0.5 * (1 + res["replay_cos_mean"]))
    assert "mu_pool" in res["meta"]["mu_source"] and res["meta"]["targets_split"] == "test"
    assert "formula" in res and "normalisation_denom_fve_cen" in res


def test_pool_baselines_by_hand():
    from eval_harness.evals.common import Pool, nearest_in_pool, random_floor
    from nla_space.scoring import fve_nrm, fve_nrm_centered

    g = torch.Generator().manual_seed(0)
    pool_v = torch.randn(7, 5, generator=g) + 2.0
    pool = Pool(rows=list(range(7)), vectors=pool_v, mu=pool_v.mean(0))
    q = torch.randn(3, 5, generator=g) + 2.0
    nn = nearest_in_pool(q, pool)
    for i in range(3):
        raw = [float(fve_nrm(pool_v[j], q[i])) for j in range(7)]
        cen = [float(fve_nrm_centered(pool_v[j], q[i], pool.mu)) for j in range(7)]
        assert nn.raw_idx[i] == max(range(7), key=raw.__getitem__) and nn.raw_fve[i] == pytest.approx(max(raw), abs=1e-6)
        assert nn.cen_idx[i] == max(range(7), key=cen.__getitem__) and nn.cen_fve[i] == pytest.approx(max(cen), abs=1e-6)
    r_raw, r_cen = random_floor(pool)
    pairs = [(a, b) for a in range(7) for b in range(7) if a != b]
    assert r_raw == pytest.approx(sum(float(fve_nrm(pool_v[a], pool_v[b])) for a, b in pairs) / len(pairs), abs=1e-6)
    assert r_cen == pytest.approx(sum(float(fve_nrm_centered(pool_v[a], pool_v[b], pool.mu)) for a, b in pairs) / len(pairs), abs=1e-6)


def test_nn_anchor_baseline_is_really_centered(eval_env, tmp_path):
    from eval_harness.data.dataset import load_target_set
    from eval_harness.evals.common import make_pool, nearest_in_pool
    from nla_space.scoring import fve_nrm, fve_nrm_centered

    out = tmp_path / "rr.json"
    assert _run(["rerank-eval", "--card", eval_env["card"], "--targets", eval_env["targets"], "--M", 3, "--K", 2,
                 "--max-new-tokens", 3, "--out", out]) == 0
    res = json.loads(out.read_text())
    ts = load_target_set(eval_env["targets"])
    pool = make_pool(ts, 2000)
    v = ts.vectors[ts.indices("test")[:3]]
    a = pool.vectors[nearest_in_pool(v, pool).cen_idx]
    assert res["nn_anchor_baseline_cen_mean"] == pytest.approx(float(fve_nrm_centered(a, v, pool.mu).mean()), abs=1e-6)
    assert res["nn_anchor_baseline_raw_mean"] == pytest.approx(float(fve_nrm(a, v).mean()), abs=1e-6)


def test_resume_refuses_swapped_weights(eval_env, tmp_path, monkeypatch):
    import shutil

    from eval_harness.evals import common as evals

    card = tmp_path / "card"
    shutil.copytree(eval_env["card"], card)
    out = tmp_path / "w.json"
    args = ["centered-eval", "--card", card, "--targets", eval_env["targets"], "--M", 2, "--K", 2, "--max-new-tokens", 3, "--out", out]

    def boom(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(evals, "sample_target", boom)
    with pytest.raises(KeyboardInterrupt):
        _run(args)
    monkeypatch.undo()
    from safetensors.torch import load_file, save_file

    t = load_file(str(card / "av.safetensors"))
    t["proj.weight"] = t["proj.weight"] * 1.01
    save_file(t, str(card / "av.safetensors"))
    assert _run(args + ["--resume"]) == 2
