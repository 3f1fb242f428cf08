"""End to end on the real embedded backbones through the command line: the default card (Gemma-3-270M,
greedy) and the SmolLM2-135M-Instruct cards (sampled decoding, seeded)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEXT = "The Eiffel Tower is in Paris, the capital of France."
ARGS = ["--card", "smollm2-135m", "--text", TEXT, "--k", "8", "--json", "--seed", "3", "--max-new-tokens", "16"]


#: One intra-op thread: on a shared, loaded CPU two spinning OpenMP threads run a SmolLM2 forward
#: 5-10x slower than one; the in-process half of the test uses the same count, so both halves
#: reduce in the same order and must agree token for token.
THREADS = 1


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(THREADS))
    return subprocess.run([sys.executable, "-m", "nla_space", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.e2e
def test_cli_verbalize_smollm2_json(smollm2):
    """The SmolLM2 patch card's JSON contract (guided, K candidates), reproduced token for token in process."""
    proc = _run(["verbalize", *ARGS])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    d = json.loads(lines[0])

    assert d["card"] == "nla-space/smollm2-135m-L21-patch" and d["layer"] == 21 and d["k"] == 8
    from nla_space.cards import find_card

    card = find_card("smollm2-135m")
    assert d["tau"] == card.default_tau and isinstance(d["trained"], bool) and d["seed"] == 3 and d["greedy"] is False
    assert isinstance(d["hedged"], bool) and isinstance(d["centered"], bool)
    assert len(d["candidates"]) == 8 and 0 <= d["best_index"] < 8
    best = d["best"]
    assert set(best) == {"text", "token_ids", "score_raw", "score_cen", "specificity", "confidence", "fluency"}
    assert d["fluency_weight"] == 0.0 and all(c["fluency"] is None for c in d["candidates"])  # no fluency prior on this card
    assert best == d["candidates"][d["best_index"]]
    assert isinstance(best["text"], str) and 1 <= len(best["token_ids"]) <= 16
    for c in d["candidates"]:
        assert 0.0 <= c["score_raw"] <= 1.0 and math.isfinite(c["score_raw"])
        assert (c["score_cen"] is None) == (not d["centered"])
        assert math.isfinite(c["specificity"]) and 0.0 <= c["confidence"] <= 1.0
    # the default card is calibrated: the best is the most specific, hedged by its confidence
    assert d["strategy"] == card.patch.default_strategy == "guided" and d["criterion"] == "confidence"
    assert "among 40" in d["confidence_meaning"]
    assert best["specificity"] == max(c["specificity"] for c in d["candidates"])
    assert d["score"] == best["confidence"] and d["hedged"] == (d["score"] < d["tau"])
    assert {"extract_s", "sample_s", "score_s", "total_s"} <= set(d["timings"])
    if not d["trained"]:
        assert any(n["kind"] == "untrained" for n in d["notes"])

    # Same seed, same output: the in-process path (same card, same backbone) reproduces the
    # subprocess's candidates token for token.
    import torch

    from nla_space.runtime import open_card

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        res = open_card("smollm2-135m").verbalize(text=TEXT, k=8, seed=3, max_new_tokens=16)
        other = open_card("smollm2-135m").verbalize(text=TEXT, k=8, seed=4, max_new_tokens=16)
    finally:
        torch.set_num_threads(threads)
    assert [c.token_ids for c in res.candidates] == [c["token_ids"] for c in d["candidates"]]
    assert [c.score_raw for c in res.candidates] == pytest.approx([c["score_raw"] for c in d["candidates"]], abs=1e-5)
    assert res.best_index == d["best_index"]
    assert [c.token_ids for c in other.candidates] != [c["token_ids"] for c in d["candidates"]]


@pytest.mark.e2e
def test_cli_embedded_bad_layer_exits_2():
    proc = _run(["verbalize", "--text", TEXT, "--layer", "30"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: card nla-space/gemma3-270m-patch supports layer(s) [13, 3, 5, 7, 9, 11, 15], not 30"]


@pytest.mark.e2e
def test_cli_verbalize_default_card_gemma3_greedy():
    """The default card (``embedded``, alias ``gemma3-270m``: a patch AV on Gemma-3-270M from PyPI, default layer 13 of seven;
    the first call converts the GGUF into the cache, ~1 min) decodes greedily with a calibrated
    confidence: one candidate; ``--strategy guided`` gives K, and a ``--k`` that greedy would drop is refused."""
    refused = _run(["verbalize", "--text", TEXT, "--k", "3", "--json"])
    assert refused.returncode == 2 and "--strategy best-of-k" in refused.stderr and not refused.stdout
    proc = _run(["verbalize", "--text", TEXT, "--json", "--seed", "1", "--max-new-tokens", "6"])
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout.strip().splitlines()[-1])
    assert d["card"] == "nla-space/gemma3-270m-patch" and d["layer"] == 13 and d["trained"] is True
    assert d["strategy"] == "greedy" and d["greedy"] is True and len(d["candidates"]) == 1
    assert d["criterion"] == "confidence" and 0.0 <= d["score"] <= 1.0 and "among 40" in d["confidence_meaning"]
    assert d["hedged"] == (d["score"] < d["tau"]) and 1 <= len(d["best"]["token_ids"]) <= 6
    proc = _run(["verbalize", "--card", "gemma3-270m", "--strategy", "guided", "--text", TEXT, "--k", "3", "--json", "--seed", "1",
                 "--max-new-tokens", "6"])
    assert proc.returncode == 0, proc.stderr
    g = json.loads(proc.stdout.strip().splitlines()[-1])
    # the default card's guided decoding has a fluency prior: K candidates plus the greedy anchor, each with its fluency
    assert g["strategy"] == "guided" and g["fluency_weight"] > 0 and len(g["candidates"]) == 3 + 1
    assert all(math.isfinite(c["score_cen"]) and math.isfinite(c["fluency"]) for c in g["candidates"])
    assert all(1 <= len(c["token_ids"]) <= 6 for c in g["candidates"])


@pytest.mark.e2e
def test_cli_verbalize_gemma3_prefix_card():
    """The earlier Gemma-3-270M prefix AV stays available as ``gemma3-270m-prefix``, with centered scores."""
    proc = _run(["verbalize", "--card", "gemma3-270m-prefix", "--text", TEXT, "--k", "3", "--json", "--seed", "1", "--max-new-tokens", "6"])
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout.strip().splitlines()[-1])
    assert d["card"] == "nla-space/gemma3-270m-L13" and d["layer"] == 13 and d["centered"] is True
    assert d["score"] == max(c["score_cen"] for c in d["candidates"])
