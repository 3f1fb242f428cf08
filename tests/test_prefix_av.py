"""The SRT prefix AV against a plain reference computation written here.

An SRT-format release folder (reference ``config.json`` + ``best_av.pt`` wrapper) is built over a
tiny random backbone saved to disk; :func:`nla_space.runtime.open_card` must produce exactly the
greedy continuation of ``model.generate(inputs_embeds=[W v, P])`` (times √d on Gemma-2, where the
reference releases were trained with the model scaling ``inputs_embeds``), and score it by the
round-trip convention of the SRT eval scripts (prefix-free, BOS-free, read at the first EOS inclusive).
"""

from __future__ import annotations

import json
import math
import pathlib
from pathlib import Path

import pytest
import torch

import tiny
from nla_space.errors import NLAInputError
from nla_space.reencode import reencode_ids
from nla_space.rollout import eos_inclusive_mask
from nla_space.runtime import open_card
from nla_space.verbalizers import NLAConfig, build_prefix_av

LAYER = 2  # hidden_states index; the tiny backbones have 4 blocks
EOS = tiny.SPECIALS.index("<eos>")
PAD = tiny.SPECIALS.index("<pad>")

#: The reference release config (``config.json`` of https://huggingface.co/RiverRider/srt-nla-av-llama32-3b), minus the keys newer versions added
#: (``use_layer_embed``, ``inject_norm``) and minus ``h_max``, plus a key we do not know.
REFERENCE_CONFIG = {
    "backbone_id": "meta-llama/Llama-3.2-3B",
    "backbone_dtype": "bfloat16",
    "extraction_layer": LAYER,
    "d_vector": None,
    "max_new_tokens": 64,
    "temperature": 1.0,
    "top_p": 1.0,
    "pool": "last",
    "lambda_mag": 0.1,
    "beta_kl": 0.05,
    "gamma_entropy": 0.05,
    "delta_community": 0.2,
    "h_min": 1.5,
    "num_prefix_tokens": 1,
    "prefix_mode": "static",
    "prefix_mlp_hidden": 256,
    "num_inject_slots": 1,
    "some_future_key": {"nested": [1, 2, 3]},
}


