"""Opt-in bfloat16 compute on CPU (issue #7): float32 stays the CPU default whatever a card says;
``dtype="bfloat16"`` / ``--dtype bfloat16`` / ``NLA_CPU_DTYPE=bfloat16`` run the backbone in bfloat16
while the AV stays float32 and scores are float32; the bench names each path's dtype and reports
the bf16-vs-fp32 fidelity. Tiny random Llama models: on them the best pick of two dtypes may differ
(scores are close together), so the robust assertion is that re-scoring the *same* candidate token
ids in bfloat16 and float32 moves each score by less than 0.02.
"""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from eval_harness.bench import dtype_fidelity
from nla_space import cli
from nla_space.backbone import load_backbone, requested_dtype, resolve_dtype
from nla_space.errors import NLAInputError
from nla_space.policy import score_vectors
from nla_space.reencode import reencode_ids
from nla_space.rollout import Rollout
from nla_space.runtime import open_card

#: |Δ score| allowed between bfloat16 and float32 re-encodings of the same candidate ids (tiny models)
SCORE_TOL = 0.02
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """A tiny Llama backbone folder, a card folder for it (layer 2, μ), and the same card with
    ``backbone_dtype: bfloat16`` in its config (as CUDA cards carry)."""
    from nla_space.io import save_tensors

    root = tmp_path_factory.mktemp("dtype")
    bb = tiny.save_backbone(root / "bb", "llama")
    card = tiny.make_card_folder(root / "card", bb, layer=2, num_prefix_tokens=2)
    save_tensors(card / "mu.safetensors", {"mu": torch.randn(32, generator=torch.Generator().manual_seed(1)) * 0.1})
    bf_card = root / "card_bf16"
    bf_card.mkdir()
    for f in card.iterdir():
        (bf_card / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bf_card / "config.json").read_text())
    cfg["backbone_dtype"] = "bfloat16"
    (bf_card / "config.json").write_text(json.dumps(cfg))
    return {"bb": bb, "card": card, "card_bf16": bf_card, "root": root}


def test_resolve_dtype_cpu_default_is_float32_whatever_the_card_says():
    assert resolve_dtype(None, CPU) == torch.float32
    assert resolve_dtype(None, CPU, default_dtype="bfloat16") == torch.float32
    assert resolve_dtype(None, CPU, default_dtype=torch.bfloat16) == torch.float32
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    assert resolve_dtype(torch.bfloat16, CPU, default_dtype="float32") == torch.bfloat16
    assert resolve_dtype("float32", CPU, default_dtype="bfloat16") == torch.float32
    with pytest.raises(NLAInputError, match="not supported on CPU"):
        resolve_dtype("float16", CPU)
    with pytest.raises(NLAInputError, match="not a dtype"):
        resolve_dtype("bf16x", CPU)


def test_cuda_dtype_rules_are_unchanged():
    cuda = torch.device("cuda")  # resolve_dtype only reads the device type: no GPU needed
    assert resolve_dtype(None, cuda) == torch.bfloat16
    assert resolve_dtype(None, cuda, default_dtype="float16") == torch.float16
    assert resolve_dtype("float32", cuda, default_dtype="bfloat16") == torch.float32


def test_open_card_on_cpu_stays_float32_with_and_without_a_card_dtype(folders):
    for card in (folders["card"], folders["card_bf16"]):
        oc = open_card(str(card), backbone=str(folders["bb"]), device="cpu")
        assert oc.backbone.dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in oc.backbone.model.parameters())


def test_explicit_bfloat16_loads_the_backbone_in_bfloat16(folders):
    bb = load_backbone(str(folders["bb"]), device="cpu", dtype="bfloat16")
    assert bb.dtype == torch.bfloat16 and bb.dtype_name == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in bb.model.parameters())
    oc = open_card(str(folders["card_bf16"]), backbone=str(folders["bb"]), device="cpu", dtype="bfloat16")
    assert oc.backbone.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in oc.av.parameters())  # the adapter stays float32
    prefix = oc.av.embeds(torch.randn(32)[None], oc.backbone)
    assert prefix.dtype == torch.bfloat16  # cast at the boundary, before the model


