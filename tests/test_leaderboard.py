"""The leaderboard: published numbers with sources from the built-in cards, reproduced ones from
results files, ρ with each card's own anchors, K-curves, findings, markdown and PNG."""

from __future__ import annotations

import json

import pytest

from eval_harness.cli import main as harness
from eval_harness.leaderboard_build import build_leaderboard, kcurve_slope, to_markdown
from nla_space.leaderboard import load_leaderboard
from test_evals import LAYER, eval_env  # noqa: F401  (shared fixture)

SRT = ("RiverRider/srt-nla-av-v1", "RiverRider/srt-nla-av-llama32-3b", "RiverRider/srt-nla-av-gemma2-2b-v1")
ROW_KEYS = {"card", "title", "backbone", "layer", "metric", "label", "K", "M", "published", "published_source",
            "reproduced", "reproduced_meta", "rho_published", "rho_reproduced"}
FINDING_KEYS = {"card", "origin", "kcurve_slope_per_doubling", "logp_rerank_minus_greedy", "spearman_logp_oracle",
                "nn_anchor_rerank_minus_greedy", "raw_floor", "centered_floor", "centering_changes_verdict",
                "greedy_minus_nn_retrieval"}


def _row(lb, card, metric, K=None):
    rows = [r for r in lb["rows"] if r["card"] == card and r["metric"] == metric and (K is None or r["K"] == K)]
    assert rows, (card, metric, K)
    return rows[0]


def test_published_part_has_the_three_srt_cards_with_sources():
    lb = build_leaderboard()  # no results: the published part, from the cards
    assert set(lb) >= {"generated", "rows", "kcurves", "findings"}
    for r in lb["rows"]:
        assert set(r) >= ROW_KEYS
    for f in lb["findings"]:
        assert set(f) >= FINDING_KEYS
    best = {c: _row(lb, c, "adapter_cen_bestofK_mean") for c in SRT}
    assert best[SRT[0]]["published"] == 0.777 and best[SRT[0]]["K"] == 64 and best[SRT[0]]["M"] == 200
    assert best[SRT[1]]["published"] == 0.858 and best[SRT[1]]["M"] == 32
    assert best[SRT[2]]["published"] == 0.631
    for c in SRT:
        assert "model card" in best[c]["published_source"]
        assert best[c]["label"] == "best-of-64 (centered)"
    # ρ with each card's own floor and ceiling, never the Qwen constants
    assert best[SRT[1]]["rho_published"] == pytest.approx((0.858 - 0.498) / (0.756 - 0.498), abs=1e-3)
    assert best[SRT[2]]["rho_published"] == pytest.approx((0.631 - 0.498) / (0.598 - 0.498), abs=1e-3)
    assert _row(lb, SRT[0], "adapter_cen_greedy_mean")["rho_published"] == pytest.approx(0.26, abs=0.01)
    assert _row(lb, SRT[0], "adapter_raw_greedy_mean")["rho_published"] is None
    # K-curves and findings
    llama = sorted((c["K"], c["score_cen"]) for c in lb["kcurves"] if c["card"] == SRT[1])
    assert llama[0] == (1, 0.636) and llama[-1] == (32, 0.809)
    fnd = {f["card"]: f for f in lb["findings"] if f["origin"] == "published"}
    assert fnd[SRT[0]]["kcurve_slope_per_doubling"] == pytest.approx(0.030, abs=0.002)
    assert fnd[SRT[0]]["logp_rerank_minus_greedy"] == pytest.approx(-0.025, abs=1e-3)
    assert fnd[SRT[2]]["centering_changes_verdict"] is True  # raw greedy below the raw floor on Gemma-2
    assert fnd[SRT[1]]["centering_changes_verdict"] is False
    assert fnd[SRT[1]]["greedy_minus_nn_retrieval"] == pytest.approx(0.633 - 0.820, abs=1e-3)


def test_load_leaderboard_reads_the_file(tmp_path):
    path = tmp_path / "lb.json"
    path.write_text(json.dumps({"generated": "x", "rows": [{"card": "a"}]}))
    assert load_leaderboard(path)["rows"] == [{"card": "a"}]
    path.write_text("{not json")
    assert load_leaderboard(path)["rows"]  # falls back to the published numbers


