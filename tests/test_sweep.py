"""The layer sweep (``nla_space.sweep``): library, CLI (``--layer all``) and app (the "Sweep all layers"
button and the ``/sweep`` API), on a tiny two-layer injection card (tests/test_injection.py's tiny
Phi-3 release with a depth template) and a tiny single-layer prefix card."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from nla_space import activations, cli
from nla_space.errors import NLAInputError
from nla_space.runtime import open_card
from nla_space.sweep import LayerResult, sweep
from test_injection import Setup, _write_sidecar

TEXT = "the cat is on the old tree"
CONTRACT_KEYS = {"card", "layer", "k", "tau", "trained", "greedy", "temperature", "seed", "centered", "hedged",
                 "score", "best_index", "best", "candidates", "timings", "notes", "compass"}
PARAMS = dict(k=3, seed=7, max_new_tokens=6, tau=0.6)


@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> dict:
    """A tiny Phi-3 injection card listing layers [3, 2] (default first), saved as a card JSON whose id
    is its own path (so the app resolves it like a built-in card), and the card opened."""
    root = tmp_path_factory.mktemp("sweep")
    s = Setup(root, "phi3")
    _write_sidecar(s.av, s.sidecar())
    card = s.card()
    path = root / "card.json"
    data = card.to_dict()
    data["id"] = str(path)
    path.write_text(json.dumps(data), encoding="utf-8")
    return {"path": str(path), "opened": open_card(str(path), device="cpu")}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """A tiny single-layer (layer 2) prefix card folder over a saved tiny Llama backbone."""
    root = tmp_path_factory.mktemp("sweep1")
    bb = tiny.save_backbone(root / "bb", "llama")
    return {"card": str(tiny.make_card_folder(root / "card", bb, layer=2)), "bb": str(bb)}


def _without_timings(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "timings"}


# ------------------------------------------------------------------ library


def test_extract_layers_equals_single_layer_extraction(tiny_backbone, multi) -> None:
    layers = [1, 3, 2]
    many = activations.extract_layers(tiny_backbone, TEXT, layers)
    assert sorted(many) == [1, 2, 3]
    for ell in layers:
        assert torch.equal(many[ell], activations.extract(tiny_backbone, TEXT, ell))
    oc = multi["opened"]
    got = oc.extract_layers(TEXT, oc.layers)
    for ell in oc.layers:  # the injection card reads the base model (adapter off) in one forward too
        assert torch.equal(got[ell], oc.extract(TEXT, ell))


def test_sweep_equals_a_single_layer_verbalize_at_each_layer(multi) -> None:
    oc = multi["opened"]
    calls: list[tuple[float, str]] = []
    results = sweep(oc, TEXT, progress=lambda f, m: calls.append((f, m)), **PARAMS)
    assert [r.layer for r in results] == sorted(oc.layers) == [2, 3]  # ascending, though the card lists [3, 2]
    for r in results:
        assert isinstance(r, LayerResult)
        one = oc.verbalize(text=TEXT, layer=r.layer, **PARAMS)
        assert (r.best_text, r.score, r.hedged) == (one.best.text, one.score, one.hedged)
        assert r.depth_pct == oc.av.depth_pct(r.layer) is not None
        d = r.to_dict()
        assert CONTRACT_KEYS <= set(d) and d["depth_pct"] == r.depth_pct
        assert _without_timings(d) == {**_without_timings(one.to_dict()), "depth_pct": r.depth_pct}
    fracs = [f for f, _ in calls]
    assert fracs == sorted(fracs) and fracs[0] == 0.0 and fracs[-1] == 1.0
    assert any("layer 2 (1/2)" in m for _, m in calls) and any("layer 3 (2/2)" in m for _, m in calls)


def test_sweep_of_requested_layers_and_bad_input(multi) -> None:
    oc = multi["opened"]
    assert [r.layer for r in sweep(oc, TEXT, [3, 3], k=1, seed=0, max_new_tokens=4)] == [3]
    with pytest.raises(NLAInputError, match="supports layer"):
        sweep(oc, TEXT, [2, 5], k=1, max_new_tokens=4)
    with pytest.raises(NLAInputError, match="empty"):
        sweep(oc, "  ", k=1, max_new_tokens=4)
    with pytest.raises(NLAInputError, match="k must be"):
        sweep(oc, TEXT, k=0, max_new_tokens=4)


# ------------------------------------------------------------------ CLI


def test_cli_layer_all_json_and_text(multi, capsys) -> None:
    argv = ["verbalize", "--card", multi["path"], "--text", TEXT, "--layer", "all", "--k", "3", "--seed", "7",
            "--max-new-tokens", "6", "--tau", "0.6"]
    assert cli.main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["sweep"] and [e["layer"] for e in out["sweep"]] == [2, 3]
    lib = [r.to_dict() for r in sweep(multi["opened"], TEXT, **PARAMS)]
    assert [_without_timings(e) for e in out["sweep"]] == [_without_timings(e) for e in lib]

    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "sweep of 2 layer(s)" in lines[0]
    rows = [ln for ln in lines if ln.startswith("layer")]
    assert len(rows) == 2 and rows[0].startswith("layer   2") and "%" in rows[0]


def test_cli_layer_all_on_a_single_layer_card_runs_its_layer(single, capsys) -> None:
    argv = ["verbalize", "--card", single["card"], "--text", "the cat is red", "--k", "2", "--max-new-tokens", "4", "--json"]
    assert cli.main(argv + ["--layer", "all"]) == 0
    swept = json.loads(capsys.readouterr().out)["sweep"]
    assert cli.main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert len(swept) == 1 and swept[0]["depth_pct"] is None
    assert _without_timings(swept[0]) == {**_without_timings(plain), "depth_pct": None}


@pytest.mark.parametrize("extra, match", [
    (["--text", TEXT, "--layer", "deep"], "--layer must be an integer or 'all'"),
    (["--text", TEXT, "--layer", "7"], "supports layer"),
    (["--vector", "v.npy", "--layer", "all"], "--layer all sweeps"),
    (["--text", "", "--layer", "all"], "empty"),
])
def test_cli_bad_sweep_input_is_one_error_line(multi, capsys, extra, match) -> None:
    try:
        rc = cli.main(["verbalize", "--card", multi["path"], "--max-new-tokens", "4", "--k", "1", *extra])
    except SystemExit as exc:  # argparse-level errors
        rc = exc.code
    out = capsys.readouterr()
    assert rc == 2 and out.out == ""
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], out.err


# ------------------------------------------------------------------ app


@pytest.fixture()
def fresh_engine(monkeypatch):
    from nla_space.ui import engine

    monkeypatch.setattr(engine, "_OPEN", {})
    monkeypatch.setattr(engine, "_FAILED", {})
    monkeypatch.setattr(engine, "APP_MAX_NEW_TOKENS", 6)
    return engine


def test_app_sweep_button_returns_the_table_and_plot(multi, fresh_engine) -> None:
    from nla_space.ui import handlers, views

    assert handlers.sweep_visibility(multi["path"])["visible"] is True
    calls = []
    table, fig, raw = handlers.sweep_ui(TEXT, multi["path"], 2, 0.6, 1.0, 0, False,
                                        progress=lambda f, desc="": calls.append((f, desc)))
    assert list(table.columns) == views.SWEEP_COLUMNS and table["layer"].tolist() == [2, 3]
    assert table["depth %"].notna().all() and set(table["decision"]) <= {"hedged", "confident"}
    assert [e["layer"] for e in raw["sweep"]] == [2, 3] and all(e["k"] == 2 for e in raw["sweep"])
    assert table["score"].tolist() == [round(e["score"], 4) for e in raw["sweep"]]
    assert any("τ" in t.get_text() for t in fig.axes[0].get_legend().get_texts())
    assert calls and calls[-1][0] == 1.0 and any("layer 3" in d for _, d in calls)

    from nla_space.ui import api_sweep

    api = api_sweep(TEXT, card=multi["path"], k=2, tau=0.6, seed=0)
    assert [_without_timings(e) for e in api["sweep"]] == [_without_timings(e) for e in raw["sweep"]]


def test_app_sweep_is_hidden_and_refused_for_a_single_layer_card(multi, fresh_engine) -> None:
    import gradio as gr

    from nla_space.ui import handlers

    assert handlers.sweep_visibility("gemma3-270m-l13")["visible"] is False
    with pytest.raises(gr.Error, match="single layer"):  # refused before the card is opened
        handlers.sweep_ui(TEXT, "gemma3-270m-l13", 2, None, 1.0, 0, False)
    assert fresh_engine._OPEN == {}
    for bad, match in ((dict(text=""), "empty"), (dict(k=0), "k must be"), (dict(card="no-such-card"), "unknown card")):
        args = {"text": TEXT, "card": multi["path"], "k": 2, **bad}
        with pytest.raises(gr.Error, match=match):
            handlers.sweep_ui(args["text"], args["card"], args["k"], None, 1.0, 0, False)


def test_multi_layer_read_leaves_the_full_models_hidden_states_alone() -> None:
    """Regression: reading several layers once asked the truncated view (which shares the layer modules
    with the full model) for ``output_hidden_states``; transformers' recording hooks then made a later
    full-model forward return every layer twice, so its ``hidden_states[ℓ]`` was wrong. A fresh
    backbone, because the order of first calls decided it."""
    bb = tiny.make_backbone("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        many = activations.hidden_at_layers(bb, [1, 3, 2], input_ids=ids, attention_mask=mask)
        full = bb.model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(full) == bb.num_layers + 1
    for ell, h in many.items():
        torch.testing.assert_close(full[ell], h, rtol=1e-5, atol=1e-5)
