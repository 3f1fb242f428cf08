"""The demo app: pure view/engine helpers (fast), then the real app.py launched on localhost with the
real embedded backbone and called through ``gradio_client`` (``-m e2e``)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from nla_space.errors import NLAInputError

CONTRACT_KEYS = {"card", "layer", "k", "tau", "trained", "greedy", "temperature", "seed", "centered", "hedged",
                 "score", "best_index", "best", "candidates", "timings", "notes", "compass"}
TEXT = "The Eiffel Tower is in Paris, the capital of France."


def _fake_result(centered: bool = True) -> dict[str, Any]:
    cands = [
        {"text": "a", "token_ids": [1], "score_raw": 0.70, "score_cen": 0.55 if centered else None},
        {"text": "b", "token_ids": [2], "score_raw": 0.80, "score_cen": 0.65 if centered else None},
        {"text": " ", "token_ids": [3], "score_raw": 0.75, "score_cen": 0.60 if centered else None},
    ]
    return {"card": "x", "layer": 3, "k": 3, "tau": 0.6, "trained": False, "greedy": False, "temperature": 1.0,
            "seed": 0, "centered": centered, "hedged": False, "score": 0.65 if centered else 0.8, "best_index": 1,
            "best": cands[1], "candidates": cands, "timings": {"total_s": 0.1}, "notes": []}


# ------------------------------------------------------------------------------------------------
# Fast unit tests (no model, no server)


def test_candidates_frame_sorted_and_marked() -> None:
    from nla_space.ui import views

    df = views.candidates_frame(_fake_result())
    assert list(df.columns) == views.CANDIDATE_COLUMNS
    assert df["score (centered)"].tolist() == [0.65, 0.6, 0.55]
    assert df.loc[0, "chosen"] == "★" and (df["chosen"] == "★").sum() == 1
    assert "empty" in df.loc[1, "candidate"]  # whitespace-only candidate is labelled
    raw = views.candidates_frame(_fake_result(centered=False))
    assert raw["score (raw)"].tolist() == [0.8, 0.75, 0.7]


def test_badge_and_notes() -> None:
    from nla_space.ui import views

    r = _fake_result()
    assert "CONFIDENT" in views.badge_html(r) and "UNTRAINED AV" in views.badge_html(r)
    r.update(hedged=True, trained=True)
    html = views.badge_html(r)
    assert "HEDGED" in html and "UNTRAINED" not in html
    assert "Untrained" in views.notes_markdown(_fake_result())


def test_score_plot_draws_tau_and_anchors() -> None:
    from nla_space.cards import find_card
    from nla_space.ui import views

    card = find_card("srt-gemma2-2b")
    fig = views.score_plot(_fake_result(), card)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("τ" in s for s in labels) and any("floor" in s for s in labels) and any("ceiling" in s for s in labels)
    raw = views.score_plot(_fake_result(centered=False), card)  # anchors are centered: not drawn on raw scores
    assert not any("floor" in t.get_text() for t in raw.axes[0].get_legend().get_texts())
    # the default (calibrated) card: its anchors on the confidence scale
    default = find_card("embedded")
    assert default.anchors.random_floor_conf is not None and default.anchors.ceiling_conf is not None
    res = _fake_result()
    res["criterion"] = "confidence"
    for c, conf in zip(res["candidates"], (0.3, 0.9, 0.5)):
        c["confidence"] = conf
    labels = [t.get_text() for t in views.score_plot(res, default).axes[0].get_legend().get_texts()]
    assert any("unrelated text" in s for s in labels) and any("ceiling" in s for s in labels), labels


def test_check_request_refuses_bad_input() -> None:
    from nla_space.ui import engine

    ok = engine.check_request(TEXT, card="embedded", k=4.0, seed=3.0, strategy="best-of-k")
    assert ok.k == 4 and ok.seed == 3 and ok.card == "nla-space/gemma3-270m-patch"
    # K: 16 for a sampling strategy when not given, 1 for greedy (the default card's default), and an explicit
    # K > 1 with greedy is refused by name, except from the app's K slider (which says it serves best-of-K and guided)
    assert engine.check_request(TEXT, strategy="guided").k == 16 and engine.check_request(TEXT).k == 1
    # the tab's τ slider at the card's default τ means each layer's own calibrated τ; another value is kept
    from nla_space.cards import find_card

    default_tau = find_card("embedded").default_tau
    assert engine.check_request(TEXT, tau=default_tau, k_is_slider=True).tau is None
    assert engine.check_request(TEXT, tau=default_tau).tau == default_tau
    assert engine.check_request(TEXT, tau=0.42, k_is_slider=True).tau == 0.42
    assert engine.check_request(TEXT, k=8, k_is_slider=True).k == 1
    assert engine.check_request(TEXT, k=8, k_is_slider=True, strategy="guided").k == 8
    for bad in (dict(k=4), dict(k=4, strategy="greedy"), dict(k=4, greedy=True)):
        with pytest.raises(NLAInputError, match="best-of-k") as e:
            engine.check_request(TEXT, **bad)
        assert e.value.field == "k"
    for bad in (dict(text=""), dict(text="   "), dict(text="x" * (engine.MAX_TEXT_CHARS + 1)), dict(text=TEXT, k=0),
                dict(text=TEXT, k=engine.APP_MAX_K + 1), dict(text=TEXT, k=2.5), dict(text=TEXT, card="no-such-card"),
                dict(text=TEXT, tau=1.5), dict(text=TEXT, temperature=float("nan")), dict(text=TEXT, layer=4)):
        with pytest.raises(NLAInputError):
            engine.check_request(**bad)


def test_gpu_function_returns_user_errors_as_data() -> None:
    """On ZeroGPU the GPU function runs in a worker process: user errors must come back as plain data."""
    from nla_space.ui import engine

    out = engine.run_verbalize("no-such-card", TEXT, None, 2, None, 1.0, 0)
    assert set(out) == {"error"} and "unknown card" in out["error"]


def test_gpu_duration_is_sized_by_k_and_clamped() -> None:
    from nla_space.ui import engine

    small = engine.gpu_seconds("c", "t", None, 1, None, 1.0, 0)
    big = engine.gpu_seconds("c", "t", None, 64, None, 1.0, 0)
    assert 0 < small < big <= engine.MAX_GPU_SECONDS
    assert engine.gpu_seconds("c", "t", None, 10_000, None, 1.0, 0) == engine.MAX_GPU_SECONDS


def test_leaderboard_frames() -> None:
    from nla_space.ui import leaderboard_tab as lt

    lb = lt.load()
    df = lt.rows_frame(lb)
    srt = {"RiverRider/srt-nla-av-v1", "RiverRider/srt-nla-av-llama32-3b", "RiverRider/srt-nla-av-gemma2-2b-v1"}
    assert srt <= set(df["card"])
    only = lt.filter_rows(df, None, ["RiverRider/srt-nla-av-v1"], None)
    assert len(only) and set(only["card"]) == {"RiverRider/srt-nla-av-v1"}
    assert len(lt.filter_rows(df, ["google/gemma-2-2b"], None, None)) < len(df)
    bars = lt.bar_frame(lb, "adapter_cen_bestofK_mean")
    assert len(bars) >= 3 and not bars["series"].duplicated().any()  # one bar per x: bars never stack
    assert ((bars["score"] >= 0) & (bars["score"] <= 1)).all()
    assert len(lt.kcurve_frame(lb)) and len(lt.findings_frame(lb))


def test_launch_kwargs_honour_env_and_refuse_share(monkeypatch: pytest.MonkeyPatch) -> None:
    from nla_space.ui import launch_kwargs

    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    kw = launch_kwargs()
    assert kw["server_name"] == "0.0.0.0" and kw["server_port"] == 7999 and kw["share"] is False
    with pytest.raises(ValueError):
        launch_kwargs(share=True)


def test_embed_snippet_and_present_flag() -> None:
    from nla_space.ui import about_tab, theme

    snip = about_tab.embed_snippet("https://me-demo.hf.space")
    assert "<iframe" in snip and "<gradio-app" in snip and "present=1" in snip
    assert theme.is_present("1") and theme.is_present("true") and not theme.is_present(None)
    assert "googleapis" not in theme.CSS


def test_about_tab_states_the_default_card_from_its_file() -> None:
    from nla_space.cards import find_card
    from nla_space.ui import about_tab

    card = find_card(None)
    md = about_tab.default_card_markdown(card)
    assert card.description in md and f"| licence | {card.license} |" in md
    assert f"| default decoding | {card.patch.default_strategy}" in md and card.patch.calibration.meaning() in md


# ------------------------------------------------------------------------------------------------
# The token × layer grid, on tiny random cards (no server)

GRID_TEXT = "the cat is on the old tree"


@pytest.fixture(scope="module")
def multi_card(tmp_path_factory) -> dict[str, Any]:
    """A tiny Phi-3 injection card listing layers [3, 2] (default 3) that reads the raw text (so it takes
    positions), saved as a card JSON whose id is its path (the app resolves it like a built-in card)."""
    from test_injection import Setup, _write_sidecar

    from nla_space.runtime import open_card

    root = tmp_path_factory.mktemp("grid")
    s = Setup(root, "phi3")
    _write_sidecar(s.av, s.sidecar())
    data = s.card(input={"chat_template": False, "add_special_tokens": True}).to_dict()
    path = root / "card.json"
    data["id"] = str(path)
    path.write_text(json.dumps(data), encoding="utf-8")
    return {"path": str(path), "opened": open_card(str(path), device="cpu")}


@pytest.fixture()
def fresh_engine(monkeypatch: pytest.MonkeyPatch):
    from nla_space.ui import engine

    monkeypatch.setattr(engine, "_OPEN", {})
    monkeypatch.setattr(engine, "_FAILED", {})
    monkeypatch.setattr(engine, "APP_MAX_NEW_TOKENS", 6)
    return engine


def test_token_layer_grid_is_the_heat_map_at_every_card_layer(multi_card, tmp_path: Path) -> None:
    import tiny

    from nla_space.cards import card_from_folder
    from nla_space.runtime import open_card
    from nla_space.ui import engine, heat, views

    oc = multi_card["opened"]
    pieces, _ = oc.token_states(GRID_TEXT, 2)
    for position in (None, 1):
        grid = heat.token_layer_grid(oc, GRID_TEXT, position=position)
        assert grid["layers"] == sorted(oc.layers) == [2, 3] and grid["default_layer"] == 3 == oc.card.default_layer
        assert grid["tokens"] == pieces and grid["position"] == position
        assert len(grid["values"]) == 2 and all(len(row) == len(pieces) for row in grid["values"])
        for layer, row in zip(grid["layers"], grid["values"]):  # row ℓ is the heat map at ℓ
            assert row == [h for _, h in engine.token_heat(oc, GRID_TEXT, layer, position)]
            assert row[-1 if position is None else position] == pytest.approx(1.0, abs=1e-3)  # v itself
        assert json.loads(json.dumps(grid)) == grid  # plain data (it comes back from the GPU worker)
    assert heat.token_layer_grid(oc, GRID_TEXT, [3])["layers"] == [3]
    with pytest.raises(NLAInputError, match="supports layer"):
        heat.token_layer_grid(oc, GRID_TEXT, [2, 7])
    # a single-layer card: one row
    folder = tiny.make_card_folder(tmp_path / "card", tiny.save_backbone(tmp_path / "bb"), layer=2)
    one = heat.token_layer_grid(open_card(card_from_folder(folder)), GRID_TEXT)
    assert one["layers"] == [2] and len(one["values"]) == 1 and len(one["values"][0]) == len(GRID_TEXT.split())
    # more than MAX_GRID_LAYERS layers: an evenly spaced subset, the default layer kept
    picks = heat.grid_layers(range(40), 13)
    assert len(picks) == heat.MAX_GRID_LAYERS and picks == sorted(picks) and {0, 13, 39} <= set(picks)
    assert heat.grid_layers([25, 8, 15, 8], 15) == [8, 15, 25]

    # the view: one row per layer (label first, the default starred), one shaded column per token
    grid = heat.token_layer_grid(oc, GRID_TEXT)
    styled = views.grid_frame(grid)
    df = styled.data
    assert list(df.columns) == views.grid_headers(pieces) and len(df.columns) == len(pieces) + 1
    assert df["layer"].tolist() == ["L2", "L3 ★"] and df.iloc[1, -1] == grid["values"][1][-1]
    assert "background-color: rgb(239, 68, 60)" in views.heat_css(1.0) and "rgb(128, 90, 213)" in views.heat_css(-1.0)
    assert views.heat_css(0.0).startswith("background-color: rgb(255, 255, 255)")
    assert list(views.grid_frame(None).columns) == ["layer"]


def test_grid_click_verbalizes_that_token_at_that_layer(multi_card, fresh_engine) -> None:
    import gradio as gr

    from nla_space.ui import handlers

    params = dict(text=GRID_TEXT, card=multi_card["path"], k=2, seed=0, strategy="best-of-k")
    first = handlers.run_checked(**params)
    grid, n = first.grid, len(first.grid["tokens"])
    assert first.result["layer"] == 3 and grid["layers"] == [2, 3]
    assert first.heat == list(zip(grid["tokens"], grid["values"][1]))  # the heat map is the grid's row at the layer read
    rendered = handlers.render(*first)
    assert len(rendered) == 12 and rendered[-1] is grid and rendered[-2].data.shape == (2, n + 1)

    # cell (row 0, column 2) = layer 2, token 1: the same request as layer=2, position=1
    cell = handlers.grid_checked(grid, [0, 2], **params)
    direct = handlers.run_checked(layer=2, position=1, **params)
    assert cell.result["layer"] == 2 and cell.result["position"] == 1
    assert {k: v for k, v in cell.result.items() if k != "timings"} == {k: v for k, v in direct.result.items() if k != "timings"}
    assert cell.grid["position"] == 1 and cell.heat == list(zip(cell.grid["tokens"], cell.grid["values"][0]))
    assert "at layer 2" in handlers.render(*cell)[2]
    # the label column: the card's read position at that row's layer
    label = handlers.grid_checked(grid, (1, 0), **params)
    assert label.result["layer"] == 3 and label.result["position"] == n - 1
    # clicks outside the grid, no grid yet, and a grid drawn for a longer text: clear messages
    for bad_grid, index, match in ((grid, [0, n + 1], "column .* outside the grid"), (grid, [2, 1], "row 2 is outside"),
                                   (grid, None, "not a cell"), (None, [0, 1], "press Verbalize first")):
        with pytest.raises(gr.Error, match=match):
            handlers.grid_checked(bad_grid, index, **params)
    with pytest.raises(gr.Error, match="out of range"):
        handlers.grid_checked(grid, [0, n], **{**params, "text": "the cat"})


# ------------------------------------------------------------------------------------------------
# The real app, launched on localhost


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def client():
    import app  # the repository's app.py: opens the embedded card at import
    from gradio_client import Client

    from nla_space.ui import launch_kwargs

    _, url, _ = app.demo.launch(**launch_kwargs(prevent_thread_lock=True, server_name="127.0.0.1",
                                                server_port=_free_port(), quiet=True))
    try:
        yield Client(url, verbose=False, analytics_enabled=False)
    finally:
        app.demo.close()


def test_api_takes_every_option_of_the_cli() -> None:
    """/verbalize takes every per-request option of `nla-space verbalize`; only the server's own settings
    (which backbone, device, dtype and bfloat16 mode the app runs) and the CLI's input/output forms are not per request."""
    import inspect

    from nla_space.cli import build_parser
    from nla_space.ui.app import api_verbalize

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["verbalize"]
    cli = {a.dest for a in sub._actions if a.dest != "help"}
    server_side = {"backbone", "device", "dtype", "bf16_mode", "vector", "texts", "json"}
    assert cli - server_side <= set(inspect.signature(api_verbalize).parameters), cli - server_side


