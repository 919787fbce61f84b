"""The fact-checking report: the paper's Table 3 (CSV, Markdown) and its four figures.

:func:`fact_check_table` flattens :func:`kneurons.factcheck.fact_check_metrics` outputs of
several (language, model) runs into one row per (language, model, population, method, λ
setting) (wo_DKN, which has no λ, once per population);
:func:`fact_check_markdown` lays that table out like Table 3 of Chen et al. (AAAI 2024)
with P, R and F1 in percent and ΔF1, the relative change of with_DKN's F1 over wo_DKN's
(``100 * (F1_with - F1_wo) / F1_wo``, in percent of the baseline's F1), on the with_DKN row.

Figures: :mod:`kneurons.figures` (PNG and SVG, atomic, reproducible, "no data" panels).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .factcheck import METHODS, ranking_score
from .figures import figure, layer_bars, no_data
from .io import write_csv, write_text

FACT_CHECK_COLUMNS = ["language", "model", "population", "method", "setting", "precision",
                      "recall", "f1", "auroc", "n_true", "n_wrong", "threshold"]
"""The leading columns of :func:`fact_check_table`."""

FACT_CHECK_EXTRA_COLUMNS = ["precision_wrong", "recall_wrong", "f1_wrong", "auroc_wrong",
                            "n_no_dkn", "n_abstained", "threshold_source", "n_facts",
                            "n_facts_dropped", "n_relations", "n_relations_no_dkn"]
"""The columns after :data:`FACT_CHECK_COLUMNS`."""

THRESHOLD_SOURCES = ("auto", "config")
METHOD_LABELS = {"wo_DKN": "wo DKN", "with_DKN": "with DKN"}
"""How the methods are named in the Markdown table (the paper's "wo DKN" / "with DKN")."""
POPULATION_LABELS = {"all_relations": "all", "dkn_relations": "DKN only"}
"""How the populations (:data:`kneurons.factcheck.POPULATIONS`) are named in the Markdown."""


# ---- Table 3 ------------------------------------------------------------------------------

def fact_check_rows(model: str, language: str, document: Mapping) -> list[dict]:
    """The rows of :func:`fact_check_table` from one fact_check metrics JSON document."""
    return [{"language": language, "model": model, "population": entry["population"],
             "setting": entry["setting"], "threshold_source": entry["threshold_source"],
             "metrics": entry["metrics"]} for entry in document["metrics"]]


def fact_check_table(rows: Sequence[Mapping]) -> pd.DataFrame:
    """Table 3: per (language, model, population) one wo_DKN row, then one with_DKN row per λ
    setting (in the given order); sorted by language, model, then population.

    Each input row is ``{"language", "model", "population", "setting", "threshold_source",
    "metrics"}`` (:func:`fact_check_rows`) where ``metrics`` is a
    :func:`~kneurons.factcheck.fact_check_metrics` result and ``threshold_source`` is ``"auto"``
    (λ chosen on the calibration slice) or ``"config"``. wo_DKN does not depend on λ: its row
    (from the first setting) has setting "" and threshold NaN.
    """
    records = []
    for row in rows:
        source = row["threshold_source"]
        if source not in THRESHOLD_SOURCES:
            raise ValueError(f"threshold_source {source!r} of {row['model']}/{row['language']} "
                             f"is not one of {THRESHOLD_SOURCES}")
        for method in METHODS:
            metrics = row["metrics"][method]
            threshold = metrics.get("threshold")
            record = {"language": row["language"], "model": row["model"],
                      "population": row["population"], "method": method,
                      "setting": row["setting"] if method == "with_DKN" else ""}
            for column in FACT_CHECK_COLUMNS[5:] + FACT_CHECK_EXTRA_COLUMNS:
                record[column] = metrics.get(column)
            record["threshold"] = math.nan if threshold is None else float(threshold)
            record["threshold_source"] = source if method == "with_DKN" else ""
            records.append(record)
    table = pd.DataFrame(records, columns=FACT_CHECK_COLUMNS + FACT_CHECK_EXTRA_COLUMNS)
    if table.empty:
        return table
    keys = ["language", "model", "population", "method", "setting"]
    if table[table["method"] == "with_DKN"].duplicated(keys).any():
        raise ValueError("fact_check_table: a (language, model, population, setting) row "
                         "appears more than once")
    table = table.drop_duplicates(keys)  # wo_DKN: one row per population
    order = {p: i for i, p in enumerate(POPULATION_LABELS)}
    table["_population"] = table["population"].map(lambda p: order.get(p, len(order)))
    table["_method"] = table["method"].map({m: i for i, m in enumerate(METHODS)})
    table = table.sort_values(["language", "model", "_population", "_method"], kind="stable")
    return table.drop(columns=["_population", "_method"]).reset_index(drop=True)


def _percent(value) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{100 * float(value):.2f}"


def _delta_f1(with_f1, wo_f1) -> str:
    if any(v is None or pd.isna(v) for v in (with_f1, wo_f1)) or float(wo_f1) == 0:
        return "n/a"
    return f"{100 * (float(with_f1) - float(wo_f1)) / float(wo_f1):+.2f}"


def _lambda(value) -> str:
    return "n/a (no DKN score)" if value is None or pd.isna(value) else f"{float(value):.6g}"


def fact_check_markdown(table: pd.DataFrame) -> str:
    """Table 3 as Markdown: Dataset, Model, Relations, Method, λ, n, P, R, F1 (%), ΔF1 (%),
    Abstained, then notes.

    n: candidates of the population (P, R and F1 are "n/a" when it is empty). ΔF1 is on the
    with_DKN rows (relative to the same model, language and population's wo_DKN F1; "n/a" when
    the baseline's F1 is 0). Abstained: candidates with_DKN judged not correct for want of
    DKN. The notes say how each λ was chosen and give the candidate, DKN-less
    relation and dropped-fact counts per (model, language).
    """
    header = ["Dataset", "Model", "Relations", "Method", "λ", "n", "P", "R", "F1", "ΔF1",
              "Abstained"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 4 + ["---:"] * 7) + "|"]
    notes = []
    sources = set()
    for (language, model), run in table.groupby(["language", "model"], sort=False):
        for population, group in run.groupby("population", sort=False):
            wo = group.loc[group["method"] == "wo_DKN", "f1"]
            wo_f1 = wo.iloc[0] if len(wo) else None
            for row in group.itertuples(index=False):
                with_dkn = row.method == "with_DKN"
                n = int(row.n_true or 0) + int(row.n_wrong or 0)
                rates = ([_percent(row.precision), _percent(row.recall), _percent(row.f1)]
                         if n else ["n/a"] * 3)
                lam = "n/a" if pd.isna(row.threshold) else f"{float(row.threshold):.6g}"
                cells = [f"mLAMA-{language}", str(model),
                         POPULATION_LABELS.get(population, population),
                         METHOD_LABELS.get(row.method, row.method),
                         (row.setting if row.setting == lam else f"{row.setting} = {lam}")
                         if with_dkn else "", str(n), *rates,
                         _delta_f1(row.f1, wo_f1) if with_dkn and n else "",
                         _count(row._asdict(), "n_abstained") if with_dkn else ""]
                lines.append("| " + " | ".join(cells) + " |")
        with_rows = run[run["method"] == "with_DKN"]
        sources.update(with_rows["threshold_source"])
        every = run[run["population"] == "all_relations"]
        first = (every if len(every) else run).iloc[0]
        lams = "; ".join(f"{r.setting} = {_lambda(r.threshold)}" for r in with_rows.drop_duplicates(
            "setting").itertuples(index=False))
        notes.append(
            f"- {model} / mLAMA-{language}: λ {lams or 'n/a'}; "
            f"{int(first['n_true'])} true / {int(first['n_wrong'])} wrong candidates; "
            f"relations without DKN: {_count(first, 'n_relations_no_dkn')} of "
            f"{_count(first, 'n_relations')} ({_count(first, 'n_no_dkn')} candidates, on which "
            f"with DKN abstains); facts left out for both methods (no attribution records, "
            f"e.g. causal templates starting with [Y]): {_count(first, 'n_facts_dropped')}")
    if table.empty:
        lines.append("| (no data) | | | | | | | | | | |")
    how = {
        "auto": "auto: chosen to maximise the with-DKN F1 on the calibration slice of the "
                "discovery part (never on the evaluation part; the DKN are found without that "
                "slice)",
        "config": "numbers: fixed in the config (factcheck.thresholds; 1e-06 is the authors' λ)",
    }
    explanation = "; ".join(f"{how[s]}" for s in THRESHOLD_SOURCES if s in sources)
    text = [
        "\n".join(lines), "",
        "P, R and F1 in % for the class \"the statement is correct\" over the true and wrong "
        "candidates of the evaluation facts. wo DKN: the model judges by its own prediction; "
        "with DKN: correct when the mean attribution of the relation's DKN exceeds λ. "
        "ΔF1: relative change of F1 with DKN over wo DKN, in % of the wo-DKN F1. Relations: "
        "all (with DKN abstains on relations without DKN: judged not correct, counted under "
        "Abstained) or DKN only (only relations with DKN, for both methods: the authors' "
        "population; n/a when no relation has DKN). n: candidates. The paper's P and R columns correspond to our R and P (the authors' "
        "cal_hallucination.py swaps them; see docs/differences.md).",
        "",
        f"λ settings: {explanation or 'none (no rows)'}.",
    ]
    if notes:
        text += [""] + notes
    return "\n".join(text) + "\n"


