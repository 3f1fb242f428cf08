"""The bench command's machinery on a tiny card: both paths run the same fixed-length work."""

from __future__ import annotations

import json

import torch

import tiny
from eval_harness.bench import flop_count, matmul_gflops, run_bench
from nla_space.rollout import sample
from nla_space.runtime import open_card


def _opened(tmp_path):
    bb_dir = tiny.save_backbone(tmp_path / "bb", "llama")
    card_dir = tiny.make_card_folder(tmp_path / "card", bb_dir, layer=2)
    return open_card(str(card_dir), backbone=str(bb_dir))


def test_fixed_length_rollouts_ignore_stop_tokens(tmp_path):
    opened = _opened(tmp_path)
    bb = opened.backbone
    v = torch.randn(bb.hidden_size)
    prefix = opened.av.embeds(v[None].expand(3, -1), bb)
    roll = sample(bb, prefix, 7, generator=torch.Generator().manual_seed(0), stop_ids=[])
    assert roll.ids.shape == (3, 7) and int(roll.mask.sum()) == 21


def test_run_bench_reports_both_paths(tmp_path):
    opened = _opened(tmp_path)
    report = run_bench(opened, [1, 3], new_tokens=5)
    data = report.to_dict()
    json.dumps(data)
    assert [r["k"] for r in data["rows"]] == [1, 3]
    for r in data["rows"]:
        assert r["project_s"] > 0 and r["plain_s"] > 0 and r["flop_bound_s"] > 0
        assert abs(r["speedup"] - r["plain_s"] / r["project_s"]) < 1e-2
    assert data["matmul_gflops"] > 0


def test_flop_count_grows_with_k_and_tokens(tmp_path):
    opened = _opened(tmp_path)
    assert flop_count(opened, 2, 8, 2) > flop_count(opened, 1, 8, 2)
    assert flop_count(opened, 1, 16, 2) > flop_count(opened, 1, 8, 2)
    assert matmul_gflops(torch.device("cpu"), n=256, reps=2) > 0.1


def test_stop_sequences_end_rows_and_mask_through_the_sequence(tmp_path):
    opened = _opened(tmp_path)
    bb = opened.backbone
    v = torch.randn(bb.hidden_size)
    prefix = opened.av.embeds(v[None].expand(4, -1), bb)
    free = sample(bb, prefix, 10, generator=torch.Generator().manual_seed(3), stop_ids=[])
    # Use the first row's tokens 2..3 as a two-token stop sequence: row 0 must stop right there.
    seq = free.ids[0, 2:4].tolist()
    roll = sample(bb, prefix, 10, generator=torch.Generator().manual_seed(3), stop_ids=[], stop_sequences=[seq])
    assert roll.ids[0, :4].tolist() == free.ids[0, :4].tolist()
    assert int(roll.mask[0].sum()) <= 4
    first = next(t for t in range(1, 10) if free.ids[0, t - 1 : t + 1].tolist() == seq)
    assert int(roll.mask[0].sum()) == first + 1
    for r in range(4):  # every row: valid up to the first occurrence (or everything)
        row = free.ids[r].tolist()
        hits = [t for t in range(1, 10) if row[t - 1 : t + 1] == seq]
        assert int(roll.mask[r].sum()) == (hits[0] + 1 if hits else roll.ids.shape[1])