def test_float32_and_bfloat16_copies_are_cached_separately(folders):
    a = open_card(str(folders["card"]), backbone=str(folders["bb"]), device="cpu")
    b = open_card(str(folders["card"]), backbone=str(folders["bb"]), device="cpu", dtype="bfloat16")
    assert a.backbone is not b.backbone and (a.backbone.dtype, b.backbone.dtype) == (torch.float32, torch.bfloat16)
    assert open_card(str(folders["card"]), backbone=str(folders["bb"]), device="cpu").backbone is a.backbone
    assert a.with_dtype("float32") is a and a.with_dtype("bfloat16").backbone is b.backbone


def test_env_switch_is_read_by_entry_points_only(folders, monkeypatch):
    monkeypatch.setenv("NLA_CPU_DTYPE", "bfloat16")
    assert requested_dtype(None, "cpu") == "bfloat16"
    assert requested_dtype("float32", "cpu") == "float32"  # the flag wins
    # The library default is untouched: training and target building stay float32.
    assert load_backbone(str(folders["bb"]), device="cpu").dtype == torch.float32
    monkeypatch.setenv("NLA_CPU_DTYPE", "half")
    with pytest.raises(NLAInputError, match="NLA_CPU_DTYPE='half'"):
        requested_dtype(None, "cpu")
    monkeypatch.setenv("NLA_CPU_DTYPE", "")
    assert requested_dtype(None, "cpu") is None


def test_bfloat16_verbalize_end_to_end_scores_finite_and_close_to_float32(folders):
    oc16 = open_card(str(folders["card"]), backbone=str(folders["bb"]), device="cpu", dtype="bfloat16")
    oc32 = oc16.with_dtype("float32")
    assert oc32.av is oc16.av and oc32.backbone.dtype == torch.float32
    res = oc16.verbalize(text="the cat is red", k=8, seed=3, max_new_tokens=8)
    assert res.centered and len(res.candidates) == 8
    scores = torch.tensor([c.score_cen for c in res.candidates])
    assert torch.isfinite(scores).all() and ((0 <= scores) & (scores <= 1)).all()
    assert res.best_index == int(scores.argmax())
    # Re-score the same candidate ids in float32: every score within SCORE_TOL.
    T = max(len(c.token_ids) for c in res.candidates)
    ids = torch.full((8, T), oc32.backbone.pad_id, dtype=torch.long)
    mask = torch.zeros((8, T), dtype=torch.long)
    for i, c in enumerate(res.candidates):
        ids[i, : len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
        mask[i, : len(c.token_ids)] = 1
    roll = Rollout(ids=ids, mask=mask)
    v = oc16.extract("the cat is red", 2)
    assert v.dtype == torch.float32
    h32 = reencode_ids(oc32.backbone, 2, roll.ids, roll.mask)
    _, cen32 = score_vectors(h32, v, oc32.mu)
    assert (cen32 - scores).abs().max() < SCORE_TOL


def test_dtype_fidelity_block(folders):
    oc16 = open_card(str(folders["card"]), backbone=str(folders["bb"]), device="cpu", dtype="bfloat16")
    fid = dtype_fidelity(oc16, oc16.with_dtype("float32"), "the cat is red", k=6, new_tokens=6, seed=0)
    json.dumps(fid)
    assert fid["dtype"] == "bfloat16" and fid["reference_dtype"] == "float32" and fid["score"] == "centered"
    assert 0 <= fid["mean_abs_delta_score"] <= fid["max_abs_delta_score"] < SCORE_TOL
    assert isinstance(fid["same_best_pick"], bool) and isinstance(fid["same_best_text_as_reference_run"], bool)
    assert 0 <= fid["identical_candidates"] <= 6 and fid["activation_cosine"] > 0.99
    # Against itself the measurement is exact.
    oc32 = oc16.with_dtype("float32")
    same = dtype_fidelity(oc32, oc32, "the cat is red", k=4, new_tokens=5, seed=1)
    assert same["mean_abs_delta_score"] == 0 and same["same_best_pick"] and same["identical_candidates"] == 4


def test_cli_verbalize_dtype_bfloat16(folders, capsys):
    argv = ["verbalize", "--card", str(folders["card"]), "--backbone", str(folders["bb"]), "--max-new-tokens", "5",
            "--text", "the dog", "--k", "3", "--json", "--dtype", "bfloat16", "--device", "cpu"]
    assert cli.main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["candidates"]) == 3 and all(0 <= c["score_cen"] <= 1 for c in d["candidates"])


