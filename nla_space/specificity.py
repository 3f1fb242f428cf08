"""Specificity: how uniquely a verbalization's re-encode points back to ``v`` — the contrastive score
and the calibrated confidence that the hedge uses.

Why not the centered fve alone
    On short natural text the last-token state is dominated by the text's ending, so an unrelated
    text with the same ending re-encodes close to ``v`` and scores high on ``fve_nrm_centered``.
    A contrastive score asks instead whether the re-encode is closer to ``v`` than to *other*
    activations: text that matches any activation ending in "." equally well is not specific.

Definition (the one place it is stated)
    With μ the card's mean activation, ``ĥ = (h − μ)/‖h − μ‖``, ``v̂`` likewise, and a held-out pool
    ``P`` of M activations (never trained on; the card's ``pool.safetensors``), each centered and
    normalised the same way::

        c_v = ĥ · v̂          c_j = ĥ · p̂_j (j = 1 … M)
        z   = (c_v − mean_j c_j) / std_j c_j

    ``z`` is the specificity: how many pool standard deviations ``v`` stands above the pool when the
    verbalization is the query. It is what guided decoding steers by and what best-of-K selects by on
    a card that ships a pool.

Confidence
    ``confidence = σ(a·x + b)``: the probability that the verbalization is *retrieval-correct* — its
    re-encode ranks ``v`` first among ``v`` and 39 other held-out activations (1-in-40) — with
    ``a, b`` fitted by logistic regression on the card's calibration texts (:func:`fit_calibration`).
    The feature ``x`` is named by the calibration (:data:`FEATURES`):

    ``z``         the specificity above;
    ``margin40``  ``c_v − q_{1−1/40}(c_j)``: how far ``v`` stands above the pool's top 2.5 % (the
                  expected best of 39 distractors). It asks the calibrated question directly — does
                  ``v`` beat 39 others — where ``z`` measures distance from the pool's middle; on
                  user-style calibration texts it separated right from wrong answers better
                  (AUC 0.81 vs 0.75, docs/training_patch.md).

    The card's ``default_tau`` is the confidence threshold chosen on the calibration texts so that
    answers at or above it were retrieval-correct at a stated precision; the badge says so.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

POOL_KEY = "pool"
RETRIEVAL_N = 40  #: the n of the 1-in-n retrieval the confidence is calibrated for


def unit_centered(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """``(x − μ)/‖x − μ‖`` row-wise, float32."""
    c = x.float() - mu.float().to(x.device)
    return c / c.norm(dim=-1, keepdim=True).clamp_min(1e-8)


#: the features a calibration may use (module docstring); each maps (c_v, c_pool) to (n,)
FEATURES = ("z", "margin40")


def feature(name: str, c_v: torch.Tensor, c_p: torch.Tensor) -> torch.Tensor:
    """Feature ``name`` of each row: ``c_v`` (n,) the centered cosine to ``v``, ``c_p`` (n, M) to the pool."""
    if name == "z":
        return (c_v - c_p.mean(-1)) / c_p.std(-1).clamp_min(1e-6)
    if name == "margin40":
        return c_v - c_p.quantile(1.0 - 1.0 / RETRIEVAL_N, dim=-1)
    raise CheckpointError(f"unknown calibration feature {name!r}; known: {', '.join(FEATURES)}")


@dataclass
class Calibration:
    """``confidence = σ(a·x + b)`` for the feature ``x`` named ``feature``; ``tau`` and ``precision``
    describe the threshold chosen on the calibration texts."""

    a: float
    b: float
    tau: float
    precision: float  #: fraction of calibration answers with confidence ≥ tau that were retrieval-correct
    coverage: float  #: fraction of calibration answers with confidence ≥ tau
    n_val: int
    settings: dict[str, Any]
    feature: str = "z"  #: one of FEATURES

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "Calibration":
        fields = cls.__dataclass_fields__
        unknown = sorted(set(data) - set(fields))
        missing = sorted(k for k, f in fields.items() if k not in data and f.default is dataclasses.MISSING)
        if unknown or missing:
            raise CheckpointError(f"{where}: calibration keys: unknown {unknown}, missing {missing}")
        hints = {"a": float, "b": float, "tau": float, "precision": float, "coverage": float, "n_val": int, "settings": dict, "feature": str}
        for key, kind in hints.items():
            value = data.get(key, fields[key].default)
            ok = isinstance(value, kind) if kind is not float else isinstance(value, (int, float)) and math.isfinite(value)
            if isinstance(value, bool) or not ok:
                raise CheckpointError(f"{where}: calibration '{key}' must be {kind.__name__}, got {value!r}")
        cal = cls(**data)
        if cal.feature not in FEATURES:
            raise CheckpointError(f"{where}: calibration feature {cal.feature!r} is not one of {', '.join(FEATURES)}")
        return cal

    def to_dict(self) -> dict[str, Any]:
        """The card file's ``patch.calibration`` object (every field)."""
        return dataclasses.asdict(self)

    def confidence_of(self, x: torch.Tensor) -> torch.Tensor:
        """σ(a·x + b) of feature values ``x``."""
        return torch.sigmoid(self.a * x.float() + self.b)

    def meaning(self) -> str:
        texts = self.settings.get("calibration_texts", "val texts")
        return (f"confident = calibrated probability ≥ {self.tau:.2f} that the answer re-encodes closest to this activation "
                f"among {RETRIEVAL_N} (on the card's calibration set, {texts}, {self.precision:.0%} of such answers were, "
                f"{self.coverage:.0%} of answers were confident)")


