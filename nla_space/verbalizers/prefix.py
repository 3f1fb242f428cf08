"""SRT-family prefix activation verbalizer (``srt/nla/verbalizer.py`` of https://github.com/space-bacon/SRT).

Given a target ``v ∈ R^d`` the AV builds the soft input sequence

    [ proj(v), proj_extra_1(v) … proj_extra_{M-1}(v), prefix_1 … prefix_P ]

(no BOS, no text prompt) and the frozen backbone continues it. Before ``proj``, v is conditioned by
``cfg.inject_norm``: ``none`` (as the reference), ``embed`` (rescaled to the mean norm of the
embedding-table rows, for backbones whose residual norms are far from the token embeddings'), or
``center_embed`` (``v − inject_mu`` rescaled to that norm, where ``inject_mu`` is a stored buffer
holding the anisotropy mean μ of the training targets: on SmolLM2 layer 21 two dimensions of μ
carry most of ‖v‖ and raw targets share cos ≈ 0.54, so without centering every injected vector
looks alike; measured in ``nla_space/assets/cards/smollm2-135m-L21/TRAINING.md``). Parameter names match the reference
``state_dict`` exactly (``proj``, ``prefix_embeds``, ``proj_extra``, ``prefix_mlp``, ``layer_embed``)
so a published ``best_av.pt`` loads. Adapter parameters are float32; :meth:`PrefixAV.embeds`
rounds to the config's ``backbone_dtype`` and casts to the running backbone's dtype at the boundary,
and multiplies by the backbone's embedding scale (see :attr:`nla_space.backbone.Backbone.embed_scale`).

Our own checkpoints are ``config.json`` (NLAConfig) + ``av.safetensors`` (these tensors only).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..backbone import Backbone
from ..errors import CheckpointError
from ..hub import load_state_dict
from ..io import save_tensors
from .config import NLAConfig

log = logging.getLogger(__name__)

#: Checkpoint file names of a prefix-AV folder, in the order they are looked for.
WEIGHT_FILES = ("av.safetensors", "best_av.pt", "best_av/best_av.pt")


class PrefixAV(nn.Module):
    """The trainable prefix adapter. It does not own the backbone (checkpoints hold adapter keys only)."""

    def __init__(self, cfg: NLAConfig, d_embed: int, bos_embedding: torch.Tensor, num_layers: int, embed_row_norm: float = 1.0):
        super().__init__()
        self.cfg = cfg
        d_vec = cfg.d_vector or d_embed
        self.d_vec, self.d_embed = d_vec, d_embed
        self.embed_row_norm = float(embed_row_norm)
        if cfg.inject_norm == "center_embed":
            self.register_buffer("inject_mu", torch.zeros(d_vec))
        else:
            self.inject_mu = None
        P, M = cfg.num_prefix_tokens, cfg.num_inject_slots
        bos = bos_embedding.detach().float().reshape(d_embed)

        self.proj = nn.Linear(d_vec, d_embed, bias=False)
        with torch.no_grad():
            if d_vec == d_embed:
                nn.init.eye_(self.proj.weight)
            else:
                nn.init.xavier_uniform_(self.proj.weight)
        self.proj_extra = nn.ModuleList([nn.Linear(d_vec, d_embed, bias=False) for _ in range(M - 1)])
        for lin in self.proj_extra:
            nn.init.xavier_uniform_(lin.weight, gain=0.1)

        self.prefix_embeds: nn.Parameter | None = None
        self.prefix_mlp: nn.Sequential | None = None
        if P > 0 and cfg.prefix_mode == "static":
            self.prefix_embeds = nn.Parameter(bos.repeat(P, 1).clone())
        elif P > 0 and cfg.prefix_mode == "mlp":
            hidden = cfg.prefix_mlp_hidden
            self.prefix_mlp = nn.Sequential(nn.Linear(d_vec, hidden), nn.GELU(), nn.Linear(hidden, P * d_embed))
            with torch.no_grad():
                nn.init.xavier_uniform_(self.prefix_mlp[0].weight)
                nn.init.zeros_(self.prefix_mlp[0].bias)
                nn.init.zeros_(self.prefix_mlp[2].weight)
                self.prefix_mlp[2].bias.copy_(bos.repeat(P))
        self.layer_embed: nn.Embedding | None = None
        if cfg.use_layer_embed:
            self.layer_embed = nn.Embedding(num_layers + 1, d_embed)
            nn.init.zeros_(self.layer_embed.weight)
        self.num_layers = num_layers

    @property
    def prefix_length(self) -> int:
        return self.cfg.num_inject_slots + self.cfg.num_prefix_tokens

    def inject(self, v: torch.Tensor, layer: int | torch.Tensor | None = None) -> torch.Tensor:
        """Adapter output in float32, ``(B, M+P, d_embed)``, in the space of embedding-table rows."""
        v = v.float()
        if v.ndim == 1:
            v = v[None]
        if self.cfg.inject_norm == "center_embed":
            v = v - self.inject_mu
        if self.cfg.inject_norm in ("embed", "center_embed"):
            v = nn.functional.normalize(v, dim=-1) * self.embed_row_norm
        slots = torch.stack([self.proj(v)] + [lin(v) for lin in self.proj_extra], dim=1)
        if self.layer_embed is not None:
            ids = torch.as_tensor(self.cfg.extraction_layer if layer is None else layer, device=v.device)
            ids = ids.long().clamp(0, self.num_layers).expand(v.shape[0])
            slots = slots + self.layer_embed(ids)[:, None, :]
        parts = [slots]
        B = v.shape[0]
        if self.prefix_embeds is not None:
            parts.append(self.prefix_embeds[None].expand(B, -1, -1))
        elif self.prefix_mlp is not None:
            parts.append(self.prefix_mlp(v).view(B, self.cfg.num_prefix_tokens, self.d_embed))
        return torch.cat(parts, dim=1)

    @property
    def boundary_dtype(self) -> torch.dtype:
        """The dtype the reference casts the prefix to at the boundary: the config's ``backbone_dtype``
        (``float32``, ``float16``, else ``bfloat16``, as the reference reads an unknown name)."""
        return {"float32": torch.float32, "float16": torch.float16}.get(self.cfg.backbone_dtype, torch.bfloat16)

    def embeds(self, v: torch.Tensor, backbone: Backbone, layer: int | None = None) -> torch.Tensor:
        """The prefix as the backbone consumes it: rounded to :attr:`boundary_dtype`, then in the
        backbone's dtype, times its embedding scale.

        The reference casts its float32 adapter output to the config's ``backbone_dtype``. Where the
        backbone runs in another dtype (a bfloat16 card opened on a float32 CPU backbone, the project's
        CPU default) the prefix is rounded to that dtype first and then cast, so it holds the values the
        reference feeds its model; without the rounding greedy decodes of such cards differed (tested)."""
        x = self.inject(v.to(self.proj.weight.device), layer).to(self.boundary_dtype).to(backbone.dtype)
        scale = backbone.embed_scale
        return x * torch.tensor(scale, dtype=backbone.dtype, device=x.device) if scale != 1.0 else x

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items()}

    def save(self, folder: Path) -> None:
        """Write ``config.json`` + ``av.safetensors`` (adapter tensors only) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.cfg.to_json(folder / "config.json")
        save_tensors(folder / "av.safetensors", self.adapter_state(), metadata={"format": "pt", "kind": "nla-prefix-av"})


