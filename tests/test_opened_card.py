"""The one declared interface of an opened card (:mod:`nla_space.verbalizers.base`) on every kind, with
tiny random models: every strategy, the read position, the token states and the heat map, and every
eval refusing a kind it does not support before it does any work."""

from __future__ import annotations

import argparse
import importlib

import pytest
import torch

import tiny
from nla_space.cards import builtin_cards, card_from_folder, find_card
from nla_space.errors import NLAInputError
from nla_space.io import save_tensors
from nla_space.policy import NOTE_KINDS, STRATEGIES
from nla_space.runtime import CARD_KINDS, OpenedCard, open_card
from nla_space.sweep import sweep
from nla_space.ui import engine, views

TEXT = "the cat is on the old tree"
WORDS = TEXT.split()
KINDS = ["prefix", "patch", "injection", "injection-raw"]
#: kinds that read the raw text (position p = the text cut after its token p)
RAW = ("prefix", "patch", "injection-raw")


@pytest.fixture(scope="module")
def cards(tmp_path_factory) -> dict[str, OpenedCard]:
    from test_injection import Setup, _write_sidecar

    root = tmp_path_factory.mktemp("opened")
    folder = tiny.make_card_folder(root / "prefix", tiny.save_backbone(root / "bb"), layer=2)
    save_tensors(folder / "mu.safetensors", {"mu": 0.1 * torch.randn(32, generator=torch.Generator().manual_seed(0))})
    inj = Setup(root / "inj", "phi3")
    _write_sidecar(inj.av, inj.sidecar())
    return {
        "prefix": open_card(card_from_folder(folder)),
        "patch": open_card(find_card(str(tiny.make_patch_card(root / "patch", "llama")))),
        "injection": open_card(inj.card(), device="cpu"),  # the text inside the chat template
        "injection-raw": open_card(inj.card(input={"chat_template": False, "add_special_tokens": True}), device="cpu"),
    }


def n_text_tokens(oc: OpenedCard, text: str = TEXT) -> int:
    return len(oc.backbone.tokenizer(text, add_special_tokens=False)["input_ids"])


def same(a, b) -> None:
    assert [c.token_ids for c in a.candidates] == [c.token_ids for c in b.candidates]
    assert [c.score_raw for c in a.candidates] == [c.score_raw for c in b.candidates]
    assert a.best_index == b.best_index and a.position == b.position and a.read_token == b.read_token


def test_every_kind_is_an_opened_card_and_shares_one_verbalize(cards) -> None:
    assert set(CARD_KINDS) == {"prefix", "patch", "injection"}
    for oc in cards.values():
        assert isinstance(oc, OpenedCard)
        for name in ("verbalize", "check_layer", "check_vector", "guided", "read", "candidate_texts"):
            assert getattr(type(oc), name) is getattr(OpenedCard, name), name  # implemented once, never overridden
        assert type(oc).default_max_new_tokens is OpenedCard.default_max_new_tokens
    with pytest.raises(TypeError, match="abstract"):
        OpenedCard()  # type: ignore[abstract]


@pytest.mark.parametrize("kind", KINDS)
def test_verbalize_with_every_strategy(cards, kind) -> None:
    oc = cards[kind]
    layer = oc.check_layer(None)
    for strategy in STRATEGIES:
        k = None if strategy == "greedy" else 3
        res = oc.verbalize(text=TEXT, k=k, seed=0, strategy=strategy, max_new_tokens=5)
        assert res.strategy == strategy and res.layer == layer and res.candidates
        assert len(res.candidates) <= res.k == (1 if strategy == "greedy" else 3)
        if strategy == "greedy":  # an explicit K that greedy would drop is refused, naming the strategies that use it
            with pytest.raises(NLAInputError, match="best-of-k") as e:
                oc.verbalize(text=TEXT, k=3, strategy=strategy, max_new_tokens=5)
            assert e.value.field == "k"
        d = res.to_dict()
        assert {"position", "read_token"} <= set(d) and all(n["kind"] in NOTE_KINDS for n in d["notes"])
        if kind == "injection":  # read at the chat template's last token: not a token of the text
            assert d["position"] is None and d["read_token"] == oc.backbone.tokenizer.decode([oc._ids(TEXT, None)[0][-1]])
        else:
            last = oc.backbone.tokenizer(TEXT, add_special_tokens=False)["input_ids"][-1]
            assert d["position"] == n_text_tokens(oc) - 1 and d["read_token"] == oc.backbone.tokenizer.decode([last])
    v = oc.read(TEXT, layer)
    raw = oc.verbalize(vector=v.numpy(), k=2, seed=1, max_new_tokens=4)
    assert raw.position is None and raw.read_token is None
    with pytest.raises(NLAInputError) as e:
        oc.verbalize(vector=v.numpy(), position=0)
    assert e.value.field == "position"
    with pytest.raises(NLAInputError, match="values"):
        oc.verbalize(vector=[1.0, 2.0])