def test_without_a_file_the_app_shows_the_published_numbers(tmp_path):
    lb = load_leaderboard(tmp_path / "missing.json")
    for r in lb["rows"]:
        assert set(r) >= ROW_KEYS
    best = [r for r in lb["rows"] if r["card"] == SRT[0] and r["metric"] == "adapter_cen_bestofK_mean"]
    assert best and best[0]["published"] == 0.777 and "model card" in best[0]["published_source"]
    assert any(c["card"] == SRT[1] for c in lb["kcurves"])


def test_kcurve_slope():
    assert kcurve_slope({1: 0.5, 2: 0.53, 4: 0.56, 8: 0.59}) == pytest.approx(0.03)
    assert kcurve_slope({4: 0.5}) is None


def _fake(command, card, **values):
    meta = {"command": command, "card": card, "backbone": "tiny", "layer": 2, "M": 10, "K": 8, "seed": 0,
            "finished": "2026-01-01T00:00:00+00:00"}
    return {**values, "meta": meta}


def test_reproduced_rows_beside_published():
    ce = _fake("centered-eval", SRT[1], adapter_cen_bestofK_mean=0.7, adapter_cen_greedy_mean=0.6,
               adapter_raw_greedy_mean=0.55, adapter_cen_sampled_mean=0.58, random_raw_mean=0.6, random_cen_mean=0.5,
               nn_cen_mean=0.65, kcurve_oracle_top1_cen={"1": 0.58, "2": 0.62, "4": 0.66, "8": 0.7})
    ce["meta"]["K"] = 64
    lb = build_leaderboard([ce])
    row = _row(lb, SRT[1], "adapter_cen_bestofK_mean", 64)
    assert row["published"] == 0.858 and row["reproduced"] == 0.7 and row["reproduced_meta"]["M"] == 10
    assert row["rho_reproduced"] == pytest.approx((0.7 - 0.498) / (0.756 - 0.498), abs=1e-3)
    rep = [f for f in lb["findings"] if f["card"] == SRT[1] and f["origin"] == "reproduced"][0]
    assert rep["centering_changes_verdict"] is True  # raw greedy 0.55 < raw floor 0.6, centered 0.6 > 0.5
    assert rep["kcurve_slope_per_doubling"] == pytest.approx(0.04)
    # a different K is a different row
    ce["meta"]["K"] = 16
    lb = build_leaderboard([ce])
    assert _row(lb, SRT[1], "adapter_cen_bestofK_mean", 64)["reproduced"] is None
    assert _row(lb, SRT[1], "adapter_cen_bestofK_mean", 16)["label"] == "best-of-16 (centered)"


def test_reproduced_anchors_for_a_card_without_published_ones():
    oc = {"random_floor_cen_fve_mean": 0.5, "paraphrase_best_cen_fve_mean": 0.7,
          "meta": {"command": "oracle-ceiling", "card": None, "backbone": "embedded:smollm2-135m-instruct", "layer": 21,
                   "M": 20, "K": 8, "finished": "2026-01-01T00:00:00+00:00"}}
    ce = _fake("centered-eval", "nla-space/smollm2-135m-L21", adapter_cen_bestofK_mean=0.65)
    lb = build_leaderboard([oc, ce])
    assert lb["anchors"]["nla-space/smollm2-135m-L21"]["ceiling"] == 0.7
    row = _row(lb, "nla-space/smollm2-135m-L21", "adapter_cen_bestofK_mean", 8)
    assert row["rho_reproduced"] == pytest.approx(0.75)
    assert row["published"] is None and row["reproduced"] == 0.65


