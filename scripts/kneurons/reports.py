"""Reports: the fact-checking table (the paper's Table 3) and the figures.

:func:`fact_check_table` flattens :func:`kneurons.factcheck.fact_check_metrics` outputs of
several (language, model) runs into one row per (language, model, population, method, λ
setting) (wo_DKN, which has no λ, once per population);
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
from .io import atomic_path, write_csv, write_text

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


def _layer_bars(ax, bars: Mapping[str, pd.Series], ylabel: str, heading: str,
                **legend) -> None:
    """Side-by-side bars per layer, one series (layer -> count) per legend label."""
    from matplotlib.ticker import MaxNLocator

    width = 0.8 / max(len(bars), 1)
    for k, (label, part) in enumerate(bars.items()):
        ax.bar(part.index.to_numpy() + (k - (len(bars) - 1) / 2) * width, part.to_numpy(),
               width=width, label=label)
    layers = sorted(set().union(*(part.index for part in bars.values())))
    if layers:
        ax.set_xticks(layers)
        ax.set_xlim(min(layers) - 1, max(layers) + 1)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(heading)
    ax.legend(**legend)

def plot_dkn_layers(layer_counts: pd.DataFrame, out_png, out_svg) -> None:
    """Number of DKN neurons per layer: one panel per model, one bar group per language.

    ``layer_counts`` has columns ``model, language, layer, count``.
    """
    plt = _pyplot()

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
                bars = {f"mLAMA-{language}": sub[sub["language"] == language]
                        .groupby("layer")["count"].sum()
                        for language in sorted(sub["language"].unique())}
                _layer_bars(ax, bars, "DKN neurons", f"{model}", title="dataset")
            if models:
                fig.suptitle(title)
            _save(fig, out_png, out_svg)
        finally:
            plt.close(fig)


def plot_f1_vs_lambda(curves: Mapping[str, pd.DataFrame], chosen: Mapping[str, float],
                      out_png, out_svg) -> None:
    """F1 of with_DKN against λ per key (e.g. ``"toy-bert/en"``), each λ setting as a line.

    ``curves[key]`` has columns ``threshold`` and ``f1`` (see
    :func:`~kneurons.factcheck.f1_curve`); ``chosen[key]`` is λ or a map setting -> λ, one
    line per setting (NaN or missing: no line).
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


# ---- language-independent knowledge neurons and cross-lingual editing ---------------------

LIKN_FIGURES = ("likn_layers", "likn_erase", "likn_edit")
KIND_LABELS = {"fact": "same fact (LIKN)", "control_random": "control: random other fact",
               "control_same_relation": "control: other fact, same relation"}
"""How the rows of :func:`kneurons.likn.likn_statistics` are named in the report."""


def _prob(value) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{float(value):.3f}"


def _signed_percent(value) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{100 * float(value):+.1f}"


def _main_group(languages: pd.Series) -> str:
    """The language group with the most languages (ties: the first in string order)."""
    groups = sorted(set(languages))
    return max(groups, key=lambda g: (g.count("+"), [-ord(c) for c in g])) if groups else ""


