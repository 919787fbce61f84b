"""Attribution shards: which candidates are attributed, the record format, resumption."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kneurons.attribution import attribute
from kneurons.checkpoint import Checkpoint
from kneurons.queries import encode_query
from kneurons.neurons import top_neurons
from kneurons.records import read_shard, score_matrix, write_shard
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
    facts = facts_table()
    discovery = candidate_table(facts, "discovery")
    assert (discovery["candidate"] == "wrong").sum() == 2  # the calibration facts
    assert set(discovery.loc[discovery["candidate"] == "wrong", "uuid"]) == {"u0", "u1"}
    assert discovery.loc[discovery["candidate"] == "wrong", "obj_label"].tolist() == ["Paris", "Rome"]
    evaluation = candidate_table(facts, "evaluation")
    assert len(evaluation) == 12 and evaluation["checked"].all()


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
                    "quadrature": "riemann"}
    assert not (tmp_path / "shard-0.parquet.checkpoint").exists()
    first = records.iloc[0]
    fact = facts.set_index("uuid").loc[first["uuid"]]
    query = encode_query(lm, fact["template"], fact["sub_label"], first["obj_label"])
    expected = attribute(lm, [query], method="ig", steps=4)[0]
    assert first["prob"] == pytest.approx(expected.prob, rel=1e-5)
    assert first["rank"] == expected.rank and first["predicted"] == expected.predicted
    layers, neurons, values = top_neurons(expected.scores, 5)
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
    np.testing.assert_allclose(score_matrix(row["scores"], lm.n_layers, lm.d_ff), full,
                               rtol=1e-6, atol=1e-30)


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
