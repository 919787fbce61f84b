"""Language-independent knowledge neurons: set logic and statistics on hand-made neuron sets,
the erase and edit operations against direct forwards on tiny models, and the experiment's
metrics on hand-counted cases."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

from kneurons.hooks import ffn_hooks
from kneurons.scoring import erased_token_probs
from kneurons.likn import (
    ANY_LANGUAGE, EDIT_COLUMNS, NULLS, STATISTICS, STATS_COLUMNS, TEST_COLUMNS, coded_sets,
    cross_lingual_editing, dai_edit_delta, edit_neuron_sets, edit_summary, edit_tests,
    edit_value_slots, find_likn, language_groups, language_independent_neurons,
    likn_statistics, likn_table, locality_facts, object_embedding, one_language_neurons,
    other_fact_likn, pairing_overlap, sample_edit_facts, score_queries, share_of_kn,
    within_groups_permutation)
from kneurons.neurons import random_neurons_like
from kneurons.queries import encode_query

# ---- set logic ---------------------------------------------------------------------------


def test_likn_is_the_intersection_in_the_first_languages_order():
    en = [(1, 5), (0, 2), (2, 7), (0, 9)]
    zh = [(0, 9), (3, 3), (1, 5)]
    assert language_independent_neurons([en, zh]) == [(1, 5), (0, 9)]
    assert language_independent_neurons([zh, en]) == [(0, 9), (1, 5)]
    assert language_independent_neurons([en, zh, [(0, 9)]]) == [(0, 9)]
    assert language_independent_neurons([en, []]) == []
    assert language_independent_neurons([[(0, 1), (0, 1)], [(0, 1)]]) == [(0, 1)]
    assert language_independent_neurons([]) == []


def test_language_groups_are_every_pair_then_all():
    assert language_groups(["en", "zh"]) == [("en", "zh")]
    assert language_groups(["en", "fr", "zh"]) == [("en", "fr"), ("en", "zh"), ("fr", "zh"),
                                                    ("en", "fr", "zh")]
    assert language_groups(["en"]) == []


def test_within_groups_permutation_is_a_uniform_permutation_within_each_group():
    groups = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2])
    rng = np.random.default_rng(3)
    draws = [within_groups_permutation(groups, rng) for _ in range(3000)]
    for partner in draws[:50]:
        assert sorted(partner) == list(range(9))  # a permutation
        assert (groups[partner] == groups).all()  # within the group
    assert (np.array([p[8] for p in draws]) == 8).all()  # a group of one stays in place
    # uniform: each of the 5 facts of group 0 is fact 0's partner 1/5 of the time, and fact 0
    # keeps its own (a uniform permutation, not a derangement) as often as any other
    counts = np.bincount([p[0] for p in draws], minlength=5)[:5] / len(draws)
    assert np.allclose(counts, 0.2, atol=0.03)
    again = np.random.default_rng(3)
    assert all((within_groups_permutation(groups, again) == d).all() for d in draws[:5])


def test_share_of_kn():
    assert share_of_kn(2, [4, 8]) == pytest.approx((0.5 + 0.25) / 2)
    assert share_of_kn(0, [0, 3]) == 0.0
    assert math.isnan(share_of_kn(0, [0, 0]))


KN = {
    "en": {"a": [(0, 1), (0, 2), (1, 3)], "b": [(1, 9), (1, 5)], "c": [(0, 7)]},
    "zh": {"a": [(1, 3), (0, 2), (1, 9)], "b": [(0, 0)], "d": [(0, 7)]},
}
RELATIONS = {"a": "P1", "b": "P1", "c": "P2", "d": "P2"}


def test_likn_table_on_hand_made_sets():
    table = likn_table(KN, RELATIONS)
    facts = table.set_index("uuid")
    assert sorted(facts.index) == ["a", "b"]  # c and d are in one language only
    assert set(table["languages"]) == {"en+zh"}
    assert list(zip(facts.at["a", "likn_layers"], facts.at["a", "likn_neurons"])) == [(0, 2), (1, 3)]
    assert facts.at["a", "n_likn"] == 2 and facts.at["b", "n_likn"] == 0
    assert list(facts.at["a", "n_kn"]) == [3, 3] and list(facts.at["b", "n_kn"]) == [2, 1]
    assert facts.at["a", "share_of_kn"] == pytest.approx(2 / 3)
    assert facts.at["b", "share_of_kn"] == 0.0


def test_pairing_overlap_hand_counted():
    """The identity pairing is the table's LIKN; a swap pairs en(a) with zh(b) and en(b) with
    zh(a) (the pairs the old one-draw controls gave)."""
    table = likn_table(KN, RELATIONS)
    sets = coded_sets([KN["en"], KN["zh"]], ["a", "b"], RELATIONS)
    n_likn, n_kn, layers = pairing_overlap(sets, [np.array([0, 1])])
    assert list(n_likn) == list(table["n_likn"]) == [2, 0]
    assert n_kn.tolist() == [[3, 2], [3, 1]]
    assert list(layers) == [1, 1]  # (0, 2) and (1, 3)
    n_likn, n_kn, layers = pairing_overlap(sets, [np.array([1, 0])])
    assert list(n_likn) == [0, 1]  # en(a) ∩ zh(b) = {}, en(b) ∩ zh(a) = {(1, 9)}
    assert n_kn.tolist() == [[3, 2], [1, 3]]
    assert list(layers) == [0, 1]
    # a third language: each language's partner permutation applies to its own sets
    three = coded_sets([KN["en"], KN["zh"], {"a": [(0, 2), (1, 9)], "b": [(1, 9)]}],
                       ["a", "b"], RELATIONS)
    identity, swap = np.array([0, 1]), np.array([1, 0])
    assert list(pairing_overlap(three, [identity, identity])[0]) == [1, 0]  # (0, 2)
    assert list(pairing_overlap(three, [swap, swap])[0]) == [0, 1]  # (1, 9)
    assert list(pairing_overlap(three, [identity, swap])[0]) == [0, 0]


def _stat(stats, statistic, relation="all"):
    return stats[(stats["statistic"] == statistic) & (stats["relation"] == relation)].iloc[0]


def test_likn_statistics_and_nulls_hand_counted():
    """Two facts: the null draws the identity (mean |LIKN| 1) or the swap (0.5), each half
    of the time; both have one fact of two with a LIKN."""
    table = likn_table(KN, RELATIONS)
    stats, layers, null = likn_statistics(table, seed=0, n_perm=2000, n_boot=500)
    assert list(stats.columns) == STATS_COLUMNS
    assert list(stats["relation"].drop_duplicates()) == ["all", "P1"]
    share = _stat(stats, "share_with_likn")
    assert (share.n_facts, share.estimate, share.n_not_converged) == (2, 0.5, 0)
    assert (share.low, share.high) == (0.0, 1.0)  # resamples of {a, b}
    for null_name in NULLS:  # every pairing has one fact of two with a LIKN
        assert share[f"{null_name}_mean"] == 0.5 and share[f"{null_name}_p"] == 1.0
    mean = _stat(stats, "mean_likn")
    assert mean.estimate == 1.0
    for null_name in NULLS:  # P(null >= 1) = 1/2
        assert mean[f"{null_name}_mean"] == pytest.approx(0.75, abs=0.03)
        assert (mean[f"{null_name}_low"], mean[f"{null_name}_high"]) == (0.5, 1.0)
        assert mean[f"{null_name}_p"] == pytest.approx(0.5, abs=0.04)
    assert _stat(stats, "likn_share_of_kn").estimate == pytest.approx((2 / 3 + 0) / 2)
    kn = _stat(stats, "mean_kn")
    assert kn.estimate == pytest.approx((3 + 3 + 2 + 1) / 4)
    assert math.isnan(kn.shuffled_p) and math.isnan(kn.within_relation_mean)  # not tested
    assert _stat(stats, "mean_likn", "P1").estimate == 1.0  # the relation has both facts
    # layers: the identity has one LIKN neuron in layer 0 and one in 1, the swap one in 1
    by_layer = layers.set_index("layer")
    assert list(by_layer["n_likn"]) == [1, 1] and list(by_layer["n_facts"]) == [2, 2]
    # resampling {a, b}: a (one neuron in each layer) drawn 0, 1 or 2 times
    assert (by_layer.at[0, "low"], by_layer.at[0, "high"]) == (0.0, 2.0)
    assert by_layer.at[0, "shuffled_mean"] == pytest.approx(0.5, abs=0.04)
    assert by_layer.at[1, "shuffled_mean"] == 1.0
    assert set(null["null"]) == set(NULLS) and len(null) == 2 * 2000
    assert set(null["mean_likn"]) == {0.5, 1.0}
    again = likn_statistics(table, seed=0, n_perm=2000, n_boot=500)
    pd.testing.assert_frame_equal(again.stats, stats)  # seeded
    other = likn_statistics(table, seed=1, n_perm=2000, n_boot=500).stats
    assert not other["shuffled_p"].equals(stats["shuffled_p"])


def synthetic_kn(n_facts: int, n_relations: int, *, core: int, own: int, pool: int,
                 relation_pools: bool, seed: int):
    """KN sets in en and zh of ``n_facts`` facts: ``core`` neurons of the fact in both
    languages (the effect), plus ``own`` neurons drawn independently per language from a pool
    of ``pool`` neurons (the relation's own pool when ``relation_pools``: neurons that a
    relation's facts share, as object-type neurons do)."""
    rng = np.random.default_rng(seed)
    kn, relations = {"en": {}, "zh": {}}, {}
    for i in range(n_facts):
        uuid, relation = f"u{i:03d}", i % n_relations
        relations[uuid] = f"P{relation}"
        layer = relation if relation_pools else 0
        shared = [(50 + i, j) for j in range(core)]  # this fact's own neurons
        for lang in kn:
            drawn = [(layer, int(j)) for j in rng.choice(pool, own, replace=False)]
            kn[lang][uuid] = shared + drawn
    return kn, relations


def test_a_shared_core_is_far_above_both_nulls():
    kn, relations = synthetic_kn(40, 4, core=2, own=4, pool=30, relation_pools=True, seed=0)
    stats = likn_statistics(likn_table(kn, relations), seed=0, n_perm=500, n_boot=300).stats
    for statistic in ("share_with_likn", "mean_likn", "likn_share_of_kn"):
        row = _stat(stats, statistic)
        for null_name in NULLS:
            assert row[f"{null_name}_p"] < 0.01, (statistic, null_name)
            assert row["low"] > row[f"{null_name}_high"]
    mean = _stat(stats, "mean_likn")
    assert mean.low <= mean.estimate <= mean.high and mean.n_boot == 300
    assert mean.estimate >= 2  # the core
    # per relation (10 facts each) the effect is found within the relation too
    assert (stats.loc[stats["relation"] != "all", "within_relation_p"].dropna() < 0.05).all()


def test_independent_draws_from_relation_pools_pass_only_the_easy_null():
    """No fact-specific sharing, but a relation's facts share a pool: against facts of any
    relation the overlap looks significant, against the relation's own facts it does not."""
    kn, relations = synthetic_kn(60, 4, core=0, own=5, pool=20, relation_pools=True, seed=1)
    stats = likn_statistics(likn_table(kn, relations), seed=0, n_perm=1000, n_boot=300).stats
    row = _stat(stats, "mean_likn")
    assert row.shuffled_p < 0.01
    assert row.within_relation_p > 0.05
    # the harder null's mean sits at the observed value, inside its interval
    assert row.low <= row.within_relation_mean <= row.high
    assert row.within_relation_mean == pytest.approx(row.estimate, rel=0.25)


def test_independent_draws_from_one_pool_pass_no_null():
    kn, relations = synthetic_kn(60, 4, core=0, own=5, pool=40, relation_pools=False, seed=3)
    stats = likn_statistics(likn_table(kn, relations), seed=0, n_perm=1000, n_boot=300).stats
    for statistic in ("share_with_likn", "mean_likn", "likn_share_of_kn"):
        row = _stat(stats, statistic)
        for null_name in NULLS:
            assert row[f"{null_name}_p"] > 0.05, (statistic, null_name)
            assert row.low <= row[f"{null_name}_mean"] <= row.high


def test_the_overlap_test_holds_its_level_without_an_effect():
    """Under the null (independent draws) p <= 0.1 in about 10% of the data sets, not more."""
    rejected = []
    for seed in range(60):
        kn, relations = synthetic_kn(20, 2, core=0, own=4, pool=25, relation_pools=True,
                                     seed=100 + seed)
        stats = likn_statistics(likn_table(kn, relations), seed=seed, n_perm=200,
                                n_boot=10).stats
        rejected.append(_stat(stats, "mean_likn").within_relation_p <= 0.1)
    assert np.mean(rejected) <= 0.2
    kn, relations = synthetic_kn(20, 2, core=1, own=4, pool=25, relation_pools=True, seed=7)
    stats = likn_statistics(likn_table(kn, relations), seed=0, n_perm=200, n_boot=10).stats
    assert _stat(stats, "mean_likn").within_relation_p <= 0.01  # one shared neuron is found


def _records(rows):
    return pd.DataFrame([dict(uuid=u, relation=r, candidate=c, top_layers=ls, top_neurons=ns,
                              top_scores=ss, **extra) for u, r, c, ls, ns, ss, *more in rows
                         for extra in [more[0] if more else {}]])


def test_find_likn_reads_true_records_through_the_kn_rule():
    en = _records([("a", "P1", "true", [0, 1, 1], [4, 5, 6], [1.0, 0.5, 0.1]),
                   ("a", "P1", "wrong", [0], [4], [1.0]),
                   ("b", "P2", "true", [1], [2], [0.3])])
    zh = _records([("a", "P1", "true", [1, 0], [5, 4], [0.9, 0.25]),
                   ("b", "P2", "true", [1], [3], [0.3])])
    table, (stats, _, _) = find_likn({"en": en, "zh": zh}, kn_threshold=0.2, max_kn=20,
                                     seed=0, n_perm=50, n_boot=50)
    facts = table.set_index("uuid")
    # en KN of a: scores > 0.2 x 1.0 -> (0, 4), (1, 5); zh: > 0.2 x 0.9 -> (1, 5), (0, 4)
    assert list(zip(facts.at["a", "likn_layers"], facts.at["a", "likn_neurons"])) == [(0, 4), (1, 5)]
    assert facts.at["b", "n_likn"] == 0
    assert _stat(stats, "share_with_likn").estimate == 0.5  # 1 of 2 facts
    table, _ = find_likn({"en": en, "zh": zh}, kn_threshold=0.2, max_kn=1, seed=0, n_perm=5,
                         n_boot=5)
    # max_kn = 1: en (0, 4) and zh (1, 5) no longer overlap
    assert table.set_index("uuid").at["a", "n_likn"] == 0
    # τ per language: en 0.6 keeps only (0, 4); zh 0.2 keeps (1, 5) and (0, 4)
    table, _ = find_likn({"en": en, "zh": zh}, kn_threshold={"en": 0.6, "zh": 0.2},
                         max_kn=20, seed=0, n_perm=5, n_boot=5)
    facts = table.set_index("uuid")
    assert list(zip(facts.at["a", "likn_layers"], facts.at["a", "likn_neurons"])) == [(0, 4)]
    bad = zh.assign(relation=["P9", "P2"])
    with pytest.raises(ValueError, match="different relations"):
        find_likn({"en": en, "zh": bad}, 0.2, 20, 0)


def test_find_likn_keeps_converged_records_only_and_counts_the_rest():
    en = _records([("a", "P1", "true", [0], [4], [1.0], {"converged": True}),
                   ("b", "P1", "true", [0], [5], [1.0], {"converged": False}),
                   ("c", "P2", "true", [0], [6], [1.0], {"converged": True}),
                   ("d", "P2", "true", [0], [7], [1.0], {"converged": True})])
    zh = _records([("a", "P1", "true", [0], [4], [1.0], {"converged": True}),
                   ("b", "P1", "true", [0], [5], [1.0], {"converged": True}),
                   ("c", "P2", "true", [0], [6], [1.0], {"converged": None}),
                   ("d", "P2", "true", [0], [7], [1.0], {"converged": True}),
                   ("e", "P2", "true", [0], [8], [1.0], {"converged": False})])
    table, (stats, _, _) = find_likn({"en": en, "zh": zh}, 0.2, 20, seed=0, n_perm=20,
                                     n_boot=20)
    # b (en) and c (zh, unknown counts as not converged) are left out; e is in zh only
    assert sorted(table["uuid"]) == ["a", "d"]
    share = _stat(stats, "share_with_likn")
    assert (share.n_facts, share.n_not_converged, share.estimate) == (2, 2, 1.0)
    assert _stat(stats, "share_with_likn", "P1").n_not_converged == 1
    assert _stat(stats, "share_with_likn", "P2").n_not_converged == 1
    # without the column every record counts as converged
    table, (stats, _, _) = find_likn({"en": en.drop(columns="converged"),
                                      "zh": zh.drop(columns="converged")}, 0.2, 20, seed=0,
                                     n_perm=20, n_boot=20)
    assert sorted(table["uuid"]) == ["a", "b", "c", "d"]
    assert (stats["n_not_converged"] == 0).all()


def test_a_relation_whose_facts_all_failed_is_counted_with_no_facts():
    en = _records([("a", "P1", "true", [0], [4], [1.0], {"converged": True}),
                   ("b", "P2", "true", [0], [5], [1.0], {"converged": False})])
    zh = _records([("a", "P1", "true", [0], [4], [1.0], {"converged": True}),
                   ("b", "P2", "true", [0], [5], [1.0], {"converged": True})])
    _, (stats, _, _) = find_likn({"en": en, "zh": zh}, 0.2, 20, seed=0, n_perm=20, n_boot=20)
    row = _stat(stats, "mean_likn", "P2")
    assert (row.n_facts, row.n_not_converged) == (0, 1)
    assert math.isnan(row.estimate) and math.isnan(row.shuffled_p)
    empty = likn_statistics(likn_table({"en": {}, "zh": {}}, {}), seed=0, n_perm=5, n_boot=5)
    assert empty.stats.empty and empty.layers.empty and empty.null.empty


# ---- neuron sets, sample, summary ----------------------------------------------------------


def test_one_language_neurons_and_equal_size_sets():
    kn = {"en": [(0, 1), (1, 2), (0, 3), (1, 4)], "zh": [(1, 2), (0, 5), (0, 1)]}
    assert one_language_neurons(kn, "en") == [(0, 3), (1, 4)]
    assert one_language_neurons(kn, "zh") == [(0, 5)]
    assert edit_neuron_sets(kn, d_ff=8, seed=0, uuid="x") is None  # zh has 1 < 2 = |LIKN|
    kn["zh"].append((1, 6))
    sets = edit_neuron_sets(kn, d_ff=8, seed=0, uuid="x")
    assert sets["likn"] == [(0, 1), (1, 2)]
    assert sets["only_en"] == [(0, 3), (1, 4)] and sets["only_zh"] == [(0, 5), (1, 6)]
    every_kn = set(kn["en"]) | set(kn["zh"])
    assert [layer for layer, _ in sets["random"]] == [0, 1]  # the LIKN's layers
    assert not set(sets["random"]) & every_kn
    assert edit_neuron_sets(kn, 8, 0, "x") == sets  # seeded
    assert edit_neuron_sets({"en": [(0, 1)], "zh": [(0, 2)]}, 8, 0, "x") is None  # no LIKN


def test_random_neurons_like_draws_distinct_free_neurons_of_the_same_layers():
    rng = np.random.default_rng(0)
    exclude = [(0, 0), (0, 1), (0, 2)]
    picked = random_neurons_like([(0, 0), (2, 0), (2, 1)], exclude=exclude, d_ff=4, rng=rng)
    assert picked[0] == (0, 3)  # the only free neuron of layer 0
    assert [layer for layer, _ in picked] == [0, 2, 2] and len(set(picked)) == 3
    draws = {random_neurons_like([(1, 0)], [], 4, np.random.default_rng(s))[0] for s in range(40)}
    assert draws == {(1, 0), (1, 1), (1, 2), (1, 3)}  # uniform over the layer's free neurons
    with pytest.raises(ValueError, match="no free neuron"):
        random_neurons_like([(0, 0), (0, 1)], exclude=exclude, d_ff=4, rng=rng)


def test_other_fact_likn_is_another_facts_large_enough_likn():
    likn_of = {"a": [(0, 1), (1, 2)], "b": [(0, 3)], "c": [(2, 5), (1, 1), (0, 0)],
               "d": [(1, 7), (0, 2)]}
    seen = set()
    for seed in range(20):
        got = other_fact_likn("a", 2, likn_of, seed)
        assert got in ([(2, 5), (1, 1)], [(1, 7), (0, 2)])  # never a itself, never b (too small)
        assert got == other_fact_likn("a", 2, dict(reversed(list(likn_of.items()))), seed)
        seen.add(tuple(got))
    assert len(seen) == 2  # the seed chooses among the candidates
    assert other_fact_likn("a", 3, likn_of, 0) == [(2, 5), (1, 1), (0, 0)]
    assert other_fact_likn("c", 4, likn_of, 0) is None


def test_sample_and_locality_are_seeded_and_order_independent():
    uuids = [f"u{i}" for i in range(20)]
    sample = sample_edit_facts(uuids, 5, seed=1)
    assert len(sample) == 5 and set(sample) <= set(uuids)
    assert sample_edit_facts(list(reversed(uuids)), 5, seed=1) == sample
    assert sample_edit_facts(uuids, 6, seed=1)[:5] == sample  # a larger sample extends it
    assert sample_edit_facts(uuids, 5, seed=2) != sample
    assert sorted(sample_edit_facts(uuids[:3], 5, seed=1)) == uuids[:3]
    relations = {u: f"P{i % 3}" for i, u in enumerate(uuids)}
    local = locality_facts("u0", relations, 4, seed=1)
    assert len(local) == 4 and all(relations[u] != "P0" for u in local)


def test_edit_summary_hand_counted():
    base = dict(operation="edit", neuron_set="likn", edit_lang="en", edited_uuid="a",
                relation="P1", n_neurons=2)
    rows = [
        dict(base, eval_lang="en", target="fact", uuid="a", p_true_before=0.8,
             p_true_after=0.2, top1_true_before=True, top1_true_after=False,
             p_wrong_before=0.1, p_wrong_after=0.7, top1_wrong_before=False,
             top1_wrong_after=True),
        dict(base, eval_lang="en", target="fact", uuid="b", p_true_before=0.5,
             p_true_after=0.5, top1_true_before=True, top1_true_after=True,
             p_wrong_before=0.2, p_wrong_after=0.1, top1_wrong_before=False,
             top1_wrong_after=False),
        dict(base, eval_lang="en", target="unrelated", uuid="c", p_true_before=0.4,
             p_true_after=0.3, top1_true_before=True, top1_true_after=True,
             p_wrong_before=None, p_wrong_after=None, top1_wrong_before=None,
             top1_wrong_after=None),
        dict(base, operation="erase", edit_lang=ANY_LANGUAGE, eval_lang="zh", target="fact",
             uuid="a", p_true_before=0.0, p_true_after=0.0, top1_true_before=False,
             top1_true_after=False, p_wrong_before=0.3, p_wrong_after=0.3,
             top1_wrong_before=False, top1_wrong_after=False),
    ]
    summary = edit_summary(pd.DataFrame(rows, columns=EDIT_COLUMNS), seed=0, n_boot=200)
    assert list(summary["operation"]) == ["erase", "edit", "edit"]
    fact = summary[(summary["operation"] == "edit") & (summary["target"] == "fact")].iloc[0]
    assert fact.n == 2 and fact.n_facts == 1  # both rows belong to the edit of fact a
    # one edited fact: every resample is that fact, so the interval is the estimate
    assert (fact.delta_p_true_low, fact.delta_p_true_high) == pytest.approx((-0.3, -0.3))
    assert fact.delta_p_true == pytest.approx((-0.6 + 0.0) / 2)
    assert fact.rel_change_p_true == pytest.approx((-0.75 + 0.0) / 2)
    assert (fact.top1_true_before, fact.top1_true_after) == (1.0, 0.5)
    assert fact.delta_p_wrong == pytest.approx((0.6 - 0.1) / 2)
    assert fact.edit_success == 0.5
    unrelated = summary[summary["target"] == "unrelated"].iloc[0]
    assert unrelated.rel_change_p_true == pytest.approx(-0.25)
    assert math.isnan(unrelated.edit_success) and math.isnan(unrelated.delta_p_wrong)
    erase = summary[summary["operation"] == "erase"].iloc[0]
    assert math.isnan(erase.rel_change_p_true)  # P(true) before = 0: no relative change


def test_edit_summary_intervals_cover_the_mean_and_shrink_with_n():
    rng = np.random.default_rng(0)

    def results(n):
        before = rng.uniform(0.4, 0.9, n)
        return pd.DataFrame([dict(operation="erase", neuron_set="likn", edit_lang=ANY_LANGUAGE,
                                  eval_lang="en", target="fact", edited_uuid=f"u{i}",
                                  uuid=f"u{i}", relation="P1", n_neurons=2, p_true_before=b,
                                  p_true_after=b - d, top1_true_before=True,
                                  top1_true_after=bool(d < 0.3), p_wrong_before=0.1,
                                  p_wrong_after=0.1, top1_wrong_before=False,
                                  top1_wrong_after=False)
                             for i, (b, d) in enumerate(zip(before, rng.uniform(0, 0.4, n)))],
                            columns=EDIT_COLUMNS)

    small, large = (edit_summary(results(n), seed=1, n_boot=400).iloc[0] for n in (10, 200))
    for row in (small, large):
        assert row.delta_p_true_low < row.delta_p_true < row.delta_p_true_high
        assert row.top1_true_after_low <= row.top1_true_after <= row.top1_true_after_high
    assert (small.n, small.n_facts, large.n_facts) == (10, 10, 200)
    assert (large.delta_p_true_high - large.delta_p_true_low
            < 0.5 * (small.delta_p_true_high - small.delta_p_true_low))
    assert large.delta_p_true == pytest.approx(-0.2, abs=0.03)  # the true mean change


def edit_results(n_facts: int, effect: float, seed: int) -> pd.DataFrame:
    """Erase and edit rows of ``n_facts`` facts for the sets likn, likn_other (missing for
    every fifth fact), only_en and random, scored in en and zh. P(true) drops by ``effect``
    more under likn than under any control, and P(wrong) rises by as much more under an
    edit; the controls' changes and every set's noise are alike."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_facts):
        uuid = f"u{i:03d}"
        for lang in ("en", "zh"):
            before, wrong = rng.uniform(0.3, 0.9), rng.uniform(0.0, 0.2)
            fact_shift = rng.normal(0, 0.05)  # shared by every set of the fact: pairing helps
            for operation, edit_lang in (("erase", ANY_LANGUAGE), ("edit", "en")):
                for name in ("likn", "likn_other", "only_en", "random"):
                    if name == "likn_other" and i % 5 == 0:
                        continue
                    extra = effect if name == "likn" else 0.0
                    drop = 0.1 + fact_shift + extra + rng.normal(0, 0.05)
                    rise = (0.05 + fact_shift + extra + rng.normal(0, 0.05)
                            if operation == "edit" else 0.0)
                    rows.append(dict(operation=operation, neuron_set=name, edit_lang=edit_lang,
                                     eval_lang=lang, target="fact", edited_uuid=uuid, uuid=uuid,
                                     relation="P1", n_neurons=2, p_true_before=before,
                                     p_true_after=before - drop, top1_true_before=True,
                                     top1_true_after=bool(drop < 0.2), p_wrong_before=wrong,
                                     p_wrong_after=wrong + rise, top1_wrong_before=False,
                                     top1_wrong_after=bool(rise > 0.2)))
    return pd.DataFrame(rows, columns=EDIT_COLUMNS)


def test_edit_tests_find_a_likn_effect_and_pair_by_fact():
    tests = edit_tests(edit_results(30, effect=0.1, seed=0), seed=0, n_perm=500, n_boot=300)
    assert list(tests.columns) == TEST_COLUMNS
    # erase: P(true) only; edit: P(true) and P(wrong); each against the three controls
    assert len(tests) == (1 + 2) * 2 * 3
    assert set(tests.loc[tests["operation"] == "erase", "measure"]) == {"delta_p_true"}
    assert list(tests["control"].iloc[:3]) == ["likn_other", "only_en", "random"]
    assert (tests["p"] < 0.01).all()
    true = tests[tests["measure"] == "delta_p_true"]
    wrong = tests[tests["measure"] == "delta_p_wrong"]
    assert (true["difference_high"] < 0).all() and (wrong["difference_low"] > 0).all()
    assert true["difference"].between(-0.13, -0.07).all()
    assert set(tests.loc[tests["control"] == "likn_other", "n_facts"]) == {24}  # 6 of 30 lack it
    assert set(tests.loc[tests["control"] != "likn_other", "n_facts"]) == {30}
    row = tests.iloc[0]
    assert row.difference == pytest.approx(row.likn - row.control_value)
    again = edit_tests(edit_results(30, effect=0.1, seed=0), seed=0, n_perm=500, n_boot=300)
    pd.testing.assert_frame_equal(again, tests)


def test_edit_tests_without_an_effect_find_none_after_holm():
    from kneurons.likn_report import comparison_reading
    from kneurons.statistics import holm

    tests = edit_tests(edit_results(30, effect=0.0, seed=1), seed=0, n_perm=500, n_boot=300)
    adjusted = holm(tests["p"].to_numpy())
    assert (adjusted >= tests["p"]).all() and (adjusted > 0.05).all()
    covered = (tests["difference_low"] < 0) & (tests["difference_high"] > 0)
    assert covered.mean() >= 0.8  # 95% intervals, not corrected: a few may miss 0
    readings = [comparison_reading(dict(row, p_holm=p))
                for row, p in zip(tests.to_dict("records"), adjusted)]
    assert set(readings) == {"no detectable difference"}
    strong = edit_tests(edit_results(30, effect=0.1, seed=1), seed=0, n_perm=500, n_boot=300)
    strong_adjusted = holm(strong["p"].to_numpy())
    assert {comparison_reading(dict(row, p_holm=p)) for row, p in
            zip(strong.to_dict("records"), strong_adjusted)} == {"LIKN stronger"}
    # the wrong direction is named as such
    weak = edit_tests(edit_results(30, effect=-0.1, seed=1), seed=0, n_perm=500, n_boot=300)
    assert {comparison_reading(dict(row, p_holm=p)) for row, p in
            zip(weak.to_dict("records"), holm(weak["p"].to_numpy()))} == {"control stronger"}


# ---- the operations against direct forwards --------------------------------------------------

QUERIES = {
    "masked": [("the capital of [X] is [Y] .", "tanzania", "dodoma"),
               ("[X] is located in [Y] .", "kilimanjaro", "dar es salaam")],
    "causal": [("The capital of [X] is [Y] .", "Tanzania", "Dodoma"),
               ("[X] is located in [Y] .", "Kilimanjaro", "Tanzania")],
}


@pytest.fixture(params=["tiny_bert", "tiny_gpt2"])
def lm(request):
    return request.getfixturevalue(request.param)


def _direct_probs(lm, query, erase):
    """P(object) and top-1 of one query, unbatched, with a hand-written zeroing hook."""
    pos = torch.as_tensor(query.target_positions)
    by_layer = {}
    for layer, neuron in erase:
        by_layer.setdefault(layer, []).append(neuron)

    def zero(neurons):
        def fn(act):  # act: [1, seq, d_ff]
            act = act.clone()
            for n in neurons:
                act[0, pos, n] = 0.0
            return act
        return fn

    with torch.no_grad(), ffn_hooks(lm, {layer: zero(ns) for layer, ns in by_layer.items()}):
        logits = lm.model(input_ids=torch.as_tensor([query.input_ids])).logits[0]  # [seq, V]
    probs = torch.softmax(logits[pos], -1)[torch.arange(len(pos)), torch.as_tensor(query.target_ids)]
    top1 = bool((logits[pos].argmax(-1) == torch.as_tensor(query.target_ids)).all())
    return float(probs.mean()), top1


def test_erasing_matches_a_direct_forward_with_patched_activations(lm):
    queries = [encode_query(lm, *q) for q in QUERIES[lm.arch]]
    assert len({len(q.input_ids) for q in queries}) == 2  # padding is exercised
    erase = [(0, 3), (lm.n_layers - 1, 7), (lm.n_layers - 1, 11)]
    for neurons in ([], erase):
        probs, top1 = score_queries(lm, queries, erase=neurons)
        for q, p, t in zip(queries, probs, top1):
            direct_p, direct_t = _direct_probs(lm, q, neurons)
            assert p == pytest.approx(direct_p, rel=1e-5, abs=1e-7)
            assert t == direct_t
    plain, _ = score_queries(lm, queries)
    erased, _ = score_queries(lm, queries, erase=erase)
    assert not np.allclose(plain, erased)
    for q, p in zip(queries, erased):  # the DKN suppression convention, too
        assert p == pytest.approx(float(erased_token_probs(lm, q, [erase]).mean()), rel=1e-5)


def test_a_value_slot_edit_adds_activation_times_delta_to_the_ffn_output(lm):
    proj = lm.ffn_site(1)
    x = torch.randn(2, 3, lm.d_ff)  # [batch, seq, d_ff]
    hidden = lm.value_slot(1, 5).shape[0]
    delta = torch.randn(hidden)
    with torch.no_grad():
        before = proj(x)  # [batch, seq, hidden]
        with edit_value_slots(lm, [(1, 5), (1, 5)], delta):  # duplicates count once
            after = proj(x)
    expected = x[..., 5:6] * delta  # neuron 5's activation times the added vector
    torch.testing.assert_close(after - before, expected, rtol=1e-4, atol=1e-5)


def test_edit_value_slots_matches_hand_changed_weights_and_restores_them(lm):
    neurons = [(0, 2), (lm.n_layers - 1, 9)]
    query = encode_query(lm, *QUERIES[lm.arch][0])
    ids = torch.as_tensor([query.input_ids])
    hidden = lm.value_slot(0, 0).shape[0]
    delta = torch.linspace(-1, 1, hidden)
    manual = copy.deepcopy(lm.model)
    with torch.no_grad():
        for layer, neuron in neurons:
            proj = lm.spec.ffn_site(lm.spec.blocks(manual)[layer])
            if lm.model.config.model_type == "gpt2":  # Conv1D weight [d_ff, hidden]
                proj.weight[neuron, :] += delta
            else:  # nn.Linear weight [hidden, d_ff]
                proj.weight[:, neuron] += delta
        expected = manual(input_ids=ids).logits
    original = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with torch.no_grad():
        with edit_value_slots(lm, neurons, delta):
            edited = lm.model(input_ids=ids).logits
        restored = lm.model(input_ids=ids).logits
    torch.testing.assert_close(edited, expected)
    assert not torch.allclose(edited, restored)
    for key, value in lm.model.state_dict().items():
        assert torch.equal(value, original[key]), key
    with pytest.raises(RuntimeError, match="boom"), edit_value_slots(lm, neurons, delta):
        raise RuntimeError("boom")
    for key, value in lm.model.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_dai_edit_delta_uses_the_output_embeddings(tiny_bert):
    weight = tiny_bert.model.get_output_embeddings().weight.detach()
    assert torch.equal(object_embedding(tiny_bert, [3, 5]), (weight[3] + weight[5]) / 2)
    delta = dai_edit_delta(tiny_bert, [3], [4, 6], lambda1=1.0, lambda2=8.0)
    torch.testing.assert_close(delta, -weight[3] + 8 * (weight[4] + weight[6]) / 2)


# ---- the experiment on a tiny model ------------------------------------------------------------


def _facts(template, rows):
    return pd.DataFrame([dict(uuid=u, relation=r, template=template[r], sub_label=s,
                              obj_label=o, wrong_obj_label=w) for u, r, s, o, w in rows])


def test_cross_lingual_editing_on_a_tiny_model(tiny_bert):
    rows = [("a", "P36", "tanzania", "dodoma", "paris"),
            ("b", "P36", "france", "paris", "berlin"),
            ("c", "P37", "tanzania", "swahili", "english"),
            ("d", "P37", "kenya", "english", "swahili")]
    facts = {"en": _facts({"P36": "the capital of [X] is [Y] .",
                           "P37": "the official language of [X] is [Y] ."}, rows),
             "zh": _facts({"P36": "[X]的首都是[Y]。", "P37": "[X]的官方语言是[Y]。"}, rows)}
    kn = {"en": {"a": [(0, 1), (1, 2), (2, 3)], "b": [(0, 1)], "c": [(0, 4)], "d": [(0, 4)]},
          "zh": {"a": [(0, 1), (1, 4), (2, 5)], "b": [(0, 2)], "c": [(0, 4)], "d": [(1, 1)]}}
    table = likn_table(kn, {u: r for u, r, *_ in rows})
    results = cross_lingual_editing(tiny_bert, facts, table, edit_sample=5, n_locality=2,
                                    lambda1=1.0, lambda2=8.0, seed=0)
    # only a is eligible (b: no LIKN; c: no one-language neurons; d: no LIKN)
    assert set(results["edited_uuid"]) == {"a"}
    # 5 sets x (2 erase + 2 x 2 edit) scorings x (1 fact + 2 unrelated) rows
    assert len(results) == 5 * 6 * 3
    assert set(results["neuron_set"]) == {"likn", "likn_other", "only_en", "only_zh", "random"}
    assert (results["n_neurons"] == 1).all()
    # likn_other: c's LIKN, the only other fact with one (c itself is not eligible)
    other = results[(results["operation"] == "erase") & (results["neuron_set"] == "likn_other")
                    & (results["target"] == "fact") & (results["eval_lang"] == "en")].iloc[0]
    fact_a = facts["en"].iloc[0]
    a_queries = [encode_query(tiny_bert, fact_a.template, fact_a.sub_label, fact_a.obj_label)]
    assert other.p_true_after == pytest.approx(
        score_queries(tiny_bert, a_queries, erase=[(0, 4)])[0][0], rel=1e-6)
    unrelated = results[results["target"] == "unrelated"]
    assert set(unrelated["uuid"]) == {"c", "d"} and unrelated["p_wrong_after"].isna().all()
    for lang in ("en", "zh"):
        fact = facts[lang].iloc[0]
        queries = [encode_query(tiny_bert, fact.template, fact.sub_label, fact.obj_label),
                   encode_query(tiny_bert, fact.template, fact.sub_label, fact.wrong_obj_label)]
        plain, _ = score_queries(tiny_bert, queries)
        erased, _ = score_queries(tiny_bert, queries, erase=[(0, 1)])
        mine = results[(results["target"] == "fact") & (results["eval_lang"] == lang)]
        assert np.allclose(mine["p_true_before"], plain[0]) and \
            np.allclose(mine["p_wrong_before"], plain[1])
        erase = mine[(mine["operation"] == "erase") & (mine["neuron_set"] == "likn")].iloc[0]
        assert erase.p_true_after == pytest.approx(erased[0], rel=1e-6)
        assert erase.p_wrong_after == pytest.approx(erased[1], rel=1e-6)
        assert erase.edit_lang == ANY_LANGUAGE
        edit = mine[(mine["operation"] == "edit") & (mine["neuron_set"] == "likn")
                    & (mine["edit_lang"] == "en")].iloc[0]
        delta = dai_edit_delta(tiny_bert, queries[0].target_ids, queries[1].target_ids, 1.0, 8.0)
        if lang == "en":
            with edit_value_slots(tiny_bert, [(0, 1)], delta):
                edited, _ = score_queries(tiny_bert, queries)
            assert edit.p_true_after == pytest.approx(edited[0], rel=1e-6)
            assert edit.p_wrong_after == pytest.approx(edited[1], rel=1e-6)
    summary = edit_summary(results, seed=0, n_boot=50)
    assert set(summary["target"]) == {"fact", "unrelated"} and (summary["n"] > 0).all()
    assert (summary["n_facts"] == 1).all()
    tests = edit_tests(results, seed=0, n_perm=50, n_boot=50)
    assert set(tests["control"]) == {"likn_other", "only_en", "only_zh", "random"}
    assert (tests["n_facts"] == 1).all()


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:4] == b"\x89PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_likn_report_tables_markdown_and_figures(tmp_path):
    from kneurons.likn_report import LIKN_FIGURES, likn_report

    table = likn_table(KN, RELATIONS)
    rows = [dict(operation=op, neuron_set=name, edit_lang=ANY_LANGUAGE if op == "erase" else "en",
                 eval_lang=lang, target=target, edited_uuid="a", uuid="a", relation="P1",
                 n_neurons=2, p_true_before=0.9, p_true_after=0.45, top1_true_before=True,
                 top1_true_after=False, p_wrong_before=0.1 if target == "fact" else None,
                 p_wrong_after=0.5 if target == "fact" else None, top1_wrong_before=False,
                 top1_wrong_after=(target == "fact") or None)
            for op in ("erase", "edit") for name in ("likn", "random")
            for lang in ("en", "zh") for target in ("fact", "unrelated")]
    results = pd.DataFrame(rows, columns=EDIT_COLUMNS)
    stats, layers, null = likn_statistics(table, seed=0, n_perm=200, n_boot=100)
    hand = {"model": "m", "stats": stats, "layers": layers, "null": null,
            "edits": edit_summary(results, seed=0, n_boot=50),
            "tests": edit_tests(results, seed=0, n_perm=50, n_boot=50)}
    kn, relations = synthetic_kn(40, 4, core=2, own=4, pool=30, relation_pools=True, seed=0)
    strong = likn_statistics(likn_table(kn, relations), seed=0, n_perm=2000, n_boot=100)
    effect = edit_results(30, effect=0.1, seed=0)
    no_effect = edit_results(30, effect=0.0, seed=1)  # edited in zh: a second table block
    no_effect["edit_lang"] = no_effect["edit_lang"].replace("en", "zh")
    both = pd.concat([effect, no_effect[no_effect["operation"] == "edit"]], ignore_index=True)
    synthetic = {"model": "s", "stats": strong.stats, "layers": strong.layers,
                 "null": strong.null, "edits": edit_summary(both, seed=0, n_boot=100),
                 "tests": edit_tests(both, seed=0, n_perm=2000, n_boot=100)}
    # a model whose facts all failed to converge: no null draws, its panels are left out
    failed = pd.DataFrame([dict(languages="en+zh", relation="all", statistic=statistic,
                                n_facts=0, n_not_converged=3) for statistic in STATISTICS])
    failed = {"model": "f", "stats": failed.reindex(columns=STATS_COLUMNS),
              "layers": layers.iloc[0:0], "null": null.iloc[0:0],
              "edits": hand["edits"].iloc[0:0], "tests": hand["tests"].iloc[0:0]}
    figures = {name: (tmp_path / f"{name}.png", tmp_path / f"{name}.svg") for name in LIKN_FIGURES}
    stats, edits, tests = likn_report([hand, synthetic, failed], tmp_path / "likn.csv",
                                      tmp_path / "edit.csv", tmp_path / "tests.csv",
                                      tmp_path / "likn.md", figures)
    assert list(stats.columns[:4]) == ["model", "languages", "relation", "statistic"]
    assert {"shuffled_p_holm", "within_relation_p_holm"} <= set(stats.columns)
    overall = stats[stats["relation"] == "all"]
    tested = overall[["shuffled_p", "within_relation_p"]].to_numpy().ravel()
    from kneurons.statistics import holm
    adjusted = holm(tested)
    np.testing.assert_allclose(overall[["shuffled_p_holm", "within_relation_p_holm"]]
                               .to_numpy().ravel(), adjusted)  # one family: all models
    assert pd.read_csv(tmp_path / "edit.csv")["model"].isin(["m", "s"]).all()
    saved = pd.read_csv(tmp_path / "tests.csv")
    np.testing.assert_allclose(saved["p_holm"], holm(saved["p"].to_numpy()))
    assert set(saved.loc[(saved["model"] == "s") & (saved["edit_lang"] == "zh"), "reading"]) \
        == {"no detectable difference"}
    assert set(saved.loc[(saved["model"] == "s") & (saved["edit_lang"] != "zh"), "reading"]) \
        == {"LIKN stronger"}
    text = (tmp_path / "likn.md").read_text()
    assert "| m | en+zh | mean LIKN size | 2 | 0 | 1.00 [0.00, 2.00] | 0.7" in text
    assert ("| m | en+zh | P1 | facts with a non-empty LIKN (share) | 2 | 0 | 0.50 [0.00, 1.00] |"
            in text)
    assert "| f | en+zh | mean LIKN size | 0 | 3 | n/a | n/a |" in text
    # one edited fact: every interval is that fact's value
    assert ("| m | likn | 2.00 | en | 1 | 0.900 [0.900, 0.900] | 0.450 [0.450, 0.450] | "
            "-0.450 [-0.450, -0.450] | -50.0 [-50.0, -50.0] | 100 [100, 100] | 0 [0, 0] | 1, 1 |"
            ) in text
    assert "| m | en | likn | zh | 1 | 100 [100, 100] | 0.100 [0.100, 0.100] |" in text
    assert ("- s en+zh (n = 40 facts): against facts shuffled: above chance in facts with a "
            "non-empty LIKN (share), mean LIKN size, LIKN share of KN;") in text
    assert "- m en+zh (n = 2 facts): against facts shuffled: not distinguishable" in text
    assert "LIKN is stronger in 6 of 16 comparisons" in text
    assert "LIKN does no better than random neurons in:" in text
    assert "- s, edit in zh, scored in en, ΔP(wrong): LIKN" in text
    assert "- s, erase, scored in en" not in text  # LIKN is stronger there
    for png, svg in figures.values():
        width, _ = _png_size(png)
        assert width <= 2000 and svg.stat().st_size > 0
    assert "(no null draws): f." in figures["likn_null"][1].read_text()
    empty = {key: value.iloc[0:0] if isinstance(value, pd.DataFrame) else "e"
             for key, value in hand.items()}
    likn_report([empty], tmp_path / "e.csv", tmp_path / "e2.csv", tmp_path / "e3.csv",
                tmp_path / "e.md", figures)
    assert "(no data)" in (tmp_path / "e.md").read_text()
    assert "no data" in figures["likn_null"][1].read_text()