@pytest.mark.e2e
def test_api_returns_the_cli_json_contract(client) -> None:
    named = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    params = [p["parameter_name"] for p in named["/verbalize"]["parameters"]]
    assert params == ["text", "card", "layer", "k", "tau", "temperature", "seed", "strategy", "greedy", "max_new_tokens", "position"]

    out = client.predict(TEXT, seed=0, api_name="/verbalize")
    assert CONTRACT_KEYS <= set(out)  # keys may be added to the contract, never removed
    # the default card decodes greedily: one candidate, and a K it would not use is refused before the queue
    from gradio_client.exceptions import ValidationError

    with pytest.raises(ValidationError, match="strategy"):
        client.predict(TEXT, k=4, seed=0, api_name="/verbalize")
    assert out["k"] == 1 and out["strategy"] == "greedy" and out["greedy"] is True and len(out["candidates"]) == 1
    assert out["layer"] == 13
    guided = client.predict(TEXT, k=3, seed=0, strategy="guided", max_new_tokens=8, api_name="/verbalize")
    # the default card's fluency prior: the K = 3 search candidates, then the greedy reading as the anchor
    assert guided["strategy"] == "guided" and guided["fluency_weight"] > 0 and len(guided["candidates"]) == 3 + 1
    assert all(c["fluency"] is not None for c in guided["candidates"])
    assert out["best"] == out["candidates"][out["best_index"]]
    assert out["hedged"] == (out["score"] < out["tau"])

    # The same object as `python -m nla_space verbalize --json` (same runtime path, same seed).
    from nla_space.ui import engine

    direct = engine.get_open("embedded").verbalize(text=TEXT, seed=0).to_dict()
    assert set(out) == set(direct)
    for key in set(direct) - {"timings"}:
        assert out[key] == pytest.approx(direct[key]) if isinstance(direct[key], float) else out[key] == direct[key], key