def test_leaderboard_command_on_real_results(eval_env, tmp_path):
    res = tmp_path / "results"
    common = ["--card", eval_env["card"], "--targets", eval_env["targets"], "--M", 4, "--K", 4, "--max-new-tokens", 5]
    assert harness([str(x) for x in ["centered-eval", *common, "--out", res / "ce.json"]]) == 0
    assert harness([str(x) for x in ["rerank-eval", *common, "--out", res / "rr.json"]]) == 0
    assert harness([str(x) for x in ["oracle-ceiling", "--backbone", eval_env["backbone"], "--layer", LAYER, "--targets",
                                     eval_env["targets"], "--n-targets", 4, "--paraphrase-k", 2, "--paraphrase-max-new", 4,
                                     "--out", res / "oc.json"]]) == 0
    out, md, png = tmp_path / "lb.json", tmp_path / "lb.md", tmp_path / "k.png"
    assert harness(["leaderboard", "--results", str(res), "--out", str(out), "--markdown", str(md), "--plot", str(png)]) == 0
    lb = json.loads(out.read_text())
    card = str(eval_env["card"])
    row = _row(lb, card, "adapter_cen_bestofK_mean", 4)
    assert row["reproduced"] is not None and row["reproduced_meta"]["targets_split"] == "test"
    assert _row(lb, card, "logp_rerank_cen_mean", 4)["reproduced"] is not None
    assert any(c["card"] == card and c["origin"] == "reproduced" for c in lb["kcurves"])
    assert any(f["card"] == card and f["origin"] == "reproduced" and f["logp_rerank_minus_greedy"] is not None for f in lb["findings"])
    for c in SRT:
        assert _row(lb, c, "adapter_cen_bestofK_mean")["published"] is not None
    text = md.read_text()
    assert "| best-of-64 (centered) |" in text and "Findings" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert to_markdown(lb) == text


def test_policy_eval_and_roundtrip_results_become_rows():
    """policy-eval (with and without a compass) and roundtrip files: the first layer's rates at τ 0.30,
    λ 0, as separate compass / oracle rows; the round-trip mean and top-1."""
    def policy(compass: bool, right: float) -> dict:
        sweep = [{"tau": t, "confident_right": right if t == 0.3 else 0.9, "confident_wrong": 0.1, "hedged": 1 - right - 0.1}
                 for t in (0.2, 0.3)]
        return {"n_samples": 12, "per_layer": {"21": {"n": 40, "oracle_retrieval_any": 0.25,
                                                      "penalty_sweeps": {"0.0": sweep, "0.3": [{"tau": 0.3, "confident_right": 0.99}]}}},
                "meta": {"command": "policy-eval", "card": "c", "args": {"compass": "x.safetensors" if compass else None}}}
    rt = {"holdout_n": 50, "arms": {"roundtrip": {"mean": 0.123, "n": 50}},
          "correct_vs_wrong": {"L1": {"top1": 0.6}, "L2": {"top1": 0.8}}, "meta": {"command": "roundtrip", "card": "c"}}
    lb = build_leaderboard([policy(True, 0.2), policy(False, 0.4), rt], cards=[])
    got = {(r["label"], r["K"], r["M"]): r["reproduced"] for r in lb["rows"] if r["card"] == "c"}
    assert got[("confident right (τ 0.30), compass rerank of 12", 12, 40)] == 0.2
    assert got[("confident right (τ 0.30), oracle rerank of 12", 12, 40)] == 0.4
    assert got[("hedged (τ 0.30), oracle rerank of 12", 12, 40)] == pytest.approx(0.5)
    assert got[("any candidate retrieves the target, compass rerank of 12", 12, 40)] == 0.25
    assert got[("round-trip cosine, mean-centred (AR or re-encode)", None, 50)] == 0.123
    assert got[("round trip picks the right activation over a wrong one", None, 50)] == pytest.approx(0.7)
    assert all(r["rho_reproduced"] is None for r in lb["rows"])  # rates and cosines are not fve scores: no ρ
    # a card outside the built-in set gets its layer from the results (multi-layer commands record ``layers``)
    multi = policy(False, 0.4)
    multi["meta"]["layers"] = [15, 8]
    assert {r["layer"] for r in build_leaderboard([multi], cards=[])["rows"]} == {15}


