"""Attribution shards: which candidates are attributed, the record format, resumption."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kneurons.attribution import attribute
from kneurons.checkpoint import Checkpoint
from kneurons.queries import encode_query
from kneurons.neurons import top_neurons
from kneurons.factcheck import dkn_scores
from kneurons.records import (COMPLETENESS_TOLERANCE, converged, neuron_scores, read_shard,
                              score_matrix, write_shard)
from kneurons.shards import attribute_candidates, candidate_table, run_shard, shard_of


def facts_table(n: int = 6) -> pd.DataFrame:
    subjects = ["Anna", "Bob", "Carl", "Dora", "Emil", "Fay", "Gus", "Hal"]
    return pd.DataFrame({
        "uuid": [f"u{i}" for i in range(n)], "lineid": list(range(n)),
        "relation": ["P1" if i % 2 else "P2" for i in range(n)],
        "template": ["[X] lives in [Y] ." if i % 2 else "[Y] is home of [X] ." for i in range(n)],
        "sub_label": subjects[:n], "obj_label": ["Paris", "Rome"] * (n // 2),
        "obj_uri": ["Q1", "Q2"] * (n // 2), "wrong_obj_label": ["Rome", "Paris"] * (n // 2),
        "wrong_obj_uri": ["Q2", "Q1"] * (n // 2),
        "calibration": [i in (0, 1) for i in range(n)],
    })


def test_shards_partition_the_facts():
    facts = facts_table()
    shards = [shard_of(facts, i, 3) for i in range(3)]
    uuids = sorted(u for shard in shards for u in shard["uuid"])
    assert uuids == sorted(facts["uuid"])
    assert [len(s) for s in shards] == [2, 2, 2]
    with pytest.raises(ValueError, match="shard 3"):
        shard_of(facts, 3, 3)


def test_wrong_objects_are_attributed_only_for_checked_facts():
    """Protocol of #21: the discovery part holds the true objects only; the wrong objects of
    the calibration slice form the calibration part (attributed after aggregate_dkn)."""
    facts = facts_table()
    discovery = candidate_table(facts, "discovery")
    assert (discovery["candidate"] == "true").all() and len(discovery) == 6
    assert set(discovery.loc[discovery["checked"], "uuid"]) == {"u0", "u1"}  # calibration
    calibration = candidate_table(facts, "calibration")
    assert (calibration["candidate"] == "wrong").all() and calibration["checked"].all()
    assert calibration["uuid"].tolist() == ["u1", "u0"]  # by relation, then lineid
    assert calibration["obj_label"].tolist() == ["Paris", "Rome"]
    evaluation = candidate_table(facts, "evaluation")
    assert len(evaluation) == 12 and evaluation["checked"].all()
    assert all(c == ["true", "wrong"] for c in evaluation.groupby("uuid")["candidate"].apply(list))
    with pytest.raises(ValueError, match="unknown part"):
        candidate_table(facts, "checked")


def test_top_neurons_best_first_ties_by_index():
    scores = np.array([[0.1, 0.5, 0.5], [0.9, -1.0, 0.0]], np.float32)
    layers, neurons, values = top_neurons(scores, 3)
    assert list(zip(layers, neurons)) == [(1, 0), (0, 1), (0, 2)]
    assert values.tolist() == pytest.approx([0.9, 0.5, 0.5])


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_gpt2"])
def test_run_shard_records_match_the_engine(request, tmp_path, fixture):
    lm = request.getfixturevalue(fixture)
    facts = facts_table()
    out = tmp_path / "shard-0.parquet"
    run_shard(lm, facts, part="discovery", shard=0, n_shards=2, method="ig", steps=4,
              quadrature="riemann", keep_top=5, output=out, batch_queries=2)
    records, meta = read_shard(out)
    assert meta == {"n_layers": lm.n_layers, "d_ff": lm.d_ff, "method": "ig", "steps": 4,
                    "max_steps": None, "quadrature": "riemann"}
    assert not (tmp_path / "shard-0.parquet.checkpoint").exists()
    first = records.iloc[0]
    fact = facts.set_index("uuid").loc[first["uuid"]]
    query = encode_query(lm, fact["template"], fact["sub_label"], first["obj_label"])
    expected = attribute(lm, [query], method="ig", steps=4)[0]
    assert first["prob"] == pytest.approx(expected.prob, rel=1e-5)
    assert first["rank"] == expected.rank and first["predicted"] == expected.predicted
    layers, neurons, values = top_neurons(expected.scores, 5)
    assert list(first["layers"]) == list(range(lm.n_layers))
    assert list(first["top_layers"]) == layers.tolist()
    assert list(first["top_neurons"]) == neurons.tolist()
    checked = records[records["checked"]]
    unchecked = records[~records["checked"]]
    assert len(checked) and len(unchecked)
    assert unchecked["scores"].isna().all()
    row = checked.iloc[0]
    fact = facts.set_index("uuid").loc[row["uuid"]]
    query = encode_query(lm, fact["template"], fact["sub_label"], row["obj_label"])
    full = attribute(lm, [query], method="ig", steps=4)[0].scores
    # the shard's queries share batched passes: equal up to float rounding of the largest score
    np.testing.assert_allclose(score_matrix(row["scores"], lm.n_layers, lm.d_ff), full,
                               rtol=0, atol=1e-5 * np.abs(full).max())


def test_stored_scores_keep_tiny_values_within_one_percent(tmp_path):
    """Scores from 1e-12 to 1 (either sign, and zeros) survive the shard round trip, and
    fact checking reads them back, with a relative error <= 1% (float16 would not)."""
    from types import SimpleNamespace

    from kneurons.factcheck import dkn_scores
    from kneurons.shards import _records

    magnitudes = np.logspace(-12, 0, 97)  # [97]
    full = np.concatenate([magnitudes, -magnitudes, np.zeros(2)]).reshape(4, 49)  # [4, 49]
    full = full.astype(np.float64)
    rows = pd.DataFrame({"uuid": ["u", "u"], "lineid": [0, 0], "relation": ["P1", "P1"],
                         "candidate": ["true", "wrong"], "obj_uri": ["Q1", "Q2"],
                         "obj_label": ["a", "b"], "checked": [True, True]})
    results = [SimpleNamespace(scores=sign * full, prob=0.5, token_probs=[0.5], rank=1,
                               predicted=False) for sign in (1.0, -1.0)]
    queries = [SimpleNamespace(target_ids=[1])] * 2
    write_shard(_records(rows, queries, results, keep_top=3), tmp_path / "s.parquet", {})
    records, _ = read_shard(tmp_path / "s.parquet")
    for sign, blob in zip((1.0, -1.0), records["scores"]):
        back = score_matrix(blob, 4, 49)
        np.testing.assert_allclose(back, sign * full, rtol=1e-2, atol=0)
        assert (back == 0).sum() == 2  # only the true zeros are zero
    # fact checking decodes the same values: one DKN neuron per relation reads one cell
    for flat in (0, 50, 96, 195):
        layer, unit = divmod(flat, 49)
        scores = dkn_scores(records, {"P1": [(layer, unit)]}, 4, 49)
        expected = full[layer, unit]
        got = scores.set_index("candidate")["dkn_score"]
        assert got["true"] == pytest.approx(expected, rel=1e-2, abs=0)
        assert got["wrong"] == pytest.approx(-expected, rel=1e-2, abs=0)
    assert np.float16(1e-8) == 0  # the old dtype lost these values


def test_resumed_attribution_equals_an_uninterrupted_one(tiny_bert, tmp_path):
    facts = facts_table()
    candidates = candidate_table(facts, "evaluation")
    options = dict(method="amig", steps=3, quadrature="riemann", keep_top=4)
    whole = attribute_candidates(tiny_bert, candidates, **options, batch_queries=4)
    checkpoint = Checkpoint(tmp_path / "ckpt", "fp")
    attribute_candidates(tiny_bert, candidates.iloc[:8], **options, batch_queries=4,
                         checkpoint=checkpoint)  # "killed" after 8 records
    assert len(Checkpoint(tmp_path / "ckpt", "fp").load()) == 8
    resumed = attribute_candidates(tiny_bert, candidates, **options, batch_queries=4,
                                   checkpoint=Checkpoint(tmp_path / "ckpt", "fp"))
    pd.testing.assert_frame_equal(resumed, whole)
    # another fingerprint (other inputs or params) discards the checkpoint
    assert Checkpoint(tmp_path / "ckpt", "other").load() is None


def test_amig_skips_causal_templates_without_query_tokens(tiny_gpt2, tmp_path):
    facts = facts_table()  # the P2 template starts with [Y]
    records = run_shard(tiny_gpt2, facts, part="evaluation", shard=0, n_shards=1, method="amig",
                        steps=2, quadrature="riemann", keep_top=3,
                        output=tmp_path / "s.parquet")
    assert set(records["relation"]) == {"P1"}


def part_records(lm, facts, tmp_path, name, part="evaluation", **options):
    out = tmp_path / f"{name}.parquet"
    settings = dict(method="amig", steps=3, quadrature="riemann", keep_top=5)
    run_shard(lm, facts, part=part, shard=0, n_shards=1, output=out, **{**settings, **options})
    return read_shard(out)


@pytest.mark.parametrize(("fixture", "method"), [("tiny_bert", "amig"), ("tiny_gpt2", "ig")])
def test_records_on_their_relations_layers_keep_the_full_attributions_scores(
        request, tmp_path, fixture, method):
    """Fact checking reads a relation's DKN (and control) neurons only: attributed on their
    layers, their scores equal those of the attribution on every layer (each row patches
    one layer); a relation without layers gets the unpatched forward only."""
    lm = request.getfixturevalue(fixture)
    facts = facts_table()
    last = lm.n_layers - 1
    full, meta = part_records(lm, facts, tmp_path, "full", method=method)
    part, part_meta = part_records(lm, facts, tmp_path, "part", method=method,
                                   relation_layers={"P1": [last], "P3": [0]})
    assert part_meta == meta  # fact checking reads both kinds of shards together
    assert part[["uuid", "candidate"]].equals(full[["uuid", "candidate"]])
    assert set(part["relation"]) == {"P1", "P2"}
    for column in ("prob", "rank", "n_tokens"):
        np.testing.assert_allclose(part[column], full[column], rtol=1e-5)
    np.testing.assert_allclose(np.concatenate(part["token_probs"].tolist()),
                               np.concatenate(full["token_probs"].tolist()), rtol=1e-5)
    assert part["predicted"].tolist() == full["predicted"].tolist()
    p1, p2 = part["relation"] == "P1", part["relation"] == "P2"
    assert all(list(layers) == [last] for layers in part.loc[p1, "layers"])
    assert all(len(blob) == lm.d_ff * 4 for blob in part.loc[p1, "scores"])
    assert (part.loc[p1, "steps"] == 3).all() and part.loc[p1, "completeness_error"].notna().all()
    on_last = [(last, j) for j in range(lm.d_ff)]
    np.testing.assert_allclose(neuron_scores(part[p1], on_last, lm.n_layers, lm.d_ff),
                               neuron_scores(full[p1], on_last, lm.n_layers, lm.d_ff),
                               rtol=1e-5, atol=1e-9)
    assert np.isnan(neuron_scores(part[p1], [(0, 0)], lm.n_layers, lm.d_ff)).all()
    assert all(set(layers) == {last} for layers in part.loc[p1, "top_layers"])
    # no layers: one forward, no scores, nothing to converge
    assert part.loc[p2, "scores"].isna().all() and (part.loc[p2, "steps"] == 0).all()
    assert all(len(layers) == 0 and len(top) == 0
               for layers, top in zip(part.loc[p2, "layers"], part.loc[p2, "top_layers"]))
    assert part.loc[p2, "completeness_error"].isna().all() and converged(part[p2]).all()
    # the DKN scores of fact checking, to float rounding
    dkn = {"P1": [(last, 0), (last, 3), (last, lm.d_ff - 1)], "P2": []}
    ours = dkn_scores(part, dkn, lm.n_layers, lm.d_ff)
    today = dkn_scores(full, dkn, lm.n_layers, lm.d_ff)
    np.testing.assert_allclose(ours["dkn_score"], today["dkn_score"], rtol=1e-5, atol=1e-9)
    assert ours["dkn_score"].notna().sum() == ours["has_dkn"].sum() == p1.sum()


def test_full_matrices_restore_the_records_before_the_split(tiny_bert, tmp_path):
    """attribution.full_matrices: the calibration and evaluation parts attributed on every
    layer hold what the shards held before #21: discovery + calibration are the candidates
    of the old discovery part, and every checked record stores attribute()'s whole
    [n_layers, d_ff] matrix (the old reader of whole matrices reads it as it is)."""
    lm, facts = tiny_bert, facts_table()
    parts = {part: part_records(lm, facts, tmp_path, part, part=part)[0]
             for part in ("discovery", "calibration", "evaluation")}
    discovery = pd.concat([parts["discovery"], parts["calibration"]], ignore_index=True)
    assert sorted(zip(discovery["uuid"], discovery["candidate"])) == sorted(
        [(u, "true") for u in facts["uuid"]] + [("u0", "wrong"), ("u1", "wrong")])
    assert len(parts["evaluation"]) == 12
    for records in (discovery, parts["evaluation"]):
        checked = records[records["checked"]]
        for row in checked.itertuples():
            fact = facts.set_index("uuid").loc[row.uuid]
            query = encode_query(lm, fact["template"], fact["sub_label"], row.obj_label)
            expected = attribute(lm, [query], method="amig", steps=3)[0].scores
            assert list(row.layers) == list(range(lm.n_layers))
            np.testing.assert_allclose(score_matrix(row.scores, lm.n_layers, lm.d_ff), expected,
                                       rtol=1e-5, atol=1e-9)
        scores = dkn_scores(records, {"P1": [(0, 1)], "P2": [(1, 2)]}, lm.n_layers, lm.d_ff)
        assert scores["dkn_score"].notna().all() and len(scores) == len(checked)


def test_queries_above_the_tolerance_are_refined_or_marked_not_converged(tiny_bert):
    """ig with 1 Riemann node misses completeness on tiny BERT (errors 0.13-1.2); doubling the
    nodes brings every query within the tolerance by 4 nodes, some only after 2."""
    lm = tiny_bert
    candidates = candidate_table(facts_table(), "evaluation")
    options = dict(method="ig", steps=1, quadrature="riemann", keep_top=4)
    once = attribute_candidates(lm, candidates, **options)  # no refinement
    above = once["completeness_error"] > COMPLETENESS_TOLERANCE
    assert above.any() and (once["steps"] == 1).all()
    assert converged(once).tolist() == (~above).tolist()
    refined = attribute_candidates(lm, candidates, **options, max_steps=8)
    assert refined["converged"].all() and converged(refined).all()
    assert (refined.loc[above, "steps"] >= 2).all() and (refined.loc[~above, "steps"] == 1).all()
    assert (refined["completeness_error"] <= COMPLETENESS_TOLERANCE).all()
    assert set(refined["steps"]) <= {1, 2, 4, 8} and refined["steps"].max() > 2
    # a refined record is the attribution with its number of nodes
    row = refined.loc[refined["steps"].idxmax()]
    fact = facts_table().set_index("uuid").loc[row["uuid"]]
    query = encode_query(lm, fact["template"], fact["sub_label"], row["obj_label"])
    again = attribute(lm, [query], method="ig", steps=int(row["steps"]))[0].scores
    np.testing.assert_allclose(score_matrix(row["scores"], lm.n_layers, lm.d_ff), again,
                               rtol=1e-5, atol=1e-9)
    # the cap reached: kept, counted, marked
    capped = attribute_candidates(lm, candidates, **options, max_steps=2)
    still = capped["completeness_error"] > COMPLETENESS_TOLERANCE
    assert still.any() and (capped.loc[above, "steps"] == 2).all()
    assert (~capped.loc[still, "converged"]).all() and capped.loc[~still, "converged"].all()
    assert len(capped) == len(candidates)


RUNNER = """
import sys
sys.path.insert(0, {scripts!r})
import logging, pandas as pd, torch
logging.basicConfig(level=logging.INFO)
torch.set_num_threads(1)
from kneurons.models import load_model
from kneurons.shards import run_shard
lm = load_model({model!r}, "masked")
run_shard(lm, pd.read_parquet({facts!r}), part="evaluation", shard=0, n_shards=1, method="amig",
          steps=8, quadrature="riemann", keep_top=4, output={out!r}, batch_queries=1)
