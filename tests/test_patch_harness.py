"""The harness around the patch verbalizer: the text corpus, train-patch, patch-release, reading-eval."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import tiny
from eval_harness.cli import main
from eval_harness.evals.reading_eval import ReadingEval, load_texts
from eval_harness.data.text_corpus import code_window, prose_window, read_corpus, split_of
from nla_space.errors import NLAInputError


def test_prose_and_code_windows() -> None:
    rng = random.Random(0)
    text = " ".join(f"word{i}." if i % 7 == 6 else f"word{i}" for i in range(80))
    for _ in range(200):
        w = prose_window(text, rng)
        assert w is not None and 4 <= len(w.split()) <= 36 and text.startswith(w)
    assert prose_window("too short", rng) is None
    code = "def f(x):\n    y = x + 1\n    return y\n\n\ndef g():\n    pass\n"
    for _ in range(50):
        w = code_window(code, rng)
        assert w is None or (len(w) <= 200 and "\n" in w)


def test_split_is_by_document_and_stable() -> None:
    assert split_of("fortunes", "work:1") == split_of("fortunes", "work:1")
    counts = {}
    for i in range(5000):
        s = split_of("src", str(i))
        counts[s] = counts.get(s, 0) + 1
    assert 0.85 < counts["train"] / 5000 < 0.95 and counts["test"] > 80 and counts["val"] > 50


def test_read_corpus_errors(tmp_path) -> None:
    with pytest.raises(NLAInputError, match="no such corpus"):
        read_corpus(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "split": "val"}\n{"nope": 1}\n')
    with pytest.raises(NLAInputError, match="bad.jsonl:2"):
        read_corpus(bad)
    with pytest.raises(NLAInputError, match="train split"):
        load_texts(None, bad, "train", None)


def _corpus(path: Path) -> Path:
    rows = []
    for i, t in enumerate(tiny.SENTENCES * 6):
        rows.append({"text": t, "source": "tiny", "doc": str(i), "split": ["train", "train", "val", "mu_pool"][i % 4]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_patch_learns_resumes_and_ships(tmp_path, capsys) -> None:
    bb_dir = tiny.save_backbone(tmp_path / "bb")
    corpus = _corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "run"
    args = ["train-patch", "--backbone", str(bb_dir), "--corpus", str(corpus), "--out", str(out), "--layer", "2",
            "--steps", "4", "--batch-size", "4", "--eval-every", "2", "--val-rows", "8", "--r", "4", "--alpha", "8", "--lr", "0.01"]
    assert main(args) == 0
    rows = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and all("val_ce_gain" in r for r in rows if r["step"] % 2 == 0)
    assert main(args) == 2  # a second fresh run over the first is refused
    assert "already holds a run" in capsys.readouterr().err
    assert main(args[:-2] + ["--lr", "0.01", "--steps", "6", "--resume"]) == 0  # continues at step 4
    rows = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert rows[-1]["val_ce"] < rows[0]["val_ce"]  # it learned the corpus
    adapter = json.loads((out / "best" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(bb_dir)  # the backbone as given (an id: embedded:NAME), not a cache path
    # ship it: AV folder + pool + calibration on the val texts + card file, then open and verbalize
    card_file = tmp_path / "card.json"
    assert main(["patch-release", "--run", str(out), "--corpus", str(corpus), "--av-folder", str(tmp_path / "av"),
                 "--card-file", str(card_file), "--card-id", "local/tiny-patch", "--backbone", str(bb_dir),
                 "--calibrate", "12", "--k", "2", "--target-precision", "0.5", "--title", "Tiny patch", "--description", "d"]) == 0
    card = json.loads(card_file.read_text())
    cal = card["patch"]["calibration"]
    assert card["kind"] == "patch" and card["default_tau"] == cal["tau"] and cal["n_val"] == 12
    # a re-release without --title/--description keeps the card's own (and its calibration, with --calibrate 0),
    # and the pool it already holds for the same backbone, layer and texts (not recomputed: same file)
    pool = tmp_path / "av" / "pool.safetensors"
    before = (pool.stat().st_ino, pool.stat().st_mtime_ns)
    assert main(["patch-release", "--run", str(out), "--corpus", str(corpus), "--av-folder", str(tmp_path / "av"),
                 "--card-file", str(card_file), "--card-id", "local/tiny-patch", "--backbone", str(bb_dir), "--k", "2"]) == 0
    again = json.loads(card_file.read_text())
    assert (again["title"], again["description"], again["patch"]["calibration"]) == ("Tiny patch", "d", cal)
    assert (pool.stat().st_ino, pool.stat().st_mtime_ns) == before
    from nla_space.cards import find_card
    from nla_space.runtime import open_card

    res = open_card(find_card(str(card_file))).verbalize(text="the cat is on the tree", k=2, seed=0)
    assert res.criterion == "confidence" and res.strategy == "guided"


def test_reading_eval_metrics_on_known_records() -> None:
    class Stub:  # the opened card's μ, under both the attribute and the per-layer accessor
        mu = torch.zeros(4)

        def check_layer(self, layer: int | None) -> int | None:
            return layer

        def mu_at(self, layer: int | None) -> torch.Tensor:
            return self.mu

    ev = ReadingEval(Stub(), "guided", 4)  # type: ignore[arg-type]
    V = torch.eye(4)
    recs = [{"v": V[i].tolist(), "h": V[i].tolist(), "hedged": i >= 2, "specificity": 1.0, "seconds": 1.0,
             "verbalization": f"t{i}", "text": f"t{i}"} for i in range(4)]
    recs[3]["h"] = V[0].tolist()  # the fourth answer points at the first text
    agg = ReadingEval.aggregate(ev, recs, embed=lambda texts: torch.eye(4)[[int(t[1]) for t in texts]])
    assert agg["retrieval_top1"] == 0.75 and agg["confident"] == 0.5 and agg["confident_right"] == 0.5
    assert agg["confident_wrong"] == 0.0 and agg["precision_confident"] == 1.0 and agg["minilm_top1"] == 1.0


def test_reading_eval_command_on_a_tiny_patch_card(tmp_path) -> None:
    card = tiny.make_patch_card(tmp_path, "llama")
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny.SENTENCES[:5]))
    out = tmp_path / "res.json"
    assert main(["reading-eval", "--card", str(card), "--texts", str(texts), "--strategies", "guided,best-of-k,greedy",
                 "--k", "3", "--no-minilm", "--judge", str(tmp_path / "bb-llama"), "--out", str(out),
                 "--examples-md", str(tmp_path / "ex.md")]) == 0
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"guided_k3", "best-of-k_k3", "greedy"}
    for r in res["results"].values():
        assert 0 <= r["retrieval_top1"] <= 1 and r["n"] == 5 and len(r["examples"]) == 5
        assert r["judge_ppl_mean"] > 1 and r["input_judge_ppl_median"] > 1 and 0 <= r["repeat3_rate"] <= 1
        assert all(e["judge_ppl"] is None or e["judge_ppl"] > 1 for e in r["examples"])
    assert res["meta"]["command"] == "reading-eval" and "| text | verbalization" in (tmp_path / "ex.md").read_text()


def test_cli_strategy_flag(tmp_path, capsys) -> None:
    from nla_space.cli import main as cli_main

    card = tiny.make_patch_card(tmp_path, "llama")
    assert cli_main(["verbalize", "--card", str(card), "--text", "the cat", "--k", "2", "--strategy", "best-of-k", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["strategy"] == "best-of-k" and out["criterion"] == "centered"
    with pytest.raises(SystemExit):
        cli_main(["verbalize", "--card", str(card), "--text", "the cat", "--strategy", "beam"])


def test_engine_checks_the_strategy() -> None:
    from nla_space.ui import engine

    assert engine.check_request("hi", strategy="default").strategy is None
    assert engine.check_request("hi", strategy="guided").strategy == "guided"
    assert engine.check_request("hi", greedy=True).strategy == "greedy"
    with pytest.raises(NLAInputError, match="strategy"):
        engine.check_request("hi", strategy="beam")
    with pytest.raises(NLAInputError, match="contradicts"):
        engine.check_request("hi", strategy="guided", greedy=True)
