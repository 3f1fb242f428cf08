"""Hub downloads with pinned revisions, offline mode, and safe checkpoint loading.

* Every download goes through :func:`snapshot` (``huggingface_hub.snapshot_download``), which honours
  ``HF_HUB_OFFLINE`` (read by ``huggingface_hub`` at import) and the standard cache
  (``HF_HUB_CACHE`` / ``HF_HOME``). A revision should be a commit SHA; a branch name works but is
  reported as unpinned.
* Checkpoints: safetensors first; a ``.pt``/``.bin`` pickle is read with
  ``torch.load(weights_only=True)`` and an allow-list of the path classes the reference trainers
  pickle in their ``cfg``. Anything else in a pickle is refused, never executed.
"""

from __future__ import annotations

import logging
import pathlib
import re
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import CheckpointError

log = logging.getLogger(__name__)

_SHA_RE = re.compile(r"^[0-9a-f]{40}$")

#: Globals a reference ``best_av.pt`` may reference besides tensors and containers: its ``cfg``
#: holds ``pathlib`` paths (the SRT trainers save their argparse settings there). Nothing else is allowed.
SAFE_PICKLE_GLOBALS: tuple[type, ...] = (
    pathlib.PosixPath,
    pathlib.PurePosixPath,
    pathlib.WindowsPath,
    pathlib.PureWindowsPath,
    pathlib.Path,
    pathlib.PurePath,
)

#: Keys under which the reference wrapper dicts keep the adapter weights, in lookup order.
WRAPPER_KEYS = ("trainable", "av", "av_state_dict", "model", "state_dict")


def is_pinned(revision: str | None) -> bool:
    return bool(revision) and bool(_SHA_RE.match(revision or ""))


def snapshot(repo_id: str, revision: str | None, allow_patterns: Iterable[str] | None = None) -> Path:
    """Local folder holding ``repo_id`` at ``revision`` (downloaded or from the cache).

    Raises :class:`CheckpointError` with a readable reason when the files are not reachable (offline
    and not cached, unknown repo, network down).
    """
    from huggingface_hub import constants as hub_constants
    from huggingface_hub import snapshot_download

    def is_offline_mode() -> bool:  # huggingface_hub 1.x/2.x moved it out of ``utils``
        return bool(hub_constants.HF_HUB_OFFLINE)

    try:
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=list(allow_patterns) if allow_patterns else None
        )
    except Exception as exc:  # huggingface_hub raises many types; all mean "not available"
        mode = "offline mode (HF_HUB_OFFLINE=1) and not in the local cache" if is_offline_mode() else "download failed"
        raise CheckpointError(f"cannot get {repo_id}@{revision or 'main'}: {mode} ({type(exc).__name__}: {exc})") from exc
    if not is_pinned(revision):  # after the download, so that a failure stays one line
        log.warning("%s: revision %r is not a commit SHA; the download is not pinned", repo_id, revision)
    return Path(path)


def _unwrap(obj: Any, source: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{source}: no tensors found (keys: {sorted(map(str, obj))[:8]})")
    return tensors


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: safetensors, or a weights-only pickle (reference wrapper unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        with torch.serialization.safe_globals(list(SAFE_PICKLE_GLOBALS)):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc).strip().splitlines()
        reason = next((m for m in msg if "Unsupported global" in m or "GLOBAL" in m), msg[0] if msg else "")
        raise CheckpointError(
            f"{path}: refused to load: it is not a plain tensor checkpoint that loads with "
            f"weights_only=True ({type(exc).__name__}: {reason[:300]})"
        ) from exc
    return _unwrap(obj, path)