def write_release(folder: Path, d: int, num_prefix: int = 1, seed: int = 0, layer: int = LAYER, scale: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Write an SRT release folder (reference config + ``best_av.pt`` wrapper); return (W, P)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(REFERENCE_CONFIG, num_prefix_tokens=num_prefix, extraction_layer=layer)
    (folder / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g) * scale
    P = torch.randn(num_prefix, d, generator=g) * scale
    wrapper = {
        "trainable": {"proj.weight": W.clone(), **({"prefix_embeds": P.clone()} if num_prefix else {})},
        "step": 5000,
        "cfg": {"out_dir": pathlib.PosixPath("/x/y"), "lr": 3e-5},
    }
    torch.save(wrapper, folder / "best_av.pt")
    return W, P


def plain_model(folder: Path, attn: str):
    """The backbone loaded by plain ``transformers`` calls, independent of ``nla_space.backbone``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation=attn)
    return model.eval()


def plain_hidden(model, ids: list[int], layer: int) -> torch.Tensor:
    """``hidden_states[layer]`` at the last position of a full forward of ``ids`` (no BOS added)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    return out.hidden_states[layer][0, -1].float()


def plain_fve(h: torch.Tensor, v: torch.Tensor) -> float:
    """½(1 + cos) written out by hand."""
    cos = float(h.double() @ v.double()) / (float(h.double().norm()) * float(v.double().norm()))
    return 0.5 * (1.0 + cos)


@pytest.fixture(scope="module")
def saved_backbones(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backbones")
    return {arch: tiny.save_backbone(root / arch, arch) for arch in ("llama", "qwen2", "gemma2")}


@pytest.mark.parametrize(
    "arch,num_prefix",
    [("llama", 1), ("qwen2", 1), ("gemma2", 1), ("qwen2", 16)],
)
def test_release_greedy_equals_plain_generate(saved_backbones, tmp_path, arch, num_prefix):
    bb_dir = saved_backbones[arch]
    rel = tmp_path / f"release-{arch}-p{num_prefix}"
    W, P = write_release(rel, d=32, num_prefix=num_prefix, seed=num_prefix)
    oc = open_card(str(rel), backbone=str(bb_dir))
    assert oc.trained and oc.card.layers == [LAYER]
    assert oc.av.cfg.num_prefix_tokens == num_prefix and oc.av.prefix_length == 1 + num_prefix
    assert oc.av.cfg.use_layer_embed is False and oc.av.cfg.inject_norm == "none"  # missing keys → defaults

    model = plain_model(bb_dir, oc.backbone.model.config._attn_implementation)
    n_new = 10
    for vseed in range(3):
        v = torch.randn(32, generator=torch.Generator().manual_seed(100 + vseed)) * 2.0
        res = oc.verbalize(vector=v, greedy=True, max_new_tokens=n_new, seed=vseed)

        # (1, 1+P, d), rounded to the config's backbone_dtype (bfloat16) as the reference casts it
        prefix = torch.cat([(W @ v)[None], P], dim=0)[None].to(torch.bfloat16).float()
        if arch == "gemma2":
            # transformers 5.x scales inside the embedding module, so inputs_embeds arrive unscaled;
            # the releases were trained when the model multiplied inputs_embeds by sqrt(hidden).
            prefix = prefix * torch.tensor(math.sqrt(32.0), dtype=torch.float32)
        with torch.no_grad():
            ref = model.generate(
                inputs_embeds=prefix,
                attention_mask=torch.ones(1, prefix.shape[1], dtype=torch.long),
                do_sample=False,
                max_new_tokens=n_new,
                pad_token_id=PAD,
                eos_token_id=EOS,
            )[0].tolist()
        assert res.k == 1 and len(res.candidates) == 1 and res.greedy
        assert res.best.token_ids == ref, (arch, vseed)
        assert res.best.text == oc.backbone.tokenizer.decode(ref, skip_special_tokens=True)

        # Round trip: generated ids re-encoded without prefix and BOS, read at the first EOS (inclusive).
        upto = ref.index(EOS) + 1 if EOS in ref else len(ref)
        h = plain_hidden(model, ref[:upto], LAYER)
        assert res.best.score_raw == pytest.approx(plain_fve(h, v.float()), abs=2e-5)
        assert res.centered is False and res.best.score_cen is None


def test_gemma2_embed_scale_is_sqrt_hidden(saved_backbones, tmp_path):
    rel = tmp_path / "rel"
    write_release(rel, d=32)
    oc = open_card(str(rel), backbone=str(saved_backbones["gemma2"]))
    assert oc.backbone.embed_scale == pytest.approx(math.sqrt(32.0), rel=1e-6)
    v = torch.randn(32)
    x = oc.av.embeds(v, oc.backbone)
    # the config says bfloat16: the prefix is rounded there first, as the reference casts it
    torch.testing.assert_close(x, oc.av.inject(v).to(torch.bfloat16).float() * math.sqrt(32.0), rtol=1e-6, atol=1e-6)
    oc_llama = open_card(str(rel), backbone=str(saved_backbones["llama"]))
    assert oc_llama.backbone.embed_scale == 1.0


def test_release_with_mu_scores_centered(saved_backbones, tmp_path):
    rel = tmp_path / "rel-mu"
    write_release(rel, d=32, num_prefix=16)
    mu = torch.randn(32, generator=torch.Generator().manual_seed(7))
    torch.save({"mu": mu}, rel / f"mu_l{LAYER}.pt")
    oc = open_card(str(rel), backbone=str(saved_backbones["qwen2"]))
    torch.testing.assert_close(oc.mu, mu)
    model = plain_model(saved_backbones["qwen2"], oc.backbone.model.config._attn_implementation)
    v = torch.randn(32, generator=torch.Generator().manual_seed(8))
    res = oc.verbalize(vector=v, k=6, seed=3, max_new_tokens=8, tau=0.0)
    assert res.centered is True
    for c in res.candidates:
        h = plain_hidden(model, c.token_ids, LAYER)
        assert c.score_raw == pytest.approx(plain_fve(h, v), abs=2e-5)
        assert c.score_cen == pytest.approx(plain_fve(h - mu, v - mu), abs=2e-5)
    assert res.best_index == max(range(6), key=lambda i: res.candidates[i].score_cen)


@pytest.fixture(scope="module")
def eos_prone_backbone(tmp_path_factory) -> Path:
    """A tiny Llama whose LM head makes ``<eos>`` likely (rows stop at varied lengths)."""
    model, tok = tiny.make_model("llama")
    with torch.no_grad():
        ids = torch.randint(4, len(tok), (64, 12), generator=torch.Generator().manual_seed(0))
        h = model.model(input_ids=ids).last_hidden_state.reshape(-1, 32)
        m = h.mean(0)
        model.lm_head.weight[EOS] = 3.0 * m / (m @ m)
    folder = tmp_path_factory.mktemp("eos-llama")
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def test_sampled_candidates_follow_eos_inclusive_round_trip(eos_prone_backbone, tmp_path):
    rel = tmp_path / "rel"
    write_release(rel, d=32, scale=0.02)
    oc = open_card(str(rel), backbone=str(eos_prone_backbone))
    model = plain_model(eos_prone_backbone, oc.backbone.model.config._attn_implementation)
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    n_new = 12
    res = oc.verbalize(vector=v, k=16, seed=0, max_new_tokens=n_new, tau=0.5)
    assert len(res.candidates) == 16
    ended = [c for c in res.candidates if c.token_ids and c.token_ids[-1] == EOS]
    full = [c for c in res.candidates if EOS not in c.token_ids]
    assert ended and full, "the fixture should give rows with and without an EOS"
    assert any(len(c.token_ids) < n_new for c in ended)
    for c in res.candidates:
        assert c.token_ids.count(EOS) <= 1 and PAD not in c.token_ids
        assert len(c.token_ids) == n_new or c.token_ids[-1] == EOS
        h = plain_hidden(model, c.token_ids, LAYER)
        assert c.score_raw == pytest.approx(plain_fve(h, v), abs=2e-5)
    assert res.best_index == max(range(16), key=lambda i: res.candidates[i].score_raw)
    # Same seed, same candidates; another seed, other candidates.
    again = oc.verbalize(vector=v, k=16, seed=0, max_new_tokens=n_new, tau=0.5)
    assert [c.token_ids for c in again.candidates] == [c.token_ids for c in res.candidates]
    other = oc.verbalize(vector=v, k=16, seed=1, max_new_tokens=n_new, tau=0.5)
    assert [c.token_ids for c in other.candidates] != [c.token_ids for c in res.candidates]


def test_reencode_ids_matches_plain_forward_per_row(tiny_backbone):
    bb = tiny_backbone
    rows = [
        [10, 11, 12, EOS, PAD, PAD],  # EOS mid: read at the EOS
        [EOS, PAD, PAD, PAD, PAD, PAD],  # EOS first: read at position 0
        [20, 21, 22, 23, 24, 25],  # no EOS: read at the last token
        [30, EOS, 31, EOS, PAD, PAD],  # several EOS: the first one ends the row
    ]
    ids = torch.tensor(rows)
    mask = eos_inclusive_mask(ids, [EOS])
    assert mask.sum(1).tolist() == [4, 1, 6, 2]
    got = reencode_ids(bb, LAYER, ids, mask)
    for i, row in enumerate(rows):
        n = int(mask[i].sum())
        with torch.no_grad():
            ref = bb.model(input_ids=torch.tensor([row[:n]]), output_hidden_states=True).hidden_states[LAYER][0, -1]
        torch.testing.assert_close(got[i], ref.float(), rtol=1e-5, atol=1e-5)


def test_prefix_av_variants_inject_shapes(tiny_llama):
    """Multi-slot, MLP-prefix and layer-embedding configs build and inject the documented shapes."""
    cfg = NLAConfig(backbone_id="tiny", backbone_dtype="float32", extraction_layer=LAYER, num_prefix_tokens=3, prefix_mode="mlp", num_inject_slots=2,
                    use_layer_embed=True, inject_norm="embed", prefix_mlp_hidden=8)
    av = build_prefix_av(cfg, tiny_llama)
    assert av.prefix_length == 5
    out = av.inject(torch.randn(4, 32))
    assert out.shape == (4, 5, 32) and out.dtype == torch.float32
    # Freshly initialised: identity proj, zero MLP output layer → prefix slots are the BOS row.
    bos_row = tiny_llama.model.get_input_embeddings().weight[tiny_llama.bos_id]
    torch.testing.assert_close(out[:, 2:], bos_row.expand(4, 3, 32))
    static = build_prefix_av(NLAConfig(backbone_id="tiny", backbone_dtype="float32", extraction_layer=LAYER, num_prefix_tokens=0), tiny_llama)
    v = torch.randn(32)
    torch.testing.assert_close(static.inject(v)[0, 0], v)  # identity init, raw v, no scale
    assert static.inject(v).shape == (1, 1, 32)


def test_open_card_refuses_unsupported_layer(saved_backbones, tmp_path):
    rel = tmp_path / "rel"
    write_release(rel, d=32)
    oc = open_card(str(rel), backbone=str(saved_backbones["llama"]))
    with pytest.raises(NLAInputError, match="supports layer"):
        oc.verbalize(vector=torch.randn(32), layer=1, greedy=True, max_new_tokens=2)
    write_release(tmp_path / "rel-deep", d=32, layer=5)  # past the last block
    with pytest.raises(NLAInputError, match="out of range"):
        open_card(str(tmp_path / "rel-deep"), backbone=str(saved_backbones["llama"])).verbalize(
            vector=torch.randn(32), greedy=True, max_new_tokens=2
        )


def test_a_bfloat16_card_on_a_float32_backbone_rounds_its_prefix_like_the_reference(saved_backbones, tmp_path):
    """The reference casts its float32 prefix to the config's ``backbone_dtype`` at the boundary, so a
    bfloat16 card run on a float32 backbone (the project's CPU default) feeds bf16-rounded values. The
    fixture (no static prefix: the first token is read off the injected slot itself, so it has many
    near-ties) has greedy decodes that differ with and without that rounding; the card decodes like
    the rounding reference on every one of them, and a float32 card does not round."""
    bb_dir = saved_backbones["llama"]
    rel = tmp_path / "release-bf16"
    W, P = write_release(rel, d=32, num_prefix=0, seed=0)
    oc = open_card(str(rel), backbone=str(bb_dir))
    assert oc.av.cfg.backbone_dtype == "bfloat16" and oc.backbone.dtype == torch.float32
    model = plain_model(bb_dir, oc.backbone.model.config._attn_implementation)

    def plain_greedy(v: torch.Tensor, rounded: bool) -> list[int]:
        prefix = (W @ v)[None, None]
        if rounded:
            prefix = prefix.to(torch.bfloat16).float()
        with torch.no_grad():
            return model.generate(inputs_embeds=prefix, attention_mask=torch.ones(1, 1, dtype=torch.long), do_sample=False,
                                  max_new_tokens=8, pad_token_id=PAD, eos_token_id=EOS)[0].tolist()

    vs = torch.randn(300, 32, generator=torch.Generator().manual_seed(7)) * 2.0
    differ = [v for v in vs if plain_greedy(v, True) != plain_greedy(v, False)]
    assert len(differ) >= 2, "the fixture must tell the two recipes apart"
    for v in differ:
        assert oc.verbalize(vector=v, greedy=True, max_new_tokens=8).best.token_ids == plain_greedy(v, True)

    cfg32 = json.loads((rel / "config.json").read_text()) | {"backbone_dtype": "float32"}
    (rel / "config.json").write_text(json.dumps(cfg32))
    oc32 = open_card(str(rel), backbone=str(bb_dir))
    assert all(oc32.verbalize(vector=v, greedy=True, max_new_tokens=8).best.token_ids == plain_greedy(v, False) for v in differ)


def test_a_prefix_card_refuses_the_last_layer_with_the_reason(saved_backbones, tmp_path):
    """The SRT reference reads hidden_states[num_layers] (after the final norm); the project's layer
    num_layers is the raw block output, so a prefix card at that layer says why it cannot read it."""
    rel = tmp_path / "release-last"
    write_release(rel, d=32, layer=4)
    oc = open_card(str(rel), backbone=str(saved_backbones["llama"]))
    with pytest.raises(NLAInputError, match="final-normed") as e:
        oc.verbalize(vector=torch.randn(32), greedy=True, max_new_tokens=4)
    assert e.value.field == "layer"
