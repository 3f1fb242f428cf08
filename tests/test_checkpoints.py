"""Checkpoint safety: pickles are read weights-only (never executed), and every malformed
checkpoint or config is refused with a :class:`CheckpointError` that says what is wrong."""

from __future__ import annotations

import json
import os
import pathlib
from pathlib import Path

import pytest
import torch

import tiny
from nla_space import cli
from nla_space.errors import CheckpointError
from nla_space.hub import load_state_dict
from nla_space.runtime import open_card
from nla_space.verbalizers import NLAConfig, PrefixAV, build_prefix_av, load_adapter_weights
from test_prefix_av import REFERENCE_CONFIG, write_release

D = 32


class _Evil:
    """Unpickling this would run ``os.system`` (creating ``marker``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilOpen:
    """Unpickling this would create ``marker`` through ``builtins.open`` (no shell needed)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def bb_dir(tmp_path_factory) -> Path:
    return tiny.save_backbone(tmp_path_factory.mktemp("bb") / "llama", "llama")


def _release(folder: Path, trainable: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(REFERENCE_CONFIG)))
    torch.save(trainable, folder / "best_av.pt")
    return folder


def _cli_error(capsys, argv: list[str]) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("evil_cls", [_Evil, _EvilOpen])
def test_malicious_pickle_is_refused_without_running(tmp_path, bb_dir, capsys, evil_cls):
    marker = tmp_path / "PWNED"
    W = torch.eye(D)
    payload = {"trainable": {"proj.weight": W, "prefix_embeds": torch.zeros(1, D)}, "cfg": evil_cls(marker)}
    rel = _release(tmp_path / "rel", payload)
    assert not marker.exists()

    with pytest.raises(CheckpointError, match="refused to load"):
        load_state_dict(rel / "best_av.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="weights_only"):
        open_card(str(rel), backbone=str(bb_dir))
    assert not marker.exists()
    line = _cli_error(capsys, ["verbalize", "--card", str(rel), "--backbone", str(bb_dir), "--text", "the cat"])
    assert "refused to load" in line
    assert not marker.exists()


def test_malicious_pickle_does_run_when_loaded_unsafely(tmp_path):
    """Proves the payload above is live: an unsafe load would have created the marker."""
    marker = tmp_path / "PWNED"
    torch.save({"x": _EvilOpen(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the one deliberate unsafe load
    assert marker.exists()


def test_reference_wrapper_with_paths_loads(tmp_path):
    W = torch.randn(D, D)
    wrapper = {
        "trainable": {"proj.weight": W, "prefix_embeds": torch.randn(1, D)},
        "step": 5000,
        "cfg": {"out_dir": pathlib.PosixPath("/x/y"), "pure": pathlib.PurePosixPath("a/b"), "lr": 3e-5},
    }
    torch.save(wrapper, tmp_path / "best_av.pt")
    state = load_state_dict(tmp_path / "best_av.pt")
    assert sorted(state) == ["prefix_embeds", "proj.weight"]
    torch.testing.assert_close(state["proj.weight"], W)


@pytest.mark.parametrize(
    "payload,match",
    [
        ({"trainable": {}}, "no tensors found"),
        ({"weights": {"proj.weight": torch.eye(D)}}, "no tensors found"),
        ({"trainable": {"prefix_embeds": torch.zeros(1, D)}}, "no adapter tensor was loaded"),
        ({"trainable": {"backbone.lm_head.weight": torch.zeros(4, D)}}, "no adapter tensor was loaded"),
        ({"trainable": {"module.proj.weight": torch.eye(D), "prefix_embeds": torch.zeros(1, D)}}, "do not belong"),
        ({"trainable": {"proj.weight": torch.eye(D)}}, "missing adapter tensors"),
        ({"trainable": {"proj.weight": torch.eye(D + 1), "prefix_embeds": torch.zeros(1, D)}}, r"shape \(33, 33\)"),
        ({"trainable": {"proj.weight": torch.eye(D), "prefix_embeds": torch.zeros(16, D)}}, r"prefix_embeds has shape \(16, 32\)"),
        ({"trainable": {"proj.weight": torch.full((D, D), float("nan")), "prefix_embeds": torch.zeros(1, D)}}, "finite"),
        ({"trainable": {"proj.weight": torch.ones(D, D, dtype=torch.long), "prefix_embeds": torch.zeros(1, D)}}, "float"),
        ([torch.eye(D)], "expected a dict"),
    ],
)
def test_bad_adapter_contents_are_refused(tmp_path, tiny_llama, payload, match):
    torch.save(payload, tmp_path / "best_av.pt")
    av = build_prefix_av(NLAConfig(backbone_id="tiny", backbone_dtype="float32", extraction_layer=2), tiny_llama)
    before = {k: v.clone() for k, v in av.state_dict().items()}
    with pytest.raises(CheckpointError, match=match):
        load_adapter_weights(av, tmp_path / "best_av.pt")
    for k, v in av.state_dict().items():  # nothing half-loaded
        torch.testing.assert_close(v, before[k])


def test_cli_refuses_wrong_shape_with_one_line(tmp_path, bb_dir, capsys):
    rel = _release(tmp_path / "rel", {"trainable": {"proj.weight": torch.eye(64), "prefix_embeds": torch.zeros(1, 64)}})
    line = _cli_error(capsys, ["verbalize", "--card", str(rel), "--backbone", str(bb_dir), "--text", "the cat"])
    assert "proj.weight has shape (64, 64)" in line and "(32, 32)" in line


def _saved_av(folder: Path, tiny_llama) -> PrefixAV:
    av = build_prefix_av(NLAConfig(backbone_dtype="float32", extraction_layer=2, backbone_id="tiny"), tiny_llama)
    with torch.no_grad():
        for p in av.parameters():
            p.copy_(torch.randn_like(p))
    av.save(folder)
    return av


@pytest.mark.parametrize(
    "damage",
    ["truncate", "garbage", "empty", "huge_header"],
)
def test_corrupt_safetensors_is_refused(tmp_path, tiny_llama, damage):
    _saved_av(tmp_path, tiny_llama)
    path = tmp_path / "av.safetensors"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes((1 << 40).to_bytes(8, "little") + data[8:])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_state_dict(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "text"])
def test_corrupt_pickle_is_refused(tmp_path, damage):
    path = tmp_path / "best_av.pt"
    torch.save({"trainable": {"proj.weight": torch.eye(D)}}, path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(400), "text": b"hello"}[damage])
    with pytest.raises(CheckpointError, match="refused to load"):
        load_state_dict(path)


def test_missing_checkpoint_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "nope.safetensors")


def test_release_folder_without_weights_is_refused(tmp_path, bb_dir):
    rel = tmp_path / "rel"
    rel.mkdir()
    (rel / "config.json").write_text(json.dumps(dict(REFERENCE_CONFIG)))
    with pytest.raises(CheckpointError, match="no AV weights"):
        open_card(str(rel), backbone=str(bb_dir))


@pytest.mark.parametrize(
    "patch,match",
    [
        ({"num_prefix_tokens": "16"}, "num_prefix_tokens"),
        ({"extraction_layer": 1.5}, "extraction_layer"),
        ({"extraction_layer": -1}, "extraction_layer"),
        ({"num_inject_slots": 0}, "num_inject_slots"),
        ({"prefix_mode": "dynamic"}, "prefix_mode"),
        ({"inject_norm": "unit"}, "inject_norm"),
        ({"use_layer_embed": "yes"}, "use_layer_embed"),
        ({"temperature": True}, "temperature"),
        ({"top_p": "1.0"}, "top_p"),
        ({"d_vector": 0}, "d_vector"),
    ],
)
def test_config_with_wrong_types_is_refused(tmp_path, patch, match):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(REFERENCE_CONFIG, **patch)))
    with pytest.raises(CheckpointError, match=match):
        NLAConfig.from_json(path)


