"""A corpus of natural text windows built offline from locally installed packages.

Targets for a verbalizer must look like what people type (questions, statements, instructions,
code, dialogue, other languages), not bare-BOS samples of an instruct model. This module builds
such a corpus from text that ships with Debian and Python packages, so it can be rebuilt on any
machine of the project without a download:

=============  =====================================================  ==========================
source         what                                                   licence (of the source)
=============  =====================================================  ==========================
``fortunes``   quotes, jokes, dialogue, poems, riddles (Debian        BSD-style / public domain
               ``fortunes``, ``fortunes-min``; the offensive sets      (see the packages'
               are never read)                                        ``copyright`` files)
``fortunes-xx`` German, Spanish, Italian sayings (``fortunes-de``,     GPL / public domain
               ``-es``, ``-it``; their ``off`` folders skipped)       (packages' ``copyright``)
``pydoc``      paragraphs of the Python reference                     PSF-2.0
               (``pydoc_data/topics.py`` of the running Python)
``code``       2-8 consecutive lines of the Python standard library   PSF-2.0
``debian``     one-line Debian package summaries (``apt-cache``)      each package's own
``prompts``    ``nla_space/assets/corpora/user_prompts_v1.jsonl``               CC0-1.0
=============  =====================================================  ==========================

Windows
    One window per document (so a split by row is a split by document). Prose windows start at
    the document's start and end after 4-36 words: half of them at a sentence end (``.?!``) when
    one falls in that range, the rest mid-sentence at a random word. At 1.2-1.5 tokens a word that
    is roughly the 6-48 tokens of text people type into the demo. Code windows are 2-8 lines
    (at most 200 characters) starting at a random line.
Splits
    By a hash of ``source + document id``: 90 % ``train``, 2 % ``val``, 3 % ``test``, 5 %
    ``mu_pool``; stable when sources grow.

Output: JSONL rows ``{"text", "source", "doc", "split"}`` (the input format of
``targets --corpus``, and of ``train-patch``), plus ``<out>.meta.json`` with counts and the
package versions read.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from nla_space.errors import NLAInputError
from nla_space.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

FORTUNE_DIR = Path("/usr/share/games/fortunes")
#: English fortune files that are text (the art/banner files are pictures, translate-me is a to-do list)
SKIP_FORTUNES = {"art", "ascii-art", "banner", "translate-me", "asciiart", "off"}
SPLIT_SHARES = (("val", 0.02), ("test", 0.03), ("mu_pool", 0.05))

_SENTENCE_END = re.compile(r"[.?!][\"')\]]?$")


@dataclass(frozen=True)
class Doc:
    source: str
    doc: str  #: stable id within the source
    text: str


def split_of(source: str, doc: str) -> str:
    """The document's split, from a hash of its source and id (stable as sources grow)."""
    h = int(hashlib.sha256(f"{source}\x00{doc}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    edge = 0.0
    for name, share in SPLIT_SHARES:
        edge += share
        if h < edge:
            return name
    return "train"


def prose_window(text: str, rng: random.Random, min_words: int = 4, max_words: int = 36) -> str | None:
    """The document's first 4-36 words, ending at a sentence end half the time (see module doc)."""
    words = text.split()
    if len(words) < min_words:
        return None
    hi = min(max_words, len(words))
    ends = [i for i in range(min_words, hi + 1) if _SENTENCE_END.search(words[i - 1])]
    n = rng.choice(ends) if ends and rng.random() < 0.5 else rng.randint(min_words, hi)
    return " ".join(words[:n])


def code_window(text: str, rng: random.Random, max_chars: int = 200) -> str | None:
    lines = [ln.rstrip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln.strip()]
    if len(lines) < 2:
        return None
    start = rng.randrange(0, max(1, len(lines) - 2))
    take = lines[start : start + rng.randint(2, 8)]
    # dedent to the window's first line
    indent = len(take[0]) - len(take[0].lstrip())
    take = [ln[indent:] if ln[:indent].strip() == "" else ln.lstrip() for ln in take]
    out = ""
    for ln in take:
        if len(out) + len(ln) + 1 > max_chars and out:
            break
        out = f"{out}\n{ln}" if out else ln
    return out if len(out) >= 12 else None


# ----------------------------------------------------------------------------------------- sources


def _fortune_file(path: Path) -> Iterator[str]:
    raw = path.read_bytes().decode("utf-8", errors="replace")
    for entry in raw.split("\n%\n"):
        entry = entry.strip().strip("%").strip()
        if entry:
            yield entry


def fortunes(folder: Path, source: str, lang_dir: str | None = None) -> Iterator[Doc]:
    base = folder / lang_dir if lang_dir else folder
    if not base.is_dir():
        return
    for path in sorted(base.iterdir()):
        if path.is_dir() or path.suffix in (".dat", ".u8") or path.name in SKIP_FORTUNES or path.name.endswith("-pre"):
            continue
        if lang_dir is None and not (folder / f"{path.name}.u8").exists() and path.name not in ("fortunes", "literature", "riddles"):
            continue  # top-level files without a .u8 twin are fortunes-it's links, not English
        for j, entry in enumerate(_fortune_file(path)):
            if 15 <= len(entry) <= 600 and "\x1b" not in entry:
                yield Doc(source, f"{path.name}:{j}", " ".join(entry.split()))


def pydoc_topics() -> Iterator[Doc]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return
    for name, body in sorted(topics.items()):
        for j, para in enumerate(re.split(r"\n\s*\n", body)):
            para = " ".join(para.split())
            if len(para) >= 60 and not para.startswith(("*", "|", "=", "-")) and para.count("::") == 0:
                yield Doc("pydoc", f"{name}:{j}", para)


def stdlib_code(limit_files: int = 400) -> Iterator[Doc]:
    lib = Path(json.__file__).resolve().parent.parent
    files = sorted(p for p in lib.glob("*.py") if not p.name.startswith("test"))[:limit_files]
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for j, block in enumerate(re.split(r"\n(?=def |class )", text)):
            if 80 <= len(block) <= 20_000:
                yield Doc("code", f"{p.name}:{j}", block)


def debian_summaries() -> Iterator[Doc]:
    try:
        out = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, timeout=120, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return
    pkg = None
    for line in out.splitlines():
        if line.startswith("Package: "):
            pkg = line[9:].strip()
        elif line.startswith("Description: ") and pkg:
            desc = line[13:].strip()
            if len(desc) >= 20:
                yield Doc("debian", pkg, desc[0].upper() + desc[1:] + ".")


def prompts(path: Path) -> Iterator[Doc]:
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.strip():
            row = json.loads(line)
            yield Doc("prompts", str(row["id"]), row["text"])


def _package_versions(names: list[str]) -> dict[str, str]:
    vers = {}
    for n in names:
        try:
            r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", n], capture_output=True, text=True, timeout=10, check=False)
            vers[n] = r.stdout.strip() or "not installed"
        except (OSError, subprocess.TimeoutExpired):
            vers[n] = "unknown"
    return vers


def build_corpus(out: Path, caps: dict[str, int], seed: int = 0, prompts_path: Path | None = None) -> dict[str, object]:
    """Write the window corpus to ``out`` (JSONL) and ``out.meta.json``; returns the meta.

    ``caps`` limits the windows taken per source (documents are shuffled with ``seed`` first, so a
    cap takes a random subset)."""
    rng = random.Random(seed)
    sources: dict[str, Iterator[Doc]] = {
        "fortunes": fortunes(FORTUNE_DIR, "fortunes"),
        "fortunes-de": fortunes(FORTUNE_DIR, "fortunes-de", "de"),
        "fortunes-es": fortunes(FORTUNE_DIR, "fortunes-es", "es"),
        "fortunes-it": fortunes(FORTUNE_DIR, "fortunes-it", "it"),
        "pydoc": pydoc_topics(),
        "code": stdlib_code(),
        "debian": debian_summaries(),
    }
    if prompts_path is not None:
        sources["prompts"] = prompts(prompts_path)
    rows: list[dict[str, str]] = []
    counts: dict[str, int] = {}
    seen: set[str] = set()
    for name, it in sources.items():
        docs = list(it)
        rng.shuffle(docs)
        taken = 0
        for d in docs:
            if taken >= caps.get(name, 10**9):
                break
            text = code_window(d.text, rng) if name == "code" else prose_window(d.text, rng)
            if not text or text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "source": d.source, "doc": d.doc, "split": split_of(d.source, d.doc)})
            taken += 1
        counts[name] = taken
        log.info("%s: %d windows from %d documents", name, taken, len(docs))
    if not rows:
        raise NLAInputError("no text found: install Debian's fortunes packages (apt-get install fortunes fortunes-min)")
    rng.shuffle(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    splits = {s: sum(1 for r in rows if r["split"] == s) for s in ("train", "val", "test", "mu_pool")}
    meta: dict[str, object] = {
        "n": len(rows), "per_source": counts, "splits": splits, "seed": seed, "caps": caps,
        "python": sys.version.split()[0],
        "debian_packages": _package_versions(["fortunes", "fortunes-min", "fortunes-de", "fortunes-es", "fortunes-it"]),
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
    }
    atomic_write_json(out.with_suffix(".meta.json"), meta)
    return meta


def read_corpus(path: Path, split: str | None = None) -> list[dict[str, str]]:
    """Rows of a corpus file (optionally one split); a clear error for a missing or bad file."""
    path = Path(path)
    if not path.is_file():
        raise NLAInputError(f"{path}: no such corpus file (build it with `python -m eval_harness text-corpus`)")
    rows = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                row["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise NLAInputError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({exc})") from exc
            if split is None or row.get("split", "train") == split:
                rows.append(row)
    return rows
