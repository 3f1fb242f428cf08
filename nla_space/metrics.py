"""Evaluation metrics shared by the harness: 1-in-n retrieval, mean-centred row cosine, bootstrap CIs.

Conventions (stated once here; the eval commands cite them):

* **1-in-n retrieval** (nla-at-home's ``scripts/av_policy.py --eval``, ``docs/references.md``): a query is *right* when the argmax of its scores
  over the n keys (the first index on ties, as ``torch.argmax``) is its own key.
* **Mean-centred row cosine** (nla-at-home's ``scripts/eval_roundtrip_phi4.py``, "mean-centred per-layer cosine"): P (reconstructions) and T
  (true activations), same rows; both centred by **their own** row means; the mean over rows of
  ``cos(Pc_i, Tc_i)``; float64.
* **Bootstrap** (nla-at-home's CI script is not published; this is our compatible reading of the
  B = 20k percentile CI its AR model card reports): B resamples of the n items with replacement, drawn from a ``torch.Generator`` seeded with
  ``seed`` (so a seed gives the same CI); the **same** resamples for every layer and every arm
  (paired); each statistic is recomputed on the resample (for the centred cosine the centring means
  too); the CI is the (2.5, 97.5) percentile pair (linear interpolation). A resample is represented
  by its count vector ``w`` (how often each item was drawn, ``Σw = n``), so the centred cosine of a
  resample is computed exactly from n×n Gram matrices without materialising (B, n, d) tensors.
* **Forced choice against a wrong activation** (nla-at-home's ``scripts/experiments/stress_test_nla.py``): ``correct_i = cos(P_i, T_i)``, ``wrong_i =
  cos(P_i, T_{(i+1) mod n})``; top-1 = the fraction with ``correct_i > wrong_i``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch


def retrieved(scores: torch.Tensor, own: int) -> bool:
    """1-in-n retrieval: ``argmax(scores)`` (first on ties) is ``own``."""
    return int(torch.argmax(scores)) == int(own)


def retrieved_rows(scores: torch.Tensor, own: int) -> list[bool]:
    """:func:`retrieved` for each row of ``scores`` (queries × keys)."""
    return [bool(x) for x in (scores.argmax(dim=1) == int(own)).tolist()]


def row_cosines(P: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """cos(P_i, T_i) per row, float64."""
    return torch.nn.functional.cosine_similarity(P.double(), T.double(), dim=-1, eps=1e-12)


def centered_row_cosine(P: torch.Tensor, T: torch.Tensor) -> float:
    """The reference's mean-centred per-layer cosine (own row means; module docstring)."""
    P, T = P.double(), T.double()
    return float(row_cosines(P - P.mean(0), T - T.mean(0)).mean())


def resample_counts(n: int, B: int, seed: int) -> torch.Tensor:
    """(B, n) float64 count vectors of B bootstrap resamples of n items (seeded, deterministic)."""
    if n < 1 or B < 1:
        raise ValueError(f"bootstrap needs n ≥ 1 and B ≥ 1, got n={n}, B={B}")
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, n, (B, n), generator=g)
    return torch.zeros(B, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(B, n, dtype=torch.float64))