@pytest.mark.parametrize("text,match", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"), ("\xff\xfe", "not valid JSON")])
def test_config_that_is_not_an_object_is_refused(tmp_path, text, match):
    path = tmp_path / "config.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match=match):
        NLAConfig.from_json(path)


def test_reference_config_keys_missing_and_unknown(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(REFERENCE_CONFIG))
    cfg = NLAConfig.from_json(path)
    assert cfg.backbone_id == "meta-llama/Llama-3.2-3B" and cfg.max_new_tokens == 64
    assert cfg.h_max == 3.0 and cfg.use_layer_embed is False and cfg.inject_norm == "none"
    assert not hasattr(cfg, "some_future_key")


def test_own_format_round_trips(tmp_path, tiny_llama, bb_dir):
    cfg = NLAConfig(backbone_dtype="float32", extraction_layer=2, backbone_id="tiny", num_prefix_tokens=3, num_inject_slots=2,
                    prefix_mode="mlp", prefix_mlp_hidden=8, use_layer_embed=True)
    av = build_prefix_av(cfg, tiny_llama)
    with torch.no_grad():
        for p in av.parameters():
            p.copy_(torch.randn_like(p))
    folder = tmp_path / "ours"
    av.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["av.safetensors", "config.json"]
    cfg2 = NLAConfig.from_json(folder / "config.json")
    assert cfg2 == cfg
    av2 = build_prefix_av(cfg2, tiny_llama)
    keys = load_adapter_weights(av2, folder / "av.safetensors")
    assert keys == sorted(av.state_dict())
    v = torch.randn(3, D)
    torch.testing.assert_close(av2.inject(v), av.inject(v))
    # ... and the folder is a card.
    oc = open_card(str(folder), backbone=str(bb_dir))
    assert oc.trained and oc.card.layers == [2]
    torch.testing.assert_close(oc.av.inject(v), av.inject(v))


def test_mu_of_wrong_size_is_refused(tmp_path, bb_dir):
    rel = tmp_path / "rel"
    write_release(rel, d=D)
    torch.save({"mu": torch.zeros(D + 3)}, rel / "mu_l2.pt")
    with pytest.raises(CheckpointError, match="μ has 35 values"):
        open_card(str(rel), backbone=str(bb_dir))


def test_mu_not_finite_is_refused(tmp_path, bb_dir):
    rel = tmp_path / "rel"
    write_release(rel, d=D)
    mu = torch.zeros(D)
    mu[5] = float("nan")
    torch.save({"mu": mu}, rel / "mu_l2.pt")
    with pytest.raises(CheckpointError, match="μ contains NaN"):
        open_card(str(rel), backbone=str(bb_dir))


def test_d_vector_other_than_hidden_size_is_refused(tmp_path, bb_dir):
    rel = tmp_path / "rel"
    rel.mkdir()
    (rel / "config.json").write_text(json.dumps(dict(REFERENCE_CONFIG, d_vector=16)))
    torch.save({"trainable": {"proj.weight": torch.randn(D, 16), "prefix_embeds": torch.randn(1, D)}}, rel / "best_av.pt")
    with pytest.raises(CheckpointError, match="d_vector=16 but the backbone has d=32"):
        open_card(str(rel), backbone=str(bb_dir))


def test_card_json_with_wrong_types_is_refused(tmp_path, bb_dir, capsys):
    rel = tmp_path / "rel"
    write_release(rel, d=D)
    for extra, match in [({"layers": "2"}, "layers"), ({"default_tau": 1.5}, "default_tau"), ({"layers": []}, "layers")]:
        (rel / "card.json").write_text(json.dumps(extra))
        with pytest.raises(CheckpointError, match=match):
            open_card(str(rel), backbone=str(bb_dir))
    (rel / "card.json").write_text(json.dumps({"kind": "mystery"}))
    line = _cli_error(capsys, ["verbalize", "--card", str(rel), "--backbone", str(bb_dir), "--text", "the cat"])
    assert "kind 'mystery' is not supported" in line
