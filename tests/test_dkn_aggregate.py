"""A relation's DKN set with its control sets and its stability (kneurons.dkn aggregation)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kneurons.dkn import (aggregate_relations, dkn_stability, frequent_kn_control,
                          matched_random_control)


def _rows(relation: str, query_dkn: list[list[tuple[int, int]]], query_kn=None) -> pd.DataFrame:
    query_kn = query_kn or query_dkn
    return pd.DataFrame({
        "uuid": [f"{relation}-{i}" for i in range(len(query_dkn))],
        "relation": relation,
        "kn_layers": [[a for a, _ in kn] for kn in query_kn],
        "kn_neurons": [[b for _, b in kn] for kn in query_kn],
        "base_prob": 0.5,
        "pair_layers": [[[a for a, _ in d]] if d else [] for d in query_dkn],
        "pair_neurons": [[[b for _, b in d]] if d else [] for d in query_dkn],
        "dkn_layers": [[a for a, _ in d] for d in query_dkn],
        "dkn_neurons": [[b for _, b in d] for d in query_dkn]})


def test_frequent_kn_control_takes_the_most_frequent_non_dkn():
    kn = [[(0, 1), (2, 5), (1, 7)], [(0, 1), (2, 5)], [(2, 5), (3, 3), (0, 1)], [(3, 3)]]
    # counts: (0,1) 3, (2,5) 3, (3,3) 2, (1,7) 1; DKN = [(0, 1)] -> one neuron: (2, 5)
    assert frequent_kn_control(kn, [(0, 1)]) == [(2, 5)]
    assert frequent_kn_control(kn, [(0, 1), (9, 9)]) == [(2, 5), (3, 3)]
    assert frequent_kn_control(kn, []) == []


def test_matched_random_control_keeps_layer_and_activation_magnitude():
    rng = np.random.default_rng(0)
    activation = np.abs(rng.normal(size=(3, 200)))  # [n_layers, d_ff]
    activation[1, 10] = 9.0  # one very active DKN neuron: its match must be active too
    activation[1, 150:160] = np.linspace(8.0, 8.9, 10)
    dkn = [(1, 10), (2, 0)]
    got = matched_random_control(dkn, activation, exclude=[(1, 151)],
                                 rng=np.random.default_rng(1))
    assert [layer for layer, _ in got] == [1, 2]
    assert got[0][1] in set(range(150, 160)) - {151}  # among the 10 closest, excluded skipped
    assert set(got).isdisjoint(dkn)
    # matched: across many draws the control's |activation| follows the DKN neuron's
    draws = [matched_random_control([(0, 5)], activation, [], np.random.default_rng(s))[0]
             for s in range(100)]
    gaps = [abs(activation[0, j] - activation[0, 5]) for _, j in draws]
    uniform = np.abs(activation[0] - activation[0, 5]).mean()
    assert np.mean(gaps) < uniform / 5


def test_stability_is_one_for_a_set_every_query_shows_and_low_for_noise():
    steady = [[(0, 1), (1, 2)]] * 30
    got = dkn_stability(steady, 0.7, True, [(0, 1), (1, 2)], n_boot=100)
    assert got["jaccard"] == 1.0 and got["stable"]
    rng = np.random.default_rng(0)
    noise = [[(0, int(rng.integers(0, 50)))] for _ in range(12)]  # every query its own neuron
    from kneurons.dkn import relation_dkn

    kept, _ = relation_dkn(noise, 0.7)
    got = dkn_stability(noise, 0.7, True, kept, n_boot=200, seed=1)
    assert got["jaccard"] < 0.5 and not got["stable"]
    assert got["jaccard_low"] <= got["jaccard"] <= got["jaccard_high"]


def test_aggregate_writes_controls_stability_and_the_layers_to_read(caplog):
    steady = _rows("P1", [[(0, 1), (2, 3)]] * 10,
                   [[(0, 1), (2, 3), (1, 4)]] * 10)
    noisy = _rows("P2", [[(1, i)] for i in range(8)])
    activation = {"P1": np.ones((3, 20)), "P2": np.ones((3, 20))}
    summary, stats, _ = aggregate_relations(pd.concat([steady, noisy]), 0.7,
                                            activation=activation, seed=3)
    p1 = summary["relations"]["P1"]
    assert p1["dkn"] == [[0, 1], [2, 3]]
    assert p1["controls"]["frequent_kn"] == [[1, 4]]
    matched = p1["controls"]["random_matched"]
    assert [layer for layer, _ in matched] == [0, 2]
    assert not {tuple(n) for n in matched} & {(0, 1), (2, 3), (1, 4)}
    assert p1["layers"] == [0, 1, 2]
    assert p1["stability"]["stable"] and stats.set_index("relation").loc["P1", "stable"]
    assert not stats.set_index("relation").loc["P2", "stable"]
    assert "P2: the DKN set is unstable" in caplog.text
    # seeded: the same call draws the same controls; no activation -> no matched control
    again, _, _ = aggregate_relations(pd.concat([steady, noisy]), 0.7, activation=activation,
                                      seed=3)
    assert again == summary
    plain, _, _ = aggregate_relations(steady, 0.7)
    assert plain["relations"]["P1"]["controls"]["random_matched"] is None
    assert plain["relations"]["P1"]["layers"] == [0, 1, 2]


def test_matched_control_in_a_layer_the_excluded_neurons_fill():
    # the relation's knowledge neurons fill the layer: a non-DKN one is drawn
    assert matched_random_control([(0, 0)], np.ones((1, 2)), [(0, 1)],
                                  np.random.default_rng(0)) == [(0, 1)]
    with pytest.raises(ValueError, match="no free neuron"):  # the DKN themselves fill it
        matched_random_control([(0, 0), (0, 1)], np.ones((1, 2)), [], np.random.default_rng(0))


def test_relation_activation_averages_over_shards(tmp_path):
    from kneurons.dkn import relation_activation

    np.savez(tmp_path / "a.npz", relations=np.array(["P1", "P2"]),
             sums=np.stack([np.full((2, 3), 4.0), np.zeros((2, 3))]), counts=np.array([2, 0]))
    np.savez(tmp_path / "b.npz", relations=np.array(["P1"]), sums=np.full((1, 2, 3), 2.0),
             counts=np.array([2]))
    got = relation_activation([tmp_path / "a.npz", tmp_path / "b.npz"])
    assert set(got) == {"P1"} and np.allclose(got["P1"], 1.5)  # (4 + 2) / (2 + 2)
    assert relation_activation([]) is None