def _count(row, column) -> str:
    value = row.get(column) if hasattr(row, "get") else None
    return "n/a" if value is None or pd.isna(value) else str(int(value))


def plot_dkn_layers(layer_counts: pd.DataFrame, out_png, out_svg) -> None:
    """Number of DKN neurons per layer: one panel per model, one bar group per language.

    ``layer_counts`` has columns ``model, language, layer, count``.
    """
    title = "Degenerate knowledge neurons per layer"
    data = layer_counts if layer_counts is not None else pd.DataFrame()
    models = sorted(data["model"].unique()) if len(data) else []
    with figure(out_png, out_svg, len(models), 5.0, 3.6,
                title=title, empty=not models) as (fig, axes):
        for ax, model in zip(axes, models):
            sub = data[data["model"] == model]
            bars = {f"mLAMA-{language}": sub[sub["language"] == language]
                    .groupby("layer")["count"].sum()
                    for language in sorted(sub["language"].unique())}
            layer_bars(ax, bars, "DKN neurons", f"{model}", title="dataset")


def plot_f1_vs_lambda(curves: Mapping[str, pd.DataFrame], chosen: Mapping[str, float],
                      out_png, out_svg) -> None:
    """F1 of with_DKN against λ per key (e.g. ``"toy-bert/en"``), each λ setting as a line.

    ``curves[key]`` has columns ``threshold`` and ``f1`` (see
    :func:`~kneurons.factcheck.f1_curve`); ``chosen[key]`` is λ or a map setting -> λ, one
    line per setting (NaN or missing: no line).
    """
    title = "Fact checking with DKN: F1 against the threshold λ"
    with figure(out_png, out_svg, 1, 6.4, 4.2) as (fig, axes):
        ax = axes[0]
        keys = [key for key in sorted(curves) if len(curves[key])]
        if not keys:
            no_data(ax, title)
        for key in keys:
            curve = curves[key].sort_values("threshold")
            (line,) = ax.plot(curve["threshold"], 100 * curve["f1"], marker=".",
                              label=key)
            lams = chosen.get(key, math.nan)
            if not isinstance(lams, Mapping):
                lams = {"chosen": lams}
            for (setting, lam), style in zip(lams.items(), ["--", ":", "-."] * len(lams)):
                if lam is not None and not pd.isna(lam):
                    ax.axvline(float(lam), color=line.get_color(), linestyle=style,
                               label=f"{key}: λ {setting} = {float(lam):.4g}")
        if keys:
            ax.set_xlabel("λ (mean DKN attribution threshold)")
            ax.set_ylabel("F1 (%)")
            ax.set_title(title)
            ax.legend(fontsize="small")


