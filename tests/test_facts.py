"""Tests of kneurons.facts: corrupted facts (wrong objects) and the discovery/evaluation split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kneurons.facts import (PARTS, corrupt_facts, corruption_report, discovery_count,
                            mark_calibration, split_facts, split_report)
from kneurons.mlama import read_mlama

REPO = Path(__file__).resolve().parent.parent
MINI = REPO / "resources" / "mlama-mini"
SEEDS = range(40)


@pytest.fixture(scope="module")
def sample():
    return {lang: read_mlama(MINI, lang)[0] for lang in ["en", "zh"]}


@pytest.fixture(scope="module")
def corrupted_sample(sample):
    return corrupt_facts(sample, seed=0)


def table(rows: list[tuple]) -> pd.DataFrame:
    """Facts from (uuid, lineid, relation, sub_uri, obj_uri, sub_label, obj_label) rows."""
    cols = ["uuid", "lineid", "relation", "sub_uri", "obj_uri", "sub_label", "obj_label"]
    df = pd.DataFrame(rows, columns=cols)
    df["lineid"] = df["lineid"].astype("int64")
    df["template"] = "[X] r [Y] ."
    return df


def wrong_of(tables: dict[str, pd.DataFrame], uuid: str, lang: str = "en") -> tuple[str, str]:
    row = tables[lang].set_index("uuid").loc[uuid]
    return row["wrong_obj_uri"], row["wrong_obj_label"]


def shuffled(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)


# --- corruption on the real sample ---------------------------------------------------------

def test_sample_corruption_invariants(sample, corrupted_sample):
    for lang, before in sample.items():
        after = corrupted_sample[lang]
        assert len(after) == 500  # every relation has several objects
        assert list(after.columns) == [*before.columns, "wrong_obj_uri", "wrong_obj_label"]
        pd.testing.assert_frame_equal(after[before.columns], before)
        assert pd.api.types.is_string_dtype(after["wrong_obj_uri"])
        assert (after["wrong_obj_uri"] != after["obj_uri"]).all()
        assert (after["wrong_obj_label"] != after["obj_label"]).all()
        # the wrong object is an object of the same relation, shown with its own label
        labels = set(zip(before["relation"], before["obj_uri"], before["obj_label"]))
        for rel, uri, label in zip(after["relation"], after["wrong_obj_uri"],
                                   after["wrong_obj_label"]):
            assert (rel, uri, label) in labels
    en = corrupted_sample["en"].set_index("uuid")
    zh = corrupted_sample["zh"].set_index("uuid")
    assert (en.loc[zh.index, "wrong_obj_uri"] == zh["wrong_obj_uri"]).all()
    # not degenerate: P1376 has 50 distinct objects, so the draw spreads over many
    assert en[en["relation"] == "P1376"]["wrong_obj_uri"].nunique() > 20


def test_inputs_are_not_modified(sample):
    copies = {lang: df.copy() for lang, df in sample.items()}
    corrupt_facts(sample, seed=3)
    for lang in sample:
        pd.testing.assert_frame_equal(sample[lang], copies[lang])


def test_corruption_is_deterministic_and_seed_dependent(sample, corrupted_sample):
    again = corrupt_facts(sample, seed=0)
    other = corrupt_facts(sample, seed=1)
    for lang in sample:
        pd.testing.assert_frame_equal(again[lang], corrupted_sample[lang])
        changed = (other[lang]["wrong_obj_uri"] != corrupted_sample[lang]["wrong_obj_uri"]).mean()
        assert changed > 0.5


def test_corruption_is_independent_of_row_and_language_order(sample, corrupted_sample):
    permuted = {"zh": shuffled(sample["zh"], 1), "en": shuffled(sample["en"], 2)}
    result = corrupt_facts(permuted, seed=0)
    assert list(result) == ["zh", "en"]
    for lang in sample:
        pd.testing.assert_frame_equal(result[lang], corrupted_sample[lang])


def test_adding_a_relation_does_not_reshuffle_others(sample, corrupted_sample):
    extra = table([("new-1", 0, "P999", "Q1", "Q2", "a", "b"),
                   ("new-2", 1, "P999", "Q3", "Q4", "c", "d")])
    grown = {"en": pd.concat([sample["en"], extra], ignore_index=True), "zh": sample["zh"]}
    result = corrupt_facts(grown, seed=0)
    old = result["en"][result["en"]["relation"] != "P999"].reset_index(drop=True)
    pd.testing.assert_frame_equal(old, corrupted_sample["en"])
    assert wrong_of(result, "new-1") == ("Q4", "d")


# --- corruption on hand-made cases ---------------------------------------------------------

def test_never_another_answer_of_the_same_subject_across_languages():
    # S1 has two answers, A (en fact u1) and B (zh-only fact u2). B is labelled in en via
    # another subject (u3), so only the N-M rule keeps it from being u1's wrong object.
    en = table([("u1", 0, "R", "S1", "A", "s1", "a"),
                ("u3", 2, "R", "S2", "B", "s2", "b"),
                ("u4", 3, "R", "S3", "C", "s3", "c"),
                ("u5", 4, "R", "S4", "D", "s4", "d")])
    zh = table([("u2", 1, "R", "S1", "B", "s1", "乙"),
                ("u3", 2, "R", "S2", "B", "s2", "乙"),
                ("u6", 5, "R", "S5", "A", "s5", "甲"),
                ("u7", 6, "R", "S6", "C", "s6", "丙")])
    seen = set()
    for seed in SEEDS:
        result = corrupt_facts({"en": en, "zh": zh}, seed)
        seen.add(wrong_of(result, "u1")[0])
        assert wrong_of(result, "u2", "zh") == ("C", "丙")  # A and B are S1's answers
    assert seen == {"C", "D"}
    # without the zh fact, B is a fair wrong object for u1
    seen_en_only = {wrong_of(corrupt_facts({"en": en}, s), "u1")[0] for s in SEEDS}
    assert seen_en_only == {"B", "C", "D"}


def test_wrong_object_is_labelled_in_every_language_of_the_fact():
    # C is an object only in en; u1 (en + zh) must never get it, u9 (en only) may.
    en = table([("u1", 0, "R", "S1", "A", "s1", "a"),
                ("u2", 1, "R", "S2", "B", "s2", "b"),
                ("u3", 2, "R", "S3", "C", "s3", "c"),
                ("u9", 9, "R", "S9", "D", "s9", "d")])
    zh = table([("u1", 0, "R", "S1", "A", "s1", "甲"),
                ("u2", 1, "R", "S2", "B", "s2", "乙"),
                ("u4", 3, "R", "S4", "D", "s4", "丁")])
    got_u1, got_u9 = set(), set()
    for seed in SEEDS:
        result = corrupt_facts({"en": en, "zh": zh}, seed)
        uri, label_en = wrong_of(result, "u1", "en")
        assert wrong_of(result, "u1", "zh")[0] == uri
        got_u1.add((uri, label_en, wrong_of(result, "u1", "zh")[1]))
        got_u9.add(wrong_of(result, "u9")[0])
    assert got_u1 == {("B", "b", "乙"), ("D", "d", "丁")}
    assert got_u9 == {"A", "B", "C"}


def test_homonyms_of_a_true_answer_are_never_wrong_objects():
    # G and A are different entities that share the en label "Georgia".
    en = table([("u1", 0, "R", "S1", "A", "s1", "Georgia"),
                ("u2", 1, "R", "S2", "G", "s2", "Georgia"),
                ("u3", 2, "R", "S3", "C", "s3", "Chile")])
    for seed in SEEDS:
        result = corrupt_facts({"en": en}, seed)
        assert wrong_of(result, "u1") == ("C", "Chile")
        assert wrong_of(result, "u2") == ("C", "Chile")
        assert wrong_of(result, "u3")[0] in {"A", "G"}


def test_label_of_an_entity_is_its_most_frequent_label_ties_by_sort():
    en = table([("u1", 0, "R", "S1", "A", "s1", "Alpha"),
                ("u2", 1, "R", "S2", "A", "s2", "Alfa"),
                ("u3", 2, "R", "S3", "A", "s3", "Alfa"),
                ("u4", 3, "R", "S4", "B", "s4", "Bz"),
                ("u5", 4, "R", "S5", "B", "s5", "Ba"),
                ("u6", 5, "R", "S6", "C", "s6", "c"),
                ("u7", 6, "Q", "S7", "A", "s7", "Other relation label")])
    seen = set()
    for seed in SEEDS:
        out = corrupt_facts({"en": en}, seed)["en"]
        assert "u7" not in set(out["uuid"])  # relation Q has a single object
        seen |= set(zip(out["wrong_obj_uri"], out["wrong_obj_label"]))
    assert seen == {("A", "Alfa"), ("B", "Ba"), ("C", "c")}


def test_single_object_relation_is_dropped_and_counted():
    en = table([("u1", 0, "ONE", "S1", "A", "s1", "a"),
                ("u2", 1, "ONE", "S2", "A", "s2", "a"),
                ("u3", 0, "R", "S1", "A", "s1", "a"),
                ("u4", 1, "R", "S2", "B", "s2", "b")])
    zh = table([("u1", 0, "ONE", "S1", "A", "s1", "甲"),
                ("u4", 1, "R", "S2", "B", "s2", "乙")])
    # u4 (en + zh): A has no zh label in R -> no wrong object either
    result = corrupt_facts({"en": en, "zh": zh}, seed=5)
    assert result["en"]["uuid"].tolist() == ["u3"]
    assert wrong_of(result, "u3") == ("B", "b")
    assert len(result["zh"]) == 0
    assert list(result["zh"].columns) == [*zh.columns, "wrong_obj_uri", "wrong_obj_label"]
    report = corruption_report({"en": en, "zh": zh}, result)
    assert report["dropped_uuids"] == ["u1", "u2", "u4"]
    assert report["facts_in"] == 6 and report["facts_out"] == 1
    assert report["dropped_no_wrong_object"] == 5
    assert report["languages"]["en"]["per_relation"]["ONE"] == {
        "facts_in": 2, "facts_out": 0, "dropped_no_wrong_object": 2, "distinct_wrong_objects": 0}
    assert report["languages"]["zh"]["dropped_no_wrong_object"] == 2
    json.dumps(report)


def test_corruption_rejects_inconsistent_input():
    en = table([("u1", 0, "R", "S1", "A", "s1", "a"), ("u2", 1, "R", "S2", "B", "s2", "b")])
    zh = table([("u1", 0, "R", "S1", "B", "s1", "乙")])
    with pytest.raises(ValueError, match="uuid u1"):
        corrupt_facts({"en": en, "zh": zh}, 0)
    with pytest.raises(ValueError, match="duplicate uuid"):
        corrupt_facts({"en": pd.concat([en, en.iloc[:1]])}, 0)
    with pytest.raises(ValueError, match="obj_label"):
        corrupt_facts({"en": en.drop(columns="obj_label")}, 0)
    for seed in (-1, 1.5, True, "0"):
        with pytest.raises(ValueError, match="seed"):
            corrupt_facts({"en": en}, seed)
    assert corrupt_facts({}, 0) == {}
    assert len(corrupt_facts({"en": en}, np.int64(7))["en"]) == 2


# --- split ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n, fraction, expected", [
    (0, 0.8, 0), (1, 0.8, 1), (1, 0.3, 0), (2, 0.8, 1), (2, 0.1, 1), (3, 0.1, 1),
    (10, 0.8, 8), (50, 0.8, 40), (5, 0.5, 2), (7, 0.5, 4), (928, 0.8, 742), (4, 0.99, 3),
])
def test_discovery_count(n, fraction, expected):
    assert discovery_count(n, fraction) == expected


def test_split_of_sample(corrupted_sample):
    splits = split_facts(corrupted_sample, 0.8, seed=0)
    assert set(splits) == {"en", "zh"}
    for lang, parts in splits.items():
        assert tuple(parts) == PARTS
        whole = corrupted_sample[lang]
        disc, ev = parts["discovery"], parts["evaluation"]
        assert disc.groupby("relation").size().eq(40).all()
        assert ev.groupby("relation").size().eq(10).all()
        assert not set(disc["uuid"]) & set(ev["uuid"])
        combined = pd.concat([disc, ev]).sort_values(["relation", "lineid"])
        pd.testing.assert_frame_equal(combined.reset_index(drop=True), whole)
        for part in parts.values():
            assert list(part.columns) == list(whole.columns)
            assert list(part.index) == list(range(len(part)))
            assert part.equals(part.sort_values(["relation", "lineid"]).reset_index(drop=True))
    for part in PARTS:
        assert splits["en"][part]["uuid"].tolist() == splits["zh"][part]["uuid"].tolist()
    report = split_report(splits)
    assert report["zh"]["discovery"]["facts"] == 400
    assert report["en"]["evaluation"]["per_relation"]["P17"] == 10
    json.dumps(report)


def test_split_aligns_languages_with_partial_overlap(corrupted_sample):
    en = corrupted_sample["en"]
    zh = corrupted_sample["zh"].iloc[::3]  # zh has only a third of the facts
    splits = split_facts({"en": en, "zh": zh}, 0.8, seed=4)
    en_disc = set(splits["en"]["discovery"]["uuid"])
    assert set(splits["zh"]["discovery"]["uuid"]) <= en_disc
    assert not set(splits["zh"]["evaluation"]["uuid"]) & en_disc
    # proportions hold on the union of uuids (= en here), zh gets its share of each part
    assert splits["en"]["discovery"].groupby("relation").size().eq(40).all()
    assert len(splits["zh"]["discovery"]) + len(splits["zh"]["evaluation"]) == len(zh)
    assert 0 < len(splits["zh"]["evaluation"]) < len(zh)
    # a uuid only in zh counts for its relation too: 50 + 1 uuids -> round(40.8) = 41
    rel = zh["relation"].iloc[0]
    zh_only = zh.iloc[:1].assign(uuid="zh-only", lineid=10**6)
    splits2 = split_facts({"en": en, "zh": pd.concat([zh, zh_only])}, 0.8, seed=4)
    disc = set()
    for lang in ["en", "zh"]:
        part = splits2[lang]["discovery"]
        disc |= set(part.loc[part["relation"] == rel, "uuid"])
    assert len(disc) == discovery_count(51, 0.8) == 41


def test_split_is_deterministic_order_independent_and_seed_dependent(corrupted_sample):
    a = split_facts(corrupted_sample, 0.8, seed=0)
    b = split_facts({lang: shuffled(df, 9) for lang, df in corrupted_sample.items()}, 0.8, 0)
    c = split_facts(corrupted_sample, 0.8, seed=1)
    for lang in a:
        for part in PARTS:
            pd.testing.assert_frame_equal(a[lang][part], b[lang][part])
    assert set(a["en"]["discovery"]["uuid"]) != set(c["en"]["discovery"]["uuid"])
    assert len(a["en"]["discovery"]) == len(c["en"]["discovery"])


def test_split_small_relations_get_both_parts():
    rows = [(f"u{i}", i, "R2", f"S{i}", f"O{i}", "s", "o") for i in range(2)]
    rows += [(f"v{i}", i, "R3", f"S{i}", f"O{i}", "s", "o") for i in range(3)]
    rows += [("w0", 0, "R1", "S", "O", "s", "o")]
    df = table(rows).assign(wrong_obj_uri="W", wrong_obj_label="w")
    for seed in range(10):
        parts = split_facts({"en": df}, 0.8, seed)["en"]
        disc = parts["discovery"].groupby("relation").size().to_dict()
        ev = parts["evaluation"].groupby("relation").size().to_dict()
        assert disc == {"R1": 1, "R2": 1, "R3": 2}
        assert ev == {"R2": 1, "R3": 1}


def test_split_rejects_bad_arguments(corrupted_sample):
    for fraction in (0.0, 1.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="discovery_fraction"):
            split_facts(corrupted_sample, fraction, 0)
    with pytest.raises(ValueError, match="wrong_obj_uri"):
        split_facts({"en": corrupted_sample["en"].drop(columns="wrong_obj_uri")}, 0.8, 0)
    with pytest.raises(ValueError, match="seed"):
        split_facts(corrupted_sample, 0.8, -1)


def test_calibration_slice_is_a_seeded_aligned_share_of_discovery(corrupted_sample):
    splits = split_facts(corrupted_sample, 0.8, seed=0)
    marked = mark_calibration(splits, 0.25, seed=0)
    for lang, parts in marked.items():
        disc = parts["discovery"]
        assert disc["calibration"].dtype == bool
        assert disc.groupby("relation")["calibration"].sum().eq(10).all()  # 25% of 40
        assert not parts["evaluation"]["calibration"].any()
        pd.testing.assert_frame_equal(disc.drop(columns="calibration"), splits[lang]["discovery"])
    en, zh = (marked[lang]["discovery"] for lang in ("en", "zh"))
    assert en.loc[en["calibration"], "uuid"].tolist() == zh.loc[zh["calibration"], "uuid"].tolist()
    again = mark_calibration(splits, 0.25, seed=0)["en"]["discovery"]
    assert again["calibration"].tolist() == en["calibration"].tolist()
    other = mark_calibration(splits, 0.25, seed=1)["en"]["discovery"]
    assert other["calibration"].tolist() != en["calibration"].tolist()
    none = mark_calibration(splits, 0.0, seed=0)["en"]["discovery"]
    assert not none["calibration"].any()
    with pytest.raises(ValueError, match="calibration_fraction"):
        mark_calibration(splits, 1.5, seed=0)


def test_split_by_size_takes_counts_per_relation_and_leaves_small_relations_out(
        corrupted_sample, caplog):
    from kneurons.facts import SplitSizes

    sizes = SplitSizes(discovery=20, calibration=5, evaluation=15)  # 40 of each 50-fact relation
    splits = split_facts(corrupted_sample, 0.8, seed=1, sizes=sizes)
    splits = mark_calibration(splits, 0.25, seed=1, sizes=sizes)
    for lang, parts in splits.items():
        disc, ev = parts["discovery"], parts["evaluation"]
        assert (disc.groupby("relation").size() == 25).all()
        assert (disc.groupby("relation")["calibration"].sum() == 5).all()
        assert (ev.groupby("relation").size() == 15).all()
        assert not set(disc["uuid"]) & set(ev["uuid"])
    # the first ranked facts are the fraction split's first ones too (one ranking)
    by_fraction = split_facts(corrupted_sample, 0.5, seed=1)
    assert set(splits["en"]["discovery"]["uuid"]) <= set(by_fraction["en"]["discovery"]["uuid"])
    report = split_report(splits, corrupted_sample)
    assert report["en"]["unused"] == 10 * len(set(corrupted_sample["en"]["relation"]))
    assert report["en"]["calibration"]["facts"] == 5 * len(report["en"]["discovery"]["per_relation"])
    # a relation smaller than the sum is left out of both parts, with a warning
    big = SplitSizes(discovery=40, calibration=5, evaluation=10)
    left = split_facts(corrupted_sample, 0.8, seed=1, sizes=big)
    assert left["en"]["discovery"].empty and left["en"]["evaluation"].empty
    assert "left out of the split" in caplog.text
    assert split_report(left, corrupted_sample)["en"]["relations_left_out"] == sorted(
        set(corrupted_sample["en"]["relation"]))
    with pytest.raises(ValueError, match="evaluation"):
        SplitSizes(discovery=1, calibration=0, evaluation=0)
    assert SplitSizes.of({"discovery": 1, "calibration": 0, "evaluation": 1}).total == 2