@pytest.mark.parametrize("kind", RAW)
def test_position_on_raw_text_readers(cards, kind) -> None:
    oc = cards[kind]
    n = n_text_tokens(oc)
    kw = dict(k=3, seed=2, max_new_tokens=5)
    last = oc.verbalize(text=TEXT, **kw)
    same(oc.verbalize(text=TEXT, position=-1, **kw), last)
    first = oc.verbalize(text=TEXT, position=0, **kw)
    assert first.position == 0 and first.read_token.strip() == oc.backbone.tokenizer.decode(
        oc.backbone.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:1]).strip()
    for bad in (n, -n - 1, "1", True):
        with pytest.raises(NLAInputError) as e:
            oc.verbalize(text=TEXT, position=bad, **kw)
        assert e.value.field == "position"
    # position p reads exactly what the text cut after its token p reads
    p = 2
    ids = oc.backbone.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    cut = oc.backbone.tokenizer.decode(ids[: p + 1])
    assert oc.backbone.tokenizer(cut, add_special_tokens=False)["input_ids"] == ids[: p + 1]
    assert torch.equal(oc.read(TEXT, oc.check_layer(None), p), oc.read(cut, oc.check_layer(None)))
    at_p, truncated = oc.verbalize(text=TEXT, position=p, **kw), oc.verbalize(text=cut, **kw)
    same(at_p, truncated)
    assert at_p.position == p


def test_a_chat_wrapped_injection_card_refuses_a_position(cards) -> None:
    oc = cards["injection"]
    for pos in (0, -1, 3):
        with pytest.raises(NLAInputError, match="chat template") as e:
            oc.verbalize(text=TEXT, position=pos, k=2, max_new_tokens=3)
        assert e.value.field == "position"
    with pytest.raises(NLAInputError) as e:
        sweep(oc, TEXT, position=0, k=2, max_new_tokens=3)
    assert e.value.field == "position"


