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
    assert ok.k == 4 and ok.seed == 3 and ok.card == "nla-space/gemma3-270m-L13-patch"
    # K: 16 for a sampling strategy when not given, 1 for greedy (the default card's default), and an explicit
    # K > 1 with greedy is refused by name, except from the app's K slider (which says it serves best-of-K and guided)
    assert engine.check_request(TEXT, strategy="guided").k == 16 and engine.check_request(TEXT).k == 1
    assert engine.check_request(TEXT, k=8, k_is_slider=True).k == 1
    assert engine.check_request(TEXT, k=8, k_is_slider=True, strategy="guided").k == 8
    for bad in (dict(k=4), dict(k=4, strategy="greedy"), dict(k=4, greedy=True)):
        with pytest.raises(NLAInputError, match="best-of-k") as e:
            engine.check_request(TEXT, **bad)
        assert e.value.field == "k"
    for bad in (dict(text=""), dict(text="   "), dict(text="x" * (engine.MAX_TEXT_CHARS + 1)), dict(text=TEXT, k=0),
                dict(text=TEXT, k=engine.APP_MAX_K + 1), dict(text=TEXT, k=2.5), dict(text=TEXT, card="no-such-card"),
                dict(text=TEXT, tau=1.5), dict(text=TEXT, temperature=float("nan")), dict(text=TEXT, layer=3)):
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
    assert guided["strategy"] == "guided" and len(guided["candidates"]) == 3
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
    out = client.predict(TEXT, seed=0, api_name="/sweep")  # the embedded card has one layer: one entry
    assert list(out) == ["sweep"] and [e["layer"] for e in out["sweep"]] == [13]
    assert CONTRACT_KEYS | {"depth_pct"} <= set(out["sweep"][0]) and out["sweep"][0]["depth_pct"] is None
    sampled = client.predict(TEXT, k=2, seed=0, strategy="best-of-k", api_name="/sweep")
    assert sampled["sweep"][0]["strategy"] == "best-of-k" and len(sampled["sweep"][0]["candidates"]) == 2


BAD_INPUTS = [
    (dict(text=""), "empty"),
    (dict(text="word " * 2000), "characters long"),
    (dict(text=TEXT, k=0), "k must be"),
    (dict(text=TEXT, k=100_000), "k must be"),
    (dict(text=TEXT, card="no-such-card"), "unknown card"),
    (dict(text=TEXT, card="srt-gemma2-2b"), "offline"),  # a hub card that cannot be downloaded here
    (dict(text=TEXT, layer=5), "supports layer"),
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
    assert [r["seed"] for r in results] == [0, 1] and all(len(r["candidates"]) == 2 for r in results)


@pytest.mark.e2e
def test_ui_event_renders_every_output(client) -> None:
    out = client.predict(TEXT, "nla-space/smollm2-135m-L21", 21, 3, 0.6, 1.0, 1, False, "default", api_name="/verbalize_ui")
    badge, best, notes, compass, heat, table, plot, timings, download, raw = out
    assert ("CONFIDENT" in badge) != ("HEDGED" in badge)
    assert best and isinstance(heat, dict | list)
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
        client.predict(TEXT, "nla-space/gemma3-270m-L13-patch", 21, 3, 0.6, 1.0, 1, False, "default", api_name="/verbalize_ui")


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
