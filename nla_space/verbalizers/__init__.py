"""Activation verbalizers. ``prefix``: the SRT family (soft prefix over a frozen backbone)."""

from .config import NLAConfig
from .prefix import PrefixAV, build_prefix_av, load_adapter_weights

__all__ = ["NLAConfig", "PrefixAV", "build_prefix_av", "load_adapter_weights"]