def likn_markdown(stats: pd.DataFrame, edits: pd.DataFrame) -> str:
    """The LIKN statistics (with their controls), per relation, and the erasing and editing
    tables as Markdown. ``stats``/``edits``: :func:`kneurons.likn.likn_statistics` and
    :func:`kneurons.likn.edit_summary` rows with a leading ``model`` column."""
    out = ["# Language-independent knowledge neurons (LIKN) and cross-lingual editing", "",
           "## LIKN of the discovery facts (all relations)", "",
           "| Model | Languages | Pairs | Facts | With LIKN (%) | Mean LIKN | Mean KN "
           "| LIKN share of KN (%) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    overall = stats[stats["relation"] == "all"]
    for row in overall.itertuples(index=False):
        out.append(f"| {row.model} | {row.languages} | {KIND_LABELS.get(row.kind, row.kind)} | "
                   f"{int(row.n_facts)} | {_percent(row.share_with_likn)} | "
                   f"{row.mean_likn:.2f} | {row.mean_kn:.2f} | "
                   f"{_percent(row.likn_share_of_kn)} |")
    if overall.empty:
        out.append("| (no data) | | | | | | | |")
    out += ["", "LIKN of a fact: the intersection of its knowledge neurons (KN) in the group's "
            "languages. Controls: the same intersection between a fact's KN in the first "
            "language and another fact's KN in the others (a random other fact, or another "
            "fact of the same relation), i.e. the overlap that chance and shared "
            "relation/object neurons alone give. LIKN share of KN: mean over the languages "
            "of |LIKN| / |KN|.", "",
            "## Per relation: facts with a non-empty LIKN (%)", "",
            "| Model | Languages | Relation | Facts | " + " | ".join(KIND_LABELS.values())
            + " | Mean LIKN (same fact) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    per_relation = stats[stats["relation"] != "all"]
    for (model, languages, relation), group in per_relation.groupby(
            ["model", "languages", "relation"], sort=True):
        by_kind = group.set_index("kind")
        cells = [_percent(by_kind["share_with_likn"].get(kind)) for kind in KIND_LABELS]
        facts = by_kind["n_facts"].get("fact")
        mean = by_kind["mean_likn"].get("fact")
        out.append(f"| {model} | {languages} | {relation} | "
                   f"{'n/a' if facts is None else int(facts)} | " + " | ".join(cells)
                   + f" | {'n/a' if mean is None else f'{mean:.2f}'} |")
    out += ["", "## Erasing: activations of the set set to 0 at the object position(s)", "",
            "| Model | Neuron set | Neurons | Scored in | Facts | P(true) before | after | "
            "Change (%) | Top-1 before (%) | after (%) | Unrelated: change (%) | "
            "Unrelated top-1 after (%) |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    erase = edits[edits["operation"] == "erase"]
    for row, unrelated in _with_unrelated(erase):
        out.append(
            f"| {row.model} | {row.neuron_set} | {row.mean_neurons:.2f} | {row.eval_lang} | "
            f"{int(row.n)} | {_prob(row.p_true_before)} | {_prob(row.p_true_after)} | "
            f"{_signed_percent(row.rel_change_p_true)} | {_percent(row.top1_true_before)} | "
            f"{_percent(row.top1_true_after)} | {_signed_percent(unrelated.get('rel_change_p_true'))} | "
            f"{_percent(unrelated.get('top1_true_after'))} |")
    out += ["", "## Editing: value slots v_i <- v_i - λ1 e(true) + λ2 e(wrong) (Dai et al.)", "",
            "| Model | Edited in | Neuron set | Scored in | Success (%) | P(wrong) before | "
            "after | P(true) before | after | Top-1 true after (%) | Unrelated: change (%) | "
            "Unrelated top-1 after (%) |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    edit = edits[edits["operation"] == "edit"]
    for row, unrelated in _with_unrelated(edit):
        out.append(
            f"| {row.model} | {row.edit_lang} | {row.neuron_set} | {row.eval_lang} | "
            f"{_percent(row.edit_success)} | {_prob(row.p_wrong_before)} | "
            f"{_prob(row.p_wrong_after)} | {_prob(row.p_true_before)} | "
            f"{_prob(row.p_true_after)} | {_percent(row.top1_true_after)} | "
            f"{_signed_percent(unrelated.get('rel_change_p_true'))} | "
            f"{_percent(unrelated.get('top1_true_after'))} |")
    out += ["", "Sets of equal size k = |LIKN| per fact: likn (the fact's LIKN over all the "
            "model's languages), likn_other (the k best LIKN neurons of another fact, "
            "seeded; facts without such a fact are left out of this set), only_<lang> (the k "
            "best KN of that language that are in no "
            "other language's KN), random (per LIKN neuron a random neuron of the same layer "
            "outside every KN of the fact). Change: mean relative change of P(true) "
            "((after - before) / before). P(object): mean over the object's tokens (teacher "
            "forced). Top-1: every object token is the model's argmax. Success: the wrong "
            "object becomes top-1. e(y): the output word embedding of the object (mean over its "
            "tokens in the edited language). Unrelated: the true objects of discovery facts of "
            "other relations, scored under the same intervention (the locality control)."]
    return "\n".join(out) + "\n"


def _with_unrelated(summary: pd.DataFrame):
    """(fact row, the matching unrelated row as a dict) pairs of an edit summary."""
    keys = ["model", "operation", "neuron_set", "edit_lang", "eval_lang"]
    unrelated = {tuple(row[k] for k in keys): row
                 for row in summary[summary["target"] == "unrelated"].to_dict("records")}
    for row in summary[summary["target"] == "fact"].itertuples(index=False):
        yield row, unrelated.get(tuple(getattr(row, k) for k in keys), {})


def plot_likn_layers(layers: pd.DataFrame, out_png, out_svg) -> None:
    """LIKN neurons per layer, of the facts and of the two controls: one panel per model
    (its language group with the most languages). Columns: model, languages, kind, layer,
    n_likn."""
    plt = _pyplot()

    title = "Language-independent knowledge neurons per layer"
    with plt.rc_context(_RC):
        models = sorted(layers["model"].unique()) if len(layers) else []
        fig, axes = _figure(plt, len(models), 5.0, 3.6)
        try:
            if not models:
                _no_data(axes[0], title)
            for ax, model in zip(axes, models):
                sub = layers[layers["model"] == model]
                group = _main_group(sub["languages"])
                sub = sub[sub["languages"] == group]
                bars = {KIND_LABELS[kind]: sub[sub["kind"] == kind]
                        .groupby("layer")["n_likn"].sum()
                        for kind in KIND_LABELS if kind in set(sub["kind"])}
                _layer_bars(ax, bars, "neurons (summed over facts)", f"{model} ({group})",
                            fontsize="small")
            if models:
                fig.suptitle(title)
            _save(fig, out_png, out_svg)
        finally:
            plt.close(fig)


def _set_order(names) -> list[str]:
    rank = {"likn": 0, "likn_other": 1, "random": 3}
    return sorted(set(names), key=lambda n: (rank.get(n, 2), n))


def _grouped_bars(ax, data: pd.DataFrame, x_keys: list, value: str, scale: float = 100.0):
    """Bars of ``value`` per x key (tuple label) and evaluation language."""
    languages = sorted(data["eval_lang"].unique())
    width = 0.8 / max(len(languages), 1)
    positions = np.arange(len(x_keys))
    for j, lang in enumerate(languages):
        sub = data[data["eval_lang"] == lang].set_index("_x")[value].reindex(x_keys)
        ax.bar(positions + (j - (len(languages) - 1) / 2) * width,
               scale * sub.to_numpy(np.float64), width=width, label=f"scored in {lang}")
    ax.set_xticks(positions)
    ax.set_xticklabels(x_keys, rotation=30, ha="right")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.legend(fontsize="small")


def plot_likn_erase(edits: pd.DataFrame, out_png, out_svg) -> None:
    """Relative change of P(true) of the erased facts per neuron set and scoring language:
    one panel per model. ``edits``: edit summaries with a ``model`` column."""
    plt = _pyplot()
    title = "Erasing a fact through its neurons: change of P(true object)"
    with plt.rc_context(_RC):
        data = edits[(edits["operation"] == "erase") & (edits["target"] == "fact")] \
            if len(edits) else edits
        models = sorted(data["model"].unique()) if len(data) else []
        fig, axes = _figure(plt, len(models), 5.0, 3.8)
        try:
            if not models:
                _no_data(axes[0], title)
            for ax, model in zip(axes, models):
                sub = data[data["model"] == model].assign(_x=lambda d: d["neuron_set"])
                _grouped_bars(ax, sub, _set_order(sub["neuron_set"]), "rel_change_p_true")
                ax.set_ylabel("relative change of P(true) (%)")
                ax.set_title(model)
            if models:
                fig.suptitle(title)
            _save(fig, out_png, out_svg)
        finally:
            plt.close(fig)


def plot_likn_edit(edits: pd.DataFrame, out_png, out_svg) -> None:
    """Editing a fact to its wrong object: success (top row) and relative change of P(true)
    (bottom row) per (edited language, neuron set) and scoring language, one column per
    model."""
    plt = _pyplot()
    title = "Editing a fact through its neurons (Dai et al. value-slot edit)"
    with plt.rc_context(_RC):
        data = edits[(edits["operation"] == "edit") & (edits["target"] == "fact")] \
            if len(edits) else edits
        models = sorted(data["model"].unique()) if len(data) else []
        ncols = max(len(models), 1)
        fig, grid = plt.subplots(2, ncols, figsize=(6.0 * ncols, 7.0), squeeze=False,
                                 layout="constrained")
        try:
            if not models:
                _no_data(grid[0][0], title)
                grid[1][0].axis("off")
            for col, model in enumerate(models):
                sub = data[data["model"] == model].assign(
                    _x=lambda d: d["edit_lang"] + ": " + d["neuron_set"])
                keys = [f"{lang}: {name}" for lang in sorted(sub["edit_lang"].unique())
                        for name in _set_order(sub["neuron_set"])]
                _grouped_bars(grid[0][col], sub, keys, "edit_success")
                grid[0][col].set_ylabel("wrong object top-1 (%)")
                grid[0][col].set_ylim(0, 100)
                grid[0][col].set_title(f"{model}: edit success")
                _grouped_bars(grid[1][col], sub, keys, "rel_change_p_true")
                grid[1][col].set_ylabel("relative change of P(true) (%)")
                grid[1][col].set_xlabel("edited in: neuron set")
                grid[1][col].set_title(f"{model}: P(true object)")
            if models:
                fig.suptitle(title)
            _save(fig, out_png, out_svg)
        finally:
            plt.close(fig)


def likn_report(runs: Sequence[Mapping], out_csv, out_edit_csv, out_md,
                figures: Mapping[str, tuple]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The LIKN statistics (CSV), the editing summary (CSV), both as Markdown, and the
    figures of LIKN_FIGURES, from each model's ``{"model", "stats", "layers", "edits"}``
    (:mod:`kneurons.likn` tables; ``edits`` is an edit summary). Returns the two tables."""
    def stack(key: str) -> pd.DataFrame:
        frames = [run[key].assign(model=run["model"]) for run in runs]
        if not frames:
            return pd.DataFrame(columns=["model"])
        table = pd.concat(frames, ignore_index=True)
        return table[["model"] + [c for c in table.columns if c != "model"]]

    stats, layers, edits = stack("stats"), stack("layers"), stack("edits")
    write_csv(stats, out_csv)
    write_csv(edits, out_edit_csv)
    write_text(likn_markdown(stats, edits), out_md)
    plot_likn_layers(layers, *figures["likn_layers"])
    plot_likn_erase(edits, *figures["likn_erase"])
    plot_likn_edit(edits, *figures["likn_edit"])
    return stats, edits
