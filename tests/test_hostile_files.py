"""Hostile files beyond tests/test_checkpoints.py: adapter tensors of the wrong dtype in safetensors,
safetensors headers that declare huge shapes, config/card JSON with wrong types or absurd values,
damaged targets folders, hostile ``nla_meta.yaml`` sidecars, and ``trust_remote_code`` never on.

Every case must be refused with a :class:`CheckpointError` / :class:`NLAInputError` whose message names
the problem (never a bare KeyError/TypeError/traceback, never an attempt to allocate the declared size).
"""

from __future__ import annotations

import json
import re
import resource
import struct
from pathlib import Path

import pytest
import torch

import tiny
from nla_space.cards.sections import InjectionSection
from nla_space.errors import CheckpointError, NLAInputError
from nla_space.hub import load_state_dict
from nla_space.io import save_tensors
from nla_space.runtime import open_card

ROOT = Path(__file__).resolve().parent.parent
D = 32


@pytest.fixture(scope="module")
def bb_dir(tmp_path_factory) -> Path:
    return tiny.save_backbone(tmp_path_factory.mktemp("bb") / "llama", "llama")


def _card(folder: Path, bb_dir: Path) -> Path:
    """A valid card folder (config.json + av.safetensors) for the tiny backbone."""
    return tiny.make_card_folder(folder, bb_dir, layer=2)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------------
# Adapter tensors of the wrong dtype (safetensors; test_checkpoints covers a long tensor in a pickle)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.int32, torch.int64, torch.uint8])
def test_non_float_adapter_tensor_in_safetensors_is_refused(tmp_path, bb_dir, dtype):
    card = _card(tmp_path / "card", bb_dir)
    state = load_state_dict(card / "av.safetensors")
    state["proj.weight"] = torch.ones_like(state["proj.weight"]).to(dtype)
    save_tensors(card / "av.safetensors", state)
    with pytest.raises(CheckpointError, match=r"proj\.weight is not a finite float tensor"):
        open_card(str(card), backbone=str(bb_dir))


@pytest.mark.parametrize("bad", ["inf", "nan_prefix"])
def test_non_finite_adapter_tensor_in_safetensors_is_refused(tmp_path, bb_dir, bad):
    card = _card(tmp_path / "card", bb_dir)
    state = load_state_dict(card / "av.safetensors")
    if bad == "inf":
        state["proj.weight"][0, 0] = float("inf")
    else:
        state["prefix_embeds"][0, 0] = float("nan")
    save_tensors(card / "av.safetensors", state)
    with pytest.raises(CheckpointError, match="not a finite float tensor"):
        open_card(str(card), backbone=str(bb_dir))


def test_half_precision_adapter_is_accepted_and_upcast(tmp_path, bb_dir):
    """The refusal above is about kind, not width: a float16 release loads (as float32)."""
    card = _card(tmp_path / "card", bb_dir)
    state = load_state_dict(card / "av.safetensors")
    save_tensors(card / "av.safetensors", {k: v.half() for k, v in state.items()})
    oc = open_card(str(card), backbone=str(bb_dir))
    assert oc.av.proj.weight.dtype == torch.float32 and oc.trained


# ------------------------------------------------------------------------------------------------
# safetensors headers that lie about sizes


def _raw_safetensors(path: Path, header: dict, payload: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + payload)