def test_shipped_results_fill_the_findings_of_both_embedded_prefix_cards():
    """The shipped results give both embedded prefix cards every finding the published cards have, and
    the findings table has no row that is dashes only (a card with only reading-eval results has none)."""
    from eval_harness.results import load_results
    from nla_space.cards import ASSETS_DIR

    lb = build_leaderboard(list(load_results([ASSETS_DIR / "results"])))
    rows = {(f["card"], f["origin"]): f for f in lb["findings"]}
    fields = sorted(FINDING_KEYS - {"card", "origin"})
    for f in lb["findings"]:
        assert any(f[k] is not None for k in fields), f
    published = [f for f in lb["findings"] if f["origin"] == "published"]
    have = {k for f in published for k in fields if f[k] is not None}
    for card in ("nla-space/smollm2-135m-L21", "nla-space/gemma3-270m-L13"):
        assert {k for k in fields if rows[(card, "reproduced")][k] is not None} >= have, card


# ------------------------------------------------------------------------------------------------
# Per layer: reading-eval --layers runs and the cards' published per-layer numbers

GEMMA = "nla-space/gemma3-270m-L13-patch"  # 18 blocks (no backbone.shape: the embedded table), default layer 13
PHI4 = "anicka/nla-phi4-universal-av-v2"


def _reading(card: str, runs: dict, finished: str = "2027-01-01T00:00:00+00:00", path: str = "per_layer.json") -> dict:
    """A reading-eval results file with the given runs (results key → retrieval_top1_in40 and a few more)."""
    out = {}
    for name, (in40, minilm) in runs.items():
        strategy = name.split("_")[0]
        out[name] = {"strategy": strategy, "k": 1 if strategy == "greedy" else 16, "n": 40, "retrieval_top1": in40,
                     "retrieval_top1_in40": in40, "minilm_top1": minilm, "confident": 0.5, "confident_right": in40 / 2,
                     "confident_wrong": 0.05, "precision_confident": 0.9, "seconds_per_text": 2.5, "judge_ppl_mean": 11.0,
                     "examples": [{"text": "t", "verbalization": "v"}]}
        if "_L" in name:
            out[name]["layer"] = int(name.rsplit("_L", 1)[1])
    meta = {"command": "reading-eval", "card": card, "M": 40, "K": [1, 16], "seed": 0, "finished": finished, "path": path,
            "source": "nla_space/assets/corpora/heldout_40_v2.jsonl", "args": {"texts": "heldout_40_v2.jsonl"}}
    if any("_L" in k for k in runs):
        meta["layers"] = sorted({out[k]["layer"] for k in runs if "_L" in k})
    return {"results": out, "meta": meta}


def _points(lb, origin="reproduced", card=GEMMA):
    return [p for p in lb["layer_curves"] if p["origin"] == origin and p["card"] == card]


def test_per_layer_runs_become_layer_curves_and_the_default_layer_fills_the_rows():
    res = _reading(GEMMA, {"greedy_L3": (0.1, 0.2), "greedy_L13": (0.8, 0.7), "guided_k16_L3": (0.3, 0.25),
                           "guided_k16_L13": (0.95, 0.8)})
    lb = build_leaderboard([res])
    pts = _points(lb)
    assert [(p["run"], p["layer"], p["depth_pct"]) for p in pts] == [
        ("greedy", 3, 17), ("greedy", 13, 72), ("guided_k16", 3, 17), ("guided_k16", 13, 72)]  # round(100·ℓ/18)
    g13 = pts[1]
    assert g13["retrieval_top1_in40"] == 0.8 and g13["minilm_top1"] == 0.7 and g13["confident_right"] == 0.4
    assert g13["judge_ppl_mean"] == 11.0 and g13["retrieval_in40_same_group"] is None and g13["n"] == 40
    assert g13["n_blocks"] == 18 and g13["strategy"] == "greedy" and g13["k"] == 1 and g13["metric"] == "reading_eval"
    assert g13["meta"]["path"] == "per_layer.json" and g13["meta"]["layers"] == [3, 13] and g13["value"] is None
    assert "examples" not in g13
    # the rows read the default layer's runs under their plain names, once each
    assert _row(lb, GEMMA, "greedy_retrieval_top1")["reproduced"] == 0.8
    assert _row(lb, GEMMA, "guided_k16_minilm_top1")["reproduced"] == 0.8
    assert not [r for r in lb["rows"] if "_L" in r["metric"]]
    assert len([r for r in lb["rows"] if r["card"] == GEMMA and r["metric"] == "greedy_retrieval_top1"]) == 1