@pytest.mark.e2e
def test_sweep_api_returns_the_cli_sweep_contract(client) -> None:
    named = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert [p["parameter_name"] for p in named["/sweep"]["parameters"]] == ["text", "card", "k", "tau", "temperature", "seed", "strategy"]
    out = client.predict(TEXT, seed=0, api_name="/sweep")  # the embedded card's seven layers, ascending
    assert list(out) == ["sweep"] and [e["layer"] for e in out["sweep"]] == [3, 5, 7, 9, 11, 13, 15]
    assert all(CONTRACT_KEYS | {"depth_pct"} <= set(e) and e["depth_pct"] is None for e in out["sweep"])
    # the API's τ default (none given) is each layer's own calibrated τ
    from nla_space.ui import engine

    oc = engine.get_open("embedded")
    assert [e["tau"] for e in out["sweep"]] == [oc.tau_at(e["layer"]) for e in out["sweep"]]
    sampled = client.predict(TEXT, k=2, seed=0, strategy="best-of-k", api_name="/sweep")
    assert all(e["strategy"] == "best-of-k" and len(e["candidates"]) == 2 for e in sampled["sweep"])


BAD_INPUTS = [
    (dict(text=""), "empty"),
    (dict(text="word " * 2000), "characters long"),
    (dict(text=TEXT, k=0), "k must be"),
    (dict(text=TEXT, k=100_000), "k must be"),
    (dict(text=TEXT, card="no-such-card"), "unknown card"),
    (dict(text=TEXT, card="srt-gemma2-2b"), "offline"),  # a hub card that cannot be downloaded here
    (dict(text=TEXT, layer=4), "supports layer"),
    (dict(text=TEXT, tau=2.0), "tau"),
]


