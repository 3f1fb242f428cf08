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
