"""The repository cites only public sources.

Private research notes and the folder they live in are not part of the repository, so a reader of
the public repository cannot follow a citation of them. Every tracked file (``git ls-files``),
text or binary, is searched for the notes' file names and for paths into that folder; public
sources are listed in ``docs/references.md`` instead.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: the notes' file names (not preceded by a word character, so a name ending a longer word is not a hit) and any
#: path into the private folder.
_NOTE_NAMES = ("srt", "ecosystem", "nla_at_home", "kitft_nla")
_FOLDER = "shared"
FORBIDDEN = re.compile(
    r"(?<![\w-])(?:" + "|".join(_NOTE_NAMES) + r")\.md\b"
    + "|" + re.escape(_FOLDER) + r"/(?:seeds|research)\b"
    + "|" + re.escape("../" + _FOLDER),
)


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:  # not a git checkout (e.g. an installed copy)
        pytest.skip(f"git ls-files unavailable: {e}")
    return [ROOT / p for p in out.decode("utf-8", "surrogateescape").split("\0") if p]


def _offences(path: Path) -> list[str]:
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):  # deleted in the work tree, or a submodule
        return []
    text = data.decode("utf-8", "replace")
    hits = []
    for m in FORBIDDEN.finditer(text):
        line_no = text.count("\n", 0, m.start()) + 1
        hits.append(f"{path.relative_to(ROOT)}:{line_no}: {m.group(0)!r}")
    return hits


def test_the_pattern_catches_what_it_must_and_nothing_else():
    srt, ecosystem, nla_at_home, kitft = (name + ".md" for name in _NOTE_NAMES)  # built, so this file cites nothing
    for bad in (f"see {srt} §7.9", f"(``{kitft}`` §1.3)", nla_at_home, f"{ecosystem} §2.6",
                f"{_FOLDER}/seeds/003", f"`{_FOLDER}/research/{srt}`", f"../{_FOLDER}/x"):
        assert FORBIDDEN.search(bad), bad
    for fine in ("docs/references.md", f"my{srt}", "the shared policy", "shared/", "nla-at-home",
                 "kitft/natural_language_autoencoders", "docs/evals.md"):
        assert not FORBIDDEN.search(fine), fine


def test_no_tracked_file_cites_the_private_notes():
    files = _tracked_files()  # this file included: its examples are built from parts
    assert files, "git ls-files listed nothing"
    offences = [hit for p in files for hit in _offences(p)]
    assert not offences, (
        f"{len(offences)} citation(s) of private notes; cite a public source instead (docs/references.md):\n"
        + "\n".join(offences[:200])
    )