@pytest.mark.e2e
def test_bad_inputs_are_refused_and_the_app_keeps_serving(client) -> None:
    from gradio_client.exceptions import AppError, ValidationError

    for params, message in BAD_INPUTS:
        # a bad parameter is refused on arrival (ValidationError); a card that cannot open, when it runs (AppError)
        with pytest.raises((AppError, ValidationError)) as info:
            client.predict(api_name="/verbalize", **params)
        assert message in str(info.value), (params, str(info.value))
    out = client.predict("Still serving after all that?", k=2, strategy="best-of-k", api_name="/verbalize")
    assert len(out["candidates"]) == 2


@pytest.mark.e2e
def test_a_burst_is_served_in_turn_and_one_failure_does_not_spill(client) -> None:
    from gradio_client.exceptions import ValidationError

    jobs = [client.submit("A burst of requests, one of them bad.", k=2, seed=i, strategy="guided", api_name="/verbalize")
            for i in range(2)]
    bad = client.submit("", api_name="/verbalize")
    with pytest.raises(ValidationError, match="empty"):
        bad.result(timeout=240)
    assert not jobs[1].done()  # refused on arrival, while the valid requests are still queued or running
    results = [j.result(timeout=240) for j in jobs]
    # K = 2 search candidates and the default card's greedy anchor (its guided fluency prior)
    assert [r["seed"] for r in results] == [0, 1] and all(len(r["candidates"]) == 2 + 1 for r in results)


