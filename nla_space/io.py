"""Atomic file writes: a reader never sees a half-written file, and a crash leaves the old one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

#: Bytes that :func:`check_writable` writes (and removes) to prove an output folder takes data.
WRITE_PROBE_BYTES = 1 << 20


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None and exc.errno is not None:  # name the file (e.g. "No space left" while writing it)
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSONL text, split on ``\\n`` only.

    ``str.splitlines`` also splits on U+2028, U+0085, form feeds and other separators that
    ``json.dumps(..., ensure_ascii=False)`` writes raw inside strings, which cut a row in two.
    Every JSONL reader in the project splits with this function."""
    return text.split("\n")


def read_json_object(path: Path, what: str = "JSON") -> dict[str, Any]:
    """The JSON object in ``path``; anything else (unreadable, not JSON, not an object) is a
    :class:`~nla_space.errors.CheckpointError` naming the file and ``what`` it should hold."""
    from .errors import CheckpointError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read {what} ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object")
    return data


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def save_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Atomic ``safetensors`` save (tensors made contiguous and moved to CPU)."""
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(Path(path), lambda tmp: save_file(clean, str(tmp), metadata=metadata))


def check_writable(folder: Path, what: str = "output", probe_bytes: int = WRITE_PROBE_BYTES) -> None:
    """Pre-flight check before long work: create ``folder`` and write, fsync and remove a
    ``probe_bytes`` file in it. A read-only, unwritable or full location raises
    :class:`~nla_space.errors.NLAInputError` at start-up instead of an ``OSError`` hours later."""
    from .errors import NLAInputError

    folder = Path(folder)
    name = None
    if folder.exists() and not folder.is_dir():
        raise NLAInputError(f"cannot write the {what} to {folder}: it is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".nla-write-check.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * probe_bytes)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise NLAInputError(f"cannot write the {what} to {folder}: {reason} (checked before starting; "
                            f"free some space or choose another location)") from exc
    finally:
        if name is not None:
            try:
                os.unlink(name)
            except OSError:
                pass