def build_prefix_av(cfg: NLAConfig, backbone: Backbone, mu: torch.Tensor | None = None) -> PrefixAV:
    """A freshly initialised AV for ``backbone`` (identity ``proj``, BOS-row prefix), float32, on its device.

    ``mu`` fills the ``inject_mu`` buffer of a ``center_embed`` AV (training); a loaded AV gets it
    from its weights file instead.
    """
    table = backbone.model.get_input_embeddings().weight
    bos = backbone.bos_id if backbone.bos_id is not None else 0
    av = PrefixAV(
        cfg,
        d_embed=backbone.hidden_size,
        bos_embedding=table[bos].detach(),
        num_layers=backbone.num_layers,
        embed_row_norm=float(table.detach().float().norm(dim=-1).mean()),
    )
    if mu is not None:
        if av.inject_mu is None:
            raise ValueError(f"inject_norm={cfg.inject_norm!r} takes no mu")
        with torch.no_grad():
            av.inject_mu.copy_(mu.reshape(-1).float())
    return av.to(backbone.device).float()


def load_adapter_weights(av: PrefixAV, path: Path) -> list[str]:
    """Load adapter tensors from ``path`` into ``av``; returns the keys loaded.

    Refuses a file that loads nothing (the reference card snippet silently loaded nothing), keys of
    the wrong shape, or keys that are neither adapter nor backbone tensors.
    """
    state = load_state_dict(path)
    own = av.state_dict()
    adapter = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    unknown = sorted(set(adapter) - set(own))
    if unknown:
        raise CheckpointError(f"{path}: tensors {unknown[:5]} do not belong to a prefix AV with this config")
    for k, t in adapter.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"{path}: {k} has shape {tuple(t.shape)}, the AV expects {tuple(own[k].shape)} "
                "(wrong backbone or config?)"
            )
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: {k} is not a finite float tensor")
    if "proj.weight" not in adapter:
        raise CheckpointError(f"{path}: no adapter tensor was loaded (no 'proj.weight'; keys: {sorted(state)[:6]})")
    missing = sorted(set(own) - set(adapter))
    if missing:
        raise CheckpointError(f"{path}: missing adapter tensors {missing}")
    av.load_state_dict({k: v.float() for k, v in adapter.items()}, strict=True)
    return sorted(adapter)


def find_weights(folder: Path) -> Path | None:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    return None
