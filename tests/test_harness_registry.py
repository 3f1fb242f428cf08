"""Adding an eval is one class: a small eval defined here, registered into ``EVALS``, runs from the
CLI (its options come from its config dataclass) and its metric shows up in the built leaderboard."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from eval_harness.cli import main as harness
from eval_harness.evals import EVALS, EvalTask, Metric, register
from eval_harness.evals.common import eval_targets
from eval_harness.leaderboard_build import build_leaderboard, to_markdown
from eval_harness.settings import setting

CARD = "test/text-length"


@dataclass(kw_only=True)
class TextLengthConfig:
    targets: Path = setting(help="targets folder")
    out: Path = setting(help="results JSON")
    n: int = setting(3, "number of test-split targets")
    resume: bool = setting(False)


class TextLength(EvalTask):
    """Mean characters of the held-out texts: no model, just the eval contract."""

    name = "text-length"
    table = "text_length"
    help = "mean characters of the held-out texts (a test eval)"
    supported_kinds = ("prefix",)
    Config = TextLengthConfig
    metrics = (Metric("text_length", "mean_chars", "mean characters", centered=False, fve=False),)

    def open(self) -> list[int]:
        from eval_harness.data.dataset import load_target_set

        self.ts = load_target_set(self.cfg.targets)
        return eval_targets(self.ts, self.cfg.n)

    def fingerprint(self) -> dict[str, Any]:
        return {"command": self.name, "n": self.cfg.n}

    def process(self, target: int) -> dict[str, Any]:
        return {"target": target, "chars": len(self.ts.texts[target])}

    def aggregate(self, recs: list[dict[str, Any]]) -> dict[str, Any]:
        return {"mean_chars": sum(r["chars"] for r in recs) / len(recs), "M": len(recs)}

    def meta_fields(self, results: dict[str, Any]) -> dict[str, Any]:
        return {"card": CARD, "backbone": "none", "layer": 0, "M": results["M"], "K": None}


@pytest.fixture
def text_length_registered():
    register(TextLength)
    yield TextLength
    del EVALS[TextLength.name]


def _targets(folder: Path) -> Path:
    from eval_harness.data.dataset import write_target_set

    texts = ["a b c", "one two", "x", "four five six", "seven"]
    splits = ["test", "mu_pool", "test", "test", "train"]
    write_target_set(folder, torch.zeros(5, 4), texts, [[1]] * 5, splits, {"backbone": "none", "layer": 0, "seed": 0})
    return folder


def test_a_new_eval_class_is_a_command_and_a_leaderboard_row(text_length_registered, tmp_path, capsys):
    with pytest.raises(SystemExit):
        harness(["text-length", "--help"])
    assert "--targets" in capsys.readouterr().out
    out = tmp_path / "tl.json"
    assert harness(["text-length", "--targets", str(_targets(tmp_path / "t")), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["mean_chars"] == pytest.approx((5 + 1 + 13) / 3) and res["meta"]["command"] == "text-length"
    lb = build_leaderboard([res], cards=[])
    rows = [r for r in lb["rows"] if r["card"] == CARD]
    assert [(r["label"], r["reproduced"], r["M"]) for r in rows] == [("mean characters", pytest.approx(19 / 3, abs=1e-4), 3)]
    assert "| mean characters |" in to_markdown(lb)


def test_without_registration_the_eval_is_unknown(tmp_path):
    res = {"mean_chars": 1.0, "meta": {"command": "text-length", "card": CARD}}
    assert not build_leaderboard([res], cards=[])["rows"]