def test_per_layer_file_without_the_default_layer_leaves_the_rows_to_older_files():
    old = _reading(GEMMA, {"greedy": (0.6, 0.5)}, finished="2026-01-01T00:00:00+00:00", path="old.json")
    new = _reading(GEMMA, {"greedy_L3": (0.1, 0.2), "greedy_L7": (0.3, 0.3)})
    lb = build_leaderboard([new, old])
    row = _row(lb, GEMMA, "greedy_retrieval_top1")
    assert row["reproduced"] == 0.6 and row["reproduced_meta"]["path"] == "old.json"
    assert [(p["layer"], p["retrieval_top1_in40"]) for p in _points(lb)] == [(3, 0.1), (7, 0.3)]
    # a later file giving the same point wins
    newer = _reading(GEMMA, {"greedy_L3": (0.2, 0.2)}, finished="2027-02-01T00:00:00+00:00", path="newer.json")
    pts = _points(build_leaderboard([newer, new]))
    assert [(p["layer"], p["retrieval_top1_in40"], p["meta"]["path"]) for p in pts] == [(3, 0.2, "newer.json"), (7, 0.3, "per_layer.json")]


def test_old_style_results_give_no_reproduced_layer_points():
    from eval_harness.results import load_results
    from nla_space.cards import ASSETS_DIR

    lb = build_leaderboard([_reading(GEMMA, {"greedy": (0.6, 0.5), "guided_k16": (0.9, 0.8)})])
    assert _row(lb, GEMMA, "greedy_retrieval_top1")["reproduced"] == 0.6
    assert not [p for p in lb["layer_curves"] if p["origin"] == "reproduced"]
    shipped = build_leaderboard(list(load_results([ASSETS_DIR / "results"])))
    reproduced = [p for p in shipped["layer_curves"] if p["origin"] == "reproduced"]
    # the layer-13 card's shipped runs are old-style (no --layers): no points; the seven-layer default's are per layer
    assert not [p for p in reproduced if p["card"] == GEMMA]
    assert {p["card"] for p in reproduced} == {"nla-space/gemma3-270m-patch"}
    assert sorted(p["layer"] for p in reproduced if p["strategy"] == "greedy") == [3, 5, 7, 9, 11, 13, 15]
    # a card outside the built-in set: points without a depth
    unknown = build_leaderboard([_reading("someone/else", {"greedy_L4": (0.5, 0.5)})], cards=[])
    assert [(p["card"], p["layer"], p["depth_pct"]) for p in unknown["layer_curves"]] == [("someone/else", 4, None)]


def test_phi4_published_roundtrip_points_have_depth_and_citation(tmp_path):
    pts = _points(build_leaderboard(), "published", PHI4)
    # L4 / L19 are block indices; hidden_states = block + 1 (injection.block_offset); 40 blocks
    assert [(p["block"], p["layer"], p["depth_pct"], p["value"]) for p in pts] == [(4, 5, 12, 0.42), (19, 20, 50, 0.69)]
    for p in pts:
        assert p["metric"] == "roundtrip" and p["n_blocks"] == 40 and p["run"] is None and p["retrieval_top1_in40"] is None
        assert p["label"].endswith("published round-trip cosine (not retrieval)") and "nla-phi4" in p["label"]
        assert p["note"] == "50-text double holdout, mean-centred per-layer cosine through the companion AR"
        assert "huggingface.co/anicka/nla-phi4-universal-av-v2" in p["source"] and p["source"].endswith("[roundtrip]")
    assert {p["card"] for p in build_leaderboard()["layer_curves"]} == {PHI4}  # the only card with L<block> keys
    # the app's fallback without a leaderboard file, and a file written before layer_curves existed, have them too
    assert [p["value"] for p in load_leaderboard(tmp_path / "missing.json")["layer_curves"]] == [0.42, 0.69]


