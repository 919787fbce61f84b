"""Reports: the Table 3 frame and Markdown, and the figures (PNG and SVG, also when empty)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from kneurons.fact_check_report import (FACT_CHECK_COLUMNS, FACT_CHECK_EXTRA_COLUMNS,
                                       comparison_table, fact_check_markdown, fact_check_table,
                                       interval_cell, plot_dkn_layers, plot_f1_vs_lambda,
                                       plot_per_relation_f1, plot_roc)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def table_row(language, model, method, f1, *, setting=None, lam=None, source=None,
              population="all_relations", accepts_all=False, available=True, n=10,
              abstained=0):
    """One Table 3 row as kneurons.factcheck.table_rows writes it (intervals around each
    value: ±0.1)."""
    with_lambda = method not in ("wo_DKN", "all_correct")
    row = {"language": language, "model": model, "population": population, "method": method,
           "setting": setting if setting is not None else ("auto" if with_lambda else ""),
           "threshold": (lam if lam is not None else 0.125) if with_lambda else None,
           "threshold_source": (source or ("auto" if setting in (None, "auto") else "config"))
           if with_lambda else "",
           "accepts_all": accepts_all, "available": available,
           "precision": 0.654321, "recall": 0.75, "f1": f1, "auroc": 0.75, "pairwise": 0.6,
           "n_facts": n, "n_true": n, "n_wrong": n, "n_pairwise": n - 2,
           "precision_wrong": 0.5, "recall_wrong": 0.25, "f1_wrong": 1 / 3, "auroc_wrong": 0.75,
           "n_no_dkn": 2, "n_abstained": abstained, "n_relations": 3, "n_relations_no_set": 1,
           "n_relations_no_dkn": 1, "n_facts_dropped": 3, "n_facts_unconverged": 1,
           "n_calibration_unconverged": 2}
    for m in ("precision", "recall", "f1", "auroc", "pairwise"):
        row[f"{m}_low"], row[f"{m}_high"] = ((row[m] - 0.1, row[m] + 0.1) if row[m] is not None
                                             else (None, None))
    return row


def run_rows(language, model, wo_f1, with_f1, lam=0.125, population="all_relations",
             setting="auto", **kwargs):
    return [table_row(language, model, "wo_DKN", wo_f1, population=population),
            table_row(language, model, "with_DKN", with_f1, setting=setting, lam=lam,
                      population=population, abstained=2, **kwargs)]


@pytest.fixture()
def table() -> pd.DataFrame:
    return fact_check_table(run_rows("zh", "bert", 0.4, 0.5) + run_rows("en", "gpt2", 0.8, 0.6,
                                                                         lam=2.5)
                            + run_rows("en", "bert", 0.5, 0.6))


def test_fact_check_table_columns_and_order(table):
    assert list(table.columns) == FACT_CHECK_COLUMNS + FACT_CHECK_EXTRA_COLUMNS
    assert {"n_facts", "f1_low", "f1_high", "auroc_low", "pairwise", "n_pairwise",
            "accepts_all", "n_facts_unconverged"} <= set(FACT_CHECK_EXTRA_COLUMNS)
    assert list(zip(table["language"], table["model"], table["method"])) == [
        ("en", "bert", "wo_DKN"), ("en", "bert", "with_DKN"),
        ("en", "gpt2", "wo_DKN"), ("en", "gpt2", "with_DKN"),
        ("zh", "bert", "wo_DKN"), ("zh", "bert", "with_DKN")]
    assert table["f1"].tolist() == [0.5, 0.6, 0.8, 0.6, 0.4, 0.5]
    assert math.isnan(table["threshold"].iloc[0])
    assert table["threshold"].iloc[[1, 3, 5]].tolist() == [0.125, 2.5, 0.125]
    assert set(table.loc[table["method"] == "with_DKN", "threshold_source"]) == {"auto"}
    with pytest.raises(ValueError, match="threshold_source"):
        fact_check_table([table_row("en", "bert", "with_DKN", 0.6, source="guess")])
    with pytest.raises(ValueError, match="more than once"):
        fact_check_table(run_rows("en", "bert", 0.5, 0.6) + run_rows("en", "bert", 0.5, 0.7))


def test_fact_check_table_json_nulls_become_nan():
    row = table_row("en", "bert", "with_DKN", None)
    row["precision"] = row["precision_low"] = None  # write_json writes NaN as null
    table = fact_check_table([row])
    assert math.isnan(table["precision"].iloc[0]) and math.isnan(table["f1"].iloc[0])
    assert "| n/a | 75.0 [65.0, 85.0] | n/a |" in fact_check_markdown(table)


def test_fact_check_table_populations_methods_and_settings():
    """Per population: the rows in the order given (wo_DKN, baselines, then per λ setting
    with_DKN and its controls); populations in POPULATIONS order."""
    rows = []
    for population in ("dkn_relations", "all_relations"):
        rows += [table_row("en", "bert", m, 0.5, population=population)
                 for m in ("wo_DKN", "all_correct", "prob")]
        for setting, lam in (("auto", 0.125), ("1e-06", 1e-6)):
            rows += [table_row("en", "bert", m, 0.6, setting=setting, lam=lam,
                               population=population)
                     for m in ("with_DKN", "random_matched", "frequent_kn")]
    table = fact_check_table(rows)
    every = table[table["population"] == "all_relations"]
    assert list(table["population"].iloc[:9]) == ["all_relations"] * 9
    assert list(zip(every["method"], every["setting"])) == [
        ("wo_DKN", ""), ("all_correct", ""), ("prob", "auto"),
        ("with_DKN", "auto"), ("random_matched", "auto"), ("frequent_kn", "auto"),
        ("with_DKN", "1e-06"), ("random_matched", "1e-06"), ("frequent_kn", "1e-06")]
    text = fact_check_markdown(table)
    assert "| mLAMA-en | bert | all | with DKN | 1e-06 | 10 | 20 | 65.4 [55.4, 75.4] | " \
           "75.0 [65.0, 85.0] | 60.0 [50.0, 70.0] | 75.0 [65.0, 85.0] | " \
           "60.0 [50.0, 70.0] (n = 8) | 0 |" in text
    assert "| mLAMA-en | bert | DKN only | all correct |  | 10 | 20 |" in text
    assert "| mLAMA-en | bert | all | P(candidate) > λ_p | auto = 0.125 |" in text
    assert "| mLAMA-en | bert | all | random matched neurons | auto = 0.125 |" in text
    with pytest.raises(ValueError, match="unknown methods"):
        fact_check_table([table_row("en", "bert", "magic", 0.5)])


def test_fact_check_markdown_values(table):
    text = fact_check_markdown(table)
    lines = text.splitlines()
    assert lines[0] == ("| Dataset | Model | Relations | Method | λ | Facts | Statements | P | R "
                        "| F1 | AUROC | Pairwise | Abstained |")
    rows = [line for line in lines if line.startswith("| mLAMA-")]
    cells = " | 65.4 [55.4, 75.4] | 75.0 [65.0, 85.0] | {f1} | 75.0 [65.0, 85.0] | " \
            "60.0 [50.0, 70.0] (n = 8) | {abstained} |"
    assert rows == [
        "| mLAMA-en | bert | all | wo DKN |  | 10 | 20" + cells.format(
            f1="50.0 [40.0, 60.0]", abstained=""),
        "| mLAMA-en | bert | all | with DKN | auto = 0.125 | 10 | 20" + cells.format(
            f1="60.0 [50.0, 70.0]", abstained="2"),
        "| mLAMA-en | gpt2 | all | wo DKN |  | 10 | 20" + cells.format(
            f1="80.0 [70.0, 90.0]", abstained=""),
        "| mLAMA-en | gpt2 | all | with DKN | auto = 2.5 | 10 | 20" + cells.format(
            f1="60.0 [50.0, 70.0]", abstained="2"),
        "| mLAMA-zh | bert | all | wo DKN |  | 10 | 20" + cells.format(
            f1="40.0 [30.0, 50.0]", abstained=""),
        "| mLAMA-zh | bert | all | with DKN | auto = 0.125 | 10 | 20" + cells.format(
            f1="50.0 [40.0, 60.0]", abstained="2"),
    ]
    assert "calibration slice" in text and "95% percentile intervals" in text
    assert "- gpt2 / mLAMA-en: λ with DKN auto = 2.5; 10 facts (10 true / 10 wrong " \
           "statements); relations without DKN: 1 of 3 (2 statements, on which with DKN " \
           "abstains)" in text
    assert "3 without attribution records (e.g. causal templates starting with [Y]), 1 " \
           "whose attribution did not converge (and 2 of the calibration slice)" in text
    assert "our R and P" in text
    # an empty population (no relation with DKN) has no rates
    empty = run_rows("en", "bert", 0.0, 0.0, population="dkn_relations")
    for row in empty:
        row.update(n_true=0, n_wrong=0, n_facts=0)
    text = fact_check_markdown(fact_check_table(empty))
    # one line for the whole population (the CSV keeps its rows)
    assert "| mLAMA-en | bert | DKN only | (no facts: every method n/a) |  | 0 | 0 |" \
           " | | | | | |" in text
    assert "| DKN only | wo DKN |" not in text and "| DKN only | with DKN |" not in text


def test_accept_all_is_named_not_printed_as_a_number():
    rows = run_rows("zh", "gemma", 0.0, 2 / 3, lam=-1.00102, accepts_all=True)
    text = fact_check_markdown(fact_check_table(rows))
    assert "| mLAMA-zh | gemma | all | with DKN | auto = accept all |" in text
    assert "-1.00102" not in text and "-1.001" not in text
    assert "λ auto accepts every statement with a score (accept all) for: with DKN (auto)" \
        in text
    table = fact_check_table(rows)
    assert table["accepts_all"].tolist() == [False, True]


def test_unavailable_control_rows_say_so():
    row = table_row("en", "bert", "frequent_kn", None, available=False)
    for m in ("precision", "recall", "auroc", "pairwise"):
        row[m] = row[f"{m}_low"] = row[f"{m}_high"] = math.nan
    row["n_relations_no_set"] = 3
    text = fact_check_markdown(fact_check_table([table_row("en", "bert", "wo_DKN", 0.5), row]))
    assert "| mLAMA-en | bert | all | frequent KN (not DKN) | n/a | 10 | 20 | n/a | n/a | n/a |" \
           " n/a | n/a |  |" in text
    assert "frequent KN (not DKN): 3 of 3" in text


def test_interval_cells():
    assert interval_cell(0.75, 0.4, 1.0) == "75.0 [40.0, 100.0]"
    assert interval_cell(0.75, math.nan, math.nan) == "75.0"
    assert interval_cell(math.nan, 0.1, 0.2) == "n/a" and interval_cell(None, 0, 1) == "n/a"
    assert interval_cell(-0.05, -0.2, 0.1, signed=True) == "-5.0 [-20.0, +10.0]"


def comparison(model, metric, baseline, estimate, low, high, p, p_holm, setting="auto",
               population="all_relations"):
    return {"language": "en", "model": model, "population": population, "setting": setting,
            "metric": metric, "method": "with_DKN", "baseline": baseline,
            "estimate": estimate, "low": low, "high": high, "n_facts": 40, "p": p,
            "p_holm": p_holm}


def test_comparisons_with_intervals_holm_and_the_reading():
    compared = comparison_table([
        comparison("bert", "f1", "wo_DKN", 0.25, 0.1, 0.4, 0.0004, 0.002),
        comparison("bert", "f1", "prob", -0.05, -0.2, 0.1, 0.5, 1.0),
        comparison("bert", "pairwise", "prob", 0.15, 0.05, 0.25, 0.01, 0.04, setting=""),
        comparison("bert", "f1", "random_matched", None, None, None, None, None),
        {**comparison("bert", "f1", "wo_DKN", None, None, None, None, None,
                      population="dkn_relations"), "n_facts": 0}])
    text = fact_check_markdown(fact_check_table(run_rows("en", "bert", 0.5, 0.6)), compared,
                               {"n_boot": 2000, "n_perm": 5000, "seed": 7, "level": 0.95})
    assert "| mLAMA-en | bert | all | auto | F1: with DKN − wo DKN | 40 | +25.0 [+10.0, +40.0] " \
           "| <0.001 | 0.002 |" in text
    assert "| mLAMA-en | bert | all |  | pairwise: DKN score − P(candidate) | 40 | " \
           "+15.0 [+5.0, +25.0] | 0.010 | 0.040 |" in text
    assert "| F1: with DKN − random matched neurons | 40 | n/a | n/a | n/a |" in text
    assert "Holm's method over all comparisons of the same model and language" in text
    assert "| DKN only |" not in text  # a population without facts has nothing to compare
    assert len(compared) == 5  # the CSV keeps it
    assert "2000 bootstrap resamples" in text and "seed 7" in text and "5000 random swaps" in text
    assert "beyond the model's own probability" in text
    assert "- bert / mLAMA-en, all relations: with DKN − P(candidate): F1 at λ auto " \
           "-5.0 [-20.0, +10.0] (includes 0, n = 40 facts); pairwise accuracy " \
           "+15.0 [+5.0, +25.0] (above 0, n = 40 facts)" in text
    assert list(compared.columns) == ["language", "model", "population", "setting", "metric",
                                      "method", "baseline", "estimate", "low", "high",
                                      "n_facts", "p", "p_holm"]


def assert_figures(tmp_path, name, *texts):
    png, svg = tmp_path / f"{name}.png", tmp_path / f"{name}.svg"
    assert png.read_bytes().startswith(PNG_MAGIC)
    content = svg.read_text(encoding="utf-8")
    assert "<svg" in content
    for text in texts:
        assert text in content
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([png.name, svg.name])


def layer_counts() -> pd.DataFrame:
    return pd.DataFrame({"model": ["bert", "bert", "bert", "gpt2"],
                         "language": ["en", "en", "zh", "en"], "layer": [0, 2, 2, 1],
                         "count": [3, 1, 4, 2]})


def dkn_frame(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    score = rng.normal(size=8)
    score[:2] = np.nan
    return pd.DataFrame({"uuid": np.repeat(list("abcd"), 2), "relation": "P1",
                         "candidate": ["true", "wrong"] * 4, "label": [1, 0] * 4,
                         "dkn_score": score, "prob": rng.uniform(size=8),
                         "predicted": [True, False] * 4, "has_dkn": [False] * 2 + [True] * 6})


def per_relation() -> pd.DataFrame:
    rows = [(model, lang, rel, method, f1)
            for model, lang in [("bert", "en"), ("bert", "zh")]
            for rel, f1 in [("P36", 0.5), ("P19", 0.25)]
            for method in ("wo_DKN", "with_DKN")]
    return pd.DataFrame(rows, columns=["model", "language", "relation", "method", "f1"])


@pytest.mark.parametrize("empty", [False, True])
def test_plots_write_png_and_svg(tmp_path, empty):
    out = {name: tmp_path / name for name in ("layers", "f1", "roc", "relation")}
    for folder in out.values():
        folder.mkdir()
    counts = layer_counts().iloc[:0] if empty else layer_counts()
    curves = {} if empty else {"bert/en": pd.DataFrame({"threshold": [0.0, 0.5, 1.0],
                                                         "f1": [0.4, 0.7, 0.2]})}
    scores = {} if empty else {"bert/en": dkn_frame(0), "gpt2/en": dkn_frame(1)}
    relation = per_relation().iloc[:0] if empty else per_relation()

    plot_dkn_layers(counts, out["layers"] / "p.png", out["layers"] / "p.svg")
    plot_f1_vs_lambda(curves, {"bert/en": 0.5}, out["f1"] / "p.png", out["f1"] / "p.svg")
    plot_roc(scores, out["roc"] / "p.png", out["roc"] / "p.svg")
    plot_per_relation_f1(relation, out["relation"] / "p.png", out["relation"] / "p.svg")

    if empty:
        for folder in out.values():
            assert_figures(folder, "p", "no data")
    else:
        assert_figures(out["layers"], "p", "gpt2", "mLAMA-zh", "layer")
        assert_figures(out["f1"], "p", "λ chosen = 0.5", "F1 (%)")
        # one panel per model and language (was one panel with "key: score" labels)
        assert_figures(out["roc"], "p", "gpt2/en", "bert/en", "DKN score", "model probability",
                       "false positive rate")
        assert_figures(out["relation"], "p", "bert / mLAMA-zh", "P19", "with DKN")
        for folder in out.values():
            assert "no data" not in (folder / "p.svg").read_text(encoding="utf-8")


def test_plots_leave_no_open_figures(tmp_path):
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    plot_dkn_layers(layer_counts(), tmp_path / "a.png", tmp_path / "a.svg")
    plot_roc({"k": dkn_frame(2)}, tmp_path / "b.png", tmp_path / "b.svg")
    assert len(plt.get_fignums()) == before


def test_panels_wrap_into_rows_no_wider_than_2000_px(tmp_path):
    from PIL import Image

    from kneurons.figures import DPI, MAX_WIDTH_IN, grid_shape, panels

    assert grid_shape(10, 6.5) == (5, 2) and grid_shape(1, 6.5) == (1, 1)
    assert grid_shape(0, 4.0) == (1, 1) and grid_shape(7, 3.0) == (2, 4)
    with panels(tmp_path / "f.png", tmp_path / "f.svg", 5, 6.5, 3.0, title="t",
                note="two panels left out: no data") as (fig, axes):
        assert len(axes) == 5
        for ax in axes:
            ax.plot([0, 1], [0, 1])
    width, height = Image.open(tmp_path / "f.png").size
    assert width <= MAX_WIDTH_IN * DPI + 100 and height >= 0.8 * 3 * 3.0 * DPI  # 3 rows of 2
    with panels(tmp_path / "e.png", tmp_path / "e.svg", 0, 6.5, 3.0, title="t") as (_, axes):
        assert axes == []
    assert "no data" in (tmp_path / "e.svg").read_text()


def test_f1_vs_lambda_names_the_accept_all_sentinel_on_a_symlog_axis(tmp_path):
    curves = {"gemma/zh": pd.DataFrame({"threshold": [-1.00102, 1e-6, 2e-5, 3e-4],
                                        "f1": [2 / 3, 0.6, 0.5, 0.1],
                                        "accepts_all": [True, False, False, False]}),
              "toy/en": pd.DataFrame({"threshold": [], "f1": []})}
    plot_f1_vs_lambda(curves, {"gemma/zh": {"auto": -1.00102, "1e-06": 1e-6}},
                      tmp_path / "p.png", tmp_path / "p.svg",
                      references={"gemma/zh": {"wo DKN": 0.0, "all correct": 2 / 3}},
                      accepting={"gemma/zh": ["auto"]})
    svg = (tmp_path / "p.svg").read_text(encoding="utf-8")
    assert "λ auto = accept all" in svg and "λ 1e-06 = 1e-06" in svg
    assert "accept all (λ below every score)" in svg and "symlog" in svg
    assert "-1.001" not in svg and "1.00102" not in svg
    assert "Left out (no DKN score): toy/en." in svg
    assert "all correct: F1 66.7" in svg


def test_per_relation_f1_says_which_lambda_and_marks_abstentions(tmp_path):
    frame = per_relation().assign(has_dkn=True, setting="auto")
    frame.loc[frame["relation"] == "P19", "has_dkn"] = False
    plot_per_relation_f1(frame, tmp_path / "p.png", tmp_path / "p.svg",
                         lambdas={("bert", "en"): "auto = accept all",
                                  ("bert", "zh"): "auto = 0.0002"})
    svg = (tmp_path / "p.svg").read_text(encoding="utf-8")
    assert "with DKN at λ auto = accept all" in svg and "with DKN at λ auto = 0.0002" in svg
    assert svg.count("abstains (no DKN)") == 2  # P19 in both panels
    assert "F1 = 0" not in svg
    frame.loc[(frame["relation"] == "P36") & (frame["method"] == "wo_DKN"), "f1"] = 0.0
    plot_per_relation_f1(frame, tmp_path / "p.png", tmp_path / "p.svg")
    assert (tmp_path / "p.svg").read_text(encoding="utf-8").count("F1 = 0") == 2
    assert "per relation, with DKN at λ auto" in svg


def test_fact_check_figures_of_many_runs_stay_under_2000_px(tmp_path):
    from PIL import Image

    keys = [f"model{k}/en" for k in range(4)]  # 4 panels of >= 4.4 in: two rows
    plot_roc({key: dkn_frame(k) for k, key in enumerate(keys)}, tmp_path / "r.png",
             tmp_path / "r.svg")
    curves = {key: pd.DataFrame({"threshold": [0.0, 0.5], "f1": [0.4, 0.7]}) for key in keys}
    plot_f1_vs_lambda(curves, {}, tmp_path / "f.png", tmp_path / "f.svg")
    relation = pd.concat([per_relation().assign(model=f"model{k}") for k in range(4)])
    plot_per_relation_f1(relation, tmp_path / "p.png", tmp_path / "p.svg")
    counts = pd.concat([layer_counts().assign(model=f"model{k}") for k in range(4)])
    plot_dkn_layers(counts, tmp_path / "d.png", tmp_path / "d.svg",
                    models=[f"model{k}" for k in range(5)])
    for name in "rfpd":
        width, _ = Image.open(tmp_path / f"{name}.png").size
        assert width <= 2050, name
    assert "Left out (no DKN): model4." in (tmp_path / "d.svg").read_text(encoding="utf-8")


def test_dkn_sets_name_each_relation_its_stability_and_unstable_or_missing_sets():
    from kneurons.fact_check_report import dkn_sets_markdown

    stats = pd.DataFrame([
        dict(model="m", language="en", relation="P1", n_queries=30, queries_with_dkn=12,
             n_dkn=3, stability=0.8, stability_low=0.6, stability_high=1.0, stable=True),
        dict(model="m", language="en", relation="P2", n_queries=30, queries_with_dkn=5,
             n_dkn=2, stability=0.3, stability_low=0.0, stability_high=0.7, stable=False),
        dict(model="m", language="zh", relation="P1", n_queries=28, queries_with_dkn=0,
             n_dkn=0, stability=math.nan, stability_low=math.nan, stability_high=math.nan,
             stable=False)])
    text = dkn_sets_markdown(stats)
    assert "| m | en | P1 | 30 | 12 | 3 | 80.0 [60.0, 100.0] |  |" in text
    assert "| m | en | P2 | 30 | 5 | 2 | 30.0 [0.0, 70.0] | unstable |" in text
    assert "| m | zh | P1 | 28 | 0 | 0 | n/a | no DKN |" in text
