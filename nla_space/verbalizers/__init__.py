"""Activation verbalizers, one family per card kind: ``prefix`` (a learned soft prefix over a frozen
backbone, as in the SRT NLA verbalizers, https://github.com/space-bacon/SRT; :mod:`.prefix`,
:mod:`.prefix_card`), ``injection`` (one prompt token's embedding replaced by the activation;
:mod:`.injection`) and ``patch`` (the activation written into the residual stream at its own layer;
:mod:`.patch`, :mod:`.patch_card`). :mod:`.base` declares the interface every opened card has. The package exports the prefix AV's config and builders only, so
importing it loads no card opener."""

from .config import NLAConfig
from .prefix import PrefixAV, build_prefix_av, load_adapter_weights

__all__ = ["NLAConfig", "PrefixAV", "build_prefix_av", "load_adapter_weights"]
