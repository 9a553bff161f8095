"""Goodness-of-fit statistics for the sampling tests (no scipy in the test dependencies)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["chi2_sf", "chi_square", "chi_square_uniform"]


def chi2_sf(stat: float, df: int) -> float:
    """P(X >= stat) for X ~ chi-square(df): the regularised upper incomplete gamma Q(df/2, stat/2),
    by its power series below a + 1 and Lentz's continued fraction above (Numerical Recipes 6.2)."""
    a, x = df / 2.0, stat / 2.0
    prefactor = math.exp(-x + a * math.log(x) - math.lgamma(a)) if x > 0 else 0.0
    if x < a + 1:
        term = total = 1.0 / a
        n = 0
        while abs(term) > abs(total) * 1e-16:
            n += 1
            term *= x / (a + n)
            total += term
        return 1.0 - prefactor * total
    tiny = 1e-300
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = b + an / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return prefactor * h


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, pooling tokens expected fewer than 5 times."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp_ = np.append(expected[~small], expected[small].sum())
    obs, exp_ = obs[exp_ > 0], exp_[exp_ > 0]
    return float(((obs - exp_) ** 2 / exp_).sum()), len(obs) - 1


def chi_square_uniform(samples: np.ndarray, bins: int) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom of `samples [N, k]` in [0, 1)^k against the
    uniform distribution on `bins`^k equal cells: k = 1 tests uniformity, k = 2 independence of
    the two coordinates as well."""
    samples = np.atleast_2d(np.asarray(samples).T).T
    cells = np.minimum((samples * bins).astype(np.int64), bins - 1)
    flat = np.ravel_multi_index(tuple(cells.T), (bins,) * samples.shape[1])
    counts = np.bincount(flat, minlength=bins ** samples.shape[1])
    return chi_square(counts, np.full(counts.shape, 1.0 / counts.size))
