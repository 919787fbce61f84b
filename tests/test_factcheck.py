"""Fact checking with DKN: scores, metrics and the threshold, against hand-counted values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from kneurons.factcheck import (candidate_thresholds, choose_threshold, dkn_by_relation,
                                dkn_scores, f1_curve, fact_check_metrics,
                                per_relation_metrics)
from kneurons.records import SCORE_DTYPE, score_matrix

N_LAYERS, D_FF = 2, 4
DKN = {"P36": [(0, 1), (1, 2), (0, 1)], "P19": []}  # (0, 1) twice: a set, counted once


def matrix(a: float, b: float) -> bytes:
    """float32 [2, 4] with a at (0, 1), b at (1, 2) and 100 elsewhere (wrong cells show)."""
    m = np.full((N_LAYERS, D_FF), 100.0, dtype=SCORE_DTYPE)
    m[0, 1], m[1, 2] = a, b
    return m.tobytes()


def record(uuid, relation, candidate, scores, checked=True, prob=0.5, predicted=False):
    return {"uuid": uuid, "lineid": 0, "relation": relation, "candidate": candidate,
            "obj_uri": "Q1", "obj_label": "x", "checked": checked, "n_tokens": 1,
            "prob": prob, "token_probs": [prob], "rank": 1, "predicted": predicted,
            "top_layers": [0], "top_neurons": [0], "top_scores": [0.0], "scores": scores}


@pytest.fixture()
def records() -> pd.DataFrame:
    rows = [
        record("f2", "P36", "wrong", matrix(0.75, 0.25), prob=0.125),
        record("f2", "P36", "true", matrix(1.0, 2.0), prob=0.25, predicted=True),
        record("f1", "P36", "true", matrix(0.5, 0.25), prob=0.75),
        record("f1", "P36", "wrong", matrix(-0.5, 0.0), prob=0.0625),
        record("f3", "P37", "true", matrix(9.0, 9.0), prob=0.5, predicted=True),  # no DKN entry
        record("f3", "P37", "wrong", matrix(9.0, 9.0), prob=0.375),
        record("f5", "P19", "true", None, prob=0.5),  # empty DKN list: scores never read
        record("f5", "P19", "wrong", None, prob=0.5),
        record("f4", "P36", "true", None, checked=False),  # unchecked: left out
    ]
    return pd.DataFrame(rows)


def test_dkn_scores_mean_over_the_dkn_set(records):
    out = dkn_scores(records, DKN, N_LAYERS, D_FF)
    assert list(out.columns) == ["uuid", "relation", "candidate", "label", "dkn_score", "prob",
                                 "predicted", "has_dkn"]
    assert list(zip(out["relation"], out["uuid"], out["candidate"])) == [
        ("P19", "f5", "true"), ("P19", "f5", "wrong"),
        ("P36", "f1", "true"), ("P36", "f1", "wrong"),
        ("P36", "f2", "true"), ("P36", "f2", "wrong"),
        ("P37", "f3", "true"), ("P37", "f3", "wrong")]
    assert out["label"].tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
    # (0.5 + 0.25) / 2, (-0.5 + 0) / 2, (1 + 2) / 2, (0.75 + 0.25) / 2
    assert out["dkn_score"].iloc[2:6].tolist() == [0.375, -0.25, 1.5, 0.5]
    assert out["dkn_score"].iloc[[0, 1, 6, 7]].isna().all()
    assert out["has_dkn"].tolist() == [False, False, True, True, True, True, False, False]
    assert out["prob"].iloc[2:6].tolist() == [0.75, 0.0625, 0.25, 0.125]
    assert out["predicted"].tolist() == [False, False, False, False, True, False, True, False]
    assert "f4" not in set(out["uuid"])


def test_dkn_scores_match_the_shard_score_matrix(records):
    out = dkn_scores(records, DKN, N_LAYERS, D_FF).set_index(["uuid", "candidate"])
    for row in records[(records["relation"] == "P36") & records["checked"]].itertuples():
        m = score_matrix(row.scores, N_LAYERS, D_FF)
        assert out.loc[(row.uuid, row.candidate), "dkn_score"] == pytest.approx(
            (m[0, 1] + m[1, 2]) / 2)


def test_dkn_scores_rejects_bad_input(records):
    with pytest.raises(ValueError, match=r"neuron \(2, 0\)"):
        dkn_scores(records, {"P36": [(2, 0)]}, N_LAYERS, D_FF)
    with pytest.raises(ValueError, match="exactly one true and one wrong"):
        dkn_scores(records.drop(index=0), DKN, N_LAYERS, D_FF)
    with pytest.raises(ValueError, match=r"has 32 bytes of scores; expected 24"):
        dkn_scores(records, DKN, N_LAYERS, 3)
    bad = records.copy()
    bad.loc[2, "scores"] = None
    with pytest.raises(ValueError, match="f1/true has no scores"):
        dkn_scores(bad, DKN, N_LAYERS, D_FF)


def test_dkn_scores_without_checked_records(records):
    out = dkn_scores(records[~records["checked"]], DKN, N_LAYERS, D_FF)
    assert len(out) == 0 and "dkn_score" in out.columns


def test_dkn_by_relation_reads_the_dkn_json():
    doc = {"relations": {"P36": {"dkn": [[0, 1], [1, 2]], "n": 3}, "P19": {"dkn": []}}}
    assert dkn_by_relation(doc) == {"P36": [(0, 1), (1, 2)], "P19": []}


# Hand-made scores: facts f1, f2 (P36), f3 (P19) have DKN; f4 (P37) has none.
#   row  fact label dkn_score prob  predicted
#   A    f1   1     0.9       0.6   T
#   B    f1   0     0.2       0.3   F
#   C    f2   1     0.4       0.2   F
#   D    f2   0     0.5       0.5   T
#   E    f3   1     0.7       0.4   T
#   F    f3   0     0.1       0.1   F
#   G    f4   1     NaN       0.7   T
#   H    f4   0     NaN       0.05  F
def hand_scores() -> pd.DataFrame:
    return pd.DataFrame({
        "uuid": ["f1", "f1", "f2", "f2", "f3", "f3", "f4", "f4"],
        "relation": ["P36", "P36", "P36", "P36", "P19", "P19", "P37", "P37"],
        "candidate": ["true", "wrong"] * 4,
        "label": [1, 0, 1, 0, 1, 0, 1, 0],
        "dkn_score": [0.9, 0.2, 0.4, 0.5, 0.7, 0.1, np.nan, np.nan],
        "prob": [0.6, 0.3, 0.2, 0.5, 0.4, 0.1, 0.7, 0.05],
        "predicted": [True, False, False, True, True, False, True, False],
        "has_dkn": [True] * 6 + [False] * 2,
    })


def test_fact_check_metrics_by_hand():
    m = fact_check_metrics(hand_scores(), 0.45)
    w = m["with_DKN"]
    # judged correct: A, D, E (G has no DKN). TP = A, E; FP = D; FN = C, G; TN = B, F, H
    assert w["precision"] == pytest.approx(2 / 3)
    assert w["recall"] == pytest.approx(2 / 4)
    assert w["f1"] == pytest.approx(4 / 7)
    # class "wrong": judged wrong B, C, F, G, H; TP = B, F, H; FP = C, G; FN = D
    assert w["precision_wrong"] == pytest.approx(3 / 5)
    assert w["recall_wrong"] == pytest.approx(3 / 4)
    assert w["f1_wrong"] == pytest.approx(6 / 9)
    # NaN -> 0.1 - 1; pairs (pos > neg) of 16: 0.9: 4, 0.4: 3, 0.7: 4, -0.9: tie with H 0.5
    assert w["auroc"] == pytest.approx(11.5 / 16)
    assert w["auroc_wrong"] == pytest.approx(11.5 / 16)
    assert w["threshold"] == 0.45
    assert (w["n_true"], w["n_wrong"], w["n_facts"], w["n_no_dkn"]) == (4, 4, 4, 2)
    assert (w["n_relations"], w["n_relations_no_dkn"]) == (3, 1)

    b = m["wo_DKN"]
    # judged correct = predicted: A, D, E, G. TP = A, E, G; FP = D; FN = C
    assert (b["precision"], b["recall"], b["f1"]) == pytest.approx((3 / 4, 3 / 4, 3 / 4))
    # class "wrong": judged wrong B, C, F, H; TP = B, F, H; FP = C; FN = D
    assert (b["precision_wrong"], b["recall_wrong"], b["f1_wrong"]) == pytest.approx(
        (3 / 4, 3 / 4, 3 / 4))
    # prob pairs of 16: 0.6: 4, 0.2: 2, 0.4: 3, 0.7: 4
    assert b["auroc"] == pytest.approx(13 / 16)
    assert b["threshold"] is None
    assert b["n_no_dkn"] == 2


def test_a_score_equal_to_lambda_is_not_above_it():
    # λ = 0.5 = D's score: judged correct only A (0.9) and E (0.7); TP 2, FP 0, FN 2
    w = fact_check_metrics(hand_scores(), 0.5)["with_DKN"]
    assert (w["precision"], w["recall"], w["f1"]) == pytest.approx((1.0, 0.5, 4 / 6))
    curve = f1_curve(hand_scores(), [0.5])
    assert (curve["tp"].iloc[0], curve["fp"].iloc[0], curve["fn"].iloc[0]) == (2, 0, 2)


def test_fact_check_metrics_edge_cases():
    only_true = hand_scores().query("label == 1")
    assert math.isnan(fact_check_metrics(only_true, 0.45)["with_DKN"]["auroc"])
    assert math.isnan(fact_check_metrics(only_true, 0.45)["wo_DKN"]["auroc"])
    nan_lambda = fact_check_metrics(hand_scores(), math.nan)["with_DKN"]
    # nothing accepted: precision n/a (NaN, no longer 0), recall and F1 = 2TP/(2TP+FP+FN) 0
    assert math.isnan(nan_lambda["precision"])
    assert (nan_lambda["recall"], nan_lambda["f1"]) == (0, 0)
    assert nan_lambda["recall_wrong"] == 1.0
    empty = fact_check_metrics(hand_scores().iloc[:0], 0.45)["with_DKN"]
    # no statements: every rate is 0/0 (NaN, no longer 0)
    assert math.isnan(empty["f1"]) and (empty["n_true"], empty["n_facts"]) == (0, 0)
    assert math.isnan(empty["auroc"])


def test_choose_threshold_by_hand():
    s = hand_scores()
    assert candidate_thresholds(s) == pytest.approx([-0.9, 0.15, 0.3, 0.45, 0.6, 0.8])
    # F1 per candidate (4 positives, G never judged correct):
    # -0.9: 6/10, 0.15: 6/9, 0.3: TP 3 FP 1 FN 1 -> 6/8, 0.45: 4/7, 0.6: 4/6, 0.8: 2/5
    assert choose_threshold(s) == pytest.approx(0.3)
    # only dkn_score and label matter: row order, prob and predicted do not
    shuffled = s.sample(frac=1.0, random_state=1).assign(prob=0.0, predicted=True)
    assert choose_threshold(shuffled) == pytest.approx(0.3)


def test_choose_threshold_ties_take_the_smallest_lambda():
    s = pd.DataFrame({"uuid": list("abcd"), "relation": "P1", "label": [1, 0, 0, 1],
                      "dkn_score": [1.0, 2.0, 3.0, 4.0], "has_dkn": True})
    # 0.0: TP 2 FP 2 -> 4/6; 1.5: 2/5; 2.5: 2/4; 3.5: TP 1 FN 1 -> 2/3 (tie with 0.0)
    assert f1_curve(s, [0.0, 3.5])["f1"].tolist() == [2 / 3, 2 / 3]
    assert choose_threshold(s) == 0.0


def test_choose_threshold_counts_relations_without_dkn_as_missed():
    finite = pd.DataFrame({"label": [1, 0, 0, 0, 1], "dkn_score": [0.1, 0.2, 0.3, 0.4, 0.9],
                           "uuid": list("abcde"), "relation": "P1", "has_dkn": True})
    # alone: -0.9: 4/7, 0.65: TP 1 FN 1 -> 2/3 (best)
    assert choose_threshold(finite) == pytest.approx(0.65)
    missed = pd.DataFrame({"label": [1, 1], "dkn_score": [np.nan, np.nan], "uuid": ["f", "g"],
                           "relation": "P2", "has_dkn": False})
    # with two more positives never judged correct: -0.9: 4/9 (best), 0.65: 2/5
    assert choose_threshold(pd.concat([finite, missed])) == pytest.approx(-0.9)
    assert math.isnan(choose_threshold(missed))


def test_f1_curve_by_hand():
    curve = f1_curve(hand_scores(), [0.3, 0.45, 10.0])
    assert curve["tp"].tolist() == [3, 2, 0]
    assert curve["fp"].tolist() == [1, 1, 0]
    assert curve["fn"].tolist() == [1, 2, 4]
    # λ = 10 accepts nothing: precision n/a (NaN, no longer 0)
    assert curve["precision"].tolist()[:2] == pytest.approx([3 / 4, 2 / 3])
    assert math.isnan(curve["precision"].iloc[2])
    assert curve["recall"].tolist() == pytest.approx([3 / 4, 1 / 2, 0.0])
    assert curve["f1"].tolist() == pytest.approx([3 / 4, 4 / 7, 0.0])
    assert curve["f1"].iloc[1] == pytest.approx(fact_check_metrics(hand_scores(), 0.45)
                                                ["with_DKN"]["f1"])


def test_per_relation_metrics_by_hand():
    out = per_relation_metrics(hand_scores(), 0.45)
    assert list(out.columns) == ["relation", "method", "n", "precision", "recall", "f1",
                                 "has_dkn"]
    assert list(zip(out["relation"], out["method"])) == [
        ("P19", "wo_DKN"), ("P19", "with_DKN"), ("P36", "wo_DKN"), ("P36", "with_DKN"),
        ("P37", "wo_DKN"), ("P37", "with_DKN")]
    assert out["n"].tolist() == [2, 2, 4, 4, 2, 2]
    # P19: E correct, F not, both methods. P36: A TP, B TN, C FN, D FP, both methods.
    # P37: wo_DKN G TP, H TN; with_DKN nothing judged correct
    # P37 with_DKN accepts nothing: precision n/a (NaN, no longer 0)
    assert out["precision"].tolist()[:5] == pytest.approx([1, 1, 0.5, 0.5, 1])
    assert math.isnan(out["precision"].iloc[5])
    assert out["recall"].tolist() == pytest.approx([1, 1, 0.5, 0.5, 1, 0])
    assert out["f1"].tolist() == pytest.approx([1, 1, 0.5, 0.5, 1, 0])
    assert out["has_dkn"].tolist() == [True, True, True, True, False, False]


def test_check_facts_takes_lambda_from_the_calibration_slice_only(records):
    from kneurons.factcheck import check_facts

    # calibration: P36 true 1.0 vs wrong 0.0 -> the best λ separates them, midpoint 0.5
    calibration = pd.DataFrame([record("c1", "P36", "true", matrix(1.0, 1.0)),
                                record("c1", "P36", "wrong", matrix(0.0, 0.0)),
                                record("c2", "P36", "true", None, checked=False)])
    result = check_facts(records, calibration, DKN, N_LAYERS, D_FF, ["auto", 0.3], n_boot=100,
                         n_perm=100)
    assert result["settings"] == [
        {"setting": "auto", "threshold": pytest.approx(0.5), "threshold_source": "auto",
         "accepts_all": False},
        {"setting": "0.3", "threshold": 0.3, "threshold_source": "config",
         "accepts_all": False}]
    rows = {(m["setting"], m["population"]): m["metrics"] for m in result["metrics"]}
    assert sorted(rows) == [("0.3", "all_relations"), ("0.3", "dkn_relations"),
                            ("auto", "all_relations"), ("auto", "dkn_relations")]
    auto = rows[("auto", "all_relations")]
    assert auto["with_DKN"]["threshold"] == pytest.approx(0.5)
    # evaluation P36 scores: true 0.375, wrong -0.25, true 1.5, wrong 0.5 -> only f2 true is > 0.5
    assert auto["with_DKN"]["recall"] == pytest.approx(1 / 4)
    assert len(result["calibration_scores"]) == 2
    # at 0.3: f1 true 0.375, f2 true 1.5 and f2 wrong 0.5 are above -> recall 2/4
    assert rows[("0.3", "all_relations")]["with_DKN"]["recall"] == pytest.approx(2 / 4)
    per_relation = result["per_relation"]
    assert set(per_relation["relation"]) == {"P19", "P36", "P37"}
    assert set(per_relation["setting"]) == {"auto", "0.3"}
    assert result["f1_curve"]["threshold"].is_monotonic_increasing
    # a single λ is one setting
    fixed = check_facts(records, calibration, DKN, N_LAYERS, D_FF, 0.3, n_boot=20, n_perm=20)
    assert [s["setting"] for s in fixed["settings"]] == ["0.3"]


def test_both_populations_and_with_dkn_abstentions(records):
    """All relations: with_DKN abstains on (judges not correct) the relations without DKN,
    counted; relations with DKN only (the authors' population): those leave both methods."""
    from kneurons.factcheck import check_facts

    result = check_facts(records, records.iloc[:0], DKN, N_LAYERS, D_FF, [0.3], n_boot=100,
                         n_perm=100)
    rows = {m["population"]: m["metrics"] for m in result["metrics"]}
    every, dkn_only = rows["all_relations"], rows["dkn_relations"]
    # P19 (empty DKN) and P37 (no entry): 4 candidates abstained by with_DKN
    assert every["with_DKN"]["n_abstained"] == 4 and every["wo_DKN"]["n_abstained"] == 0
    assert every["with_DKN"]["n_true"] == 4 and dkn_only["with_DKN"]["n_true"] == 2
    assert dkn_only["wo_DKN"]["n_true"] == dkn_only["with_DKN"]["n_true"] == 2
    assert dkn_only["with_DKN"]["n_abstained"] == 0 and dkn_only["with_DKN"]["n_relations"] == 1
    # with_DKN at 0.3 on P36: TP f1, f2; FP f2-wrong -> precision 2/3, recall 1 (P36 only)
    # but recall 2/4 over all relations (the abstained true candidates are missed)
    assert dkn_only["with_DKN"]["recall"] == pytest.approx(1.0)
    assert every["with_DKN"]["recall"] == pytest.approx(0.5)
    # wo_DKN: predicted f2 true (P36) and f3 true (P37) -> recall 1/2 on P36 only, 2/4 on all
    assert dkn_only["wo_DKN"]["recall"] == pytest.approx(0.5)
    assert every["wo_DKN"]["recall"] == pytest.approx(0.5)


def test_facts_without_records_are_dropped_for_both_methods_and_counted(tiny_gpt2, tmp_path):
    """Causal templates starting with [Y] get no AMIG records; fact checking scores both
    methods on the same remaining facts and counts the dropped ones."""
    from kneurons.factcheck import check_facts
    from kneurons.shards import run_shard

    facts = pd.DataFrame({
        "uuid": ["a", "b", "c"], "lineid": [0, 1, 2], "relation": ["P1", "P1", "P1923"],
        "template": ["[X] lives in [Y] .", "[X] lives in [Y] .", "[Y] is where [X] won ."],
        "sub_label": ["Anna", "Bob", "Carl"], "obj_uri": ["Q1", "Q2", "Q3"],
        "obj_label": ["Paris", "Rome", "Oslo"], "wrong_obj_uri": ["Q2", "Q1", "Q4"],
        "wrong_obj_label": ["Rome", "Paris", "Bern"]})
    records = run_shard(tiny_gpt2, facts, part="evaluation", shard=0, n_shards=1,
                        method="amig", steps=2, quadrature="riemann", keep_top=3,
                        output=tmp_path / "s.parquet")
    assert set(records["uuid"]) == {"a", "b"}
    dkn = {"P1": [(0, 1)], "P1923": [(0, 2)]}
    result = check_facts(records, records.iloc[:0], dkn, tiny_gpt2.n_layers, tiny_gpt2.d_ff,
                         [0.0], facts, n_boot=100, n_perm=100)
    assert {k: result["dropped"][k] for k in ("n_facts", "relations")} == {
        "n_facts": 1, "relations": ["P1923"]}
    assert result["dropped"]["unconverged"] == {"n_facts": 0, "relations": []}
    for entry in result["metrics"]:
        wo, with_ = entry["metrics"]["wo_DKN"], entry["metrics"]["with_DKN"]
        assert wo["n_facts"] == with_["n_facts"] == 2
        assert wo["n_true"] == with_["n_true"] == 2 and wo["n_wrong"] == with_["n_wrong"] == 2
        assert wo["n_facts_dropped"] == with_["n_facts_dropped"] == 1


# ---- baselines, controls, intervals and tests (known answers) --------------------------------

def synthetic(n_facts: int, seed: int = 0, *, dkn_true=1.0, dkn_wrong=0.0) -> pd.DataFrame:
    """Balanced statements of ``n_facts`` facts in two relations: the DKN score separates true
    (``dkn_true``) from wrong (``dkn_wrong``); the model predicts the true object of a random
    half of the facts and the wrong object of the others (wo_DKN at chance: it accepts one
    statement per fact, the right one half the time); prob is noise."""
    rng = np.random.default_rng(seed)
    right = rng.permutation(np.arange(n_facts) < n_facts // 2)
    uuid = np.repeat([f"u{k:03d}" for k in range(n_facts)], 2)
    label = np.tile([1, 0], n_facts)
    return pd.DataFrame({
        "uuid": uuid, "relation": np.repeat(np.where(np.arange(n_facts) % 2, "P1", "P2"), 2),
        "candidate": np.tile(["true", "wrong"], n_facts), "label": label,
        "dkn_score": np.where(label == 1, dkn_true, dkn_wrong).astype(float),
        "prob": rng.uniform(size=2 * n_facts),
        "predicted": np.where(label == 1, np.repeat(right, 2), ~np.repeat(right, 2)),
        "has_dkn": True})


def table_of(scores, calibration=None, thresholds=(0.5,), **kwargs):
    from kneurons.factcheck import table_rows

    kwargs = {"seed": 0, "n_boot": 400, "n_perm": 800, **kwargs}
    rows, tests = table_rows(scores, scores if calibration is None else calibration,
                             list(thresholds), **kwargs)
    by_row = {(r["population"], r["method"], r["setting"]): r for r in rows}
    by_test = {(t["population"], t["metric"], t["baseline"], t["setting"]): t for t in tests}
    return by_row, by_test


def test_delta_f1_of_a_perfect_checker_against_chance_excludes_zero():
    rows, tests = table_of(synthetic(80))
    with_dkn = rows[("all_relations", "with_DKN", "0.5")]
    wo_dkn = rows[("all_relations", "wo_DKN", "")]
    assert (with_dkn["precision"], with_dkn["recall"], with_dkn["f1"]) == (1.0, 1.0, 1.0)
    # one statement accepted per fact, the true one for half of them
    assert (wo_dkn["precision"], wo_dkn["recall"], wo_dkn["f1"]) == (0.5, 0.5, 0.5)
    assert wo_dkn["f1_low"] < 0.5 < wo_dkn["f1_high"]
    delta = tests[("all_relations", "f1", "wo_DKN", "0.5")]
    assert delta["method"] == "with_DKN" and delta["estimate"] == pytest.approx(0.5)
    assert 0 < delta["low"] <= 0.5 <= delta["high"]
    assert delta["p"] < 0.01 and delta["p_holm"] < 0.05 and delta["n_facts"] == 80
    # and the perfect checker beats "accept all" (F1 2/3) too
    assert tests[("all_relations", "f1", "all_correct", "0.5")]["estimate"] == pytest.approx(1 / 3)


def test_identical_methods_differ_by_exactly_zero_with_p_one():
    """A control set with the DKN's own scores: ΔF1 = 0 on every resample (all rows and
    differences come from the same resamples) and the swap test cannot tell them apart."""
    scores = synthetic(40, dkn_true=0.6, dkn_wrong=0.4)
    scores["dkn_score"] += np.random.default_rng(3).normal(0, 0.2, len(scores))
    scores["random_matched_score"] = scores["dkn_score"]
    scores["has_random_matched"] = True
    rows, tests = table_of(scores, thresholds=["auto", 0.5])
    for setting in ("auto", "0.5"):
        control = rows[("all_relations", "random_matched", setting)]
        dkn = rows[("all_relations", "with_DKN", setting)]
        assert control["threshold"] == dkn["threshold"]
        assert control["f1"] == dkn["f1"] and control["f1_low"] == dkn["f1_low"]
        delta = tests[("all_relations", "f1", "random_matched", setting)]
        assert (delta["estimate"], delta["low"], delta["high"]) == (0.0, 0.0, 0.0)
        assert delta["p"] == 1.0 and delta["p_holm"] == 1.0


def test_all_correct_on_balanced_data_is_p_half_r_one_f1_two_thirds_exactly():
    rows, _ = table_of(synthetic(30))
    row = rows[("all_relations", "all_correct", "")]
    assert (row["precision"], row["recall"], row["f1"]) == (0.5, 1.0, 2 / 3)
    assert (row["precision_low"], row["precision_high"]) == (0.5, 0.5)  # on every resample
    assert (row["f1_low"], row["f1_high"]) == (2 / 3, 2 / 3)
    assert row["auroc"] == 0.5 and row["pairwise"] == 0.5  # every fact a tie
    assert row["accepts_all"] and row["threshold"] is None
    assert (row["n_facts"], row["n_true"], row["n_wrong"]) == (30, 30, 30)


def test_prob_threshold_comes_from_the_calibration_slice_only():
    from kneurons.factcheck import choose_threshold

    calibration = synthetic(20, seed=1)
    calibration["prob"] = np.where(calibration["label"] == 1, 0.8, 0.1)  # λ_p: midpoint 0.45
    evaluation = synthetic(20, seed=2)
    rows, _ = table_of(evaluation, calibration)
    prob = rows[("all_relations", "prob", "auto")]
    assert prob["threshold"] == pytest.approx(0.45) == choose_threshold(calibration, "prob")
    assert prob["threshold_source"] == "auto" and not prob["accepts_all"]
    changed = evaluation.assign(prob=1.0 - evaluation["prob"])
    again, _ = table_of(changed, calibration)
    assert again[("all_relations", "prob", "auto")]["threshold"] == prob["threshold"]
    moved, _ = table_of(evaluation, calibration.assign(prob=calibration["prob"] / 2))
    assert moved[("all_relations", "prob", "auto")]["threshold"] == pytest.approx(0.225)


def test_auto_lambda_that_accepts_everything_is_flagged_and_logged(caplog):
    from kneurons.factcheck import accepts_all, choose_threshold

    # calibration: wrong statements score above true ones, so the best F1 (2/3) is the
    # sentinel below every score
    calibration = synthetic(10, dkn_true=0.0, dkn_wrong=1.0)
    lam = choose_threshold(calibration)
    assert lam == -1.0 and accepts_all(lam, calibration)
    assert not accepts_all(0.5, calibration) and not accepts_all(math.nan, calibration)
    rows, _ = table_of(synthetic(10), calibration, thresholds=["auto", 1e-6])
    assert rows[("all_relations", "with_DKN", "auto")]["accepts_all"]
    assert not rows[("all_relations", "with_DKN", "1e-06")]["accepts_all"]

    from kneurons.factcheck import check_facts

    evaluation = pd.DataFrame([record(f"e{k}", "P36", c, matrix(v, v))
                               for k in range(3) for c, v in (("true", 1.0), ("wrong", 0.0))])
    calib = pd.DataFrame([record(f"c{k}", "P36", c, matrix(v, v))
                          for k in range(3) for c, v in (("true", 0.0), ("wrong", 1.0))])
    with caplog.at_level("WARNING", logger="kneurons.factcheck"):
        result = check_facts(evaluation, calib, DKN, N_LAYERS, D_FF, ["auto"], n_boot=50,
                             n_perm=50)
    assert result["settings"][0]["accepts_all"] and result["settings"][0]["threshold"] == -1.0
    assert "accept all" in caplog.text and "with_DKN" in caplog.text
    assert result["f1_curve"].loc[result["f1_curve"]["threshold"] == -1.0,
                                  "accepts_all"].tolist() == [True]


def test_precision_with_nothing_accepted_is_na_with_no_interval():
    rows, _ = table_of(synthetic(12), thresholds=[10.0])
    row = rows[("all_relations", "with_DKN", "10")]
    assert math.isnan(row["precision"]) and math.isnan(row["precision_low"])
    assert (row["recall"], row["f1"]) == (0.0, 0.0)


def test_pairwise_accuracy_by_hand():
    rows, tests = table_of(hand_scores(), thresholds=[0.45])
    dkn = rows[("all_relations", "with_DKN", "0.45")]
    prob = rows[("all_relations", "prob", "auto")]
    # DKN: f1 0.9 > 0.2, f2 0.4 < 0.5, f3 0.7 > 0.1; f4 has no DKN and is left out
    assert (dkn["pairwise"], dkn["n_pairwise"]) == (pytest.approx(2 / 3), 3)
    # P: f1, f3, f4 true above wrong; f2 not
    assert (prob["pairwise"], prob["n_pairwise"]) == (0.75, 4)
    assert rows[("all_relations", "wo_DKN", "")]["pairwise"] == 0.75  # wo_DKN ranks by prob
    # on the 3 facts with both: 2/3 - 2/3
    pair = tests[("all_relations", "pairwise", "prob", "")]
    assert pair["method"] == "with_DKN" and pair["n_facts"] == 3
    assert pair["estimate"] == pytest.approx(0.0) and pair["p"] == 1.0
    # DKN only: f4 leaves both
    assert rows[("dkn_relations", "prob", "auto")]["n_pairwise"] == 3


def test_pairwise_dkn_against_prob_with_and_without_an_effect():
    informative = synthetic(60)  # DKN separates every fact; prob is noise
    _, tests = table_of(informative)
    pair = tests[("all_relations", "pairwise", "prob", "")]
    assert pair["estimate"] > 0.3 and pair["low"] > 0 and pair["p"] < 0.01
    same = informative.assign(prob=informative["dkn_score"])
    _, tests = table_of(same)
    pair = tests[("all_relations", "pairwise", "prob", "")]
    assert (pair["estimate"], pair["p"]) == (0.0, 1.0)


def test_weighted_auroc_matches_sklearn_on_resamples():
    from sklearn.metrics import roc_auc_score

    from kneurons.factcheck import _Auroc

    rng = np.random.default_rng(0)
    values = rng.integers(0, 5, 40).astype(float)  # ties
    labels = rng.integers(0, 2, 40)
    auroc = _Auroc(values, labels)
    assert auroc(np.ones(40)) == pytest.approx(roc_auc_score(labels, values))
    rows = rng.integers(0, 40, 40)
    assert auroc(np.bincount(rows, minlength=40).astype(float)) == pytest.approx(
        roc_auc_score(labels[rows], values[rows]))


def control_records():
    """P36 with DKN (0, 1), (1, 2); its controls random_matched (0, 0) and frequent_kn
    (1, 3). Three facts; matrix cells chosen so that each set ranks them differently."""
    def m(dkn, rand, freq):
        out = np.zeros((N_LAYERS, D_FF), dtype=SCORE_DTYPE)
        out[0, 1] = out[1, 2] = dkn
        out[0, 0], out[1, 3] = rand, freq
        return out.tobytes()
    rows = []
    for k, (true, wrong) in enumerate([((1.0, 0.0, 2.0), (0.0, 1.0, 1.0)),
                                       ((1.0, 0.0, 2.0), (0.0, 1.0, 3.0)),
                                       ((1.0, 1.0, 2.0), (0.0, 1.0, 1.0))]):
        rows += [record(f"f{k}", "P36", "true", m(*true), prob=0.5),
                 record(f"f{k}", "P36", "wrong", m(*wrong), prob=0.25)]
    rows += [record("g", "P19", "true", None), record("g", "P19", "wrong", None)]
    return pd.DataFrame(rows)


def test_control_rows_from_a_document_with_controls():
    from kneurons.factcheck import check_facts, neuron_sets

    document = {"relations": {
        "P36": {"dkn": [[0, 1], [1, 2]],
                "controls": {"random_matched": [[0, 0]], "frequent_kn": [[1, 3]]}},
        "P19": {"dkn": []}}}
    sets = neuron_sets(document)
    assert sets["random_matched"] == {"P36": [(0, 0)]} and sets["frequent_kn"] == {"P36": [(1, 3)]}
    records = control_records()
    result = check_facts(records, records, document, N_LAYERS, D_FF, [0.5], n_boot=100,
                         n_perm=100)
    scores = result["scores"].set_index(["uuid", "candidate"])
    assert scores.loc[("f1", "wrong"), "frequent_kn_score"] == 3.0
    assert scores.loc[("f2", "true"), "random_matched_score"] == 1.0
    assert np.isnan(scores.loc[("g", "true"), "random_matched_score"])
    rows = {(r["population"], r["method"]): r for r in result["rows"]}
    rand = rows[("all_relations", "random_matched")]
    # at 0.5: accepted f0 wrong, f1 wrong, f2 true, f2 wrong -> TP 1, FP 3, FN 3 (g abstained)
    assert rand["available"] and (rand["precision"], rand["recall"]) == (0.25, 0.25)
    assert (rand["n_relations_no_set"], rand["n_abstained"]) == (1, 2)
    freq = rows[("dkn_relations", "frequent_kn")]
    # every statement of P36 above 0.5: TP 3, FP 3
    assert (freq["precision"], freq["recall"], freq["f1"]) == (0.5, 1.0, 2 / 3)
    # pairwise: frequent_kn 2 > 1, 2 < 3, 2 > 1 -> 2/3; random_matched 0 < 1, 0 < 1, tie -> 1/6
    assert freq["pairwise"] == pytest.approx(2 / 3)
    assert rows[("dkn_relations", "random_matched")]["pairwise"] == pytest.approx(1 / 6)
    tests = {(t["population"], t["baseline"]): t for t in result["comparisons"]}
    assert not math.isnan(tests[("all_relations", "random_matched")]["p"])


def test_control_rows_without_controls_are_not_available():
    from kneurons.factcheck import check_facts

    records = control_records()
    document = {"relations": {"P36": {"dkn": [[0, 1], [1, 2]]}, "P19": {"dkn": []}}}
    for dkn in (document, {"P36": [(0, 1), (1, 2)]}):  # a document, a plain map
        result = check_facts(records, records, dkn, N_LAYERS, D_FF, ["auto"], n_boot=50,
                             n_perm=50)
        for row in result["rows"]:
            if row["method"] in ("random_matched", "frequent_kn"):
                assert not row["available"]
                assert all(math.isnan(row[m]) for m in ("precision", "recall", "f1", "auroc",
                                                        "f1_low", "pairwise"))
                assert row["n_relations_no_set"] == row["n_relations"]
        for test in result["comparisons"]:
            if test["baseline"] in ("random_matched", "frequent_kn"):
                assert math.isnan(test["p"]) and math.isnan(test["p_holm"])
                assert math.isnan(test["estimate"])


def test_holm_adjusts_over_all_comparisons_of_a_model_language():
    from kneurons.statistics import holm

    records = control_records()
    result = check_facts_quick(records)
    ps = [t["p"] for t in result["comparisons"]]
    assert [t["p_holm"] for t in result["comparisons"]] == pytest.approx(
        holm(ps).tolist(), nan_ok=True)
    # both populations, per setting: ΔF1 against 5 methods; per population the pairwise test
    assert len(result["comparisons"]) == 2 * (2 * 5 + 1)


def check_facts_quick(records, **kwargs):
    from kneurons.factcheck import check_facts

    return check_facts(records, records, {"P36": [(0, 1), (1, 2)]}, N_LAYERS, D_FF,
                       ["auto", 0.5], n_boot=50, n_perm=50, **kwargs)


def test_unconverged_facts_are_dropped_whole_and_counted():
    records = control_records()
    records["converged"] = True
    records.loc[(records["uuid"] == "f1") & (records["candidate"] == "wrong"), "converged"] = False
    result = check_facts_quick(records)
    assert set(result["scores"]["uuid"]) == {"f0", "f2", "g"}  # f1's true record goes too
    assert result["dropped"]["unconverged"] == {"n_facts": 1, "relations": ["P36"]}
    assert result["dropped"]["calibration_unconverged"]["n_facts"] == 1
    assert {r["n_facts_unconverged"] for r in result["rows"]} == {1}
    assert {r["n_facts"] for r in result["rows"] if r["population"] == "all_relations"} == {3}
    # records written before the column existed count as converged
    assert check_facts_quick(control_records())["dropped"]["unconverged"]["n_facts"] == 0


def test_intervals_are_seeded():
    def lows(seed):
        rows, _ = table_of(synthetic(30), seed=seed, n_boot=200, n_perm=10)
        return np.array([r["f1_low"] for r in rows.values()], dtype=float)

    np.testing.assert_array_equal(lows(3), lows(3))
    assert not np.array_equal(lows(3), lows(4), equal_nan=True)
