"""Scores of a re-encoded vector ``h`` against the target activation ``v``.

Conventions (the one place they are defined; after ``srt/nla/metrics.py`` of https://github.com/space-bacon/SRT):

* ``fve_nrm(h, v) = ½ (1 + cos(h, v))`` in [0, 1], cosine computed in float32 over the last dim.
  This is *not* the "fve" of the reference training logs, which is the raw cosine.
* centered: ``fve_nrm(h − μ, v − μ)`` where μ is the mean of a pool of targets of the same
  backbone and layer, disjoint from the evaluated targets (the anisotropy correction).
* ρ = (s − floor) / (ceiling − floor) with floor and ceiling measured on the *same* backbone and
  layer (never the Qwen constants hard-coded in the reference).
"""

from __future__ import annotations

import torch


def cosine(h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Cosine over the last dim in float32; broadcasts like ``h * v``."""
    h = h.float()
    v = v.float()
    return torch.nn.functional.cosine_similarity(h, v, dim=-1, eps=1e-8)


def fve_nrm(h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """½(1 + cos(h, v)) over the last dim."""
    return 0.5 * (1.0 + cosine(h, v))


def fve_nrm_centered(h: torch.Tensor, v: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """½(1 + cos(h − μ, v − μ)) over the last dim."""
    mu = mu.float()
    return fve_nrm(h.float() - mu, v.float() - mu)


def anisotropy_mu(pool: torch.Tensor) -> torch.Tensor:
    """μ = mean of a pool of target vectors ``(N, d)``."""
    if pool.ndim != 2 or pool.shape[0] == 0:
        raise ValueError(f"μ needs a non-empty (N, d) pool, got shape {tuple(pool.shape)}")
    return pool.float().mean(0)


def rho(score: float, floor: float, ceiling: float) -> float:
    """ρ = (score − floor)/(ceiling − floor), with the floor and ceiling of the same backbone."""
    if ceiling == floor:
        raise ValueError("ρ is undefined when ceiling == floor")
    return (score - floor) / (ceiling - floor)


def pairwise_fve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fve_nrm between every row of ``a`` (N, d) and every row of ``b`` (M, d): (N, M)."""
    an = torch.nn.functional.normalize(a.float(), dim=-1)
    bn = torch.nn.functional.normalize(b.float(), dim=-1)
    return 0.5 * (1.0 + an @ bn.T)
