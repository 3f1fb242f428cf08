"""What ``policy-eval`` and ``roundtrip`` (and any eval of any card kind on a targets folder) share: any card kind (prefix/SRT or injection) on a targets
folder, at one or more layers.

Conventions (stated once here; the two commands cite them):

* **Card interface.** Only :class:`nla_space.verbalizers.base.OpenedCard`'s, which every kind has:
  ``read``, ``rollout``, ``candidate_texts``, ``reconstruct``, ``reconstruct_texts``, ``score_target``,
  ``scorer_space``, ``scorer_name``, ``top_p``, ``check_layer``, ``depth_pct``. For a prefix card the
  "AR" is the backbone self-re-encode (the round-trip convention), for a patch card the candidates read
  like typed texts, for an injection card the card's reconstructor.
* **Targets** are the first rows of the held-out ``test`` split, in row order; μ comes from the first
  ``pool_size`` rows of the ``mu_pool`` split (disjoint by construction), as in
  :mod:`eval_harness.evals.common`.
* **Activations.** A prefix card at the targets' own layer uses the stored vectors (they were read by
  the same :func:`nla_space.activations.extract`); every other case re-extracts them from the
  targets' **texts** with the card's own ``extract`` (an injection card reads the chat-wrapped text
  from its base model, which is not what the targets folder stored). ``meta.activation_source``
  says which.
* **Seeds.** The rollouts of target row ``i`` use :func:`eval_harness.evals.common.target_seed` (seed, i),
  so a resumed or ``--limit``-ed run gives the same per-target numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from nla_space.backbone import CPU_DTYPES
from nla_space.errors import NLAInputError
from nla_space.runtime import OpenedCard, open_card
from nla_space.scoring import anisotropy_mu

from ..data.dataset import TargetSet, load_target_set
from ..settings import DTYPE_HELP, setting
from .common import check_positive, pool_rows, require_card_kind
from ..distributed import rank_device

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class CardTargetsConfig:
    """Options of the evals on :func:`open_card_targets` (each adds its own ``n``)."""

    card: str = setting(help="card id, alias, local release folder, or card JSON file")
    backbone: str | None = setting(None, "override the card's backbone (hub id, folder, embedded:NAME)")
    targets: Path = setting(help="targets folder (eval_harness targets)")
    layer: tuple[int, ...] | None = setting(None, "layer(s) ℓ to evaluate, repeatable (default: the card's default layer)", extend=True)
    pool_size: int = setting(2000, "μ: first N rows of the mu_pool split (default 2000)")
    out: Path = setting(help="results JSON")
    max_new_tokens: int = setting(64)
    seed: int = setting(0)
    limit: int | None = setting(None, "evaluate at most this many targets (smoke runs; recorded in meta)")
    resume: bool = setting(False, "continue an interrupted run from <out>.partial.jsonl")
    device: str | None = setting(None)
    dtype: str | None = setting(None, DTYPE_HELP, choices=CPU_DTYPES)


@dataclass
class CardTargets:
    """An opened card (any kind), its target set, the layers, the targets and the μ pool rows."""

    oc: OpenedCard
    ts: TargetSet
    layers: list[int]
    targets: list[int]
    pool: list[int]
    _acts: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)
    _mus: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> str:
        return self.oc.card.kind

    def stored(self, layer: int) -> bool:
        """Whether the targets folder's vectors are this card's activations at ``layer``."""
        return self.kind == "prefix" and layer == self.ts.layer

    def activation(self, row: int, layer: int) -> torch.Tensor:
        """v of target row ``row`` at ``layer`` (float32 CPU, cached; see the module docstring)."""
        key = (row, layer)
        if key not in self._acts:
            if self.stored(layer):
                self._acts[key] = self.ts.vectors[row].float()
            else:
                self._acts[key] = self.oc.read(self.ts.texts[row], layer).float().cpu()
        return self._acts[key]

    def activations(self, rows: list[int], layer: int) -> torch.Tensor:
        return torch.stack([self.activation(r, layer) for r in rows])

    def mu(self, layer: int) -> torch.Tensor:
        """μ at ``layer``: the mean of the pool rows' activations."""
        if layer not in self._mus:
            self._mus[layer] = anisotropy_mu(self.activations(self.pool, layer))
        return self._mus[layer]

    def depth_key(self, layer: int) -> str:
        """Per-layer key in the reference's form ``L{ℓ}({pct}%)``: the card's prompt depth for a
        depth-conditioned injection card, else ``round(100·ℓ/n_layers)``."""
        pct = self.oc.depth_pct(layer)
        if pct is None:
            pct = round(100 * layer / self.oc.backbone.num_layers)
        return f"L{layer}({pct}%)"

    def meta_fields(self, args: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        from ..results import device_info, precision_info

        card, bb = self.oc.card, self.oc.backbone
        return {
            "card": card.id, "card_title": card.title, "card_kind": card.kind, "trained": self.oc.trained,
            "scorer": self.oc.scorer_name, "scorer_space": self.oc.scorer_space,
            "backbone": bb.spec, "backbone_revision": bb.revision, "backbone_source": bb.source_path,
            "layers": self.layers, "M": len(self.targets), "seed": args.seed, "top_p": self.oc.top_p,
            "max_new_tokens": args.max_new_tokens, "limit": args.limit,
            "targets": str(self.ts.folder), "targets_split": "test",
            "targets_rows": [self.targets[0], self.targets[-1]] if self.targets else None,
            "targets_meta": {k: self.ts.meta.get(k) for k in ("backbone", "backbone_revision", "layer", "seed", "n", "split_counts")},
            "activation_source": {str(L): ("targets folder vectors" if self.stored(L) else "re-extracted from the targets' texts with the card's extract")
                                  for L in self.layers},
            "pool_size": len(self.pool),
            "mu_source": f"mean of the first {len(self.pool)} rows of the targets' mu_pool split (disjoint from the test split)",
            "device": device_info(bb.device),
            "precision": precision_info(bb),
            **(extra or {}),
        }

    def fingerprint(self, command: str, args: Any, extra: dict[str, Any]) -> dict[str, Any]:
        return {"command": command, "card": self.oc.card.id, "backbone": self.oc.backbone.spec, "layers": self.layers,
                "targets": str(Path(self.ts.folder).resolve()), "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                "pool_size": len(self.pool), **extra}


def open_card_targets(args: Any, n_targets: int | None, supported: Sequence[str], command: str) -> CardTargets:
    """Validate the shared arguments, the output location and the card's kind (``supported``: the
    eval's ``supported_kinds``), then open the card and the targets, pick layers, targets and pool.

    ``n_targets``: the first that many test rows (None: all of them); ``--limit`` caps it further."""
    check_positive("--pool-size", args.pool_size, 2)
    check_positive("--limit", args.limit)
    check_positive("--max-new-tokens", args.max_new_tokens)
    from nla_space.io import check_writable

    check_writable(Path(args.out).parent, "results JSON")  # before any work: a full or read-only disk fails now
    require_card_kind(args.card, supported, command)
    ts = load_target_set(args.targets)
    oc = open_card(args.card, backbone=args.backbone, device=rank_device(args.device), dtype=args.dtype)
    layers = [oc.check_layer(L) for L in (args.layer or [None])]
    if len(set(layers)) != len(layers):
        raise NLAInputError(f"--layer lists a layer twice: {layers}")
    rows = ts.indices("test")
    if not rows:
        raise NLAInputError(f"{ts.folder}: the test split is empty; nothing to evaluate")
    n = len(rows) if n_targets is None else n_targets
    n = min(n, args.limit) if args.limit is not None else n
    if len(rows) < n:
        log.warning("%s: asked for %d targets, the test split has %d", ts.folder, n, len(rows))
    ct = CardTargets(oc=oc, ts=ts, layers=layers, targets=rows[:n], pool=pool_rows(ts, args.pool_size))
    for L in layers:
        if ct.stored(L) and ts.vectors.shape[1] != oc.backbone.hidden_size:
            raise NLAInputError(f"{ts.folder}: vectors have d={ts.vectors.shape[1]}, the backbone has d={oc.backbone.hidden_size}")
        if ct.stored(L) and ts.meta.get("backbone") and ts.meta["backbone"] != oc.backbone.spec:
            log.warning("targets were built with backbone %r, evaluating on %r", ts.meta["backbone"], oc.backbone.spec)
    if not oc.trained:
        log.warning("card %s has no trained AV weights: these numbers measure an untrained AV", oc.card.id)
    return ct
