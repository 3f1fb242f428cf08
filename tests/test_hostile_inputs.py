"""Property-based hostile input over the verbalize path: any input either gives a well-formed
result or a clean :class:`NLAInputError` — never another exception, never a NaN in the output."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiny
from nla_space.errors import NLAInputError
from nla_space.runtime import open_card

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def opened(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    bb_dir = tiny.save_backbone(root / "bb", "llama")
    card_dir = tiny.make_card_folder(root / "card", bb_dir, layer=2)
    return open_card(str(card_dir), backbone=str(bb_dir))


def _check_result(res) -> None:
    data = res.to_dict()
    json.dumps(data, allow_nan=False)  # strict JSON: no NaN/inf anywhere
    assert 1 <= len(data["candidates"]) <= max(1, data["k"])
    assert data["best"] == data["candidates"][data["best_index"]]
    assert isinstance(data["hedged"], bool)


numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**12), max_value=10**12),
)


@SETTINGS
@given(text=st.text(max_size=300))
def test_any_text_is_answered_or_refused_cleanly(opened, text):
    try:
        res = opened.verbalize(text=text, k=2, max_new_tokens=4, seed=0)
    except NLAInputError as exc:
        assert str(exc)
        return
    _check_result(res)


@SETTINGS
@given(k=numbers, tau=numbers, temperature=numbers)
def test_any_numbers_are_answered_or_refused_cleanly(opened, k, tau, temperature):
    try:
        res = opened.verbalize(text="the cat is red", k=k, tau=tau, temperature=temperature, max_new_tokens=3, seed=1)
    except NLAInputError as exc:
        assert str(exc)
        return
    assert isinstance(k, int) and 1 <= k and 0 <= tau <= 1 and 0 <= temperature <= 5
    _check_result(res)


@SETTINGS
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=0, max_size=40))
def test_any_vector_is_answered_or_refused_cleanly(opened, values):
    try:
        res = opened.verbalize(vector=values, k=2, max_new_tokens=3, seed=2)
    except NLAInputError as exc:
        assert str(exc)
        return
    assert len(values) == opened.backbone.hidden_size and all(math.isfinite(x) for x in values)
    _check_result(res)


def test_huge_and_control_character_text(opened):
    with pytest.raises(NLAInputError, match="tokens long"):
        opened.verbalize(text="cat " * 10_000, k=1, max_new_tokens=2)
    res = opened.verbalize(text="the\x00cat\x1b[31m is\u202e red \U0001f600", k=1, max_new_tokens=2, seed=0)
    _check_result(res)


def test_zero_vector_does_not_produce_nan_scores(opened):
    res = opened.verbalize(vector=torch.zeros(opened.backbone.hidden_size), k=2, max_new_tokens=3, seed=0)
    _check_result(res)
