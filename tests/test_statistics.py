"""The statistics behind every reported interval and test, on data with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kneurons import statistics as st


def test_clusters_keep_their_rows_together():
    groups = st.cluster_rows(["b", "a", "b", "c", "a"])
    assert [g.tolist() for g in groups] == [[0, 2], [1, 4], [3]]
    for rows in st.resamples(["b", "a", "b", "c", "a"], n_boot=20, seed=1):
        # every drawn cluster comes whole: 3 clusters drawn, rows of sizes 2, 2, 1
        assert len(rows) in {3, 4, 5, 6}
        assert set(rows.tolist()) <= {0, 1, 2, 3, 4}


def _mean(values):
    return lambda rows: {"mean": float(values[rows].mean())}


def test_bootstrap_interval_covers_a_known_proportion():
    """95 % intervals of a proportion cover the true value in about 95 % of data sets."""
    rng = np.random.default_rng(0)
    truth, covered = 0.3, 0
    reps = 200
    for rep in range(reps):
        values = (rng.random(80) < truth).astype(float)
        (iv,) = st.bootstrap(_mean(values), np.arange(80), n_boot=400, seed=rep).values()
        covered += iv.low <= truth <= iv.high
    assert 0.88 <= covered / reps <= 0.99


def test_cluster_bootstrap_covers_where_a_row_bootstrap_is_too_narrow():
    """Two identical rows per fact (a fact's statements move together): resampling rows
    under-covers, resampling facts does not."""
    rng = np.random.default_rng(1)
    truth, by_fact, by_row, reps = 0.5, 0, 0, 200
    for rep in range(reps):
        fact_values = (rng.random(30) < truth).astype(float)
        values = np.repeat(fact_values, 2)  # [60]: rows 2k, 2k+1 of fact k are equal
        facts = np.repeat(np.arange(30), 2)
        iv = st.bootstrap(_mean(values), facts, n_boot=300, seed=rep)["mean"]
        by_fact += iv.low <= truth <= iv.high
        ivr = st.bootstrap(_mean(values), np.arange(60), n_boot=300, seed=rep)["mean"]
        by_row += ivr.low <= truth <= ivr.high
    assert by_fact / reps >= 0.88
    assert by_row / reps < by_fact / reps - 0.05


def test_undefined_statistics_are_nan_and_counted():
    values = np.array([0.0, 0.0, 1.0])

    def precision(rows):  # undefined where nothing was accepted
        accepted = values[rows] > 0
        return {"p": 1.0 if accepted.any() else math.nan}

    iv = st.bootstrap(precision, np.arange(3), n_boot=200, seed=0)["p"]
    assert iv.estimate == 1.0 and 0 < iv.n_boot < 200  # some resamples draw no 1
    none = st.bootstrap(lambda rows: {"p": math.nan}, np.arange(3), n_boot=10)["p"]
    assert math.isnan(none.estimate) and none.format() == "n/a" and none.n_boot == 0
    assert st.Interval(0.75, 0.4, 1.0, 10).format() == "0.75 [0.40, 1.00]"


def _accuracy(labels):
    return lambda judged, rows: float((judged[rows] == labels[rows]).mean())


def test_swap_test_holds_its_level_without_an_effect_and_finds_one():
    rng = np.random.default_rng(2)
    rejected, reps = 0, 100
    for rep in range(reps):
        labels = rng.integers(0, 2, 60)
        a = np.where(rng.random(60) < 0.7, labels, 1 - labels)  # both 70 % accurate
        b = np.where(rng.random(60) < 0.7, labels, 1 - labels)
        _, p = st.swap_test(_accuracy(labels), a, b, np.arange(60), n_perm=300, seed=rep)
        rejected += p < 0.05
    assert rejected / reps <= 0.12  # nominal 5 %
    labels = rng.integers(0, 2, 200)
    good = np.where(rng.random(200) < 0.9, labels, 1 - labels)
    poor = np.where(rng.random(200) < 0.55, labels, 1 - labels)
    diff, p = st.swap_test(_accuracy(labels), good, poor, np.arange(200), n_perm=1000)
    assert diff > 0.2 and p < 0.01


def test_swap_test_swaps_whole_clusters():
    """A difference carried by one fact's two rows: swapping rows singly would halve it."""
    labels = np.array([1, 0, 1, 0])
    a = np.array([1, 0, 1, 0])
    b = np.array([0, 1, 1, 0])  # wrong on both rows of fact 0
    seen = set()
    metric = _accuracy(labels)
    # enumerate: with 2 clusters the null holds only differences -0.5, 0, +0.5
    _, p = st.swap_test(metric, a, b, [0, 0, 1, 1], n_perm=200, seed=0)
    rng = np.random.default_rng(0)
    for _ in range(50):
        swap = rng.random(2) < 0.5
        mask = np.repeat(swap, 2)
        x, y = np.where(mask, b, a), np.where(mask, a, b)
        seen.add(metric(x, np.arange(4)) - metric(y, np.arange(4)))
    assert seen <= {-0.5, 0.0, 0.5}
    assert p > 0.3  # 2 facts cannot show anything


def test_permutation_null_with_and_without_an_effect():
    """Overlap of paired sets against pairs shuffled at random (the LIKN null)."""
    rng = np.random.default_rng(3)

    def overlap(xs, ys):
        return float(np.mean([len(x & y) for x, y in zip(xs, ys)]))

    pool = range(200)
    en = [set(rng.choice(pool, 5, replace=False).tolist()) for _ in range(40)]
    related = [set(list(e)[:3]) | set(rng.choice(pool, 2).tolist()) for e in en]  # effect
    unrelated = [set(rng.choice(pool, 5, replace=False).tolist()) for _ in range(40)]
    for zh, effect in ((related, True), (unrelated, False)):
        observed = overlap(en, zh)
        null = st.permutation_null(lambda g: overlap(en, [zh[i] for i in g.permutation(40)]),
                                   n_perm=500, seed=4)
        p = st.one_sided_pvalue(observed, null)
        assert (p < 0.01) if effect else (p > 0.05)


def test_holm_adjusts_step_down():
    adjusted = st.holm([0.01, 0.04, 0.03, 0.005, math.nan])
    np.testing.assert_allclose(adjusted[:4], [0.03, 0.06, 0.06, 0.02])
    assert math.isnan(adjusted[4])
    assert st.holm([0.5, 0.9]).tolist() == [1.0, 1.0]


def test_pvalues_and_jaccard():
    assert st.pvalue(2.0, np.array([0.0, 1.0, -3.0, 2.0])) == pytest.approx(3 / 5)
    assert math.isnan(st.pvalue(math.nan, np.array([1.0])))
    assert st.one_sided_pvalue(1.0, np.array([0.0, 2.0]), greater=False) == pytest.approx(2 / 3)
    assert st.jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3) and st.jaccard([], []) == 1.0


def test_paired_sample_size_by_hand_and_by_simulation():
    # (1.96 + 0.8416)^2 (0.15 - 0.01) / 0.01 = 109.9 -> 110; with 28 % discordance 212
    assert st.paired_sample_size(0.1, 0.15) == 110
    assert st.paired_sample_size(0.1, 0.28) == 212
    with pytest.raises(ValueError):
        st.paired_sample_size(0.3, 0.2)
    # simulated: with that many facts the swap test finds the difference about 80 % of times
    rng = np.random.default_rng(5)
    n, found, reps = st.paired_sample_size(0.1, 0.2), 0, 150
    for rep in range(reps):
        # per fact u: [0, 0.15) a right b wrong, [0.15, 0.2) a wrong b right, [0.2, 1) both
        # right: discordance 0.2, a right on 95 %, b on 85 %, delta 0.1
        u = rng.random(n)
        a = (u < 0.15) | (u >= 0.2)
        b = u >= 0.15
        _, p = st.swap_test(lambda x, rows: float(x[rows].mean()), a.astype(float),
                            b.astype(float), np.arange(n), n_perm=200, seed=rep)
        found += p < 0.05
    assert 0.65 <= found / reps <= 0.95