"""


@pytest.mark.slow
def test_a_sigkilled_shard_job_resumes_to_the_same_output(tiny_bert, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    model_dir = tmp_path / "model"
    tiny_bert.model.save_pretrained(model_dir)
    tiny_bert.tokenizer.save_pretrained(model_dir)
    facts = pd.concat([facts_table(8)] * 4, ignore_index=True)
    facts["uuid"] = [f"u{i}" for i in range(len(facts))]
    facts["lineid"] = range(len(facts))
    facts.to_parquet(tmp_path / "facts.parquet")
    scripts = str(Path(__file__).resolve().parents[1] / "scripts")

    def start(out):
        code = RUNNER.format(scripts=scripts, model=str(model_dir),
                             facts=str(tmp_path / "facts.parquet"), out=str(out))
        return subprocess.Popen([sys.executable, "-c", code], env={**os.environ},
                                stderr=subprocess.PIPE, text=True)

    killed_out = tmp_path / "killed.parquet"
    checkpoint = Path(str(killed_out) + ".checkpoint")
    job = start(killed_out)
    deadline = time.monotonic() + 120
    while len(list(checkpoint.glob("chunk-*.parquet"))) < 3 and time.monotonic() < deadline:
        assert job.poll() is None, "the job ended before it could be killed"
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert not killed_out.exists()
    done = len(list(checkpoint.glob("chunk-*.parquet")))
    assert 3 <= done < 64  # killed mid-way
    rerun = start(killed_out)
    _, log = rerun.communicate()
    assert rerun.returncode == 0, log
    assert f"resuming after {done} of 64 records" in log
    assert not checkpoint.exists()
    whole_out = tmp_path / "whole.parquet"
    whole = start(whole_out)
    assert whole.communicate()[1] is not None and whole.returncode == 0
    pd.testing.assert_frame_equal(pd.read_parquet(killed_out), pd.read_parquet(whole_out))


def test_neuron_scores_read_records_stored_on_some_layers():
    from kneurons.records import SCORE_DTYPE

    full = np.arange(12, dtype=SCORE_DTYPE).reshape(3, 4)  # [n_layers=3, d_ff=4]
    some = np.array([[100, 101, 102, 103]], dtype=SCORE_DTYPE)  # layer 2 only
    records = pd.DataFrame({"uuid": ["a", "b", "c", "d"], "candidate": ["true"] * 4,
                            "layers": [[0, 1, 2], [2], [], None],
                            "scores": [full.tobytes(), some.tobytes(), None, full.tobytes()]})
    got = neuron_scores(records, [(0, 1), (2, 3), (2, 0)], 3, 4)
    assert got[0].tolist() == [1.0, 11.0, 8.0]
    assert np.isnan(got[1, 0]) and got[1, 1:].tolist() == [103.0, 100.0]  # layer 0 not stored
    assert np.isnan(got[2]).all()  # no attribution
    assert got[3].tolist() == [1.0, 11.0, 8.0]  # a missing value: every layer
    with pytest.raises(ValueError, match=r"48 bytes of scores; expected 16 \(float32 \[1, 4\]\)"):
        neuron_scores(records.assign(layers=[[0, 1, 2], [1], [], None],
                                     scores=[full.tobytes(), full.tobytes(), None, None]),
                      [(1, 0)], 3, 4)


def test_attributed_layers_from_the_dkn_document():
    from kneurons.records import attributed_layers

    document = {"relations": {
        "P2": {"dkn": [[5, 1], [1, 0]], "layers": [1, 3, 5]},  # DKN and control layers
        "P1": {"dkn": [[4, 0], [2, 9], [4, 1]]},  # a document without "layers"
        "P3": {"dkn": [], "layers": []}}}
    assert attributed_layers(document) == {"P1": [2, 4], "P2": [1, 3, 5], "P3": []}
    assert list(attributed_layers(document)) == ["P1", "P2", "P3"]
    assert attributed_layers({}) == {}
