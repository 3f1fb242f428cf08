"""A backbone split over devices (issue 24 part 3, :mod:`nla_space.placement`): on CPU, accelerate's
big-model loading with ``max_memory`` keeps the first blocks in memory and offloads the rest to
disk (two "devices"), and the split card reads, re-encodes and verbalizes exactly as unsplit."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from nla_space import activations
from nla_space.backbone import load_backbone
from nla_space.errors import NLAInputError
from nla_space.placement import Placement, parse_max_memory, placement_from_env
from nla_space.runtime import open_card

TEXTS = ["the cat is on the tree .", "paris is a city in france"]


def _split_env(monkeypatch: pytest.MonkeyPatch, tmp_path, device_map: str | dict = "auto", cpu: str = "120KB") -> None:
    monkeypatch.setenv("NLA_DEVICE_MAP", device_map if isinstance(device_map, str) else json.dumps(device_map))
    monkeypatch.setenv("NLA_MAX_MEMORY", f"cpu={cpu}")
    monkeypatch.setenv("NLA_OFFLOAD_FOLDER", str(tmp_path / "offload"))


def _devices(model) -> set[str]:
    return {str(v) for v in model.hf_device_map.values()}


def test_auto_map_with_max_memory_splits_the_layers_and_reads_the_same(tmp_path, monkeypatch) -> None:
    bb_dir = tiny.save_backbone(tmp_path / "bb", "llama", layers=4)
    plain = load_backbone(str(bb_dir))
    _split_env(monkeypatch, tmp_path)
    split = load_backbone(str(bb_dir))
    assert _devices(split.model) == {"cpu", "disk"}, split.model.hf_device_map  # two devices: memory, then disk
    assert split.device == torch.device("cpu")
    for layer in range(plain.num_layers + 1):  # every read, including the truncated forward stopping after block ℓ−1
        for t in TEXTS:
            torch.testing.assert_close(activations.extract(split, t, layer), activations.extract(plain, t, layer), rtol=0, atol=1e-6)
    rows = [list(plain.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    torch.testing.assert_close(activations.read_rows(split, 3, rows), activations.read_rows(plain, 3, rows), rtol=0, atol=1e-6)


def _layer_map(where: list[str]) -> dict[str, str]:
    """Embeddings, norm and head in memory; block i on ``where[i]``."""
    return {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", **{f"model.layers.{i}": w for i, w in enumerate(where)},
            "model.norm": "cpu", "lm_head": "cpu"}


def _same_answers(plain, split, strategy: str) -> None:
    k = None if strategy == "greedy" else 3
    want = plain.verbalize(TEXTS[0], strategy=strategy, k=k, seed=0, max_new_tokens=6)
    got = split.verbalize(TEXTS[0], strategy=strategy, k=k, seed=0, max_new_tokens=6)
    assert [c.token_ids for c in got.candidates] == [c.token_ids for c in want.candidates]
    assert got.best_index == want.best_index
    assert [round(c.score_raw, 5) for c in got.candidates] == [round(c.score_raw, 5) for c in want.candidates]


@pytest.mark.parametrize("strategy", ["best-of-k", "greedy"])
def test_a_prefix_card_split_over_memory_and_disk_verbalizes_the_same_ids(tmp_path, monkeypatch, strategy: str) -> None:
    from nla_space.cards import card_from_folder

    bb_dir = tiny.save_backbone(tmp_path / "bb", "llama", layers=4)
    card = card_from_folder(tiny.make_card_folder(tmp_path / "card", bb_dir, layer=2))
    plain = open_card(card)
    _split_env(monkeypatch, tmp_path, _layer_map(["cpu", "cpu", "disk", "disk"]))
    split = open_card(card)
    assert split.backbone is not plain.backbone and _devices(split.backbone.model) == {"cpu", "disk"}
    _same_answers(plain, split, strategy)


@pytest.mark.parametrize("strategy", ["greedy", "guided"])
def test_a_patch_card_on_a_device_map_verbalizes_the_same_ids(tmp_path, monkeypatch, strategy: str) -> None:
    """A LoRA card loaded through a device map (here one device: this machine has no second one that
    PEFT can attach to) answers the same; disk offload under a LoRA is refused by name (PEFT cannot
    attach to offloaded weights)."""
    card = tiny.make_patch_card(tmp_path / "card", layer=2, default_strategy="greedy")
    plain = open_card(str(card))
    _split_env(monkeypatch, tmp_path, _layer_map(["cpu"] * 4))
    split = open_card(str(card))
    assert split.backbone is not plain.backbone
    _same_answers(plain, split, strategy)
    _split_env(monkeypatch, tmp_path / "d", _layer_map(["cpu", "cpu", "disk", "disk"]))
    with pytest.raises(NLAInputError, match="offloaded weights .*model.layers.2"):
        open_card(str(card))


def test_placement_options_are_checked(monkeypatch) -> None:
    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=200GiB") == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}
    with pytest.raises(NLAInputError, match="DEVICE=SIZE"):
        parse_max_memory("70GiB")
    with pytest.raises(NLAInputError, match="device_map 'everywhere'"):
        Placement("everywhere")
    monkeypatch.setenv("NLA_DEVICE_MAP", "{not json")
    with pytest.raises(NLAInputError, match="not a JSON map"):
        placement_from_env()
    monkeypatch.delenv("NLA_DEVICE_MAP")
    assert placement_from_env() is None
