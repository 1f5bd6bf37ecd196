"""Tests of equal proportions and false-discovery control, as the comparisons use them.

- :func:`proportion_test`: two-sided test that two groups have the same share of "qualified"
  images: Fisher's exact test when a cell of the 2x2 table expects fewer than
  :data:`FISHER_BELOW` counts, else the pooled two-proportion z-test (scipy.stats).
- :func:`benjamini_hochberg`: BH q-values (adjusted p-values), equal to
  ``scipy.stats.false_discovery_control(p, method="bh")``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# Fisher's exact test when the smallest expected count of the 2x2 table is below this (the usual rule).
FISHER_BELOW = 5.0


def expected_min(k1: int, n1: int, k2: int, n2: int) -> float:
    """The smallest expected cell count of the table ``[[k1, n1 - k1], [k2, n2 - k2]]`` under independence."""
    n = n1 + n2
    if n == 0:
        return 0.0
    cols = (k1 + k2, n - k1 - k2)
    return min(r * c / n for r in (n1, n2) for c in cols)


def z_test(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided p-value of the pooled two-proportion z-test (1.0 when the pooled share is 0 or 1)."""
    from scipy.stats import norm

    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    z = (k1 / n1 - k2 / n2) / se
    return float(min(1.0, 2 * norm.sf(abs(z))))


def fisher(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided p-value of Fisher's exact test on ``[[k1, n1 - k1], [k2, n2 - k2]]``."""
    from scipy.stats import fisher_exact

    return float(fisher_exact([[k1, n1 - k1], [k2, n2 - k2]], alternative="two-sided").pvalue)


def proportion_test(k1: int, n1: int, k2: int, n2: int) -> tuple[float, str]:
    """(two-sided p-value, test name) for ``k1/n1`` vs ``k2/n2``: ``fisher`` for small counts, else ``z``."""
    if min(n1, n2) < 1:
        raise ValueError("each group needs at least one image")
    if expected_min(k1, n1, k2, n2) < FISHER_BELOW:
        return fisher(k1, n1, k2, n2), "fisher"
    return z_test(k1, n1, k2, n2), "z"


def benjamini_hochberg(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values: ``q_(i) = min_{j >= i} m p_(j) / j``, capped at 1, in the input's order."""
    p = np.asarray(p, dtype=np.float64)
    m = p.size
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    ranked = p[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum.accumulate(ranked[::-1])[::-1]
    q = np.empty(m)
    q[order] = np.minimum(q_sorted, 1.0)
    return q


__all__ = ["FISHER_BELOW", "expected_min", "z_test", "fisher", "proportion_test", "benjamini_hochberg"]
