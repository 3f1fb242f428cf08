"""``nla_meta.yaml``: the sidecar that Anthropic's NLA releases and nla-at-home adapters ship.

Schema (Anthropic's ``docs/inference.md``, https://github.com/kitft/natural_language_autoencoders;
the sidecar nla-at-home's ``scripts/train_universal_av.py`` writes), every key optional here::

    kind: nla_model   schema_version: 2   role: av | ar (older: actor | critic)
    d_model, n_layers, extraction_layer_index (K, a block index)
    extraction: {injection_scale, mse_scale}   (a number, null, or a symbolic scale: sqrt_d_model = √d_model)
    tokens: {injection_char, injection_token_id, injection_left_neighbor_id,
             injection_right_neighbor_id, critic_suffix_ids}
    prompt_templates: {av | actor, ar | critic}
    critic: {extraction_layer_index | num_hidden_layers}          (AR sidecars)
    depth_percentages: [...]                                      (nla-at-home universal AVs)
    training: {injection_mode: normalize | multiply | center_normalize, chat_template: bool, ...}   (nla-at-home; center_normalize is ours)

The sidecar is the authority for the facts it states; a card supplies the rest
(:func:`nla_space.verbalizers.injection.resolve_spec` merges them and records where each fact came
from). It is parsed with ``yaml.safe_load`` (no code, no custom tags).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError

log = logging.getLogger(__name__)

SIDECAR_NAME = "nla_meta.yaml"
#: Largest injection / MSE scale accepted (released values are ~10–200); beyond it a sidecar is refused.
MAX_SCALE = 1e6


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


@dataclass
class Sidecar:
    """The facts of one ``nla_meta.yaml`` (``None`` = not stated)."""

    path: str
    role: str | None = None
    d_model: int | None = None
    n_layers: int | None = None
    #: K, a *block* index: the activation is ``hidden_states[K + 1]`` (see :mod:`nla_space.activations`).
    extraction_layer_index: int | None = None
    injection_scale: float | None = None
    mse_scale: float | None = None
    injection_char: str | None = None
    injection_token_id: int | None = None
    left_neighbor_id: int | None = None
    right_neighbor_id: int | None = None
    critic_suffix_ids: list[int] | None = None
    av_template: str | None = None
    ar_template: str | None = None
    depth_percentages: list[int] | None = None
    injection_mode: str | None = None
    chat_template: bool | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = "<dict>") -> "Sidecar":
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: nla_meta.yaml must be a mapping")
        role = data.get("role")
        role = {"actor": "av", "critic": "ar"}.get(role, role)
        k = data.get("extraction_layer_index")
        if k is None:
            k = _get(data, "critic", "extraction_layer_index")
        if k is None and _get(data, "critic", "num_hidden_layers") is not None:
            k = int(_get(data, "critic", "num_hidden_layers")) - 1
        mode = _get(data, "training", "injection_mode")
        if mode is not None and mode not in ("normalize", "multiply", "center_normalize"):
            raise CheckpointError(f"{path}: training.injection_mode must be 'normalize', 'multiply' or 'center_normalize', got {mode!r}")
        d_model = _int_or_none(data.get("d_model"), path, "d_model")
        sc = cls(
            path=path,
            role=role,
            d_model=d_model,
            n_layers=_int_or_none(data.get("n_layers"), path, "n_layers"),
            extraction_layer_index=_int_or_none(k, path, "extraction_layer_index"),
            injection_scale=_scale(_get(data, "extraction", "injection_scale"), path, "extraction.injection_scale", d_model),
            mse_scale=_scale(_get(data, "extraction", "mse_scale"), path, "extraction.mse_scale", d_model),
            injection_char=_get(data, "tokens", "injection_char"),
            injection_token_id=_int_or_none(_get(data, "tokens", "injection_token_id"), path, "tokens.injection_token_id"),
            left_neighbor_id=_int_or_none(_get(data, "tokens", "injection_left_neighbor_id"), path, "tokens.injection_left_neighbor_id"),
            right_neighbor_id=_int_or_none(_get(data, "tokens", "injection_right_neighbor_id"), path, "tokens.injection_right_neighbor_id"),
            critic_suffix_ids=_get(data, "tokens", "critic_suffix_ids"),
            av_template=_get(data, "prompt_templates", "av") or _get(data, "prompt_templates", "actor"),
            ar_template=_get(data, "prompt_templates", "ar") or _get(data, "prompt_templates", "critic"),
            depth_percentages=data.get("depth_percentages"),
            injection_mode=mode,
            chat_template=_get(data, "training", "chat_template"),
            raw=data,
        )
        if sc.chat_template is not None and not isinstance(sc.chat_template, bool):
            raise CheckpointError(f"{path}: training.chat_template must be true or false")
        return sc


def _int_or_none(x: Any, path: str, name: str) -> int | None:
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise CheckpointError(f"{path}: {name} must be a non-negative integer, got {x!r}")
    return x


#: symbolic scales the reference writes in a sidecar, each resolved from the sidecar's ``d_model``
#: (the reference writes the resolved float for its own releases, and reads these as input sentinels)
SYMBOLIC_SCALES = {"sqrt_d_model": lambda d: math.sqrt(d)}


def _scale(x: Any, path: str, name: str, d_model: int | None) -> float | None:
    """A scale of ``extraction``: a number, a :data:`SYMBOLIC_SCALES` name (resolved with ``d_model``), or
    null (not stated: the card's value applies). ``raw`` (no normalisation) is refused by name: the
    injection rules and the AR score here always normalise, so honouring it is not possible."""
    if isinstance(x, str):
        if x in SYMBOLIC_SCALES:
            if d_model is None:
                raise CheckpointError(f"{path}: {name} is {x!r}, which is resolved from d_model, and the sidecar states no d_model")
            return float(SYMBOLIC_SCALES[x](d_model))
        if x == "raw":
            raise CheckpointError(f"{path}: {name} is 'raw' (no normalisation), which this project does not implement: "
                                  "its injection rules and AR score always normalise to a scale")
        raise CheckpointError(f"{path}: {name} {x!r} is not a scale: a positive number, null, or one of {sorted(SYMBOLIC_SCALES)}")
    return _float_or_none(x, path, name)


def _float_or_none(x: Any, path: str, name: str) -> float | None:
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < float(x) <= MAX_SCALE:
        raise CheckpointError(f"{path}: {name} must be a positive finite number up to {MAX_SCALE:g}, got {x!r}")
    return float(x)


def load_sidecar(folder: Path | None) -> Sidecar | None:
    """The sidecar of a checkpoint folder, or None when it ships none."""
    if folder is None:
        return None
    path = Path(folder) / SIDECAR_NAME
    if not path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{path}: not a readable YAML sidecar ({exc})") from exc
    sc = Sidecar.from_dict(data or {}, str(path))
    log.info("read sidecar %s (role %s)", path, sc.role)
    return sc