def test_bench_bfloat16_rows_name_dtypes_and_report_fidelity(tmp_path, capsys):
    bb_dir = tiny.save_backbone(tmp_path / "bb", "llama")
    card_dir = tiny.make_card_folder(tmp_path / "card", bb_dir, layer=2)
    out = tmp_path / "bench.json"
    common = ["bench", "--card", card_dir, "--backbone", bb_dir, "--device", "cpu", "--k", "1,3", "--tokens", "4",
              "--start", "none", "--threads", "1"]
    assert tiny.run_harness([*common, "--dtype", "bfloat16", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "project path in bfloat16, plain recipe in float32" in text and "bfloat16 fidelity vs float32" in text
    data = json.loads(out.read_text())
    for key in ("card", "device", "threads", "matmul_gflops", "cold_start_s", "warm_start_s", "rows"):
        assert key in data  # the existing keys stay
    assert data["project_dtype"] == "bfloat16" and data["plain_dtype"] == "float32"
    assert set(data["matmul_gflops_by_dtype"]) == {"bfloat16", "float32"}
    assert data["matmul_gflops"] == data["matmul_gflops_by_dtype"]["bfloat16"]
    for r in data["rows"]:
        assert r["project_dtype"] == "bfloat16" and r["plain_dtype"] == "float32"
        assert r["flop_bound_s"] > 0 and r["plain_flop_bound_s"] > 0
        # each path bounded at its own dtype's throughput (same FLOPs)
        ratio = r["plain_flop_bound_s"] / r["flop_bound_s"]
        bf, fp = data["matmul_gflops_by_dtype"]["bfloat16"], data["matmul_gflops_by_dtype"]["float32"]
        slack = 0.01 + 0.05 / bf + 0.05 / fp  # the JSON rounds each throughput to 0.1 GFLOP/s (a CPU without bf16 units: < 1)
        assert abs(ratio - bf / fp) < slack * ratio
        assert abs(r["plain_fraction_of_flop_bound"] - round(r["plain_flop_bound_s"] / r["plain_s"], 3)) < 1e-9
    fid = data["bf16_fidelity"]
    assert fid["dtype"] == "bfloat16" and fid["reference_dtype"] == "float32" and fid["k"] == 3
    assert 0 <= fid["mean_abs_delta_score"] < 0.02 and isinstance(fid["same_best_pick"], bool)

    # Like for like: the plain recipe in bfloat16 too.
    assert tiny.run_harness([*common, "--dtype", "bfloat16", "--plain-dtype", "bfloat16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plain_dtype"] == "bfloat16" and list(data["matmul_gflops_by_dtype"]) == ["bfloat16"]
    assert all(r["plain_dtype"] == "bfloat16" for r in data["rows"])

    # Default: float32 on both paths, no fidelity block.
    assert tiny.run_harness([*common, "--k", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["project_dtype"], data["plain_dtype"]) == ("float32", "float32") and "bf16_fidelity" not in data


def test_bench_bad_dtype_exits_2_with_one_line(tmp_path, capsys):
    for flag in ("--dtype", "--plain-dtype"):
        assert tiny.run_harness(["bench", "--card", tmp_path, flag, "float16", "--start", "none"]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert err == [f"error: {flag} must be float32 or bfloat16, got 'float16'"]


def test_memory_bound_counts_weights_per_step_and_kv_reads(tmp_path):
    from eval_harness.bench import memory_bytes, memory_gbps

    opened = _opened(tmp_path)
    bb = opened.backbone
    weights = sum(p.numel() for p in bb.model.parameters()) * 4  # float32, untied: every parameter but the embedding
    one = memory_bytes(opened, 1, 1, 2)
    assert one > (weights - bb.model.get_input_embeddings().weight.numel() * 4)  # one decoding step reads all weights
    assert memory_bytes(opened, 1, 9, 2) > memory_bytes(opened, 1, 8, 2) > one
    assert memory_bytes(opened, 4, 8, 2) > memory_bytes(opened, 1, 8, 2)  # more rows, more KV cache to read
    assert memory_gbps(torch.device("cpu"), mbytes=8, reps=2) > 0.1
    report = run_bench(opened, [2], new_tokens=3).to_dict()
    row = report["rows"][0]
    assert report["memory_gbps"] > 0 and row["memory_bound_s"] > 0
    assert abs(row["times_memory_bound"] - row["project_s"] / row["memory_bound_s"]) < 1e-2


def test_card_shapes_have_the_published_sizes():
    # Parameter counts of the architectures the cards run on, from their model cards:
    # Qwen2.5-7B 7.61B, Llama-3.2-3B 3.21B, Gemma-2-2B 2.61B, Phi-4 14.7B.
    from eval_harness.random_backbone import parameter_count
    from nla_space.cards import find_card

    published = {"srt-qwen2.5-7b": 7.61e9, "nla-qwen2.5-7b": 7.61e9, "kitft-qwen2.5-7b": 7.61e9,
                 "srt-llama3.2-3b": 3.21e9, "srt-gemma2-2b": 2.61e9, "nla-phi4": 14.7e9}
    for name, n in published.items():
        shape = find_card(name).backbone.shape
        assert shape["source"].endswith("config.json")
        assert abs(parameter_count(shape) - n) < 0.005 * n, name


def test_bench_random_weights_times_a_card_shape(monkeypatch, capsys):
    import eval_harness.random_backbone as rb
    from nla_space.cards import Card

    shape = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 97, "tie_word_embeddings": False,
             "source": "test"}
    card = Card.from_dict({"id": "test/shape-card", "backbone": {"id": "Org/Tiny", "dtype": "bfloat16", "shape": shape}, "layers": [20],
                           "av": {"num_prefix_tokens": 3}}, "test")
    monkeypatch.setattr(rb, "find_card", lambda name: card)
    assert tiny.run_harness(["bench", "--card", "x", "--random-weights", "--layers", "2", "--k", "2", "--tokens", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["random_weights"] == {"shape_of": "Org/Tiny", "layers": 2, "source": "test"}
    assert data["warm_start_s"] is None and "bf16_fidelity" not in data and "pipelines" not in data
    row = data["rows"][0]
    assert row["k"] == 2 and row["project_s"] > 0 and row["plain_s"] > 0 and row["memory_bound_s"] > 0
    opened = rb.random_weights_card("x", layers=2)
    assert opened.card.layers == [1] and opened.av.prefix_length == 4 and not opened.trained


def test_bench_random_weights_needs_a_card_with_a_shape(capsys):
    assert tiny.run_harness(["bench", "--card", "embedded", "--random-weights", "--k", "1", "--tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "has no backbone.shape; cards with one:" in err and "srt-qwen2.5-7b" in err
    assert tiny.run_harness(["bench", "--card", "embedded", "--layers", "2", "--k", "1"]) == 2
    assert "--layers applies to --random-weights only" in capsys.readouterr().err


def test_bench_reports_targets_and_centered_eval_rates(tmp_path, capsys):
    opened = _opened(tmp_path)
    report = run_bench(opened, [3], new_tokens=4, pipelines=True).to_dict()
    pl = report["pipelines"]
    assert pl["targets_sequences_per_s"] > 0 and pl["targets_sequences"] == 16 and pl["targets_tokens"] == 4
    assert pl["centered_eval_targets_per_s"] > 0 and pl["centered_eval_K"] == 3
    assert "pipelines" not in run_bench(opened, [1], new_tokens=2).to_dict()