@dataclass
class Specificity:
    """A card's contrastive scorer: μ, the unit-centered pool, and (optionally) its calibration."""

    mu: torch.Tensor  #: (d,)
    pool: torch.Tensor  #: (M, d), unit-centered
    calibration: Calibration | None = None

    @classmethod
    def from_pool(cls, vectors: torch.Tensor, mu: torch.Tensor, calibration: Calibration | None = None) -> "Specificity":
        if vectors.ndim != 2 or vectors.shape[0] < 8 or vectors.shape[1] != mu.numel():
            raise CheckpointError(f"a specificity pool needs (M ≥ 8, d={mu.numel()}) vectors, got {tuple(vectors.shape)}")
        return cls(mu=mu.float().reshape(-1), pool=unit_centered(vectors, mu), calibration=calibration)

    def cosines(self, h: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``c_v`` (n,) and ``c_p`` (n, M) of the definition, for rows of ``h`` (n, d) and ``v`` (d,) or (n, d)."""
        hu = unit_centered(h, self.mu)
        vu = unit_centered(v.reshape(-1, v.shape[-1]), self.mu).to(hu.device)
        return (hu * vu).sum(-1), hu @ self.pool.to(hu.device).T

    def z(self, h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Specificity of each row of ``h`` (n, d) for ``v`` (d,) or row-matched ``v`` (n, d): (n,)."""
        return feature("z", *self.cosines(h, v))

    def feature(self, name: str, h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Calibration feature ``name`` (:data:`FEATURES`) of each row of ``h`` for ``v``: (n,)."""
        return feature(name, *self.cosines(h, v))

    def confidence(self, h: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """The calibrated confidence of each row of ``h`` for ``v`` (None on an uncalibrated card)."""
        if self.calibration is None:
            return None
        return self.calibration.confidence_of(self.feature(self.calibration.feature, h, v))


def pool_key(layer: int) -> str:
    """The tensor name of layer ``layer``'s pool in a several-layer pool file (``pool.L13``)."""
    return f"{POOL_KEY}.L{layer}"


def load_pools(path: Path, layers: list[int]) -> dict[int, torch.Tensor]:
    """The pool of each of ``layers`` from one read of a pool file: its tensor :func:`pool_key` (a card
    reading several layers keeps one per layer), else the single tensor ``pool``."""
    from .hub import load_state_dict

    tensors = load_state_dict(path)
    out = {}
    for layer in layers:
        key = next((k for k in (pool_key(layer), POOL_KEY) if k in tensors), None)
        if key is None:
            raise CheckpointError(f"{path}: no '{pool_key(layer)}' or '{POOL_KEY}' tensor")
        out[layer] = tensors[key].float()
    return out


def load_pool(path: Path, layer: int | None = None) -> torch.Tensor:
    """The pool of ``layer`` (None: the file's single ``pool``) from a pool file, as :func:`load_pools` reads it."""
    if layer is not None:
        return load_pools(path, [layer])[layer]
    from .hub import load_state_dict

    tensors = load_state_dict(path)
    if POOL_KEY not in tensors:
        raise CheckpointError(f"{path}: no '{POOL_KEY}' tensor")
    return tensors[POOL_KEY].float()


# ---------------------------------------------------------------------------------- calibration


def retrieval_correct(h: torch.Tensor, v: torch.Tensor, mu: torch.Tensor, n: int = RETRIEVAL_N, draws: int = 20,
                      seed: int = 0, groups: list[str] | None = None) -> torch.Tensor:
    """For each row i, the fraction of ``draws`` random 1-in-``n`` sets (row i's ``v`` plus n−1 other
    rows' ``v``) in which ``h[i]`` ranks its own ``v`` first by centered cosine: (N,) in [0, 1].
    With N ≤ n rows, the single set of all rows is used. With ``groups`` (a label per row, e.g. the
    text's source), the n−1 others are drawn from row i's own group first (harder, like-for-like
    distractors), topped up from the other rows when the group is smaller."""
    hu, vu = unit_centered(h, mu), unit_centered(v, mu)
    sims = hu @ vu.T  # (N, N): row i = query h_i against every v
    N = sims.shape[0]
    own = sims.diag()
    if N <= n:
        return (own >= sims.max(dim=1).values).float()
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(N)
    for i in range(N):
        same = [j for j in range(N) if j != i and groups is not None and groups[j] == groups[i]]
        rest = [j for j in range(N) if j != i and j not in set(same)]
        hits = 0
        for _ in range(draws):
            pick = [same[j] for j in torch.randperm(len(same), generator=g)[: n - 1].tolist()]
            pick += [rest[j] for j in torch.randperm(len(rest), generator=g)[: n - 1 - len(pick)].tolist()]
            hits += int(own[i] > sims[i, torch.tensor(pick)].max())
        out[i] = hits / draws
    return out


#: The lowest τ a fit may choose: an answer whose own calibrated probability of being right is under
#: one half is never called confident, however right the answers above it are as a group (an AV that
#: is right on nearly every calibration text would otherwise get a τ near 0).
MIN_TAU = 0.5


def fit_calibration(z: torch.Tensor, correct: torch.Tensor, target_precision: float, settings: dict[str, Any],
                    min_coverage_rows: int = 5, feature: str = "z") -> Calibration:
    """Logistic fit of ``correct`` (probabilities in [0, 1]) on the feature values ``z`` (named
    ``feature``), then the smallest threshold on the fitted confidence, at least :data:`MIN_TAU`,
    whose val answers at or above it are correct at ≥ ``target_precision`` (at least
    ``min_coverage_rows`` of them). No such threshold: tau = 1 (never confident)."""
    z, y = z.float(), correct.float()
    m, sd = z.mean(), z.std().clamp_min(1e-6)  # fitted on the standardised feature: the L2 term is scale-free
    zs = (z - m) / sd
    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(w[0] * zs + w[1], y) + 1e-4 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    a = float(w[0].detach() / sd)
    b = float(w[1].detach() - w[0].detach() * m / sd)
    conf = torch.sigmoid(a * z + b)
    tau, prec, cov = 1.0, float("nan"), 0.0
    for t in sorted(set(round(float(c), 4) for c in conf) | {MIN_TAU}, reverse=True):
        if t < MIN_TAU:
            break
        sel = conf >= t
        if int(sel.sum()) < min_coverage_rows:
            continue
        p = float(y[sel].mean())
        if p >= target_precision:
            tau, prec, cov = t, p, float(sel.float().mean())
    if math.isnan(prec):
        prec = 0.0
    return Calibration(a=round(a, 5), b=round(b, 5), tau=round(tau, 4), precision=round(prec, 4), coverage=round(cov, 4),
                       n_val=int(z.numel()), settings=dict(settings), feature=feature)
