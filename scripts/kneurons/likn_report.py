"""The LIKN report: the overlap statistics against their permutation nulls, the cross-lingual
erasing and editing tables with their paired tests (CSV, Markdown) of every model with several
languages, and their figures (:mod:`kneurons.figures`).

Every number is printed as ``estimate [low, high]`` (95% bootstrap interval over facts) with
its n. p-values are corrected with Holm's method (:func:`kneurons.statistics.holm`) across
each table of the report, all models together: the overlap tests over all relations (every
model, language group, tested statistic and null), the overlap tests per relation, and the
erase/edit comparisons of LIKN with its control sets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .figures import panels
from .io import write_csv, write_text
from .likn import NULLS, STATISTICS, STRONGER, TESTED, control_sets
from .statistics import Interval, holm

LIKN_FIGURES = ("likn_null", "likn_layers", "likn_erase", "likn_edit")
STATISTIC_LABELS = {"share_with_likn": "facts with a non-empty LIKN (share)",
                    "mean_likn": "mean LIKN size", "likn_share_of_kn": "LIKN share of KN",
                    "mean_kn": "mean KN size"}
NULL_LABELS = {"shuffled": "facts shuffled", "within_relation": "shuffled within relation"}
MEASURE_LABELS = {"delta_p_true": "ΔP(true)", "delta_p_wrong": "ΔP(wrong)"}
ALPHA = 0.05
"""The level at which the report calls a Holm-corrected difference detected."""


def _interval(row, column: str, fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    """``est [low, high]`` of ``column`` (its ``_low``/``_high`` companions, or ``low``/``high``
    when ``column`` is ``estimate``)."""
    def get(name):
        value = row.get(name) if isinstance(row, Mapping) else getattr(row, name, None)
        return math.nan if value is None or pd.isna(value) else scale * float(value)

    low, high = ("low", "high") if column == "estimate" else (f"{column}_low", f"{column}_high")
    return Interval(get(column), get(low), get(high), 0).format(fmt)


def _p(value) -> str:
    if value is None or pd.isna(value):
        return "n/a"
    return f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


def _fmt(value, fmt: str = "{:.2f}") -> str:
    return "n/a" if value is None or pd.isna(value) else fmt.format(float(value))


def _main_group(languages: pd.Series) -> str:
    """The language group with the most languages (ties: the first in string order)."""
    groups = sorted(set(languages))
    return max(groups, key=lambda g: (g.count("+"), [-ord(c) for c in g])) if groups else ""


def with_holm(stats: pd.DataFrame) -> pd.DataFrame:
    """``stats`` (likn statistics of several models) with ``<null>_p_holm`` columns: Holm
    over every tested p-value of the rows over all relations, and separately over those of
    the per-relation rows."""
    stats = stats.copy()
    for null in NULLS:
        stats[f"{null}_p_holm"] = np.nan
    for scope in (stats["relation"] == "all", stats["relation"] != "all"):
        columns = [f"{null}_p" for null in NULLS]
        block = stats.loc[scope, columns].to_numpy(float)
        if not block.size:
            continue
        adjusted = holm(block.ravel()).reshape(block.shape)
        for k, null in enumerate(NULLS):
            stats.loc[scope, f"{null}_p_holm"] = adjusted[:, k]
    return stats


def comparison_reading(row) -> str:
    """"LIKN stronger", "control stronger" (Holm p < ALPHA, by the sign of the difference) or
    "no detectable difference"."""
    p = row["p_holm"] if isinstance(row, Mapping) else row.p_holm
    difference = row["difference"] if isinstance(row, Mapping) else row.difference
    measure = row["measure"] if isinstance(row, Mapping) else row.measure
    if pd.isna(p) or p >= ALPHA or pd.isna(difference) or difference == 0:
        return "no detectable difference"
    return "LIKN stronger" if np.sign(difference) == STRONGER[measure] else "control stronger"


def _overlap_reading(stats: pd.DataFrame) -> list[str]:
    """One sentence per (model, language group) over all relations, from the Holm p-values."""
    lines = []
    overall = stats[(stats["relation"] == "all") & stats["statistic"].isin(TESTED)]
    for (model, languages), group in overall.groupby(["model", "languages"], sort=True):
        parts = []
        for null in NULLS:
            above = [STATISTIC_LABELS[s] for s, p in zip(group["statistic"],
                                                         group[f"{null}_p_holm"])
                     if pd.notna(p) and p < ALPHA]
            parts.append(f"against {NULL_LABELS[null]}: "
                         + (f"above chance in {', '.join(above)}" if above
                            else "not distinguishable from chance in any statistic"))
        n = int(group["n_facts"].iloc[0])
        lines.append(f"- {model} {languages} (n = {n} facts): " + "; ".join(parts) + ".")
    return lines


def likn_markdown(stats: pd.DataFrame, edits: pd.DataFrame, tests: pd.DataFrame) -> str:
    """The LIKN statistics against their nulls (overall and per relation), the erasing and
    editing tables and their tests as Markdown. ``stats``: :func:`with_holm` of stacked
    :func:`kneurons.likn.likn_statistics` tables; ``edits``: stacked
    :func:`kneurons.likn.edit_summary` rows; ``tests``: stacked
    :func:`kneurons.likn.edit_tests` rows with ``p_holm``; each with a leading ``model``."""
    null_heads = " | ".join(f"{NULL_LABELS[null]}: null mean [95% range] | p | Holm p"
                            for null in NULLS)
    out = ["# Language-independent knowledge neurons (LIKN) and cross-lingual editing", "",
           "## LIKN of the discovery facts against shuffled pairings (all relations)", "",
           "| Model | Languages | Statistic | Facts | Not converged | Observed [95% CI] | "
           + null_heads + " |",
           "|---|---|---|---:|---:|---:|" + "---:|---:|---:|" * len(NULLS)]
    overall = stats[stats["relation"] == "all"]
    for row in overall.itertuples(index=False):
        out.append(f"| {row.model} | {row.languages} | {STATISTIC_LABELS[row.statistic]} | "
                   f"{int(row.n_facts)} | {int(row.n_not_converged)} | "
                   f"{_interval(row, 'estimate')} | " + " | ".join(_null_cells(row, null)
                                                                  for null in NULLS) + " |")
    if overall.empty:
        out.append("| (no data) |" + " |" * (5 + 3 * len(NULLS)))
    out += ["", "LIKN of a fact: the intersection of its knowledge neurons (KN) in the group's "
            "languages (KN from converged attributions only; facts left out for it: Not "
            "converged). Observed: the real pairing (a fact's KN in one language with the "
            "same fact's KN in the others), 95% bootstrap interval over facts. Nulls: the "
            "same statistic when each fact's KN in the first language meet the KN of a "
            "randomly permuted fact in the others, among all facts (facts shuffled) or among "
            "the facts of the same relation (shuffled within relation, the harder null: a "
            "relation's facts share object-type neurons); mean and central 95% of the "
            "permutation draws. p: one-sided, P(null >= observed); Holm p: corrected over "
            "every p of this table. LIKN share of KN: mean over the languages of "
            "|LIKN| / |KN|. Mean |KN| does not depend on the pairing and is not tested.", "",
            "Reading (Holm p < 0.05):", ""] + (_overlap_reading(stats) or ["- (no data)"])
    out += ["", "## Per relation", "",
            "| Model | Languages | Relation | Statistic | Facts | Not converged | "
            "Observed [95% CI] | " + null_heads + " |",
            "|---|---|---|---|---:|---:|---:|" + "---:|---:|---:|" * len(NULLS)]
    per_relation = stats[(stats["relation"] != "all") & stats["statistic"].isin(TESTED)]
    for row in per_relation.itertuples(index=False):
        out.append(f"| {row.model} | {row.languages} | {row.relation} | "
                   f"{STATISTIC_LABELS[row.statistic]} | {int(row.n_facts)} | "
                   f"{int(row.n_not_converged)} | {_interval(row, 'estimate')} | "
                   + " | ".join(_null_cells(row, null) for null in NULLS) + " |")
    if per_relation.empty:
        out.append("| (no data) |" + " |" * (6 + 3 * len(NULLS)))
    out += ["", "Per relation, the nulls permute the relation's facts with facts of any relation "
            "(facts shuffled) or of its own (within relation); a relation with one fact has "
            "only its own pairing (p = 1). Holm p: corrected over every p of this table.", ""]
    out += _erase_section(edits) + _edit_section(edits) + _tests_section(tests)
    return "\n".join(out) + "\n"


def _null_cells(row, null: str) -> str:
    mean, low, high = (getattr(row, f"{null}_{part}") for part in ("mean", "low", "high"))
    if pd.isna(mean):
        return "n/a | n/a | n/a"
    return (f"{Interval(mean, low, high, 0).format()} | {_p(getattr(row, f'{null}_p'))} | "
            f"{_p(getattr(row, f'{null}_p_holm'))}")


def _erase_section(edits: pd.DataFrame) -> list[str]:
    out = ["## Erasing: activations of the set set to 0 at the object position(s)", "",
           "| Model | Neuron set | Neurons | Scored in | Facts | P(true) before | after | "
           "ΔP(true) | Relative change (%) | Top-1 before (%) | after (%) | "
           "Unrelated: facts, rows | Unrelated: relative change (%) | Unrelated: top-1 after (%) |",
           "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    erase = edits[edits["operation"] == "erase"] if len(edits) else edits
    for row, unrelated in _with_unrelated(erase):
        out.append(
            f"| {row.model} | {row.neuron_set} | {row.mean_neurons:.2f} | {row.eval_lang} | "
            f"{int(row.n_facts)} | {_interval(row, 'p_true_before', '{:.3f}')} | "
            f"{_interval(row, 'p_true_after', '{:.3f}')} | "
            f"{_interval(row, 'delta_p_true', '{:+.3f}')} | "
            f"{_interval(row, 'rel_change_p_true', '{:+.1f}', 100)} | "
            f"{_interval(row, 'top1_true_before', '{:.0f}', 100)} | "
            f"{_interval(row, 'top1_true_after', '{:.0f}', 100)} | "
            f"{_unrelated_n(unrelated)} | "
            f"{_interval(unrelated, 'rel_change_p_true', '{:+.1f}', 100)} | "
            f"{_interval(unrelated, 'top1_true_after', '{:.0f}', 100)} |")
    return out + [""]


def _edit_section(edits: pd.DataFrame) -> list[str]:
    out = ["## Editing: value slots v_i <- v_i - λ1 e(true) + λ2 e(wrong) (Dai et al.)", "",
           "| Model | Edited in | Neuron set | Scored in | Facts | Success (%) | P(wrong) before "
           "| after | ΔP(wrong) | P(true) before | after | ΔP(true) | Unrelated: facts, rows | "
           "Unrelated: relative change (%) | Unrelated: top-1 after (%) |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    edit = edits[edits["operation"] == "edit"] if len(edits) else edits
    for row, unrelated in _with_unrelated(edit):
        out.append(
            f"| {row.model} | {row.edit_lang} | {row.neuron_set} | {row.eval_lang} | "
            f"{int(row.n_facts)} | {_interval(row, 'edit_success', '{:.0f}', 100)} | "
            f"{_interval(row, 'p_wrong_before', '{:.3f}')} | "
            f"{_interval(row, 'p_wrong_after', '{:.3f}')} | "
            f"{_interval(row, 'delta_p_wrong', '{:+.3f}')} | "
            f"{_interval(row, 'p_true_before', '{:.3f}')} | "
            f"{_interval(row, 'p_true_after', '{:.3f}')} | "
            f"{_interval(row, 'delta_p_true', '{:+.3f}')} | {_unrelated_n(unrelated)} | "
            f"{_interval(unrelated, 'rel_change_p_true', '{:+.1f}', 100)} | "
            f"{_interval(unrelated, 'top1_true_after', '{:.0f}', 100)} |")
    out += ["", "Sets of equal size k = |LIKN| per fact: likn (the fact's LIKN over all the "
            "model's languages), likn_other (the k best LIKN neurons of another fact, "
            "seeded; facts without such a fact are left out of this set), only_<lang> (the k "
            "best KN of that language that are in no other language's KN), random (per LIKN "
            "neuron a random neuron of the same layer outside every KN of the fact). Every "
            "value: mean over the edited facts (Facts) with its 95% bootstrap interval over "
            "them. Δ: after - before. Relative change: mean of (after - before) / before. "
            "P(object): mean over the object's tokens (teacher forced). Top-1: every object "
            "token is the model's argmax. Success: the wrong object becomes top-1. e(y): the "
            "output word embedding of the object (mean over its tokens in the edited "
            "language). Unrelated: the true objects of discovery facts of other relations, "
            "scored under the same intervention (the locality control; intervals resample "
            "the edited facts with all their unrelated facts).", ""]
    return out


def _unrelated_n(unrelated: Mapping) -> str:
    if not unrelated:
        return "n/a"
    return f"{int(unrelated['n_facts'])}, {int(unrelated['n'])}"


def _tests_section(tests: pd.DataFrame) -> list[str]:
    out = ["## Does LIKN do better than its controls? (paired by edited fact)", "",
           "| Model | Operation | Edited in | Scored in | Measure | Control | Facts | LIKN | "
           "Control | LIKN - control | p | Holm p | Reading |",
           "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in tests.itertuples(index=False):
        out.append(
            f"| {row.model} | {row.operation} | {row.edit_lang} | {row.eval_lang} | "
            f"{MEASURE_LABELS[row.measure]} | {row.control} | {int(row.n_facts)} | "
            f"{_interval(row, 'likn', '{:+.3f}')} | "
            f"{_interval(row, 'control_value', '{:+.3f}')} | "
            f"{_interval(row, 'difference', '{:+.3f}')} | {_p(row.p)} | {_p(row.p_holm)} | "
            f"{comparison_reading(row._asdict())} |")
    if tests.empty:
        out.append("| (no data) |" + " |" * 12)
    out += ["", "Per fact, the change under LIKN minus the change under the control set, on "
            "the facts both sets have; mean with its 95% bootstrap interval over the facts. "
            "p: two-sided paired swap test (the two sets' changes exchanged within a fact); "
            "Holm p: corrected over every row of this table. LIKN is stronger when it lowers "
            "P(true) more (ΔP(true)) or raises P(wrong) more (ΔP(wrong), the edit's target). "
            "Erasing has no target object, so only its ΔP(true) is compared.", ""]
    random = tests[tests["control"] == "random"] if len(tests) else tests
    if len(random):
        worse = [row for row in random.to_dict("records")
                 if comparison_reading(row) != "LIKN stronger"]
        out.append(f"**LIKN against random neurons of the same layers:** LIKN is stronger in "
                   f"{len(random) - len(worse)} of {len(random)} comparisons (Holm p < 0.05).")
        if worse:
            out += ["LIKN does no better than random neurons in:", ""]
            out += [f"- {row['model']}, {row['operation']}"
                    + ("" if row["operation"] == "erase" else f" in {row['edit_lang']}")
                    + f", scored in {row['eval_lang']}, {MEASURE_LABELS[row['measure']]}: "
                    f"LIKN {_interval(row, 'likn', '{:+.3f}')} vs random "
                    f"{_interval(row, 'control_value', '{:+.3f}')} (n = {row['n_facts']}, "
                    f"Holm p = {_p(row['p_holm'])}; {comparison_reading(row)})" for row in worse]
        out.append("")
    return out


def _with_unrelated(summary: pd.DataFrame):
    """(fact row, the matching unrelated row as a dict) pairs of an edit summary."""
    if summary.empty:
        return
    keys = ["model", "operation", "neuron_set", "edit_lang", "eval_lang"]
    unrelated = {tuple(row[k] for k in keys): row
                 for row in summary[summary["target"] == "unrelated"].to_dict("records")}
    for row in summary[summary["target"] == "fact"].itertuples(index=False):
        yield row, unrelated.get(tuple(getattr(row, k) for k in keys), {})


# ---- figures ---------------------------------------------------------------------------------

NULL_COLORS = {"shuffled": "tab:grey", "within_relation": "tab:orange"}


def _null_histogram(ax, values: np.ndarray, label: str, color: str) -> None:
    """The null draws as a normalised histogram (bars at the distinct values when there are
    few: the statistics of a few facts are discrete)."""
    values = values[np.isfinite(values)]
    if not len(values):
        return
    distinct, counts = np.unique(values, return_counts=True)
    if len(distinct) <= 40:
        step = np.diff(distinct).min() if len(distinct) > 1 else max(abs(distinct[0]), 1.0) * 0.1
        ax.bar(distinct, counts / len(values), width=0.8 * step, color=color, alpha=0.55,
               label=label)
    else:
        ax.hist(values, bins=40, weights=np.full(len(values), 1 / len(values)), color=color,
                alpha=0.55, label=label)


def plot_likn_null(stats: pd.DataFrame, null: pd.DataFrame, out_png, out_svg) -> None:
    """The observed statistic (line, with its 95% interval shaded) against its two null
    distributions, one panel per (model, tested statistic), of each model's language group
    with the most languages. Panels without null draws are left out (named in the note)."""
    title = "LIKN against shuffled pairings: observed (line, 95% CI) vs null distributions"
    cells, missing = [], []
    for model in sorted(stats["model"].unique()) if len(stats) else []:
        group = _main_group(stats.loc[stats["model"] == model, "languages"])
        draws = null[(null["model"] == model) & (null["languages"] == group)] \
            if len(null) else null
        for statistic in TESTED:
            observed = stats[(stats["model"] == model) & (stats["languages"] == group)
                             & (stats["relation"] == "all") & (stats["statistic"] == statistic)]
            if draws.empty or observed.empty or pd.isna(observed["estimate"].iloc[0]):
                if model not in missing:
                    missing.append(model)
                continue
            cells.append((model, group, statistic, observed.iloc[0], draws))
    note = (f"Left out, no facts with converged attributions in every language (no null "
            f"draws): {', '.join(missing)}." if missing else None)
    with panels(out_png, out_svg, len(cells), 4.2, 3.2, title=title, note=note) as (fig, axes):
        for ax, (model, group, statistic, row, draws) in zip(axes, cells):
            for name in NULLS:
                _null_histogram(ax, draws.loc[draws["null"] == name, statistic].to_numpy(float),
                                f"{NULL_LABELS[name]} (p = {_p(row[f'{name}_p'])})",
                                NULL_COLORS[name])
            if pd.notna(row["low"]):
                ax.axvspan(row["low"], row["high"], color="tab:blue", alpha=0.15)
            observed = Interval(row["estimate"], row["low"], row["high"], 0).format()
            ax.axvline(row["estimate"], color="tab:blue", linewidth=2,
                       label=f"observed {observed}")
            ax.set_xlabel(STATISTIC_LABELS[statistic])
            ax.set_ylabel("share of draws")
            ax.set_title(f"{model} ({group}, n = {int(row['n_facts'])})", fontsize="medium")
            ax.legend(fontsize="x-small")


def plot_likn_layers(layers: pd.DataFrame, out_png, out_svg) -> None:
    """LIKN neurons per layer (bars) beside each null's mean and 95% range (points with
    error bars): one panel per model (its language group with the most languages). Columns:
    model and :data:`kneurons.likn.LAYER_COLUMNS`."""
    from matplotlib.ticker import MaxNLocator

    title = "Language-independent knowledge neurons per layer against shuffled pairings"
    models = sorted(layers["model"].unique()) if len(layers) else []
    with panels(out_png, out_svg, len(models), 5.0, 3.6, title=title) as (fig, axes):
        for ax, model in zip(axes, models):
            sub = layers[layers["model"] == model]
            group = _main_group(sub["languages"])
            sub = sub[sub["languages"] == group].sort_values("layer")
            x = sub["layer"].to_numpy(float)
            observed = sub["n_likn"].to_numpy(float)
            err = np.clip(np.vstack([observed - sub["low"].to_numpy(float),
                                     sub["high"].to_numpy(float) - observed]), 0, None)
            ax.bar(x, observed, width=0.6, color="tab:blue", yerr=np.nan_to_num(err),
                   capsize=2, label=f"observed, 95% CI (n = {int(sub['n_facts'].max())} facts)")
            for k, null in enumerate(NULLS):
                mean = sub[f"{null}_mean"].to_numpy(float)
                low, high = sub[f"{null}_low"].to_numpy(float), sub[f"{null}_high"].to_numpy(float)
                # a percentile range need not contain the mean of a skewed discrete null
                err = np.clip(np.vstack([mean - low, high - mean]), 0, None)
                ax.errorbar(x + (k - 0.5) * 0.25, mean, yerr=err, fmt="o",
                            color=NULL_COLORS[null], markersize=4, capsize=2,
                            label=f"{NULL_LABELS[null]}: mean, 95% range")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("layer")
            ax.set_ylabel("neurons (summed over facts)")
            ax.set_title(f"{model} ({group})")
            ax.legend(fontsize="x-small")


def _set_order(names) -> list[str]:
    return ["likn"] * ("likn" in set(names)) + control_sets(names)


def _interval_bars(ax, data: pd.DataFrame, x_keys: list, value: str, n_label: str) -> None:
    """Bars of ``value`` with its 95% interval per x key and evaluation language."""
    languages = sorted(data["eval_lang"].unique())
    width = 0.8 / max(len(languages), 1)
    positions = np.arange(len(x_keys))
    for j, lang in enumerate(languages):
        sub = data[data["eval_lang"] == lang].set_index("_x").reindex(x_keys)
        mean = sub[value].to_numpy(float)
        low, high = sub[f"{value}_low"].to_numpy(float), sub[f"{value}_high"].to_numpy(float)
        err = np.clip(np.vstack([np.where(np.isfinite(low), mean - low, 0),
                                 np.where(np.isfinite(high), high - mean, 0)]), 0, None)
        ax.bar(positions + (j - (len(languages) - 1) / 2) * width, mean, width=width,
               yerr=err, capsize=2, label=f"scored in {lang}")
    ax.set_xticks(positions)
    ax.set_xticklabels(x_keys, rotation=30, ha="right")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.legend(fontsize="small", title=n_label, title_fontsize="small")


def _n_label(sub: pd.DataFrame) -> str:
    n = sorted(set(sub["n_facts"].astype(int)))
    return f"n = {n[0]} facts" if len(n) == 1 else f"n = {n[0]}-{n[-1]} facts"


def plot_likn_erase(edits: pd.DataFrame, out_png, out_svg) -> None:
    """Change of P(true) of the erased facts (mean, 95% interval) per neuron set and scoring
    language: one panel per model. ``edits``: edit summaries with a ``model`` column."""
    title = "Erasing a fact through its neurons: change of P(true object), mean and 95% CI"
    data = edits[(edits["operation"] == "erase") & (edits["target"] == "fact")] \
        if len(edits) else edits
    models = sorted(data["model"].unique()) if len(data) else []
    with panels(out_png, out_svg, len(models), 5.0, 3.8, title=title) as (fig, axes):
        for ax, model in zip(axes, models):
            sub = data[data["model"] == model].assign(_x=lambda d: d["neuron_set"])
            _interval_bars(ax, sub, _set_order(sub["neuron_set"]), "delta_p_true",
                           _n_label(sub))
            ax.set_ylabel("ΔP(true) (after - before)")
            ax.set_title(model)


def plot_likn_edit(edits: pd.DataFrame, out_png, out_svg) -> None:
    """Editing a fact to its wrong object: change of P(wrong) and of P(true) (mean, 95%
    interval) per (edited language, neuron set) and scoring language; two panels per model
    (left out, with a note, where a model has no values of a measure)."""
    title = "Editing a fact through its neurons (Dai et al. value-slot edit), mean and 95% CI"
    data = edits[(edits["operation"] == "edit") & (edits["target"] == "fact")] \
        if len(edits) else edits
    cells, missing = [], []
    for model in sorted(data["model"].unique()) if len(data) else []:
        sub = data[data["model"] == model]
        for measure in ("delta_p_wrong", "delta_p_true"):
            if sub[measure].notna().any():
                cells.append((model, measure, sub))
            else:
                missing.append(f"{model} {MEASURE_LABELS[measure]}")
    note = f"No values: {', '.join(missing)}." if missing else None
    with panels(out_png, out_svg, len(cells), 6.0, 3.8, title=title, note=note) as (fig, axes):
        for ax, (model, measure, sub) in zip(axes, cells):
            sub = sub.assign(_x=lambda d: d["edit_lang"] + ": " + d["neuron_set"])
            keys = [f"{lang}: {name}" for lang in sorted(sub["edit_lang"].unique())
                    for name in _set_order(sub["neuron_set"])]
            _interval_bars(ax, sub, keys, measure, _n_label(sub))
            ax.set_ylabel(f"{MEASURE_LABELS[measure]} (after - before)")
            ax.set_xlabel("edited in: neuron set")
            ax.set_title(f"{model}: {MEASURE_LABELS[measure]}")


def likn_report(runs: Sequence[Mapping], out_csv, out_edit_csv, out_tests_csv, out_md,
                figures: Mapping[str, tuple]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The LIKN statistics with Holm p-values (CSV), the editing summary (CSV), the paired
    tests with Holm p-values (CSV), all three as Markdown, and the figures of LIKN_FIGURES,
    from each model's ``{"model", "stats", "layers", "null", "edits", "tests"}``
    (:mod:`kneurons.likn` tables). Returns the three tables."""
    def stack(key: str) -> pd.DataFrame:
        frames = [run[key].assign(model=run["model"]) for run in runs if len(run[key])]
        if not frames:
            columns = list(runs[0][key].columns) if runs else []
            return pd.DataFrame(columns=["model"] + columns)
        table = pd.concat(frames, ignore_index=True)
        return table[["model"] + [c for c in table.columns if c != "model"]]

    stats = with_holm(stack("stats"))
    layers, null, edits, tests = stack("layers"), stack("null"), stack("edits"), stack("tests")
    tests = tests.assign(p_holm=holm(tests["p"].to_numpy(float)) if len(tests) else [])
    tests = tests.assign(reading=[comparison_reading(row) for row in tests.to_dict("records")])
    write_csv(stats, out_csv)
    write_csv(edits, out_edit_csv)
    write_csv(tests, out_tests_csv)
    write_text(likn_markdown(stats, edits, tests), out_md)
    plot_likn_null(stats, null, *figures["likn_null"])
    plot_likn_layers(layers, *figures["likn_layers"])
    plot_likn_erase(edits, *figures["likn_erase"])
    plot_likn_edit(edits, *figures["likn_edit"])
    return stats, edits, tests
