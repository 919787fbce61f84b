"""DKN detection's activation statistics (mean |FFN activation| per relation), which
aggregate_dkn's matched random control reads: known answers and the file round trip."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from test_shards import facts_table

from kneurons.dkn import relation_activation, relation_activation_sums, write_activation
from kneurons.hooks import capture_ffn, ffn_hooks
from kneurons.queries import encode_query


def queries_of(facts: pd.DataFrame) -> pd.DataFrame:
    return facts[["uuid", "relation", "template", "sub_label", "obj_label"]]


def test_a_constant_activation_is_its_own_mean(tiny_bert):
    """Every FFN activation forced to -2: each query adds |-2| at every neuron."""
    lm, queries = tiny_bert, queries_of(facts_table(6))  # P1 and P2, 3 facts each
    forced = {layer: (lambda act: torch.full_like(act, -2.0)) for layer in range(lm.n_layers)}
    with ffn_hooks(lm, forced):
        stats = relation_activation_sums(lm, queries.iloc[:5])
    assert stats["relations"].tolist() == ["P1", "P2"]
    assert stats["counts"].tolist() == [2, 3]  # u1, u3 | u0, u2, u4
    np.testing.assert_array_equal(stats["sums"][0], np.full((lm.n_layers, lm.d_ff), 4.0))
    np.testing.assert_array_equal(stats["sums"][1], np.full((lm.n_layers, lm.d_ff), 6.0))


def test_sums_are_the_object_positions_mean_absolute_activation(tiny_gpt2):
    """Against a direct forward of the whole model (LM head included), query by query."""
    lm, queries = tiny_gpt2, queries_of(facts_table(4))
    stats = relation_activation_sums(lm, queries)
    expected = np.zeros_like(stats["sums"])
    for row in queries.itertuples():
        query = encode_query(lm, row.template, row.sub_label, row.obj_label)
        with torch.inference_mode(), capture_ffn(lm) as acts:
            lm.model(input_ids=torch.as_tensor([query.input_ids]))
        r = stats["relations"].tolist().index(row.relation)
        for layer in range(lm.n_layers):
            a = acts[layer][0, query.target_positions].abs().double().numpy()  # [T, d_ff]
            expected[r, layer] += a.mean(axis=0)
    np.testing.assert_allclose(stats["sums"], expected, rtol=1e-5)
    assert (stats["sums"][0] != stats["sums"][1]).any()  # relations differ: not a constant


def test_relation_activation_reads_the_shards_files_as_a_weighted_mean(tmp_path):
    n_layers, d_ff = 2, 3
    one = {"relations": np.array(["P1", "P2"]), "counts": np.array([1, 2]),
           "sums": np.stack([np.full((n_layers, d_ff), 1.0), np.full((n_layers, d_ff), 8.0)])}
    two = {"relations": np.array(["P2"]), "counts": np.array([2]),
           "sums": np.full((1, n_layers, d_ff), 4.0)}
    empty = {"relations": np.array([], dtype=str), "counts": np.zeros(0, np.int64),
             "sums": np.zeros((0, n_layers, d_ff))}
    paths = []
    for i, stats in enumerate((one, two, empty)):
        paths.append(tmp_path / f"shard-{i}.activation.npz")
        write_activation(stats, paths[-1])
    assert [p.name for p in sorted(tmp_path.iterdir())] == [p.name for p in paths]  # no .tmp
    means = relation_activation(paths)
    assert sorted(means) == ["P1", "P2"]
    np.testing.assert_array_equal(means["P1"], np.full((n_layers, d_ff), 1.0))
    np.testing.assert_array_equal(means["P2"], np.full((n_layers, d_ff), 3.0))  # 12 / 4
    assert relation_activation([]) is None


def test_no_queries_no_relations(tiny_bert):
    stats = relation_activation_sums(tiny_bert, queries_of(facts_table(2)).iloc[:0])
    assert stats["relations"].shape == (0,) and stats["sums"].shape == (0, tiny_bert.n_layers,
                                                                         tiny_bert.d_ff)


def test_detected_queries_leave_out_calibration_and_non_converged_records(caplog):
    from kneurons.dkn import detected_queries

    facts = facts_table(6)  # calibration: u0, u1
    records = pd.DataFrame({"uuid": facts["uuid"], "relation": facts["relation"],
                            "candidate": "true", "obj_label": facts["obj_label"],
                            "converged": [True, True, False, True, True, True]})
    wrong = records.iloc[:2].assign(candidate="wrong")
    chosen = detected_queries(facts, pd.concat([records, wrong], ignore_index=True))
    assert chosen["uuid"].tolist() == ["u3", "u4", "u5"]
    assert "1 of 4 discovery queries left out" in caplog.text
    old = detected_queries(facts, records.drop(columns="converged"))  # shards before the column
    assert old["uuid"].tolist() == ["u2", "u3", "u4", "u5"]