def weighted_centered_cosine(P: torch.Tensor, T: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Mean-centred row cosine of each resample given by the count rows of ``W`` (B, n) → (B,).

    With ``p̄ = wP/n`` and ``t̄ = wT/n``: ``(P_i − p̄)·(T_i − t̄) = P_i·T_i − P_i·t̄ − p̄·T_i + p̄·t̄`` and
    ``‖P_i − p̄‖² = P_i·P_i − 2P_i·p̄ + p̄·p̄``, all from the Gram matrices; the statistic is
    ``Σ_i w_i cos_i / n`` (an item drawn twice counts twice). ``W = 1`` gives :func:`centered_row_cosine`.
    """
    P, T, W = P.double(), T.double(), W.double()
    n = P.shape[0]
    Gpt, Gpp, Gtt = P @ T.T, P @ P.T, T @ T.T
    WGpt, WGtp = W @ Gpt, W @ Gpt.T  # [b, i] = Σ_j w_j P_j·T_i ;  Σ_j w_j T_j·P_i
    WGpp, WGtt = W @ Gpp, W @ Gtt
    ptbar = (WGpt * W).sum(1) / n**2  # p̄·t̄
    ppbar = (WGpp * W).sum(1) / n**2
    ttbar = (WGtt * W).sum(1) / n**2
    num = torch.diagonal(Gpt)[None] - WGtp / n - WGpt / n + ptbar[:, None]
    np2 = (torch.diagonal(Gpp)[None] - 2 * WGpp / n + ppbar[:, None]).clamp_min(0)
    nt2 = (torch.diagonal(Gtt)[None] - 2 * WGtt / n + ttbar[:, None]).clamp_min(0)
    cos = num / (np2.sqrt() * nt2.sqrt()).clamp_min(1e-12)
    return (W * cos).sum(1) / n


def percentile_ci(samples: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of ``samples`` (linear interpolation)."""
    a = (1.0 - level) / 2.0
    q = torch.quantile(samples.double(), torch.tensor([a, 1.0 - a], dtype=torch.float64))
    return float(q[0]), float(q[1])


@dataclass
class BootstrapCI:
    """A statistic, its per-layer values and its bootstrap percentile CI."""

    mean: float
    ci95: tuple[float, float]
    per_layer: list[float]
    B: int
    seed: int
    n: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci95"] = list(self.ci95)
        return d


def _chunks(W: torch.Tensor, size: int):
    for i in range(0, W.shape[0], size):
        yield W[i : i + size]


def bootstrap_centered_cosine(Ps: Sequence[torch.Tensor], Ts: Sequence[torch.Tensor], B: int = 20_000, seed: int = 0,
                              chunk: int = 2000) -> BootstrapCI:
    """The layer mean of the mean-centred row cosine (one (P, T) pair per layer, the same n rows)
    with its paired bootstrap 95% CI (module docstring)."""
    n = Ps[0].shape[0]
    if any(P.shape[0] != n or T.shape[0] != n for P, T in zip(Ps, Ts)):
        raise ValueError("every layer needs the same n rows")
    per_layer = [centered_row_cosine(P, T) for P, T in zip(Ps, Ts)]
    W = resample_counts(n, B, seed)
    stats = torch.cat([sum(weighted_centered_cosine(P, T, w) for P, T in zip(Ps, Ts)) / len(Ps) for w in _chunks(W, chunk)])
    return BootstrapCI(mean=sum(per_layer) / len(per_layer), ci95=percentile_ci(stats), per_layer=per_layer, B=B, seed=int(seed), n=n)


def bootstrap_mean(values: Sequence[torch.Tensor], B: int = 20_000, seed: int = 0) -> BootstrapCI:
    """The layer mean of per-item values (one (n,) tensor per layer) with its paired bootstrap CI
    (the same resamples as :func:`bootstrap_centered_cosine` for the same n, B and seed)."""
    n = values[0].shape[0]
    per_layer = [float(v.double().mean()) for v in values]
    W = resample_counts(n, B, seed)
    stats = sum(W @ v.double() for v in values) / (n * len(values))
    return BootstrapCI(mean=sum(per_layer) / len(per_layer), ci95=percentile_ci(stats), per_layer=per_layer, B=B, seed=int(seed), n=n)


@dataclass
class ForcedChoice:
    """Correct vs wrong activation (module docstring); means over the n rows."""

    n_samples: int
    correct: float
    garbage: float
    delta: float
    top1: float


def forced_choice(P: torch.Tensor, T: torch.Tensor) -> ForcedChoice:
    """``correct_i = cos(P_i, T_i)`` vs ``garbage_i = cos(P_i, T_{(i+1) mod n})`` (needs n ≥ 2)."""
    n = P.shape[0]
    if n < 2:
        raise ValueError("the forced choice needs at least 2 rows")
    c = row_cosines(P, T)
    g = row_cosines(P, torch.roll(T.double(), shifts=-1, dims=0))
    return ForcedChoice(n_samples=n, correct=float(c.mean()), garbage=float(g.mean()), delta=float((c - g).mean()),
                        top1=float((c > g).double().mean()))