@pytest.mark.parametrize(
    "header,payload",
    [
        # a 10^12-element tensor declared over 16 bytes of data
        ({"proj.weight": {"dtype": "F32", "shape": [1_000_000, 1_000_000], "data_offsets": [0, 16]}}, b"\0" * 16),
        # offsets that point 4 TB past the end of a tiny file
        ({"proj.weight": {"dtype": "F32", "shape": [1_000_000, 1_000_000], "data_offsets": [0, 4 * 10**12]}}, b"\0" * 16),
        # negative / inverted offsets
        ({"proj.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 0]}}, b"\0" * 16),
        # an unknown dtype
        ({"proj.weight": {"dtype": "F1024", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 16),
        # a header that is not an object of tensors
        ({"proj.weight": "rm -rf /"}, b""),
    ],
    ids=["huge-shape", "huge-offsets", "inverted-offsets", "bad-dtype", "not-a-tensor"],
)
def test_lying_safetensors_header_is_refused_without_allocating(tmp_path, header, payload):
    path = tmp_path / "av.safetensors"
    _raw_safetensors(path, header, payload)
    before = _peak_rss_mb()
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_state_dict(path)
    assert _peak_rss_mb() - before < 200, "a lying header must not make the loader allocate the declared size"


def test_lying_header_inside_a_card_is_refused(tmp_path, bb_dir):
    card = _card(tmp_path / "card", bb_dir)
    _raw_safetensors(card / "av.safetensors",
                     {"proj.weight": {"dtype": "F32", "shape": [10**7, 10**7], "data_offsets": [0, 64]}}, b"\0" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        open_card(str(card), backbone=str(bb_dir))


# ------------------------------------------------------------------------------------------------
# config.json with absurd values (test_checkpoints covers wrong types)


@pytest.mark.parametrize(
    "patch,match",
    [
        ({"num_prefix_tokens": 10**9}, "num_prefix_tokens"),
        ({"max_new_tokens": 10**9}, "max_new_tokens"),
        ({"d_vector": 10**9}, "d_vector"),
        ({"prefix_mlp_hidden": 10**9}, "prefix_mlp_hidden"),
        ({"num_inject_slots": 10**6}, "num_inject_slots"),
        ({"extraction_layer": 10**9}, "extraction_layer"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": float("inf")}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"num_prefix_tokens": None}, "num_prefix_tokens"),
        ({"prefix_mode": ["static"]}, "prefix_mode"),
    ],
)
def test_config_with_absurd_values_is_refused_before_building(tmp_path, bb_dir, patch, match):
    card = _card(tmp_path / "card", bb_dir)
    cfg = json.loads((card / "config.json").read_text())
    cfg.update(patch)
    (card / "config.json").write_text(json.dumps(cfg))  # NaN / Infinity written as JSON extensions
    before = _peak_rss_mb()
    with pytest.raises(CheckpointError, match=match):
        open_card(str(card), backbone=str(bb_dir))
    assert _peak_rss_mb() - before < 200


def test_config_layer_beyond_the_backbone_is_refused(tmp_path, bb_dir):
    card = _card(tmp_path / "card", bb_dir)
    cfg = json.loads((card / "config.json").read_text())
    cfg["extraction_layer"] = 99  # within NLAConfig's range, beyond the 4-layer backbone
    (card / "config.json").write_text(json.dumps(cfg))
    oc = None
    try:
        oc = open_card(str(card), backbone=str(bb_dir))
    except NLAInputError as exc:
        assert "layer" in str(exc)
        return
    with pytest.raises(NLAInputError, match="layer"):
        oc.verbalize(text="the cat is on the house", k=2, max_new_tokens=3, seed=0)


def test_config_that_is_huge_is_refused_or_read_without_blowing_up(tmp_path, bb_dir):
    """A 50 MB config.json full of unknown keys: unknown keys are ignored, nothing is kept."""
    card = _card(tmp_path / "card", bb_dir)
    cfg = json.loads((card / "config.json").read_text())
    cfg["junk"] = ["x" * 1000] * 50_000
    (card / "config.json").write_text(json.dumps(cfg))
    oc = open_card(str(card), backbone=str(bb_dir))
    assert not hasattr(oc.av.cfg, "junk")


# ------------------------------------------------------------------------------------------------
# card.json: unknown keys are refused naming the file and the key, wrong types refused (test_checkpoints
# covers layers/default_tau)


def test_card_json_unknown_keys_are_refused_and_av_location_cannot_be_redirected(tmp_path, bb_dir):
    card = _card(tmp_path / "card", bb_dir)
    (card / "card.json").write_text(json.dumps({"title": "mine", "layers": [2], "exec": "__import__('os').system('touch PWNED')",
                                                "future_field": {"a": 1}}))
    with pytest.raises(CheckpointError, match=r"card\.json: unknown key 'exec'"):
        open_card(str(card), backbone=str(bb_dir))
    (card / "card.json").write_text(json.dumps({"title": "mine", "layers": [2], "av": {"repo": "evil/elsewhere", "folder": "/"}}))
    oc = open_card(str(card), backbone=str(bb_dir))
    assert oc.card.title == "mine"
    assert Path(oc.card.av.folder) == card.resolve() and oc.card.av.repo is None
    assert not (Path.cwd() / "PWNED").exists()


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"layers": [2, "3"]}, "layers"),
        ({"layers": [True]}, "layers"),
        ({"layers": 2}, "layers"),
        ({"default_tau": "0.5"}, "default_tau"),
        ({"default_tau": float("nan")}, "default_tau"),
        ({"default_tau": True}, "default_tau"),
        ({"backbone": "meta-llama/Llama-3.2-3B"}, "backbone"),
        ({"aliases": "embedded"}, "aliases"),
        ({"kind": 7}, "kind"),
        ({"mu_file": 5}, "mu_file"),
    ],
)
def test_card_json_with_wrong_types_is_refused(tmp_path, bb_dir, extra, match):
    card = _card(tmp_path / "card", bb_dir)
    (card / "card.json").write_text(json.dumps(extra))
    with pytest.raises(NLAInputError, match=match):
        open_card(str(card), backbone=str(bb_dir))


# ------------------------------------------------------------------------------------------------
# Targets folders


@pytest.fixture(scope="module")
def targets_dir(tmp_path_factory, bb_dir) -> Path:
    from eval_harness.data.targets import HealthThresholds, TargetsSpec, build_targets
    from nla_space.backbone import load_backbone

    out = tmp_path_factory.mktemp("targets") / "t"
    spec = TargetsSpec(backbone=str(bb_dir), layer=2, n=24, seq_len=5, seed=0, batch_size=12, n_val=4, n_test=4,
                       n_mu_pool=4, health=HealthThresholds(min_dim_std=1e-4, min_norm_std=0.0))
    build_targets(load_backbone(str(bb_dir)), spec, out)
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _drop_line(p: Path) -> None:
    lines = p.read_text().splitlines()
    p.write_text("\n".join(lines[:-1]) + "\n")


def _extra_line(p: Path) -> None:
    lines = p.read_text().splitlines()
    p.write_text("\n".join(lines + [lines[-1]]) + "\n")


def _cut_last_line(p: Path) -> None:
    text = p.read_text()
    p.write_text(text[: len(text) - 20])


def _bad_split(p: Path) -> None:
    lines = [json.loads(x) for x in p.read_text().splitlines()]
    lines[0]["split"] = "leaked"
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def _nan_vectors(p: Path) -> None:
    v = load_state_dict(p)["v"]
    v[3, 1] = float("nan")
    save_tensors(p, {"v": v})


def _wrong_key(p: Path) -> None:
    save_tensors(p, {"vectors": load_state_dict(p)["v"]})


def _one_dim(p: Path) -> None:
    save_tensors(p, {"v": load_state_dict(p)["v"].reshape(-1)})


def _int_vectors(p: Path) -> None:
    save_tensors(p, {"v": load_state_dict(p)["v"].to(torch.int32)})


TARGET_DAMAGE = [
    ("vectors.safetensors", _truncate, "not a readable safetensors"),
    ("vectors.safetensors", lambda p: p.unlink(), "vectors.safetensors"),
    ("vectors.safetensors", _wrong_key, "'v'"),
    ("vectors.safetensors", _one_dim, "shape"),
    ("vectors.safetensors", _nan_vectors, "finite"),
    ("vectors.safetensors", _int_vectors, "float"),
    ("texts.jsonl", _drop_line, "vectors but"),
    ("texts.jsonl", _extra_line, "vectors but"),
    ("texts.jsonl", _cut_last_line, "texts.jsonl"),
    ("texts.jsonl", lambda p: p.unlink(), "texts.jsonl"),
    ("texts.jsonl", _bad_split, "split"),
    ("meta.json", lambda p: p.write_text("{not json"), "meta.json"),
    ("meta.json", lambda p: p.write_text("[1, 2]"), "meta.json"),
    ("meta.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "complete": False})), "not complete"),
    ("meta.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "layer": "two"})), "layer"),
]


@pytest.mark.parametrize("name,damage,match", TARGET_DAMAGE,
                         ids=[f"{n}-{getattr(d, '__name__', 'lambda')}-{i}" for i, (n, d, _) in enumerate(TARGET_DAMAGE)])
def test_damaged_targets_folder_is_refused(tmp_path, targets_dir, name, damage, match):
    from eval_harness.data.dataset import load_target_set

    folder = _copy(targets_dir, tmp_path / "t")
    load_target_set(folder)  # the undamaged copy loads
    damage(folder / name)
    with pytest.raises(CheckpointError, match=match):
        load_target_set(folder)


def test_damaged_targets_folder_gives_one_error_line_on_the_command_line(tmp_path, targets_dir, bb_dir, capsys):
    from eval_harness.cli import main

    folder = _copy(targets_dir, tmp_path / "t")
    _cut_last_line(folder / "texts.jsonl")
    rc = main(["train", "--targets", str(folder), "--out", str(tmp_path / "run"), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")], err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing written


# ------------------------------------------------------------------------------------------------
# nla_meta.yaml sidecars


PHI4 = json.loads((ROOT / "nla_space" / "cards" / "nla_phi4_universal_av_v2.json").read_text(encoding="utf-8"))
PHI4_INJECTION = InjectionSection.from_dict(PHI4["injection"], "phi4")


def _sidecar(tmp_path: Path, text: str):
    from nla_space.sidecar import load_sidecar

    (tmp_path / "nla_meta.yaml").write_text(text, encoding="utf-8")
    return load_sidecar(tmp_path)


def test_sidecar_unknown_keys_are_ignored(tmp_path):
    from nla_space.verbalizers import injection as inj

    plain = inj.resolve_spec(PHI4_INJECTION, _sidecar(tmp_path, "kind: nla_model\nextraction: {injection_scale: 150}\n"), "t")
    noisy = inj.resolve_spec(PHI4_INJECTION, _sidecar(tmp_path, (
        "kind: nla_model\nextraction: {injection_scale: 150, future: 3}\nsurprise: {deep: [1, 2, 3]}\n"
        "tokens: {something_new: 5}\n")), "t")
    assert (plain.scale, plain.rule, plain.template, plain.marker) == (noisy.scale, noisy.rule, noisy.template, noisy.marker)


@pytest.mark.parametrize(
    "scale",
    ["1.0e+300", ".inf", "-.inf", ".nan", "-150", "0", "'big'", "true", "[150]"],
)
def test_sidecar_absurd_injection_scale_is_refused(tmp_path, scale):
    from nla_space.verbalizers import injection as inj

    with pytest.raises(CheckpointError, match="scale"):
        sc = _sidecar(tmp_path, f"extraction: {{injection_scale: {scale}}}\n")
        inj.resolve_spec(PHI4_INJECTION, sc, "t")


@pytest.mark.parametrize(
    "text,match",
    [
        ("d_model: '3072'\n", "d_model"),
        ("d_model: 1.5\n", "d_model"),
        ("tokens: {injection_token_id: -5}\n", "injection_token_id"),
        ("extraction_layer_index: -3\n", "extraction_layer_index"),
        ("training: {chat_template: 'yes'}\n", "chat_template"),
        ("- just\n- a list\n", "mapping"),
        ("key: [unclosed\n", "YAML"),
    ],
)
def test_sidecar_wrong_types_are_refused(tmp_path, text, match):
    with pytest.raises(CheckpointError, match=match):
        _sidecar(tmp_path, text)


def test_sidecar_python_tags_are_not_executed(tmp_path):
    marker = tmp_path / "PWNED"
    with pytest.raises(CheckpointError, match="YAML"):
        _sidecar(tmp_path, f"role: !!python/object/apply:os.system ['touch {marker}']\n")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# trust_remote_code


def _package_sources() -> list[Path]:
    return sorted([*(ROOT / "nla_space").rglob("*.py"), *(ROOT / "eval_harness").rglob("*.py"), ROOT / "app.py",
                   *(ROOT / "space").rglob("*.py")])


def test_trust_remote_code_is_never_enabled_in_the_sources():
    offenders = []
    for path in _package_sources():
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in re.finditer(r"trust_remote_code\s*[=:]\s*([^,)\s]+)", line):
                if m.group(1) != "False":
                    offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
            if re.search(r"['\"]trust_remote_code['\"]", line):
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not offenders, offenders
    # and the loaders do pass it explicitly (a default could change under us)
    assert "trust_remote_code=False" in (ROOT / "nla_space" / "backbone.py").read_text(encoding="utf-8")


def test_auto_map_in_a_backbone_folder_does_not_run_its_code(tmp_path):
    from nla_space.backbone import load_backbone

    folder = tiny.save_backbone(tmp_path / "evil", "llama")
    marker = tmp_path / "PWNED"
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    (folder / "modeling_evil.py").write_text(payload + "from transformers import LlamaForCausalLM as EvilForCausalLM\n")
    (folder / "configuration_evil.py").write_text(payload + "from transformers import LlamaConfig as EvilConfig\n")
    (folder / "tokenization_evil.py").write_text(payload + "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    tcfg["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    tcfg.pop("tokenizer_class", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg))
    try:
        bb = load_backbone(str(folder))
    except NLAInputError:
        bb = None  # refusing is fine too
    assert not marker.exists(), "code shipped in a checkpoint folder was executed"
    if bb is not None:
        assert type(bb.model).__module__.startswith("transformers.")
