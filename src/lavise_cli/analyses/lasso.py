"""The lasso of class-relevant filters (Oramas et al., ICLR 2019, as its reproduction states it).

Per image the pooled response of every filter of a layer (``X``, standardised per filter), per
class a 0/1 label column; per class a lasso picks the few filters whose responses predict the
class: ``argmin_w ‖Xw − y‖²`` subject to ``‖w‖₁ ≤ μ`` (the constrained form).  The lasso path
(scikit-learn's :func:`sklearn.linear_model.lars_path`, method ``lasso``) gives the penalised
solutions ``(1/2n)‖y − Xw‖² + α‖w‖₁`` for every α exactly; it is piecewise linear in α, so the
constrained solution for a given μ is read off the path by interpolation between its knots (the
α where the path's L1 norm equals μ).  ``per_class=K`` instead takes each class's K largest
positive weights at the first knot that has K of them.  A class's *relevant filters* are its
positive weights (the filter's firing supports the class), ranked by weight; the union over
classes is the model's relevant set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import LaviseError


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Each column (filter) to mean 0, standard deviation 1 over the rows; a constant column is all 0."""
    x = x.double()
    sd = x.std(0, unbiased=False)
    return ((x - x.mean(0)) / torch.where(sd > 0, sd, torch.ones_like(sd))).float()


@dataclass
class Selection:
    """One class's lasso: the relevant filters (positive weights, ranked), the whole weight column,
    and where on the path it was read (α of the penalised form, ‖w‖₁ of the constrained form)."""

    filters: list[int]
    weights: list[float]
    coef: np.ndarray
    alpha: float
    l1: float


def _path(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.linear_model import lars_path

    alphas, _active, coefs = lars_path(x, y - y.mean(), method="lasso")
    return alphas, coefs  # alphas decreasing; coefs (d, knots)


def _positive(coef: np.ndarray, k: int | None = None) -> tuple[list[int], list[float]]:
    pos = np.flatnonzero(coef > 0)
    order = pos[np.argsort(-coef[pos], kind="stable")]
    if k is not None:
        order = order[:k]
    return [int(u) for u in order], [float(coef[u]) for u in order]


def lasso_select(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, *, sparsity: float | None = None,
                 per_class: int | None = None) -> Selection:
    """One class's relevant filters: ``x`` (N, d) standardised responses, ``y`` (N,) 0/1.

    ``sparsity`` μ: the constrained lasso ``‖w‖₁ ≤ μ`` (read exactly off the penalised path);
    ``per_class`` K: the K largest positive weights at the first knot of the path with K of them
    (all positive weights of the least-penalised solution when it never has K).
    """
    if (sparsity is None) == (per_class is None):
        raise ValueError("give exactly one of sparsity and per_class")
    xa = np.ascontiguousarray(np.asarray(x, dtype=np.float64))
    ya = np.asarray(y, dtype=np.float64).reshape(-1)
    alphas, coefs = _path(xa, ya)
    l1 = np.abs(coefs).sum(0)
    if sparsity is not None:
        if not math.isfinite(sparsity) or sparsity <= 0:
            raise LaviseError(f"--sparsity must be a number above 0, got {sparsity:g}")
        j = int(np.searchsorted(l1, sparsity, side="right"))  # knots 0..j-1 have l1 <= mu
        if j >= len(l1):
            coef, alpha = coefs[:, -1], float(alphas[-1])
        else:
            lo, hi = j - 1, j
            t = (sparsity - l1[lo]) / (l1[hi] - l1[lo]) if l1[hi] > l1[lo] else 0.0
            coef = coefs[:, lo] + t * (coefs[:, hi] - coefs[:, lo])
            alpha = float(alphas[lo] + t * (alphas[hi] - alphas[lo]))
        filters, weights = _positive(coef)
    else:
        assert per_class is not None
        if per_class < 1:
            raise LaviseError(f"--per-class must be at least 1, got {per_class}")
        npos = (coefs > 0).sum(0)
        hit = np.flatnonzero(npos >= per_class)
        j = int(hit[0]) if len(hit) else coefs.shape[1] - 1
        coef, alpha = coefs[:, j], float(alphas[j])
        filters, weights = _positive(coef, per_class)
    return Selection(filters=filters, weights=weights, coef=coef, alpha=alpha, l1=float(np.abs(coef).sum()))


__all__ = ["Selection", "standardise", "lasso_select"]