def test_old_leaderboard_file_gets_the_published_layer_points(tmp_path):
    path = tmp_path / "lb.json"
    path.write_text(json.dumps({"generated": "x", "rows": []}))
    assert [(p["card"], p["layer"]) for p in load_leaderboard(path)["layer_curves"]] == [(PHI4, 5), (PHI4, 20)]
    path.write_text(json.dumps({"generated": "x", "rows": [], "layer_curves": []}))
    assert load_leaderboard(path)["layer_curves"] == []


def test_markdown_has_the_per_layer_section():
    res = _reading(GEMMA, {"greedy_L3": (0.1, 0.2), "greedy_L13": (0.8, 0.7), "guided_k16_L13": (0.95, 0.8)})
    md = to_markdown(build_leaderboard([res]))
    sec = md[md.index("\n## Per layer"):md.index("\n## Other published")]
    assert f"### `{GEMMA}`" in sec and "18 blocks." in sec
    assert ("| layer | depth % | greedy: 1-in-40 retrieval | greedy: MiniLM | greedy: confident-right | greedy: confident-wrong "
            "| greedy: precision of confident | greedy: s/text | greedy: judge ppl | guided_k16: 1-in-40 retrieval |") in sec
    assert "| 3 | 17 | 0.100 | 0.200 | 0.050 | 0.050 | 0.900 | 2.50 | 11.0 | — |" in sec  # no guided run at L3
    assert "| 13 | 72 | 0.800 | 0.700 | 0.400 |" in sec and "`per_layer.json`" in sec
    assert "same-group" not in sec  # no --group-by run
    assert f"### `{PHI4}`" in sec and "**0.690** at block 19 (`hidden_states[20]`, depth 50 %)" in sec
    assert "published round-trip cosine (not retrieval)" in sec and "[roundtrip]" in sec
    assert "No per-layer runs yet" not in sec
    assert "No per-layer runs yet" in to_markdown(build_leaderboard())
    assert "## Per layer" not in to_markdown({**build_leaderboard(), "layer_curves": []})


def _build_tab(monkeypatch, lb):
    import gradio as gr

    from nla_space.ui import leaderboard_tab as lt

    monkeypatch.setattr(lt, "load", lambda: lb)
    with gr.Blocks() as demo:
        lt.build()
    return {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}


def test_leaderboard_tab_builds_with_and_without_layer_curves(monkeypatch):
    from nla_space.ui import leaderboard_tab as lt

    res = _reading(GEMMA, {"greedy_L3": (0.1, 0.2), "greedy_L13": (0.8, 0.7), "guided_k16_L13": (0.95, 0.8)})
    lb = build_leaderboard([res])
    series = lt.layer_series(lb)
    assert series["gemma3-270m-l13 · greedy"] == [(17, 0.1), (72, 0.8)] and series["gemma3-270m-l13 · guided_k16"] == [(72, 0.95)]
    phi = [k for k in series if "nla-phi4" in k]
    assert len(phi) == 1 and "(not retrieval)" in phi[0] and series[phi[0]] == [(12, 0.42), (50, 0.69)]
    fig = lt.layer_figure(lb)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "gemma3-270m-l13 · greedy" in labels and phi[0] in labels
    frame = lt.layer_frame(lb)
    assert len(frame) == 5 and frame.loc[1, "1-in-40 retrieval"] == 0.8 and frame.loc[1, "depth %"] == 72
    assert frame.loc[4, "published value (not retrieval)"] == 0.69 and frame.loc[4, "run / metric"] == "roundtrip"
    with_curves = _build_tab(monkeypatch, lb)
    assert {"lb-layers-note", "lb-layers-plot", "lb-layers"} <= set(with_curves)
    assert lt.NO_LAYER_RUNS not in with_curves["lb-layers-note"].value
    # only the published points: the plot, and the "no per-layer runs yet" line
    only_pub = _build_tab(monkeypatch, build_leaderboard())
    assert "lb-layers-plot" in only_pub and lt.NO_LAYER_RUNS in only_pub["lb-layers-note"].value
    # no points at all (an old file read without the fallback): the line only
    empty = _build_tab(monkeypatch, {**build_leaderboard(), "layer_curves": []})
    assert "lb-layers-plot" not in empty and "lb-layers" not in empty
    assert "No per-layer runs yet" in empty["lb-layers-note"].value
