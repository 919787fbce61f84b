"""Reports: the Table 3 frame and Markdown, and the figures (PNG and SVG, also when empty)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from kneurons.fact_check_report import (FACT_CHECK_COLUMNS, fact_check_markdown, fact_check_table,
                              plot_dkn_layers, plot_f1_vs_lambda, plot_per_relation_f1,
                              plot_roc)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def method_metrics(p, r, f1, threshold, n_true=10, n_wrong=10, n_no_dkn=2, abstained=0):
    return {"precision": p, "recall": r, "f1": f1, "auroc": 0.75,
            "precision_wrong": 0.5, "recall_wrong": 0.25, "f1_wrong": 1 / 3,
            "auroc_wrong": 0.75, "n_true": n_true, "n_wrong": n_wrong, "n_facts": n_true,
            "n_no_dkn": n_no_dkn, "n_abstained": abstained, "n_facts_dropped": 3,
            "n_relations": 3, "n_relations_no_dkn": 1, "threshold": threshold}


def run(language, model, wo_f1, with_f1, lam=0.125, source="auto", population="all_relations",
        setting=None):
    return {"language": language, "model": model, "threshold_source": source,
            "population": population, "setting": setting or ("auto" if source == "auto"
                                                            else f"{lam:g}"),
            "metrics": {"wo_DKN": method_metrics(0.123456, 0.5, wo_f1, None),
                        "with_DKN": method_metrics(0.654321, 0.75, with_f1, lam, abstained=2)}}


@pytest.fixture()
def table() -> pd.DataFrame:
    return fact_check_table([run("zh", "bert", 0.4, 0.5), run("en", "gpt2", 0.8, 0.6, lam=2.5),
                             run("en", "bert", 0.5, 0.6)])


def test_fact_check_table_columns_and_order(table):
    assert list(table.columns) == FACT_CHECK_COLUMNS + [
        "precision_wrong", "recall_wrong", "f1_wrong", "auroc_wrong", "n_no_dkn",
        "n_abstained", "threshold_source", "n_facts", "n_facts_dropped", "n_relations",
        "n_relations_no_dkn"]
    assert list(zip(table["language"], table["model"], table["method"])) == [
        ("en", "bert", "wo_DKN"), ("en", "bert", "with_DKN"),
        ("en", "gpt2", "wo_DKN"), ("en", "gpt2", "with_DKN"),
        ("zh", "bert", "wo_DKN"), ("zh", "bert", "with_DKN")]
    assert table["f1"].tolist() == [0.5, 0.6, 0.8, 0.6, 0.4, 0.5]
    assert math.isnan(table["threshold"].iloc[0])
    assert table["threshold"].iloc[[1, 3, 5]].tolist() == [0.125, 2.5, 0.125]
    assert set(table.loc[table["method"] == "with_DKN", "threshold_source"]) == {"auto"}
    with pytest.raises(ValueError, match="threshold_source"):
        fact_check_table([run("en", "bert", 0.5, 0.6, source="guess")])
    with pytest.raises(ValueError, match="more than once"):
        fact_check_table([run("en", "bert", 0.5, 0.6), run("en", "bert", 0.5, 0.7)])


def test_fact_check_table_populations_and_settings():
    """One wo_DKN row per population, one with_DKN row per λ setting (in config order)."""
    rows = [run("en", "bert", 0.5, 0.6), run("en", "bert", 0.5, 0.7, lam=1e-6, source="config"),
            run("en", "bert", 0.45, 0.65, population="dkn_relations"),
            run("en", "bert", 0.45, 0.75, lam=1e-6, source="config",
                population="dkn_relations")]
    table = fact_check_table(rows)
    assert list(zip(table["population"], table["method"], table["setting"])) == [
        ("all_relations", "wo_DKN", ""), ("all_relations", "with_DKN", "auto"),
        ("all_relations", "with_DKN", "1e-06"),
        ("dkn_relations", "wo_DKN", ""), ("dkn_relations", "with_DKN", "auto"),
        ("dkn_relations", "with_DKN", "1e-06")]
    text = fact_check_markdown(table)
    assert "| mLAMA-en | bert | all | with DKN | 1e-06 | 20 | 65.43 | 75.00 | 70.00 | " \
           "+40.00 | 2 |" in text
    # ΔF1 against the same population's baseline: (0.75 - 0.45) / 0.45
    assert "| mLAMA-en | bert | DKN only | with DKN | 1e-06 | 20 | 65.43 | 75.00 | 75.00 | " \
           "+66.67 | 2 |" in text
    assert "| mLAMA-en | bert | DKN only | wo DKN |  | 20 | 12.35 | 50.00 | 45.00 |  |  |" in text
    assert "λ auto = 0.125; 1e-06 = 1e-06" in text
    assert "1e-06 is the authors' λ" in text and "calibration slice" in text


def test_fact_check_markdown_values(table):
    text = fact_check_markdown(table)
    lines = text.splitlines()
    assert lines[0] == ("| Dataset | Model | Relations | Method | λ | n | P | R | F1 | ΔF1 | "
                        "Abstained |")
    rows = [line for line in lines if line.startswith("| mLAMA-")]
    assert rows == [
        "| mLAMA-en | bert | all | wo DKN |  | 20 | 12.35 | 50.00 | 50.00 |  |  |",
        # (0.6 - 0.5) / 0.5 = +20 %
        "| mLAMA-en | bert | all | with DKN | auto = 0.125 | 20 | 65.43 | 75.00 | 60.00 | +20.00 | 2 |",
        "| mLAMA-en | gpt2 | all | wo DKN |  | 20 | 12.35 | 50.00 | 80.00 |  |  |",
        # (0.6 - 0.8) / 0.8 = -25 %
        "| mLAMA-en | gpt2 | all | with DKN | auto = 2.5 | 20 | 65.43 | 75.00 | 60.00 | -25.00 | 2 |",
        "| mLAMA-zh | bert | all | wo DKN |  | 20 | 12.35 | 50.00 | 40.00 |  |  |",
        "| mLAMA-zh | bert | all | with DKN | auto = 0.125 | 20 | 65.43 | 75.00 | 50.00 | +25.00 | 2 |",
    ]
    assert "calibration slice of the discovery part" in text
    assert "- gpt2 / mLAMA-en: λ auto = 2.5; 10 true / 10 wrong candidates; " \
           "relations without DKN: 1 of 3 (2 candidates, on which with DKN abstains); " \
           "facts left out for both methods (no attribution records, e.g. causal templates " \
           "starting with [Y]): 3" in text
    assert "- bert / mLAMA-zh: λ auto = 0.125" in text
    assert "our R and P" in text
    # an empty population (no relation with DKN) has no rates
    empty = run("en", "bert", 0.0, 0.0, population="dkn_relations")
    for method in ("wo_DKN", "with_DKN"):
        empty["metrics"][method].update(n_true=0, n_wrong=0)
    text = fact_check_markdown(fact_check_table([empty]))
    assert "| mLAMA-en | bert | DKN only | wo DKN |  | 0 | n/a | n/a | n/a |  |  |" in text
    assert "| mLAMA-en | bert | DKN only | with DKN | auto = 0.125 | 0 | n/a | n/a | n/a |  | 2 |" \
        in text


def test_fact_check_markdown_config_threshold_and_zero_baseline():
    text = fact_check_markdown(fact_check_table([run("en", "bert", 0.0, 0.5, source="config")]))
    assert "| mLAMA-en | bert | all | with DKN | 0.125 | 20 | 65.43 | 75.00 | 50.00 | n/a | 2 |" \
        in text
    assert "fixed in the config (factcheck.thresholds" in text
    assert "calibration slice" not in text


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
        assert_figures(out["roc"], "p", "gpt2/en: DKN score", "bert/en: model probability",
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
