"""``NLAConfig``: the SRT verbalizer config, field for field (``srt/nla/config.py`` of https://github.com/space-bacon/SRT).

JSON form: one flat object with these field names. The backbone, its dtype and the layer are
required (they are the card's facts: no config stands for a model it does not name); reading drops
unknown keys and fills the other missing ones with the defaults, so every released ``config.json``
(older ones lack ``use_layer_embed`` and ``inject_norm``) loads. Writing emits every field, sorted.
"""

from __future__ import annotations

import json
import logging
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

log = logging.getLogger(__name__)

#: ``none`` (the reference: v as is), ``embed`` (v rescaled to the mean embedding-row norm),
#: ``center_embed`` (v − μ rescaled to that norm; μ is the AV's ``inject_mu`` buffer).
INJECT_NORMS = ("none", "embed", "center_embed")


@dataclass(kw_only=True)
class NLAConfig:
    backbone_id: str
    backbone_dtype: str
    #: Index into ``hidden_states`` (0 = embeddings); see :mod:`nla_space.activations`.
    extraction_layer: int
    d_vector: int | None = None
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    pool: str = "last"
    lambda_mag: float = 0.1
    beta_kl: float = 0.05
    gamma_entropy: float = 0.05
    delta_community: float = 0.2
    h_min: float = 1.5
    h_max: float = 3.0
    num_prefix_tokens: int = 1
    prefix_mode: str = "static"
    prefix_mlp_hidden: int = 256
    num_inject_slots: int = 1
    use_layer_embed: bool = False
    #: How v is conditioned before ``proj`` (see :meth:`nla_space.verbalizers.prefix.PrefixAV.inject`).
    inject_norm: str = "none"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NLAConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            log.debug("NLAConfig: ignoring unknown keys %s", unknown)
        missing = [name for name, f in known.items() if f.default is MISSING and f.default_factory is MISSING and name not in data]
        if missing:
            raise ValueError(f"NLAConfig: missing {', '.join(missing)} (required: the config names its backbone and layer)")
        kwargs = {k: v for k, v in data.items() if k in known}
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "NLAConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise CheckpointError(f"config not found: {path}") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: {exc}") from exc

    def validate(self) -> None:
        def _int(name: str, lo: int, hi: int) -> None:
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or not lo <= val <= hi:
                raise ValueError(f"NLAConfig.{name} must be an integer in [{lo}, {hi}], got {val!r}")

        for name in ("backbone_id", "backbone_dtype"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"NLAConfig.{name} must be a non-empty string, got {getattr(self, name)!r}")
        _int("extraction_layer", 0, 4096)
        _int("num_prefix_tokens", 0, 4096)
        _int("num_inject_slots", 1, 64)
        _int("max_new_tokens", 1, 1 << 16)
        _int("prefix_mlp_hidden", 1, 1 << 16)
        if self.d_vector is not None:
            _int("d_vector", 1, 1 << 20)
        if self.prefix_mode not in ("static", "mlp"):
            raise ValueError(f"NLAConfig.prefix_mode must be 'static' or 'mlp', got {self.prefix_mode!r}")
        if self.inject_norm not in INJECT_NORMS:
            raise ValueError(f"NLAConfig.inject_norm must be one of {INJECT_NORMS}, got {self.inject_norm!r}")
        for name in ("temperature", "top_p"):
            val = getattr(self, name)
            if not isinstance(val, (int, float)) or isinstance(val, bool) or not 0 <= float(val) <= 100:
                raise ValueError(f"NLAConfig.{name} must be a number, got {val!r}")
        if not isinstance(self.use_layer_embed, bool):
            raise ValueError(f"NLAConfig.use_layer_embed must be true or false, got {self.use_layer_embed!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | Path) -> None:
        from ..io import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
