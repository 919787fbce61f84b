"""Uncertainty of the reported numbers: bootstrap intervals, paired and permutation tests, Holm.

Every reported number gets its n and a 95% interval from a bootstrap over the unit that was
sampled, a *fact* (a fact's true and wrong statements, all its rows, are resampled together:
a cluster bootstrap), and every comparison a test. Methods compared on the same facts are
compared on the same resamples (:func:`bootstrap` evaluates all statistics of one call on each
resample) and tested by swapping their outputs within a fact (:func:`swap_test`, the
approximate randomization test). Families of tests are corrected with :func:`holm`. All of it
is seeded. docs/method.md ("Uncertainty") says how the reports use these.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

LEVEL = 0.95
N_BOOT = 2000
N_PERM = 5000


@dataclass(frozen=True)
class Interval:
    """A statistic on the data (``estimate``) and its percentile bootstrap interval at
    ``level``; ``n_boot`` resamples on which the statistic was defined (e.g. a precision is
    undefined on a resample where nothing is accepted). NaN where undefined on the data."""

    estimate: float
    low: float
    high: float
    n_boot: int
    level: float = LEVEL

    def format(self, fmt: str = "{:.2f}") -> str:
        """``0.75 [0.40, 1.00]``, or ``n/a``."""
        if not math.isfinite(self.estimate):
            return "n/a"
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return fmt.format(self.estimate)
        return f"{fmt.format(self.estimate)} [{fmt.format(self.low)}, {fmt.format(self.high)}]"


def cluster_rows(clusters: Sequence) -> list[np.ndarray]:
    """The row indices of each cluster, clusters in order of first appearance."""
    codes, uniques = pd.factorize(pd.Series(np.asarray(clusters, dtype=object)), sort=False)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(1, len(uniques)))
    return np.split(order, bounds) if len(uniques) else []


def resamples(clusters: Sequence, n_boot: int = N_BOOT, seed: int = 0):
    """Row indices of ``n_boot`` cluster-bootstrap resamples: each draws as many clusters as
    there are, with replacement, and takes all their rows."""
    groups = cluster_rows(clusters)
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        picked = rng.integers(0, len(groups), len(groups))
        yield np.concatenate([groups[k] for k in picked]) if groups else np.zeros(0, int)


Statistic = Callable[[np.ndarray], Mapping[str, float]]
"""Row indices (with repeats) -> named values; NaN where a value is undefined."""


def bootstrap(statistic: Statistic, clusters: Sequence, *, n_boot: int = N_BOOT,
              seed: int = 0, level: float = LEVEL) -> dict[str, Interval]:
    """Percentile intervals of every value ``statistic`` returns, all from the same
    resamples (so that differences of values computed here are paired)."""
    n = len(clusters)
    point = dict(statistic(np.arange(n)))
    draws: dict[str, list[float]] = {name: [] for name in point}
    for rows in resamples(clusters, n_boot, seed):
        values = statistic(rows)
        for name in point:
            draws[name].append(float(values[name]))
    out = {}
    tail = (1.0 - level) / 2.0
    for name, estimate in point.items():
        values = np.asarray(draws[name], dtype=float)
        values = values[np.isfinite(values)]
        if len(values) and math.isfinite(estimate):
            low, high = np.quantile(values, [tail, 1.0 - tail])
        else:
            low = high = math.nan
        out[name] = Interval(float(estimate), float(low), float(high), int(len(values)), level)
    return out


def pvalue(observed: float, null: np.ndarray) -> float:
    """Two-sided Monte Carlo p-value: (1 + #{|null| >= |observed|}) / (1 + #null), on the
    finite null values; NaN when the observed value is not finite."""
    null = np.asarray(null, dtype=float)
    null = null[np.isfinite(null)]
    if not math.isfinite(observed) or len(null) == 0:
        return math.nan
    extreme = np.abs(null) >= abs(observed) - 1e-12 * max(1.0, abs(observed))
    return float((1 + extreme.sum()) / (1 + len(null)))


def swap_test(metric: Callable[[np.ndarray, np.ndarray], float], a: np.ndarray,
              b: np.ndarray, clusters: Sequence, *, n_perm: int = N_PERM,
              seed: int = 0) -> tuple[float, float]:
    """Paired test of ``metric(a) - metric(b)`` for two methods' outputs on the same rows
    (approximate randomization): under the null the two methods are exchangeable within a
    cluster, so each permutation swaps the outputs of all rows of a random half of the
    clusters. ``metric(values, rows)`` gets a method's outputs and the row indices they belong
    to. Returns (observed difference, two-sided p-value)."""
    a, b = np.asarray(a), np.asarray(b)
    rows = np.arange(len(a))
    observed = metric(a, rows) - metric(b, rows)
    groups = cluster_rows(clusters)
    member = np.zeros(len(a), dtype=np.int64)
    for k, idx in enumerate(groups):
        member[idx] = k
    rng = np.random.default_rng(seed)
    null = np.empty(n_perm)
    for i in range(n_perm):
        swap = rng.random(len(groups)) < 0.5
        mask = swap[member]
        x, y = np.where(mask, b, a), np.where(mask, a, b)
        null[i] = metric(x, rows) - metric(y, rows)
    return float(observed), pvalue(observed, null)


def permutation_null(statistic: Callable[[np.random.Generator], float], *,
                     n_perm: int = N_PERM, seed: int = 0) -> np.ndarray:
    """``n_perm`` draws of ``statistic(rng)`` (the statistic recomputed on one random
    relabelling each time, e.g. facts shuffled across languages)."""
    rng = np.random.default_rng(seed)
    return np.asarray([statistic(rng) for _ in range(n_perm)], dtype=float)


def one_sided_pvalue(observed: float, null: np.ndarray, *, greater: bool = True) -> float:
    """(1 + #{null >= observed}) / (1 + #null) (or <= with ``greater=False``)."""
    null = np.asarray(null, dtype=float)
    null = null[np.isfinite(null)]
    if not math.isfinite(observed) or len(null) == 0:
        return math.nan
    hits = (null >= observed - 1e-12) if greater else (null <= observed + 1e-12)
    return float((1 + hits.sum()) / (1 + len(null)))


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error); NaN stays NaN and is not
    counted in the family."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    running = 0.0
    for k, idx in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[idx]))
        out[idx] = running
    return out


def jaccard(a, b) -> float:
    """|a ∩ b| / |a ∪ b| of two sets (1 for two empty sets)."""
    a, b = set(a), set(b)
    return 1.0 if not (a or b) else len(a & b) / len(a | b)


def proportion(values: np.ndarray) -> float:
    """Mean of a boolean array; NaN when empty."""
    values = np.asarray(values)
    return float(values.mean()) if len(values) else math.nan


def paired_sample_size(delta: float, discordance: float, *, alpha: float = 0.05,
                       power: float = 0.8) -> int:
    """Facts needed to detect a difference ``delta`` between two methods judged on the same
    facts (two-sided test at ``alpha`` with ``power``), when a share ``discordance`` of the
    facts is judged differently by the two (normal approximation of the paired difference of
    proportions: n = (z_{1-alpha/2} + z_{power})^2 (discordance - delta^2) / delta^2)."""
    from scipy.stats import norm

    if not 0 < abs(delta) <= discordance <= 1:
        raise ValueError("need 0 < |delta| <= discordance <= 1")
    z = norm.ppf(1 - alpha / 2) + norm.ppf(power)
    return int(math.ceil(z * z * (discordance - delta * delta) / (delta * delta)))