@pytest.mark.parametrize("argv_extra, env", [(["--dtype", "float16"], None), ([], "fp8")])
def test_cli_bad_dtype_is_one_line_exit_2(folders, capsys, monkeypatch, argv_extra, env):
    if env is not None:
        monkeypatch.setenv("NLA_CPU_DTYPE", env)
    argv = ["verbalize", "--card", str(folders["card"]), "--backbone", str(folders["bb"]), "--text", "the dog",
            "--device", "cpu", *argv_extra]
    try:
        rc = cli.main(argv)
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and out.out == "", out.err
    assert ("--dtype" in lines[0]) if env is None else ("NLA_CPU_DTYPE" in lines[0])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3"])
def test_every_cast_leaves_the_tensors_from_pretrained_gives(tmp_path, arch):
    """``from_pretrained(dtype=bfloat16)`` keeps the rotary ``inv_freq`` buffers float32; the project's
    load path, ``from_model`` and the casts of ``cast_model`` hold the same tensors (buffers and
    parameters, dtype and value) and decode the same greedy ids; a plain ``model.to`` would not."""
    from transformers import AutoModelForCausalLM

    from nla_space.backbone import cast_model, from_model, load_backbone

    folder = tiny.save_backbone(tmp_path / arch, arch)
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
    loaded = load_backbone(str(folder), device="cpu", dtype="bfloat16", bf16_mode="reference").model
    cast = cast_model(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32), dtype=torch.bfloat16)
    wrapped = from_model(cast_model(AutoModelForCausalLM.from_pretrained(str(folder)), dtype=torch.bfloat16),
                         tiny.make_tokenizer(), bf16_mode="reference").model
    plain = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(torch.bfloat16)
    want = dict(ref.named_buffers()) | dict(ref.named_parameters())
    assert any(n.endswith("inv_freq") and t.dtype == torch.float32 for n, t in want.items())
    for model in (loaded, cast, wrapped):
        got = dict(model.named_buffers()) | dict(model.named_parameters())
        assert set(got) == set(want)
        for name, t in want.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert any(b.dtype != want[n].dtype for n, b in plain.named_buffers())  # what the cast used to give
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    with torch.no_grad():
        expect = ref.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        for model in (loaded, cast, wrapped):
            assert torch.equal(model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0), expect)


def test_bf16_mode_is_checked_and_cached_apart(folders, monkeypatch):
    """``NLA_CPU_BF16`` / ``bf16_mode`` choose the bfloat16 CPU mode; an unknown one is refused by name;
    the fast and reference copies are distinct shared backbones, and a results file can tell them apart."""
    from eval_harness.results import precision_info
    from nla_space import cpu_bf16
    from nla_space.backbone import shared_backbone

    monkeypatch.setenv("NLA_CPU_BF16", "turbo")
    with pytest.raises(NLAInputError, match="NLA_CPU_BF16"):
        cpu_bf16.resolve_mode()
    monkeypatch.delenv("NLA_CPU_BF16")
    assert cpu_bf16.resolve_mode() == "fast"
    with pytest.raises(NLAInputError, match="bf16 mode"):
        cpu_bf16.resolve_mode("turbo")
    spec = str(folders["bb"])
    fast = shared_backbone(spec, None, "cpu", "bfloat16", bf16_mode="fast")
    exact = shared_backbone(spec, None, "cpu", "bfloat16", bf16_mode="reference")
    assert fast is not exact and cpu_bf16.mode_of(exact.model) == "reference"
    assert precision_info(exact) == "bfloat16 (reference)"
    assert precision_info(shared_backbone(spec, None, "cpu", None)) == "float32"
    assert exact.model.config._attn_implementation == "sdpa"


def test_an_entry_points_bf16_mode_is_restored_after_it(monkeypatch):
    """``--bf16-mode`` holds for one command: an in-process call leaves ``$NLA_CPU_BF16`` as it found it."""
    import os

    from nla_space import cpu_bf16

    monkeypatch.delenv("NLA_CPU_BF16", raising=False)
    with cpu_bf16.mode_for_process("reference"):
        assert cpu_bf16.resolve_mode() == "reference"
    assert "NLA_CPU_BF16" not in os.environ and cpu_bf16.resolve_mode() == "fast"
    monkeypatch.setenv("NLA_CPU_BF16", "fast")
    with cpu_bf16.mode_for_process("reference"):
        pass
    assert os.environ["NLA_CPU_BF16"] == "fast"