@pytest.mark.e2e
def test_ui_event_renders_every_output(client) -> None:
    out = client.predict(TEXT, "nla-space/smollm2-135m-L21", 21, 3, 0.6, 1.0, 1, False, "default", api_name="/verbalize_ui")
    badge, best, notes, compass, heat, table, plot, timings, download, raw, grid = out  # the grid's gr.State is not sent
    assert ("CONFIDENT" in badge) != ("HEDGED" in badge)
    assert best and isinstance(heat, dict | list)
    assert [row[0] for row in grid["data"]] == ["L21 ★"] and len(grid["headers"]) == len(grid["data"][0]) > 1
    assert len(table["data"]) == 3 and plot
    # the embedded card ships a compass: its rerank is shown beside the oracle pick, and marked in the table
    assert "Oracle rerank vs compass rerank" in compass and raw["compass"]["best_index"] in range(3)
    assert any("◆" in str(row[1]) for row in table["data"]) and any("★" in str(row[1]) for row in table["data"])
    saved = json.loads(Path(download).read_text(encoding="utf-8"))
    assert saved["k"] == 3 and CONTRACT_KEYS <= set(saved) and raw["k"] == 3
    if not saved["trained"]:
        assert "UNTRAINED AV" in badge and "Untrained" in notes
    # the layer box takes any card's layer in an API call; the card refuses one it lacks, by name
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="supports layer"):
        client.predict(TEXT, "nla-space/gemma3-270m-patch", 21, 3, 0.6, 1.0, 1, False, "default", api_name="/verbalize_ui")


