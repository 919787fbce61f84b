"""Reports: the fact-checking table (the paper's Table 3) and the figures.

:func:`fact_check_table` flattens :func:`kneurons.factcheck.fact_check_metrics` outputs of
several (language, model) runs into one row per (language, model, method);
:func:`fact_check_markdown` lays that table out like Table 3 of Chen et al. (AAAI 2024)
with P, R and F1 in percent and ΔF1, the relative change of with_DKN's F1 over wo_DKN's
(``100 * (F1_with - F1_wo) / F1_wo``, in percent of the baseline's F1), on the with_DKN row.

Every figure is written as PNG and SVG, each atomically (temporary file, then rename), with
the format passed explicitly because the temporary name has no image suffix. SVG text stays
text (``svg.fonttype: none``) and the SVG carries no date and a fixed id salt, so the same
data give the same file. Empty inputs give a figure saying "no data". matplotlib is imported
lazily with the Agg backend, so importing this module needs no display.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .factcheck import METHODS, ranking_score
from .io import atomic_path

FACT_CHECK_COLUMNS = ["language", "model", "method", "precision", "recall", "f1", "auroc",
                      "n_true", "n_wrong", "threshold"]
"""The leading columns of :func:`fact_check_table`."""

FACT_CHECK_EXTRA_COLUMNS = ["precision_wrong", "recall_wrong", "f1_wrong", "auroc_wrong",
                            "n_no_dkn", "threshold_source", "n_facts", "n_relations",
                            "n_relations_no_dkn"]
"""The columns after :data:`FACT_CHECK_COLUMNS`."""

THRESHOLD_SOURCES = ("auto", "config")
METHOD_LABELS = {"wo_DKN": "wo DKN", "with_DKN": "with DKN"}
"""How the methods are named in the Markdown table (the paper's "wo DKN" / "with DKN")."""


# ---- Table 3 ------------------------------------------------------------------------------

def fact_check_table(rows: Sequence[Mapping]) -> pd.DataFrame:
    """One row per (language, model, method), sorted by language, model, then wo_DKN, with_DKN.

    Each input row is ``{"language", "model", "metrics", "threshold_source"}`` where
    ``metrics`` is a :func:`~kneurons.factcheck.fact_check_metrics` result and
    ``threshold_source`` is ``"auto"`` (λ chosen on the calibration slice) or ``"config"``.
    The wo_DKN rows have threshold NaN (the baseline judges by the model's prediction).
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
            record = {"language": row["language"], "model": row["model"], "method": method}
            for column in FACT_CHECK_COLUMNS[3:] + FACT_CHECK_EXTRA_COLUMNS:
                record[column] = metrics.get(column)
            record["threshold"] = math.nan if threshold is None else float(threshold)
            record["threshold_source"] = source
            records.append(record)
    table = pd.DataFrame(records, columns=FACT_CHECK_COLUMNS + FACT_CHECK_EXTRA_COLUMNS)
    if table.empty:
        return table
    table["_method"] = table["method"].map({m: i for i, m in enumerate(METHODS)})
    table = table.sort_values(["language", "model", "_method"], kind="stable")
    table = table.drop(columns="_method").reset_index(drop=True)
    if table.duplicated(["language", "model", "method"]).any():
        raise ValueError("fact_check_table: a (language, model) pair appears more than once")
    return table


def _percent(value) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{100 * float(value):.2f}"


def _delta_f1(with_f1, wo_f1) -> str:
    if any(v is None or pd.isna(v) for v in (with_f1, wo_f1)) or float(wo_f1) == 0:
        return "n/a"
    return f"{100 * (float(with_f1) - float(wo_f1)) / float(wo_f1):+.2f}"


def fact_check_markdown(table: pd.DataFrame) -> str:
    """Table 3 as Markdown: Dataset, Model, Method, P, R, F1 (%), ΔF1 (%), then notes.

    ΔF1 is on the with_DKN row (relative to the same model and language's wo_DKN F1; "n/a"
    when the baseline's F1 is 0). The notes say how λ was chosen, list λ per (model,
    language), and the candidate and DKN-less relation counts.
    """
    header = ["Dataset", "Model", "Method", "P", "R", "F1", "ΔF1"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 4) + "|"]
    notes = []
    sources = set()
    for (language, model), group in table.groupby(["language", "model"], sort=False):
        f1 = dict(zip(group["method"], group["f1"]))
        for row in group.itertuples(index=False):
            delta = _delta_f1(row.f1, f1.get("wo_DKN")) if row.method == "with_DKN" else ""
            cells = [f"mLAMA-{language}", str(model), METHOD_LABELS.get(row.method, row.method),
                     _percent(row.precision), _percent(row.recall), _percent(row.f1), delta]
            lines.append("| " + " | ".join(cells) + " |")
        with_rows = group[group["method"] == "with_DKN"]
        first = (with_rows if len(with_rows) else group).iloc[0]
        sources.add(first["threshold_source"])
        lam = first["threshold"]
        lam_text = "n/a (no DKN score)" if pd.isna(lam) else f"{float(lam):.6g}"
        notes.append(
            f"- {model} / mLAMA-{language}: λ = {lam_text} ({first['threshold_source']}); "
            f"{int(first['n_true'])} true / {int(first['n_wrong'])} wrong candidates; "
            f"relations without DKN: {_count(first, 'n_relations_no_dkn')} of "
            f"{_count(first, 'n_relations')} ({_count(first, 'n_no_dkn')} candidates judged "
            f"not correct by with DKN)")
    if table.empty:
        lines.append("| (no data) | | | | | | |")
    how = {
        "auto": "chosen automatically to maximise the with-DKN F1 on the calibration slice of "
                "the discovery part (never on the evaluation part)",
        "config": "set in the config (factcheck.threshold)",
    }
    explanation = "; ".join(f"{how[s]}" for s in THRESHOLD_SOURCES if s in sources)
    text = [
        "\n".join(lines), "",
        "P, R and F1 in % for the class \"the statement is correct\" over the true and wrong "
        "candidates of the evaluation facts. wo DKN: the model judges by its own prediction; "
        "with DKN: correct when the mean attribution of the relation's DKN exceeds λ. "
        "ΔF1: relative change of F1 with DKN over wo DKN, in % of the wo-DKN F1.",
        "",
        f"λ was {explanation or 'not set (no rows)'}.",
    ]
    if notes:
        text += [""] + notes
    return "\n".join(text) + "\n"


def _count(row, column) -> str:
    value = row.get(column) if hasattr(row, "get") else None
    return "n/a" if value is None or pd.isna(value) else str(int(value))


# ---- figures ------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_RC = {"svg.fonttype": "none", "svg.hashsalt": "kneurons"}


def _save(fig, out_png: str | os.PathLike, out_svg: str | os.PathLike) -> None:
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight",
                    metadata={"Software": None})
    with atomic_path(out_svg) as tmp:
        fig.savefig(tmp, format="svg", bbox_inches="tight", metadata={"Date": None})


def _no_data(ax, title: str) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, fontsize=14)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])


def _figure(plt, ncols: int, width: float, height: float):
    fig, axes = plt.subplots(1, max(ncols, 1), figsize=(width * max(ncols, 1), height),
                             squeeze=False, layout="constrained")
    return fig, list(axes[0])


def plot_dkn_layers(layer_counts: pd.DataFrame, out_png, out_svg) -> None:
    """Number of DKN neurons per layer: one panel per model, one bar group per language.

    ``layer_counts`` has columns ``model, language, layer, count``.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    title = "Degenerate knowledge neurons per layer"
    with plt.rc_context(_RC):
        data = layer_counts if layer_counts is not None else pd.DataFrame()
        models = sorted(data["model"].unique()) if len(data) else []
        fig, axes = _figure(plt, len(models), 5.0, 3.6)
        try:
            if not models:
                _no_data(axes[0], title)
            for ax, model in zip(axes, models):
                sub = data[data["model"] == model]
                languages = sorted(sub["language"].unique())
                width = 0.8 / len(languages)
                for k, language in enumerate(languages):
                    part = sub[sub["language"] == language].groupby("layer")["count"].sum()
                    ax.bar(part.index.to_numpy() + (k - (len(languages) - 1) / 2) * width,
                           part.to_numpy(), width=width, label=f"mLAMA-{language}")
                layers = sorted(sub["layer"].unique())
                ax.set_xticks(layers)
                ax.set_xlim(min(layers) - 1, max(layers) + 1)
                ax.set_xlabel("layer")
                ax.set_ylabel("DKN neurons")
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
                ax.set_title(f"{model}")
                ax.legend(title="dataset")
            if models:
                fig.suptitle(title)
            _save(fig, out_png, out_svg)
        finally:
            plt.close(fig)


def plot_f1_vs_lambda(curves: Mapping[str, pd.DataFrame], chosen: Mapping[str, float],
                      out_png, out_svg) -> None:
    """F1 of with_DKN against λ per key (e.g. ``"toy-bert/en"``), the chosen λ as a dashed line.

    ``curves[key]`` has columns ``threshold`` and ``f1`` (see
    :func:`~kneurons.factcheck.f1_curve`); ``chosen[key]`` is λ (NaN or missing: no line).
    """
    plt = _pyplot()
    title = "Fact checking with DKN: F1 against the threshold λ"
    with plt.rc_context(_RC):
        fig, axes = _figure(plt, 1, 6.4, 4.2)
        ax = axes[0]
        try:
            keys = [key for key in sorted(curves) if len(curves[key])]
            if not keys:
                _no_data(ax, title)
            for key in keys:
                curve = curves[key].sort_values("threshold")
                (line,) = ax.plot(curve["threshold"], 100 * curve["f1"], marker=".",
                                  label=key)
                lam = chosen.get(key, math.nan)
                if lam is not None and not pd.isna(lam):
                    ax.axvline(float(lam), color=line.get_color(), linestyle="--",
                               label=f"{key}: chosen λ = {float(lam):.4g}")
            if keys:
                ax.set_xlabel("λ (mean DKN attribution threshold)")
                ax.set_ylabel("F1 (%)")
                ax.set_title(title)
                ax.legend(fontsize="small")
            _save(fig, out_png, out_svg)
        finally:
            plt.close(fig)


def _roc_points(labels: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, values)
    return fpr, tpr


def plot_roc(scores_by_key: Mapping[str, pd.DataFrame], out_png, out_svg) -> None:
    """ROC curves per key: of ``dkn_score`` (with DKN, NaN ranked lowest) and of ``prob``.

    ``scores_by_key[key]`` is a :func:`~kneurons.factcheck.dkn_scores` frame. Keys whose
    scores hold one class only have no ROC and are skipped.
    """
    plt = _pyplot()
    title = "Fact checking: ROC (positive class: the statement is correct)"
    with plt.rc_context(_RC):
        fig, axes = _figure(plt, 1, 5.2, 5.0)
        ax = axes[0]
        try:
            keys = [key for key in sorted(scores_by_key)
                    if scores_by_key[key]["label"].nunique() == 2]
            if not keys:
                _no_data(ax, title)
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
            _save(fig, out_png, out_svg)
        finally:
            plt.close(fig)


def plot_per_relation_f1(per_relation: pd.DataFrame, out_png, out_svg) -> None:
    """F1 per relation of both methods: one panel per (model, language), one bar pair per relation.

    ``per_relation`` has columns ``model, language, relation, method, f1``.
    """
    plt = _pyplot()
    title = "Fact checking F1 per relation"
    with plt.rc_context(_RC):
        data = per_relation if per_relation is not None else pd.DataFrame()
        panels = (sorted(data[["model", "language"]].drop_duplicates().itertuples(index=False,
                                                                                name=None))
                  if len(data) else [])
        relations = sorted(data["relation"].unique()) if len(data) else []
        height = max(3.0, 0.28 * len(relations) + 1.5)
        fig, axes = _figure(plt, len(panels), 4.2, height)
        try:
            if not panels:
                _no_data(axes[0], title)
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
            if panels:
                fig.suptitle(title)
            _save(fig, out_png, out_svg)
        finally:
            plt.close(fig)


# ---- the whole fact-checking report -------------------------------------------------------

FIGURES = ("dkn_layers", "f1_vs_lambda", "roc", "per_relation_f1")


def fact_check_report(runs: Sequence[Mapping], out_csv, out_md,
                      figures: Mapping[str, tuple]) -> pd.DataFrame:
    """Table 3 (CSV and Markdown) and the four figures from every (model, language) run.

    Each run: ``{"model", "language", "metrics"`` (the fact_check metrics JSON: threshold,
    threshold_source, metrics), ``"scores"``, ``"f1_curve"``, ``"per_relation"``,
    ``"dkn_layers"`` (tables)}. ``figures[name] = (png, svg)`` for each name in FIGURES.
    Returns the table.
    """
    table = fact_check_table([{"language": run["language"], "model": run["model"],
                               "metrics": run["metrics"]["metrics"],
                               "threshold_source": run["metrics"]["threshold_source"]}
                              for run in runs])
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out_md) as tmp:
        tmp.write_text(fact_check_markdown(table), encoding="utf-8")
    key = lambda run: f"{run['model']}/{run['language']}"  # noqa: E731
    layers = [run["dkn_layers"].groupby("layer", as_index=False)["n_dkn"].sum()
              .rename(columns={"n_dkn": "count"}).assign(model=run["model"],
                                                          language=run["language"])
              for run in runs if len(run["dkn_layers"])]
    plot_dkn_layers(pd.concat(layers, ignore_index=True) if layers else pd.DataFrame(
        columns=["model", "language", "layer", "count"]), *figures["dkn_layers"])
    chosen = {key(run): (math.nan if run["metrics"]["threshold"] is None
                         else float(run["metrics"]["threshold"])) for run in runs}
    plot_f1_vs_lambda({key(run): run["f1_curve"] for run in runs}, chosen,
                      *figures["f1_vs_lambda"])
    plot_roc({key(run): run["scores"] for run in runs}, *figures["roc"])
    per_relation = [run["per_relation"].assign(model=run["model"], language=run["language"])
                    for run in runs]
    plot_per_relation_f1(pd.concat(per_relation, ignore_index=True) if per_relation
                         else pd.DataFrame(), *figures["per_relation_f1"])
    return table