def _roc_points(labels: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, values)
    return fpr, tpr


def plot_roc(scores_by_key: Mapping[str, pd.DataFrame], out_png, out_svg) -> None:
    """ROC curves per key: of ``dkn_score`` (with DKN, NaN ranked lowest) and of ``prob``.

    ``scores_by_key[key]`` is a :func:`~kneurons.factcheck.dkn_scores` frame. Keys whose
    scores hold one class only have no ROC and are skipped.
    """
    title = "Fact checking: ROC (positive class: the statement is correct)"
    with figure(out_png, out_svg, 1, 5.2, 5.0) as (fig, axes):
        ax = axes[0]
        keys = [key for key in sorted(scores_by_key)
                if scores_by_key[key]["label"].nunique() == 2]
        if not keys:
            no_data(ax, title)
        for key in keys:
            scores = scores_by_key[key]
            labels = scores["label"].to_numpy(np.int64)
            fpr, tpr = _roc_points(labels, ranking_score(scores, "with_DKN"))
            (line,) = ax.plot(fpr, tpr, label=f"{key}: DKN score")
            fpr, tpr = _roc_points(labels, ranking_score(scores, "wo_DKN"))
            ax.plot(fpr, tpr, linestyle="--", color=line.get_color(),
                    label=f"{key}: model probability")
        if keys:
            ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, label="chance")
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
            ax.set_title(title)
            ax.legend(fontsize="small")


