"""Degenerate knowledge neurons: the pair logic on hand-made outcomes, detection against
direct forward passes, and the relation-level aggregation."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd
import pytest
import torch

from kneurons.dkn import (aggregate_relations, detect_dkn_records, detect_query_dkn, is_degenerate_drop,
                          relation_dkn, robust_singles)
from kneurons.hooks import FFNPatch, patch_ffn
from kneurons.neurons import knowledge_neurons_of
from kneurons.queries import encode_query


def test_robust_singles_and_pair_drop_follow_the_definition():
    # base 0.5: a single suppression must keep >= 0.8 * 0.5 = 0.4
    assert robust_singles(0.5, [0.45, 0.40, 0.39, 0.6], single_drop=0.2) == [0, 1, 3]
    # joint suppression must fall below 0.75 * 0.5 = 0.375
    assert is_degenerate_drop(0.5, 0.374, pair_drop=0.25)
    assert not is_degenerate_drop(0.5, 0.375, pair_drop=0.25)


def test_relation_dkn_keeps_neurons_above_the_share_of_the_largest_count():
    queries = [[(0, 1), (1, 2)], [(0, 1), (1, 2)], [(0, 1), (1, 3)], [(0, 1)], [(1, 2), (0, 1)]]
    # counts: (0,1) 5, (1,2) 3, (1,3) 1; t = 0.5 -> count > 2.5
    kept, counts = relation_dkn(queries, 0.5)
    assert kept == [(0, 1), (1, 2)]
    assert counts[(1, 3)] == 1
    kept, _ = relation_dkn(queries, 0.6)  # > 3 -> only (0, 1)
    assert kept == [(0, 1)]
    assert relation_dkn([[], []], 0.7) == ([], {})
    # a neuron listed twice in one query counts once
    kept, counts = relation_dkn([[(2, 2), (2, 2)]], 0.7)
    assert counts[(2, 2)] == 1 and kept == [(2, 2)]


def test_knowledge_neurons_from_the_stored_best_neurons():
    layers, neurons, scores = [1, 0, 1, 0], [5, 3, 2, 7], [1.0, 0.5, 0.2, 0.1]
    assert knowledge_neurons_of(layers, neurons, scores, 0.3, 10) == [(1, 5), (0, 3)]
    assert knowledge_neurons_of(layers, neurons, scores, 0.15, 2) == [(1, 5), (0, 3)]
    assert knowledge_neurons_of(layers, neurons, [-1.0, -2.0, -3.0, -4.0], 0.2, 10) == []


def _direct_prob(lm, query, neurons):
    edits = [FFNPatch(layer=layer, neurons=[neuron], positions=query.target_positions)
             for layer, neuron in neurons]
    with torch.inference_mode(), patch_ffn(lm, edits):
        logits = lm.model(input_ids=torch.tensor([query.input_ids])).logits[0]
    probs = torch.softmax(logits[query.target_positions].float(), -1)
    return float(probs[range(len(query.target_ids)), query.target_ids].mean())


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_gpt2"])
def test_detection_matches_direct_forwards(request, fixture):
    lm = request.getfixturevalue(fixture)
    query = encode_query(lm, "[X] lives in [Y] .", "Anna", "Paris France")
    kn = [(0, 1), (0, 5), (1, 2), (1, 7), (0, 9)]
    # every single is robust (single_drop 1) and a pair is degenerate when it lowers P at all
    found = detect_query_dkn(lm, query, kn, single_drop=1.0, pair_drop=0.0, batch_size=4)
    base = _direct_prob(lm, query, [])
    assert found.base_prob == pytest.approx(base, rel=1e-4)
    assert found.single_probs == pytest.approx([_direct_prob(lm, query, [n]) for n in kn], rel=1e-4)
    expected = [(a, b) for a, b in combinations(kn, 2) if _direct_prob(lm, query, [a, b]) < base]
    assert found.pairs == expected
    assert found.tested_pairs == 10
    assert 0 < len(expected) < 10  # the check is not vacuous
    # strict singles: a neuron whose removal costs more than 1e-9 is not robust
    strict = detect_query_dkn(lm, query, kn, single_drop=0.0, pair_drop=0.0)
    robust = [n for n, p in zip(kn, strict.single_probs) if p >= base]
    assert all(a in robust and b in robust for a, b in strict.pairs)


@pytest.mark.parametrize("fixture", ["tiny_roberta", "tiny_llama", "tiny_gemma3_wide"])
def test_detection_across_layers_matches_direct_forwards(request, fixture):
    # knowledge neurons in the first and the last layer: pair rows enter at the lower one and
    # erase the other when they reach its block
    if fixture == "tiny_gemma3_wide":
        from conftest import build

        lm = build("gemma3_text", sliding_window=64)
    else:
        lm = request.getfixturevalue(fixture)
    last = lm.n_layers - 1
    query = encode_query(lm, "[X] lives in [Y] .", "Anna", "Paris France")
    kn = [(0, 1), (last, 5), (0, 2), (last, 7), (last - 1, 9)]
    found = detect_query_dkn(lm, query, kn, single_drop=1.0, pair_drop=0.0, batch_size=3)
    base = _direct_prob(lm, query, [])
    assert found.base_prob == pytest.approx(base, rel=1e-4)
    assert found.single_probs == pytest.approx([_direct_prob(lm, query, [n]) for n in kn],
                                               rel=1e-4)
    joint = {(a, b): _direct_prob(lm, query, [a, b]) for a, b in combinations(kn, 2)}
    assert found.pairs == [pair for pair, p in joint.items() if p < base]
    assert found.pair_probs == pytest.approx([joint[pair] for pair in found.pairs], rel=1e-4)
    assert found.tested_pairs == 10


def test_several_queries_at_once_equal_one_at_a_time(tiny_bert, tiny_gpt2):
    from kneurons.dkn import detect_queries_dkn

    for lm in (tiny_bert, tiny_gpt2):
        queries = [encode_query(lm, "[X] lives in [Y] .", "Anna", "Paris France"),
                   encode_query(lm, "[X] lives in [Y] .", "Bob", "Paris"),
                   encode_query(lm, "The capital of [X] is [Y] .", "Tanzania", "Dodoma")]
        kns = [[(0, 1), (0, 5), (1, 2), (1, 7), (0, 9)], [], [(2, 3), (1, 1), (0, 4)]]
        options = dict(single_drop=1.0, pair_drop=0.0)
        together = detect_queries_dkn(lm, queries, kns, batch_size=4, **options)
        for q, kn, got in zip(queries, kns, together):
            alone = detect_query_dkn(lm, q, kn, **options)
            assert got.pairs == alone.pairs and got.tested_pairs == alone.tested_pairs
            assert got.base_prob == pytest.approx(alone.base_prob, rel=1e-5)
            assert got.single_probs == pytest.approx(alone.single_probs, rel=1e-5)
            assert got.pair_probs == pytest.approx(alone.pair_probs, rel=1e-5)
        assert together[1].kn == [] and together[1].tested_pairs == 0
        assert sum(len(f.pairs) for f in together) > 0  # not vacuous
    with pytest.raises(ValueError, match="lists of knowledge neurons"):
        detect_queries_dkn(tiny_bert, queries, kns[:2], **options)


def test_records_runner_and_its_columns(tiny_bert):
    facts = pd.DataFrame({"uuid": ["u1", "u2"], "template": ["[X] lives in [Y] .", "[Y] is [X] ."],
                          "sub_label": ["Anna", "Bob"]})
    records = pd.DataFrame({
        "uuid": ["u1", "u1", "u2"], "relation": ["P1", "P1", "P2"],
        "candidate": ["true", "wrong", "true"], "obj_label": ["Paris", "Rome", "London"],
        "top_layers": [[0, 1, 0], [0], [1, 1]], "top_neurons": [[1, 2, 3], [4], [5, 6]],
        "top_scores": [[1.0, 0.5, 0.1], [1.0], [2.0, 1.0]]})
    out = detect_dkn_records(tiny_bert, facts, records, kn_threshold=0.2, max_kn=5,
                             single_drop=1.0, pair_drop=0.0)
    assert out["uuid"].tolist() == ["u1", "u2"]  # true candidates only
    assert out.loc[0, "kn_layers"] == [0, 1] and out.loc[0, "kn_neurons"] == [1, 2]
    assert out.loc[1, "tested_pairs"] == 1
    assert np.isfinite(out["base_prob"]).all()


def test_aggregate_relations_by_hand():
    rows = pd.DataFrame({
        "uuid": ["a", "b", "c", "d"], "relation": ["P1", "P1", "P1", "P2"],
        "kn_layers": [[0, 1], [0, 1, 1], [0], []], "kn_neurons": [[1, 2], [1, 2, 3], [1], []],
        "base_prob": [0.5, 0.3, 0.1, 0.2],
        "pair_layers": [[[0, 1]], [[0, 1], [1, 1]], [], []],
        "pair_neurons": [[[1, 2]], [[1, 2], [2, 3]], [], []],
        "dkn_layers": [[0, 1], [0, 1, 1], [], []], "dkn_neurons": [[1, 2], [1, 2, 3], [], []]})
    summary, stats, layers = aggregate_relations(rows, 0.7)
    # P1 counts: (0,1) 2, (1,2) 2, (1,3) 1 -> > 1.4 keeps the first two
    assert summary["relations"]["P1"]["dkn"] == [[0, 1], [1, 2]]
    assert summary["relations"]["P1"]["counts"] == [2, 2]
    assert summary["relations"]["P1"]["queries_with_dkn"] == 2
    p2 = summary["relations"]["P2"]  # (controls, stability: tests/test_dkn_aggregate.py)
    assert {k: p2[k] for k in ("dkn", "counts", "n_queries", "queries_with_dkn", "layers")} == {
        "dkn": [], "counts": [], "n_queries": 1, "queries_with_dkn": 0, "layers": []}
    p1 = stats.set_index("relation").loc["P1"]
    assert p1["mean_kn"] == pytest.approx(2.0) and p1["mean_pairs"] == pytest.approx(1.0)
    assert p1["n_dkn"] == 2 and p1["mean_base_prob"] == pytest.approx(0.3)
    assert layers.to_dict("records") == [{"relation": "P1", "layer": 0, "n_dkn": 1},
                                         {"relation": "P1", "layer": 1, "n_dkn": 1}]


def test_calibration_facts_do_not_shape_the_dkn(tiny_bert):
    """The DKN sets are the same whatever the calibration facts' records say (no leakage of
    the slice λ is tuned on into the DKN)."""
    facts = pd.DataFrame({"uuid": ["u1", "u2", "c1"],
                          "template": ["[X] lives in [Y] .", "[X] is in [Y] .", "[X] was in [Y] ."],
                          "sub_label": ["Anna", "Bob", "Carl"], "calibration": [False, False, True]})

    def records(calibration_neurons, calibration_object):
        return pd.DataFrame({
            "uuid": ["u1", "u2", "c1"], "relation": ["P1", "P1", "P1"],
            "candidate": ["true", "true", "true"],
            "obj_label": ["Paris", "London", calibration_object],
            "top_layers": [[0, 1, 0], [0, 1], [1, 0, 1]],
            "top_neurons": [[1, 2, 3], [1, 2], calibration_neurons],
            "top_scores": [[1.0, 0.9, 0.8], [1.0, 0.9], [1.0, 0.9, 0.8]]})

    options = dict(kn_threshold=0.2, max_kn=5, single_drop=1.0, pair_drop=0.0)
    first = detect_dkn_records(tiny_bert, facts, records([5, 6, 7], "Rome"), **options)
    second = detect_dkn_records(tiny_bert, facts, records([9, 1, 2], "Oslo"), **options)
    assert first["uuid"].tolist() == ["u1", "u2"]  # the calibration fact is skipped
    pd.testing.assert_frame_equal(first, second)
    assert aggregate_relations(first, 0.5)[0] == aggregate_relations(second, 0.5)[0]
    # aggregation drops calibration rows that reach it anyway (e.g. from old shards)
    assert len(first.loc[0, "dkn_layers"]) > 0  # u1 has DKN, so a leaked copy would count
    leaked = pd.concat([first, first.iloc[[0]].assign(uuid="c1")], ignore_index=True)
    clean = aggregate_relations(first, 0.5)[0]
    assert aggregate_relations(leaked, 0.5, calibration=["c1"])[0] == clean
    assert aggregate_relations(leaked, 0.5)[0] != clean


def test_pair_count_counts_pair_memberships():
    """The authors' count (one per pair membership) against ours (one per query)."""
    rows = pd.DataFrame({
        "uuid": ["a", "b"], "relation": ["P1", "P1"],
        "kn_layers": [[0, 0, 0], [0, 0]], "kn_neurons": [[1, 2, 3], [2, 3]],
        "base_prob": [0.5, 0.5],
        # query a: (0,1) is in two pairs; query b: one pair (0,2)-(0,3)
        "pair_layers": [[[0, 0], [0, 0]], [[0, 0]]], "pair_neurons": [[[1, 2], [1, 3]], [[2, 3]]],
        "dkn_layers": [[0, 0, 0], [0, 0]], "dkn_neurons": [[1, 2, 3], [2, 3]]})
    by_query, _, _ = aggregate_relations(rows, 0.7)
    by_pair, _, _ = aggregate_relations(rows, 0.7, count="pair")
    # query counts: (0,1) 1, (0,2) 2, (0,3) 2 -> > 1.4 keeps (0,2), (0,3)
    assert by_query["relations"]["P1"]["dkn"] == [[0, 2], [0, 3]]
    assert by_query["count"] == "query" and by_pair["count"] == "pair"
    # pair counts: (0,1) 2, (0,2) 2, (0,3) 2 -> all three
    assert by_pair["relations"]["P1"]["dkn"] == [[0, 1], [0, 2], [0, 3]]
    assert by_pair["relations"]["P1"]["counts"] == [2, 2, 2]
    with pytest.raises(ValueError, match="unknown DKN count"):
        aggregate_relations(rows, 0.7, count="member")