@pytest.mark.parametrize("kind", KINDS)
def test_token_states_are_the_text_tokens_read_as_the_card_reads(cards, kind) -> None:
    oc = cards[kind]
    layer = oc.check_layer(None)
    pieces, states = oc.token_states(TEXT, layer)
    assert len(pieces) == n_text_tokens(oc) and states.shape == (len(pieces), oc.d_vec)
    ids = oc.backbone.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert pieces == [oc.backbone.tokenizer.decode([i]) for i in ids]
    if kind in RAW:
        for p in (0, len(pieces) - 1):
            torch.testing.assert_close(states[p], oc.read(TEXT, layer, p), atol=1e-4, rtol=1e-4)
    else:  # the chat-wrapped input, adapter off: the text's rows of the same forward the card reads v from
        ids, _ = oc._ids(TEXT, None)
        with torch.no_grad(), oc.av.adapter_off():
            full = oc.backbone.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
        own = [i for i in range(len(ids)) if torch.allclose(full[i], states[0], atol=1e-5)]
        assert own, "the first text token's state is a row of the chat-wrapped forward"
        torch.testing.assert_close(full[-1], oc.read(TEXT, layer), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_heat_map_on_every_kind(cards, kind) -> None:
    oc = cards[kind]
    layer = oc.check_layer(None)
    heat = engine.token_heat(oc, TEXT, layer)
    assert len(heat) == n_text_tokens(oc) and all(-1.0 <= h <= 1.0 for _, h in heat)
    if kind in RAW:
        assert heat[-1][1] == pytest.approx(1.0, abs=1e-3)  # v is the last token's state
        assert engine.token_heat(oc, TEXT, layer, position=1)[1][1] == pytest.approx(1.0, abs=1e-3)
    # μ is the card's at the layer asked (mu_at), else the text's own mean
    pieces, states = oc.token_states(TEXT, layer)
    mu = oc.mu_at(layer)
    center = mu[None] if mu is not None else states.mean(0, keepdim=True)
    v = oc.read(TEXT, layer)[None]
    ref = torch.nn.functional.cosine_similarity(states - center, (v - center).expand_as(states), dim=-1)
    assert [h for _, h in heat] == [round(float(c), 3) for c in ref]


def test_mu_is_per_layer(cards) -> None:
    pre = cards["prefix"]
    assert pre.mu_at(pre.card.default_layer) is pre.mu and pre.mu is not None
    inj = cards["injection"]
    inj.mus[2] = torch.ones(32)
    try:
        assert inj.mu_at(2) is inj.mus[2] and inj.mu_at(3) is None
        assert inj.verbalize(text=TEXT, layer=2, greedy=True, max_new_tokens=3).centered
        res = inj.verbalize(text=TEXT, layer=3, greedy=True, max_new_tokens=3)
        assert not res.centered and [n.kind for n in res.notes][:1] == ["uncentered"]
        assert any(n.kind == "depth" and "47%" in n.text for n in res.notes)
    finally:
        del inj.mus[2]


def test_sweep_reads_every_layer_at_the_position(cards) -> None:
    oc = cards["injection-raw"]
    results = sweep(oc, TEXT, k=2, seed=0, max_new_tokens=4, position=1)
    assert [r.layer for r in results] == sorted(oc.layers)
    for r in results:
        same(r.verbalization, oc.verbalize(text=TEXT, layer=r.layer, k=2, seed=0, max_new_tokens=4, position=1))
        assert r.verbalization.position == 1


def test_notes_are_rendered_by_kind() -> None:
    result = {"trained": False, "centered": False, "notes": [
        {"kind": "untrained", "text": "untrained: stated by the badge"}, {"kind": "uncentered", "text": "no μ here"},
        {"kind": "card", "text": "a card note"}]}
    md = views.notes_markdown(result)
    assert "Note: a card note" in md and "stated by the badge" not in md and "no μ here" not in md


# ------------------------------------------------------------------ evals declare the kinds they support


def _card_of_kind(kind: str) -> str:
    return next(c.id for c in builtin_cards() if c.kind == kind)


def _commands_with_a_card() -> dict[str, tuple[object, argparse.ArgumentParser]]:
    """Command name → (its declared card kinds, its parser): an eval's ``supported_kinds``, a tool module's ``SUPPORTED_KINDS``."""
    from eval_harness.cli import TOOLS, commands
    from eval_harness.evals import EVALS

    out = {}
    for name, cmd in commands().items():
        p = argparse.ArgumentParser()
        cmd.add_arguments(p)
        if any("--card" in a.option_strings for a in p._actions):
            kinds = EVALS[name].supported_kinds if name in EVALS else getattr(importlib.import_module(TOOLS[name]), "SUPPORTED_KINDS", None)
            out[name] = (kinds, p)
    return out


def test_every_eval_declares_its_kinds_and_refuses_others_before_any_work(tmp_path, capsys) -> None:
    found = _commands_with_a_card()
    assert {"centered-eval", "rerank-eval", "oracle-ceiling", "policy-eval", "roundtrip", "reading-eval", "bench"} <= set(found)
    refused = 0
    for name, (kinds, parser) in found.items():
        assert kinds and set(kinds) <= set(CARD_KINDS), f"{name} declares no SUPPORTED_KINDS"
        for kind in set(CARD_KINDS) - set(kinds):
            work = tmp_path / name / kind
            argv = [name, "--card", _card_of_kind(kind)]
            for a in parser._actions:  # every other required option points at nothing that exists
                if a.required and "--card" not in a.option_strings:
                    argv += [a.option_strings[0], str(work / a.dest)]
            if name == "bench":
                argv += ["--start", "none"]
            assert tiny.run_harness(argv) == 2, name
            err = capsys.readouterr().err
            assert f"supports {' and '.join(kinds)} cards" in err and f"is a {kind} card" in err, err
            # nothing written (an output folder may have been made by the writability check), and no target
            # set or corpus read: they do not exist, and reading them would have failed with another message
            assert not [f for f in work.rglob("*") if f.is_file()]
            refused += 1
    assert refused >= 4  # centered-eval and rerank-eval refuse patch and injection cards, bench too


def test_a_new_kind_is_its_own_module_plus_one_registry_line(tmp_path, monkeypatch) -> None:
    """ARCHITECTURE.md, recipe 1: a kind defined here — a *blind* verbalizer that ignores v and lets the
    backbone write from BOS, the floor any real AV must beat — gets every strategy, the read position,
    the heat map and the CLI's JSON contract from the interface, with one line in CARD_KINDS."""
    import contextlib
    import json
    from dataclasses import dataclass

    from nla_space import guided
    from nla_space.backbone import shared_backbone
    from nla_space.reencode import reencode_ids
    from nla_space.rollout import Rollout, request_generator, sample
    from nla_space.verbalizers.base import RawTextCard

    @dataclass
    class BlindCard(RawTextCard):
        top_p: float = 1.0
        av_max_new_tokens: int = 6

        def _bos(self, n: int) -> torch.Tensor:
            emb = self.backbone.model.get_input_embeddings()
            return emb(torch.tensor([[self.backbone.bos_id]] * n))

        def rollout(self, v, k, temperature, max_new_tokens, greedy, seed, layer) -> Rollout:
            gen = request_generator(seed, self.backbone.device)
            return sample(self.backbone, self._bos(1 if greedy else k), max_new_tokens, temperature=temperature, greedy=greedy,
                          generator=gen)

        @contextlib.contextmanager
        def search_parts(self, v, layer, k, max_new_tokens):
            yield (guided.EmbedsStepper(self.backbone, self._bos(1), max_new_tokens),
                   guided.ReencodeTracker(self.backbone, layer, max_new_tokens))

        def reconstruct(self, roll: Rollout, layer: int) -> torch.Tensor:
            return reencode_ids(self.backbone, layer, roll.ids, roll.mask).float()

        def reconstruct_texts(self, texts, layer):
            return torch.stack([self.read(t, layer) for t in texts])

    def open_blind_card(card, backbone=None, device=None, revision=None, dtype=None) -> BlindCard:
        bb = shared_backbone(backbone or card.backbone_id, device=device)
        return BlindCard(card=card, backbone=bb, av=None, trained=True, mu=None)

    monkeypatch.setitem(CARD_KINDS, "blind", open_blind_card)  # the one registry line
    bb_folder = tiny.save_backbone(tmp_path / "bb")
    card_file = tmp_path / "blind.json"
    card_file.write_text(json.dumps({"id": "test/blind", "kind": "blind", "backbone": {"id": str(bb_folder)}, "layers": [2]}))
    oc = open_card(str(card_file))
    assert isinstance(oc, BlindCard)
    for strategy in STRATEGIES:
        res = oc.verbalize(text=TEXT, k=None if strategy == "greedy" else 3, seed=0, strategy=strategy, max_new_tokens=4)
        assert res.strategy == strategy and res.best.text == res.candidates[res.best_index].text
    at = oc.verbalize(text=TEXT, k=2, seed=0, position=1, max_new_tokens=4)
    assert at.position == 1 and at.read_token.strip() == WORDS[1]
    assert len(engine.token_heat(oc, TEXT, 2)) == n_text_tokens(oc)
    assert {"card", "candidates", "position", "read_token", "notes"} <= set(res.to_dict())