def plot_per_relation_f1(per_relation: pd.DataFrame, out_png, out_svg) -> None:
    """F1 per relation of both methods: one panel per (model, language), one bar pair per relation.

    ``per_relation`` has columns ``model, language, relation, method, f1``.
    """
    title = "Fact checking F1 per relation"
    data = per_relation if per_relation is not None else pd.DataFrame()
    panels = (sorted(data[["model", "language"]].drop_duplicates().itertuples(index=False,
                                                                            name=None))
              if len(data) else [])
    relations = sorted(data["relation"].unique()) if len(data) else []
    height = max(3.0, 0.28 * len(relations) + 1.5)
    with figure(out_png, out_svg, len(panels), 4.2, height,
                title=title, empty=not panels) as (fig, axes):
        positions = np.arange(len(relations))
        for ax, (model, language) in zip(axes, panels):
            sub = data[(data["model"] == model) & (data["language"] == language)]
            for k, method in enumerate(METHODS):
                f1 = (sub[sub["method"] == method].set_index("relation")["f1"]
                      .reindex(relations))
                ax.barh(positions + (k - 0.5) * 0.4, 100 * f1.to_numpy(np.float64),
                        height=0.4, label=METHOD_LABELS[method])
            ax.set_yticks(positions)
            ax.set_yticklabels(relations)
            ax.invert_yaxis()
            ax.set_xlim(0, 100)
            ax.set_xlabel("F1 (%)")
            ax.set_ylabel("relation")
            ax.set_title(f"{model} / mLAMA-{language}")
            ax.legend(fontsize="small")


# ---- the whole fact-checking report -------------------------------------------------------

def _first_setting(per_relation: pd.DataFrame) -> pd.DataFrame:
    if "setting" not in per_relation or per_relation.empty:
        return per_relation
    first = per_relation["setting"].iloc[0]
    return per_relation[per_relation["setting"] == first]


FIGURES = ("dkn_layers", "f1_vs_lambda", "roc", "per_relation_f1")


def fact_check_report(runs: Sequence[Mapping], out_csv, out_md,
                      figures: Mapping[str, tuple]) -> pd.DataFrame:
    """Table 3 (CSV and Markdown) and the four figures from every (model, language) run.

    Each run: ``{"model", "language", "metrics"`` (the fact_check metrics JSON: settings,
    dropped, metrics), ``"scores"``, ``"f1_curve"``, ``"per_relation"``,
    ``"dkn_layers"`` (tables)}. ``figures[name] = (png, svg)`` for each name in FIGURES.
    Returns the table.
    """
    table = fact_check_table([row for run in runs for row in fact_check_rows(
        run["model"], run["language"], run["metrics"])])
    write_csv(table, out_csv)
    write_text(fact_check_markdown(table), out_md)
    key = lambda run: f"{run['model']}/{run['language']}"  # noqa: E731
    layers = [run["dkn_layers"].groupby("layer", as_index=False)["n_dkn"].sum()
              .rename(columns={"n_dkn": "count"}).assign(model=run["model"],
                                                          language=run["language"])
              for run in runs if len(run["dkn_layers"])]
    plot_dkn_layers(pd.concat(layers, ignore_index=True) if layers else pd.DataFrame(
        columns=["model", "language", "layer", "count"]), *figures["dkn_layers"])
    chosen = {key(run): {s["setting"]: (math.nan if s["threshold"] is None
                                        else float(s["threshold"]))
                         for s in run["metrics"]["settings"]} for run in runs}
    plot_f1_vs_lambda({key(run): run["f1_curve"] for run in runs}, chosen,
                      *figures["f1_vs_lambda"])
    plot_roc({key(run): run["scores"] for run in runs}, *figures["roc"])
    # per relation: at the first λ setting (config order), all relations
    per_relation = [_first_setting(run["per_relation"]).assign(model=run["model"],
                                                               language=run["language"])
                    for run in runs]
    plot_per_relation_f1(pd.concat(per_relation, ignore_index=True) if per_relation
                         else pd.DataFrame(), *figures["per_relation_f1"])
    return table
