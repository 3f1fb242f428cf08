"""Card files and their typed sections (:mod:`nla_space.cards`, :mod:`nla_space.cards.sections`).

Adding a card is adding one JSON file; every section refuses a key it does not declare, naming the
file and the key; every built-in card loads and writes back to the same card; and the facts the
trainers take from the template card (no longer written in code) are the ones they used before.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

import tiny
from nla_space import cards
from nla_space.cards import CARDS_DIR, Card, builtin_cards, find_card
from nla_space.cards.sections import InjectionSection, ReconstructorSection
from nla_space.errors import CheckpointError

MULTILAYER = json.loads((CARDS_DIR / "embedded_smollm2_135m_multilayer.json").read_text(encoding="utf-8"))
PATCH = json.loads((CARDS_DIR / "embedded_smollm2_135m_l21_patch.json").read_text(encoding="utf-8"))
SRT = json.loads((CARDS_DIR / "srt_llama32_3b_l20.json").read_text(encoding="utf-8"))


def test_every_builtin_card_loads_and_writes_back_to_the_same_card() -> None:
    files = sorted(CARDS_DIR.glob("*.json"))
    loaded = builtin_cards()
    assert len(loaded) == len(files) > 0
    for path, card in zip(files, loaded):
        raw = json.loads(path.read_text(encoding="utf-8"))
        again = Card.from_dict(card.to_dict(), str(path))
        assert again == card, path.name
        # nothing in the file is dropped: every key the file states is a field that holds its value
        assert set(raw) <= set(Card.json_fields()) and card.training == raw.get("training", {}), path.name


def _bb_and_av(tmp_path: Path) -> tuple[Path, Path]:
    bb = tiny.save_backbone(tmp_path / "bb", "llama")
    return bb, tiny.make_card_folder(tmp_path / "av", bb, layer=2)


def _new_card(bb: Path, av: Path) -> dict:
    return {"id": "local/new-card", "aliases": ["new"], "kind": "prefix", "title": "a card added as one file",
            "backbone": {"id": str(bb), "revision": None, "dtype": "float32"}, "layers": [2],
            "av": {"folder": str(av)}, "default_tau": 0.55, "training": {"note": "free-form"}}


def test_a_new_card_is_one_json_file_opened_by_path(tmp_path) -> None:
    from nla_space.runtime import open_card

    bb, av = _bb_and_av(tmp_path)
    path = tmp_path / "new_card.json"
    path.write_text(json.dumps(_new_card(bb, av)), encoding="utf-8")
    card = find_card(str(path))
    assert card.id == "local/new-card" and card.source_file == str(path) and card.training == {"note": "free-form"}
    res = open_card(card).verbalize(text="the cat is red", k=2, seed=0, max_new_tokens=3)
    assert res.card == "local/new-card" and res.tau == 0.55 and len(res.candidates) == 2


def test_a_new_card_file_in_the_cards_folder_is_a_builtin_card(tmp_path, monkeypatch) -> None:
    bb, av = _bb_and_av(tmp_path)
    folder = tmp_path / "cards"
    folder.mkdir()
    (folder / "new_card.json").write_text(json.dumps(_new_card(bb, av)), encoding="utf-8")
    monkeypatch.setattr(cards, "CARDS_DIR", folder)
    assert [c.id for c in builtin_cards()] == ["local/new-card"]
    assert find_card("new").av.folder == str(av)


def _at(data: dict, path: str) -> dict:
    for part in filter(None, path.split(".")):
        data = data[part]
    return data


@pytest.mark.parametrize("base,section", [
    (SRT, ""), (SRT, "backbone"), (SRT, "backbone.shape"), (SRT, "av"), (SRT, "anchors"),
    (MULTILAYER, "injection"), (MULTILAYER, "injection.depth"), (MULTILAYER, "injection.input"),
    (MULTILAYER, "injection.parse"), (MULTILAYER, "injection.generation"),
    (MULTILAYER, "reconstructor"), (MULTILAYER, "reconstructor.base"),
    (PATCH, "patch"), (PATCH, "patch.calibration"), (PATCH, "compass"),
])
def test_an_unknown_key_is_refused_naming_the_file_and_the_key(tmp_path, base, section) -> None:
    data = copy.deepcopy(base)
    _at(data, section)["bogus_key"] = 1
    path = tmp_path / "card_with_typo.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    if section == "backbone.shape":  # free-form: any architecture field may be needed
        assert find_card(str(path)).backbone.shape["bogus_key"] == 1
        return
    with pytest.raises(CheckpointError) as err:
        find_card(str(path))
    msg = str(err.value)
    assert str(path) in msg, msg
    if section == "patch.calibration":  # Calibration.from_dict's own message, under the section's path
        assert "'patch.calibration'" in msg and "unknown ['bogus_key']" in msg, msg
    else:
        assert f"unknown key '{section + '.' if section else ''}bogus_key'" in msg, msg


@pytest.mark.parametrize("base,key,value,match", [
    (SRT, "layers", ["2"], r"'layers\[0\]' must be an integer"),
    (SRT, "av.num_prefix_tokens", "1", "'av.num_prefix_tokens' must be an integer"),
    (SRT, "backbone", "meta-llama/Llama-3.2-3B", "'backbone' must be a JSON object"),
    (SRT, "anchors.ceiling_cen", "0.7", "'anchors.ceiling_cen' must be a number or null"),
    (MULTILAYER, "injection.depth.grid", [4, "x"], r"'injection.depth.grid\[1\]' must be an integer"),
    (MULTILAYER, "injection.depth.formula", "log", "'injection.depth.formula' must be one of"),
    (MULTILAYER, "injection.rule", "add", "'injection.rule' must be one of"),
    (MULTILAYER, "injection.input.chat_template", "yes", "'injection.input.chat_template' must be true or false"),
    (MULTILAYER, "reconstructor.kind", "mystery", "'reconstructor.kind' must be one of"),
    (MULTILAYER, "reconstructor.padding_side", "middle", "'reconstructor.padding_side' must be one of"),
    (MULTILAYER, "av.format", "zip", "'av.format' must be one of"),
    (PATCH, "compass.tau", 2.0, r"'compass.tau' must be a cosine in \[-1, 1\]"),
    (PATCH, "patch.guided_beta", None, "'patch.guided_beta' must be a number"),
    (PATCH, "patch.calibration.a", "1.2", "calibration 'a' must be float"),
])
def test_a_wrong_type_or_value_is_refused_naming_the_key(tmp_path, base, key, value, match) -> None:
    data = copy.deepcopy(base)
    *parents, name = key.split(".")
    _at(data, ".".join(parents))[name] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CheckpointError, match=match):
        find_card(str(path))


def test_a_missing_required_key_is_named() -> None:
    with pytest.raises(CheckpointError, match="x.json: missing key 'backbone'"):
        Card.from_dict({"id": "a", "layers": [1]}, "x.json")
    with pytest.raises(CheckpointError, match="x.json: missing key 'reconstructor.kind'"):
        Card.from_dict({**SRT, "reconstructor": {"folder": "."}}, "x.json")


def test_resolved_specs_hold_no_defaults_of_their_own() -> None:
    """Every default of an opened injection or AR spec is its card section's (stated once)."""
    from nla_space.reconstructors import ARSpec
    from nla_space.verbalizers.injection import InjectionSpec

    for cls in (InjectionSpec, ARSpec):
        with_default = [f.name for f in dataclasses.fields(cls)
                        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
        assert not with_default, (cls.__name__, with_default)


def test_the_trainers_template_facts_come_from_the_card_files(tmp_path) -> None:
    """The template card, its trained bands and the trained AR's section are card data, and equal what
    the trainers used when they were written in code."""
    from eval_harness.data.injection_targets import template_card, trained_ar_section, trained_bands

    assert template_card().id == "anicka/nla-phi4-universal-av-v2"
    assert trained_bands() == [10, 25, 40, 47, 63, 80, 96]
    old = {"kind": "lora_heads", "folder": str(tmp_path.resolve()), "base": {"id": "org/base", "revision": None},
           "template": "Summary of the following text: <text>{explanation}</text> <summary>", "add_special_tokens": True,
           "padding_side": "left", "max_tokens": 256, "read": "last", "head_file": "value_heads.safetensors", "block_offset": 1,
           "mu_file": "mu_L{layer}.safetensors"}
    assert trained_ar_section(tmp_path, "org/base", "mu_L{layer}.safetensors") == ReconstructorSection.from_dict(old, "old")
    assert sum(c.trainer_template for c in builtin_cards()) == 1


def test_injection_card_written_by_the_trainer_is_the_template_recipe(tmp_path) -> None:
    from eval_harness.data.injection_targets import template_section
    from eval_harness.train.av_lora import injection_card_dict

    data = injection_card_dict(tmp_path / "av", tmp_path / "ar", "org/base", [3, 2])
    card = Card.from_dict(json.loads(json.dumps(data)), "card.json")
    section = template_section()
    assert card.injection == dataclasses.replace(section, marker_id=None, depth=dataclasses.replace(section.depth, trained_bands=[]))
    assert not card.trainer_template and card.layers == [3, 2] and card.av.format == "peft_lora"


def test_patch_card_writer_goes_through_the_card_class() -> None:
    from eval_harness.patch_release import card_dict

    cal = PATCH["patch"]["calibration"]
    data = card_dict("local/p", ["p"], "t", "d", {"id": "embedded:smollm2-135m-instruct", "dtype": "float32"}, 21,
                     "assets/cards/x", cal, "guided", {"training": {"pool": {"pool_rows": 8}}}, guided_beta=3.0)
    card = Card.from_dict(data, "written")
    assert card.default_tau == cal["tau"] and card.patch.calibration.a == cal["a"] and card.patch.guided_beta == 3.0
    assert card.training == {"pool": {"pool_rows": 8}}
    assert card_dict("local/p", [], "t", "d", {"id": "x"}, 1, "f", None, "guided", {})["default_tau"] == Card.default_tau
    assert data["license"] == "apache-2.0"  # the default; a kept licence (a backbone's terms) carries over
    assert card_dict("local/p", [], "t", "d", {"id": "x"}, 1, "f", None, "guided", {"license": "gemma"})["license"] == "gemma"
    with pytest.raises(CheckpointError, match="unknown key 'surprise'"):
        card_dict("local/p", [], "t", "d", {"id": "x"}, 1, "f", None, "guided", {"surprise": {}})


def test_injection_section_reads_what_resolve_spec_used_to_default() -> None:
    """An injection section that states only the required facts opens with the defaults the merge used to write."""
    from nla_space.verbalizers.injection import resolve_spec

    spec = resolve_spec(InjectionSection.from_dict({"template": "{injection_char}", "marker": "★", "rule": "normalize",
                                                    "scale": 1}, "t"), None, "t")
    assert (spec.chat_template, spec.left_text, spec.right_text, spec.block_offset, spec.depth_formula) == (False, ">", "</", 1, "none")
    assert (spec.input_chat_template, spec.input_add_special_tokens, spec.input_max_tokens, spec.input_min_position) == (True, True, 512, 0)
    assert (spec.open_tag, spec.close_tag, spec.cut_at, spec.top_p, spec.max_new_tokens) == (None, "</explanation>", [], 1.0, 64)
    assert spec.scale == 1.0 and isinstance(spec.scale, float)


def test_nla_config_names_its_backbone_and_layer(tmp_path) -> None:
    from nla_space.verbalizers.config import NLAConfig

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"num_prefix_tokens": 2}), encoding="utf-8")
    with pytest.raises(CheckpointError, match="missing backbone_id, backbone_dtype, extraction_layer"):
        NLAConfig.from_json(path)
    with pytest.raises(TypeError):
        NLAConfig(num_prefix_tokens=2)  # type: ignore[call-arg]
