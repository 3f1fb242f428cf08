"""The targets builder on tiny random backbones: both sources, splits, health check, BOS==EOS guard, resume."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from eval_harness.data.dataset import SPLITS, load_target_set
from eval_harness.data.targets import HealthError, HealthThresholds, TargetsSpec, build_targets, check_health, health_stats
from nla_space.activations import hidden_at_layer, read_last_valid

#: Tiny random models have small activations: only the degenerate-set checks stay meaningful.
TINY_HEALTH = HealthThresholds(min_dim_std=1e-4, min_norm_std=0.0)


def _spec(**kw) -> TargetsSpec:
    base = dict(backbone="tiny-llama", layer=2, n=48, seq_len=6, seed=3, batch_size=16, n_val=6, n_test=6, n_mu_pool=8, health=TINY_HEALTH)
    base.update(kw)
    return TargetsSpec(**base)


def _state(bb, layer: int, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([[bb.bos_id] + ids])
    m = torch.ones_like(x)
    return read_last_valid(hidden_at_layer(bb, layer, input_ids=x, attention_mask=m), m)[0]


def test_self_sampled_targets(tiny_llama, tmp_path):
    ts = build_targets(tiny_llama, _spec(), tmp_path / "t")
    again = load_target_set(tmp_path / "t")
    assert len(again) == 48 and again.vectors.shape == (48, tiny_llama.hidden_size)
    assert again.meta["source"] == "self-sample" and again.meta["complete"]
    assert again.meta["split_counts"] == {"train": 28, "val": 6, "test": 6, "mu_pool": 8}
    # splits are recorded per row, disjoint by construction, and reproduce from the seed
    rows = [json.loads(x) for x in (tmp_path / "t" / "texts.jsonl").read_text().splitlines()]
    assert [r["split"] for r in rows] == again.splits
    sets = [set(again.indices(s)) for s in SPLITS]
    assert sum(map(len, sets)) == 48 and len(set().union(*sets)) == 48
    # v is the layer state at the last token of [BOS] + token_ids (EOS-inclusive)
    for i in (0, 17, 47):
        assert torch.allclose(again.vectors[i], _state(tiny_llama, 2, again.token_ids[i]), atol=1e-5)
        ids = again.token_ids[i]
        stops = [j for j, t in enumerate(ids) if t in tiny_llama.stop_ids]
        assert not stops or stops == [len(ids) - 1]
    assert torch.allclose(ts.mu(), again.vectors[again.indices("mu_pool")].mean(0))
    assert again.meta["health"]["distinct_2"] > 0.5


def test_corpus_targets(tiny_llama, tmp_path):
    words = tiny.WORDS
    corpus = tmp_path / "c.jsonl"
    lines = [{"text": " ".join(words[(7 * i + j) % len(words)] for j in range(16))} for i in range(40)]
    lines.insert(3, {"text": "too short"})
    corpus.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ts = build_targets(tiny_llama, _spec(n=32, corpus=str(corpus), seq_len=5, n_val=4, n_test=4), tmp_path / "t")
    assert ts.meta["source"] == "corpus"
    assert all(len(ids) == 5 for ids in ts.token_ids)
    assert ts.texts[0] == " ".join(lines[0]["text"].split()[:5])
    assert ts.texts[3] == " ".join(lines[4]["text"].split()[:5])  # the short row was skipped


def test_health_check_refuses_constant_set(tiny_llama, tmp_path):
    stats = health_stats(torch.ones(20, 8), [[5, 6, 7]] * 20)
    with pytest.raises(HealthError, match="per-dimension std"):
        check_health(stats, HealthThresholds())
    corpus = tmp_path / "same.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": "the cat is on the house and the dog is in the old city"}) for _ in range(40)) + "\n")
    with pytest.raises(HealthError):
        build_targets(tiny_llama, _spec(n=32, corpus=str(corpus), n_val=4, n_test=4), tmp_path / "t")


def test_bos_equal_eos_guard(tmp_path):
    """A model whose BOS is also a stop token: the prompt must not count in the EOS search."""
    bb = tiny.make_backbone("llama", seed=1)
    bos = bb.bos_id
    bb.model.generation_config.eos_token_id = [bos, bb.tokenizer.eos_token_id]
    assert bos in bb.stop_ids
    ts = build_targets(bb, _spec(n=32, n_val=4, n_test=4), tmp_path / "t")
    bos_state = _state(bb, 2, [])
    assert ts.meta["health"]["mean_len"] > 2
    assert all(len(ids) >= 1 for ids in ts.token_ids)
    # not every target collapsed onto the BOS state (the reference's constant-target bug)
    assert (ts.vectors - bos_state).norm(dim=1).min() > 0
    assert ts.meta["health"]["dim_std"] > 1e-3


def test_resume_matches_uninterrupted(tiny_llama, tmp_path):
    full = build_targets(tiny_llama, _spec(), tmp_path / "a")
    assert build_targets(tiny_llama, _spec(), tmp_path / "b", stop_after_shards=2) is None
    assert not (tmp_path / "b" / "meta.json").exists()
    with pytest.raises(Exception, match="--resume"):
        build_targets(tiny_llama, _spec(), tmp_path / "b")
    resumed = build_targets(tiny_llama, _spec(), tmp_path / "b", resume=True)
    assert torch.equal(full.vectors, resumed.vectors)
    assert full.token_ids == resumed.token_ids and full.splits == resumed.splits


def test_cli_targets(tmp_path):
    from eval_harness.cli import main

    folder = tiny.save_backbone(tmp_path / "bb")
    rc = main(["targets", "--backbone", str(folder), "--layer", "2", "--n", "24", "--seq-len", "5", "--batch-size", "12",
               "--n-val", "4", "--n-test", "4", "--n-mu-pool", "4", "--out", str(tmp_path / "t"),
               "--min-dim-std", "1e-4", "--min-norm-std", "0"])
    assert rc == 0
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    assert meta["layer"] == 2 and meta["n"] == 24 and meta["sampling"]["eos_search"] == "generated positions only"
    assert main(["targets", "--backbone", str(folder), "--layer", "9", "--n", "24", "--out", str(tmp_path / "u")]) == 2


#: Characters that ``json.dumps(ensure_ascii=False)`` writes raw and ``str.splitlines`` treats as line ends.
LINE_SEPARATORS = "a\u2028b\u2029c\x85d\x0ce\x1cf\x1dg\x1eh\x0bi\rj"


def test_texts_with_unicode_line_separators_round_trip(tmp_path):
    """A sampled text may hold U+2028 and friends (Gemma-3-270M produced one): shards and the final
    texts.jsonl must read back row for row (a `splitlines` reader cut such a row in two)."""
    from eval_harness.data.dataset import write_target_set
    from eval_harness.data.targets import _read_shard, _write_shard

    texts = [LINE_SEPARATORS, "plain", "x\u2028"]
    ids = [[1, 2], [3], [4, 5, 6]]
    v = torch.randn(3, 4)
    _write_shard(tmp_path / "s", 0, v, ids, texts)
    v2, ids2, texts2 = _read_shard(tmp_path / "s", 0)
    assert texts2 == texts and ids2 == ids and torch.equal(v2, v)
    write_target_set(tmp_path / "t", v, texts, ids, ["train", "val", "test"], {"layer": 1})
    ts = load_target_set(tmp_path / "t")
    assert ts.texts == texts and ts.token_ids == ids and ts.splits == ["train", "val", "test"]
