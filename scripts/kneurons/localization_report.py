"""The localization report: tables (CSV, Markdown) and figures of every (model, language).

Inputs are :func:`kneurons.localization.localize` tables keyed ``"<model>/<lang>"``; the
statistics are those of :mod:`kneurons.localization`. Figures use the helpers of
:mod:`kneurons.figures` (PNG and SVG, atomic, reproducible SVG, "no data" panels).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from .io import write_csv, write_text
from .localization import (NEURON_SETS, OPERATIONS, TARGETS, completeness_table, layer_counts,
                           localization_statistics, paired_comparison)
from .figures import figure, layer_bars

FIGURES = ("localization_change", "localization_layers")
SET_LABELS = {"kn": "KN", "random": "random (same layers)", "activation": "top activation"}
SHORT_LABELS = {"kn": "KN", "random": "random", "activation": "top act."}


def _stack(runs: Mapping[str, pd.DataFrame], fn) -> pd.DataFrame:
    frames = []
    for pair, table in runs.items():
        model, lang = pair.split("/")
        frames.append(fn(table).assign(model=model, language=lang))
    if not frames:
        return pd.DataFrame(columns=["model", "language"])
    out = pd.concat(frames, ignore_index=True)
    return out[["model", "language"] + [c for c in out.columns if c not in ("model", "language")]]


def _of(table: pd.DataFrame, model: str, lang: str) -> pd.DataFrame:
    if table.empty:
        return table
    return table[(table["model"] == model) & (table["language"] == lang)]


def _num(value, fmt: str = "{:+.3g}") -> str:
    return "n/a" if value is None or pd.isna(value) else fmt.format(value)


def localization_markdown(stats: pd.DataFrame, paired: pd.DataFrame,
                          complete: pd.DataFrame) -> str:
    """One section per (model, language): the statistics table, AMIG vs IG, completeness."""
    out = ["# Localization: erasing and enhancing knowledge neurons (AMIG vs IG vs chance)", "",
           "Relative change of P(true object), (after - before) / before, over the sampled "
           "discovery facts (target `fact`), other facts of the same relation (`related`) and "
           "facts of other relations (`unrelated`). Median [Q1, Q3] and IQR over all rows, no "
           "outlier dropped; halved: share of rows whose P(true) falls by more than half; "
           "top-1: share of rows whose object is the model's top-1 before -> after.", ""]
    pairs = sorted(set(zip(stats["model"], stats["language"]))) if len(stats) else []
    if not pairs:
        out += ["No data.", ""]
    for model, lang in pairs:
        mine = _of(stats, model, lang)
        facts = int(mine["n_facts"].max()) if len(mine) else 0
        out += [f"## {model} / {lang} ({facts} facts)", "",
                "| Method | Neurons | Intervention | Target | n | Mean size | Median [Q1, Q3] "
                "| IQR | Halved (%) | Top-1 (%) |", "|---|---|---|---|---:|---:|---|---:|---:|---|"]
        for r in mine.itertuples(index=False):
            out.append(
                f"| {r.method} | {SET_LABELS.get(r.neuron_set, r.neuron_set)} | {r.operation} "
                f"| {r.target} | {r.n} | {r.mean_neurons:.1f} | {_num(r.median_rel_change)} "
                f"[{_num(r.q1_rel_change)}, {_num(r.q3_rel_change)}] | "
                f"{_num(r.iqr_rel_change, '{:.3g}')} | {_num(100 * r.share_halved, '{:.0f}')} | "
                f"{_num(100 * r.top1_before, '{:.0f}')} -> {_num(100 * r.top1_after, '{:.0f}')} |")
        out += ["", "AMIG vs IG over the same facts (per fact the mean relative change; "
                "difference AMIG - IG; Wilcoxon signed-rank, two-sided):", "",
                "| Neurons | Intervention | Target | Pairs | Non-zero | Median AMIG | Median IG "
                "| Median diff. | W | p | Note |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in _of(paired, model, lang).itertuples(index=False):
            out.append(f"| {SET_LABELS.get(r.neuron_set, r.neuron_set)} | {r.operation} | "
                       f"{r.target} | {r.n_pairs} | {r.n_nonzero} | {_num(r.median_amig)} | "
                       f"{_num(r.median_ig)} | {_num(r.median_difference)} | "
                       f"{_num(r.statistic, '{:g}')} | {_num(r.p_value, '{:.3g}')} | {r.note} |")
        out += ["", "Completeness of each method's attribution on the sample (relative error "
                "sum_l |sum_j score_lj - gap_l| / sum_l |gap_l|; near 1: the scores do not "
                "account for the probability gap, e.g. zero-baseline IG behind an RMSNorm):", "",
                "| Method | Facts | Known | Median rel. error | IQR | Median gap | "
                "Median score sum |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in _of(complete, model, lang).itertuples(index=False):
            out.append(f"| {r.method} | {r.n_facts} | {r.n_known} | "
                       f"{_num(r.median_rel_error, '{:.3g}')} | {_num(r.iqr_rel_error, '{:.3g}')} "
                       f"| {_num(r.median_gap_total, '{:.3g}')} | "
                       f"{_num(r.median_score_total, '{:.3g}')} |")
        out.append("")
    return "\n".join(out) + "\n"


def plot_localization_change(runs: Mapping[str, pd.DataFrame], out_png, out_svg) -> None:
    """Box plots with every point (strip) of the relative change of P(true): one column per
    (model, language), one row per intervention; per method and neuron set one box per target
    group. Fliers are drawn, nothing is dropped."""
    title = "Erase / enhance: relative change of P(true object)"
    keys = sorted(runs)
    groups = [(m, s) for m in ("amig", "ig") for s in NEURON_SETS]
    colors = {"fact": "C0", "related": "C1", "unrelated": "C2"}
    ncols = max(len(keys), 1)
    with figure(out_png, out_svg, ncols, 6.5, 7.5, nrows=len(OPERATIONS),
                title=title, empty=not keys) as (fig, grid):
        rng = np.random.default_rng(0)
        for col, key in enumerate(keys):
            table = runs[key]
            for row, op in enumerate(OPERATIONS):
                ax = grid[row][col]
                sub = table[table["operation"] == op]
                for g, (method, name) in enumerate(groups):
                    for t, target in enumerate(TARGETS):
                        v = sub.loc[(sub["method"] == method) & (sub["neuron_set"] == name)
                                    & (sub["target"] == target), "rel_change"].dropna()
                        if v.empty:
                            continue
                        x = g + (t - 1) * 0.27
                        ax.boxplot([v.to_numpy()], positions=[x], widths=0.22,
                                   showfliers=True, patch_artist=True,
                                   boxprops=dict(facecolor=colors[target], alpha=0.35),
                                   medianprops=dict(color="black"))
                        ax.scatter(x + rng.uniform(-0.07, 0.07, len(v)), v, s=6,
                                   color=colors[target], alpha=0.7, zorder=3)
                ax.axhline(0, color="grey", linewidth=0.8)
                if op == "erase":
                    ax.axhline(-0.5, color="grey", linewidth=0.8, linestyle=":")
                ax.set_xticks(range(len(groups)))
                ax.set_xticklabels([f"{m}\n{SHORT_LABELS[s]}" for m, s in groups],
                                   fontsize="small")
                ax.set_ylabel("(after - before) / before")
                ax.set_title(f"{key}: {op}")
                for target in TARGETS:
                    ax.scatter([], [], color=colors[target], label=target)
                ax.legend(fontsize="small", title="target")


def plot_localization_layers(runs: Mapping[str, pd.DataFrame], out_png, out_svg) -> None:
    """Knowledge neurons per layer of the sampled facts, AMIG and IG side by side, one panel
    per (model, language)."""
    title = "Knowledge neurons per layer: AMIG vs IG (localization sample)"
    keys = sorted(runs)
    with figure(out_png, out_svg, len(keys), 5.0, 3.6, title=title, empty=not keys) as (fig, axes):
        for ax, key in zip(axes, keys):
            counts = layer_counts(runs[key])
            bars = {method: counts[counts["method"] == method].set_index("layer")["count"]
                    for method in ("amig", "ig")}
            layer_bars(ax, bars, "knowledge neurons", key, title="method")


def localization_report(runs: Mapping[str, pd.DataFrame], out_csv, out_paired_csv,
                        out_completeness_csv, out_md, figures: Mapping[str, tuple]
                        ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The statistics, AMIG-vs-IG and completeness tables (CSV and one Markdown file) and
    the FIGURES of every ``runs["<model>/<lang>"]``. Returns the three tables."""
    stats = _stack(runs, localization_statistics)
    paired = _stack(runs, paired_comparison)
    complete = _stack(runs, completeness_table)
    for table, path in ((stats, out_csv), (paired, out_paired_csv),
                        (complete, out_completeness_csv)):
        write_csv(table, path)
    write_text(localization_markdown(stats, paired, complete), out_md)
    plot_localization_change(runs, *figures["localization_change"])
    plot_localization_layers(runs, *figures["localization_layers"])
    return stats, paired, complete