@pytest.mark.e2e
def test_compare_runs_two_settings_side_by_side(client) -> None:
    card = "nla-space/smollm2-135m-L21"
    side_a = [card, 21, 2, 0.6, 1.0, 0, False, "best-of-k"]  # best-of-2
    side_b = [card, 21, 2, 0.6, 1.0, 0, True, "default"]  # greedy
    out = client.predict("Water boils at a lower temperature at altitude.", *side_a, *side_b, api_name="/compare_ui")
    badge_a, best_a, summary_a, table_a, badge_b, best_b, summary_b, table_b = out
    assert "best-of-2" in summary_a and "greedy" in summary_b
    assert len(table_a["data"]) == 2 and len(table_b["data"]) == 1


def test_space_build_assembles_a_space_folder(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("space_build", Path(__file__).resolve().parent.parent / "space" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    out = build.build(tmp_path / "space", gguf=False)
    front = (out / "README.md").read_text(encoding="utf-8").split("---")[1]
    for line in ("sdk: gradio", "sdk_version: 6.31.0", "app_file: app.py", "python_version:", "license:",
                 "short_description:", "models:"):
        assert line in front, line
    desc = next(l for l in front.splitlines() if l.startswith("short_description:")).split(":", 1)[1].strip()
    assert len(desc) <= 60
    assert (out / "app.py").is_file() and (out / "nla_space" / "ui" / "app.py").is_file()
    reqs = [l.strip() for l in (out / "requirements.txt").read_text(encoding="utf-8").splitlines()]
    assert not [l for l in reqs if l.startswith(("gradio", "spaces"))]  # the platform provides them
    assert not list(out.rglob("__pycache__"))
