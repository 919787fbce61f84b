"""The localization report: tables (CSV, Markdown) and figures of every (model, language).

Inputs are :func:`kneurons.localization.localize` tables keyed ``"<model>/<lang>"`` (their
``attrs`` hold the sample counts); the statistics are those of :mod:`kneurons.localization`,
the p-values Holm-corrected over the whole paired table (every model and language). Figures
use :mod:`kneurons.figures` (at most ~2000 px wide; panels without data are left out and
named in a note).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from .figures import layer_bars, panels
from .io import write_csv, write_text
from .localization import (ALPHA, ATTRIBUTIONS, OPERATIONS, RANKINGS, TARGETS,
                           cell_statistics, completeness_table, holm_table, layer_counts,
                           paired_tests)

FIGURES = ("localization_curves", "localization_change", "localization_layers")
RANKING_LABELS = {"amig": "AMIG", "ig": "IG", "gxi": "gradient x input",
                  "activation": "top activation (abs.)"}
SET_LABELS = {"top": "top-k", "matched": "matched control", "kn": "KN",
              "kn_matched": "matched control of KN"}
COUNT_LABELS = {"n_facts": "discovery facts", "n_without_record": "without a record",
                "n_not_attributable": "not attributable by AMIG",
                "n_not_converged": "record not converged (left out)",
                "n_eligible": "eligible", "n_sampled": "sampled"}
COLORS = {"amig": "C0", "ig": "C1", "gxi": "C2", "activation": "C3"}


def _stack(runs: Mapping[str, pd.DataFrame], fn) -> pd.DataFrame:
    frames = []
    for pair, table in runs.items():
        model, lang = pair.split("/")
        frames.append(fn(table).assign(model=model, language=lang))
    if not frames:
        return pd.DataFrame(columns=["model", "language"])
    out = pd.concat([f for f in frames if len(f)] or frames, ignore_index=True)
    return out[["model", "language"] + [c for c in out.columns if c not in ("model", "language")]]


def _of(table: pd.DataFrame, model: str, lang: str) -> pd.DataFrame:
    if table.empty:
        return table
    return table[(table["model"] == model) & (table["language"] == lang)]


def _num(value, fmt: str = "{:+.3g}") -> str:
    return "n/a" if value is None or pd.isna(value) else fmt.format(value)


def _ci(estimate, low, high, fmt: str = "{:+.2g}") -> str:
    if pd.isna(estimate):
        return "n/a"
    if pd.isna(low) or pd.isna(high):
        return fmt.format(estimate)
    return f"{fmt.format(estimate)} [{fmt.format(low)}, {fmt.format(high)}]"


def _p(value) -> str:
    return "n/a" if pd.isna(value) else (f"{value:.2g}" if value < 0.001 else f"{value:.3f}")


def counts_table(runs: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per (model, language) the sample counts (the tables' ``attrs``)."""
    out = []
    for pair, table in runs.items():
        model, lang = pair.split("/")
        attrs = dict(getattr(table, "attrs", {}) or {})
        out.append(dict(model=model, language=lang,
                        **{k: attrs.get(k, np.nan) for k in COUNT_LABELS}))
    return pd.DataFrame(out, columns=["model", "language", *COUNT_LABELS])


def localization_markdown(stats: pd.DataFrame, paired: pd.DataFrame, complete: pd.DataFrame,
                          counts: pd.DataFrame) -> str:
    """One section per (model, language): the deletion curves, the KN table, the paired
    tests (Holm-adjusted over the whole report), completeness."""
    m = int(paired["m"].max()) if len(paired) and "m" in paired else 0
    survive = int(paired["significant"].sum()) if len(paired) else 0
    out = ["# Localization: are they knowledge neurons?", "",
           "Relative change of P(true object), (after - before) / before, when a method's "
           "neurons are erased (activation 0) or enhanced at the object position(s). Per fact "
           "one value per cell (the mean over its target queries); cells give n facts and the "
           "median over facts with its 95% bootstrap interval (resampling facts). Methods are "
           "compared at equal set sizes k (deletion curves) and each against a control of the "
           "same layers matched on |activation| at the object position. Paired tests by fact: "
           "two-sided Wilcoxon signed-rank, the median difference a - b with its bootstrap "
           f"interval, p Holm-adjusted over all {m} tests of this report (every model and "
           f"language); {survive} of them are below {ALPHA} after adjustment.", ""]
    pairs = sorted(set(zip(stats["model"], stats["language"]))) if len(stats) else []
    if not pairs:
        out += ["No data.", ""]
    for model, lang in pairs:
        mine = _of(stats, model, lang)
        c = _of(counts, model, lang)
        facts = int(mine["n_facts"].max()) if len(mine) else 0
        out += [f"## {model} / {lang} ({facts} facts)", ""]
        if len(c):
            row = c.iloc[0]
            out += ["Sample: " + "; ".join(f"{label} {_num(row[k], '{:.0f}')}"
                                           for k, label in COUNT_LABELS.items()) + ".", ""]
        curves = mine[mine["neuron_set"].isin(["top", "matched"])]
        ks = sorted(int(k) for k in curves["k"].unique())
        out += ["Deletion curves (erase the first k neurons of each ranking, target: the fact; "
                "median [95% CI] of the relative change; n facts):", "",
                "| Ranking | Set | " + " | ".join(f"k = {k}" for k in ks) + " | n |",
                "|---|---|" + "---|" * len(ks) + "---:|"]
        for method in RANKINGS:
            for name in ("top", "matched"):
                sub = curves[(curves["method"] == method) & (curves["neuron_set"] == name)]
                if sub.empty:
                    continue
                by_k = sub.set_index("k")
                cells = [_ci(by_k.at[k, "median_rel_change"], by_k.at[k, "median_low"],
                             by_k.at[k, "median_high"]) if k in by_k.index else "n/a"
                         for k in ks]
                out.append(f"| {RANKING_LABELS[method]} | {SET_LABELS[name]} | "
                           + " | ".join(cells) + f" | {int(sub['n_facts'].max())} |")
        kn = mine[mine["neuron_set"].isin(["kn", "kn_matched"])]
        out += ["", "Knowledge neurons (the KN rule) and their matched controls, erased and "
                "enhanced, on the fact, other sampled facts of its relation and facts of other "
                "relations (halved: share of queries whose P(true) falls below half; top-1: "
                "share of queries whose object is the model's top-1, before -> after):", "",
                "| Method | Set | Intervention | Target | n | Mean size | Mean abs. act. | "
                "Median [95% CI] | Halved (%) | Top-1 (%) |",
                "|---|---|---|---|---:|---:|---:|---|---:|---|"]
        for r in kn.itertuples(index=False):
            out.append(
                f"| {RANKING_LABELS[r.method]} | {SET_LABELS[r.neuron_set]} | {r.operation} | "
                f"{r.target} | {r.n_facts} | {r.mean_neurons:.1f} | "
                f"{_num(r.mean_magnitude, '{:.3g}')} | "
                f"{_ci(r.median_rel_change, r.median_low, r.median_high)} | "
                f"{_num(100 * r.share_halved, '{:.0f}')} | "
                f"{_num(100 * r.top1_before, '{:.0f}')} -> {_num(100 * r.top1_after, '{:.0f}')} |")
        out += ["", "Paired tests by fact (a - b; methods: equal k, erased on the fact; control: "
                "against the matched control; specificity: another sampled fact's KN vs the "
                "fact's own KN, erased on its query). Holm: adjusted over the whole report; "
                "**bold**: below 0.05 after adjustment.", "",
                "| Comparison | a | b | Set | k | Intervention | Target | Pairs | Non-zero | "
                "Median diff. [95% CI] | p | p (Holm) | Note |",
                "|---|---|---|---|---:|---|---|---:|---:|---|---:|---:|---|"]
        for r in _of(paired, model, lang).itertuples(index=False):
            holm_p = _p(r.p_holm)
            out.append(f"| {r.comparison} | {RANKING_LABELS.get(r.a, r.a)} | "
                       f"{RANKING_LABELS.get(r.b, r.b)} | {SET_LABELS.get(r.neuron_set)} | "
                       f"{r.k if r.k else 'KN'} | {r.operation} | {r.target} | {r.n_pairs} | "
                       f"{r.n_nonzero} | "
                       f"{_ci(r.median_difference, r.difference_low, r.difference_high)} | "
                       f"{_p(r.p_value)} | {f'**{holm_p}**' if r.significant else holm_p} | "
                       f"{r.note} |")
        out += ["", "Completeness of each attribution on the sample (the records' convergence "
                "error on the first, middle and last layer; the run's method's from its "
                "records) and the cosine of its scores with gradient x input. Zero-baseline IG "
                "behind an RMSNorm on the FFN output (Gemma) has an error of 1 and a cosine of "
                "1 by construction: it is gradient x input rescaled (docs/localization.md).",
                "", "| Method | Facts | Known | Median error | IQR | Above tolerance (%) | "
                "Median cos(gxi) | n cos |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in _of(complete, model, lang).itertuples(index=False):
            out.append(f"| {RANKING_LABELS[r.method]} | {r.n_facts} | {r.n_known} | "
                       f"{_num(r.median_error, '{:.3g}')} | {_num(r.iqr_error, '{:.3g}')} | "
                       f"{_num(100 * r.share_above_tolerance, '{:.0f}')} | "
                       f"{_num(r.median_gxi_cosine, '{:.3f}')} | {r.n_cosine} |")
        out.append("")
    return "\n".join(out) + "\n"


def _left_out(keys: list[str], kept: list[str], what: str) -> str | None:
    missing = [k for k in keys if k not in kept]
    return f"left out ({what}): {', '.join(missing)}" if missing else None


def plot_localization_curves(stats: pd.DataFrame, out_png, out_svg,
                             pairs: list[str] | None = None) -> None:
    """Deletion curves: median relative change of P(true) with its 95% interval against k
    (log2 axis), one line per ranking (solid) and its matched control (dashed), one panel per
    (model, language) of ``pairs`` ("model/lang"; default: those of ``stats``)."""
    keys = (sorted(set(zip(stats["model"], stats["language"]))) if len(stats) else []) \
        if pairs is None else [tuple(p.split("/")) for p in sorted(pairs)]
    curves = stats[stats["neuron_set"].isin(["top", "matched"])] if len(stats) else stats
    kept = [key for key in keys if len(_of(curves, *key)) and _of(curves, *key)["n_facts"].max()]
    note = _left_out([f"{m}/{lang}" for m, lang in keys], [f"{m}/{lang}" for m, lang in kept],
                     "no facts")
    title = "Deletion curves: erase the top-k neurons of each ranking (dashed: matched control)"
    with panels(out_png, out_svg, len(kept), 5.2, 3.8, title=title, note=note) as (fig, axes):
        for ax, key in zip(axes, kept):
            mine = _of(curves, *key)
            for method in RANKINGS:
                for name, style in (("top", "-"), ("matched", "--")):
                    sub = mine[(mine["method"] == method) & (mine["neuron_set"] == name)]
                    sub = sub.sort_values("k")
                    if sub.empty:
                        continue
                    ax.plot(sub["k"], sub["median_rel_change"], style, marker="o", ms=3,
                            color=COLORS[method],
                            label=RANKING_LABELS[method] if name == "top" else None)
                    ax.fill_between(sub["k"], sub["median_low"], sub["median_high"],
                                    color=COLORS[method], alpha=0.12 if name == "top" else 0.06)
            ax.set_xscale("log", base=2)
            ks = sorted(int(k) for k in mine["k"].unique())
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.minorticks_off()
            ylim = ax.get_ylim()  # the lines below do not stretch the data's scale
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.axhline(-0.5, color="grey", linewidth=0.8, linestyle=":")
            ax.set_ylim(min(ylim[0], -0.02), max(ylim[1], 0.02))
            ax.set_xlabel("k (neurons erased)")
            ax.set_ylabel("median (after - before) / before")
            n = int(mine["n_facts"].max())
            ax.set_title(f"{key[0]} / {key[1]} ({n} facts)")
            ax.legend(fontsize="small")


def plot_localization_change(runs: Mapping[str, pd.DataFrame], out_png, out_svg) -> None:
    """Box plots with every point of the relative change of P(true) under the KN of AMIG and
    IG and their matched controls, per target group: one panel per (model, language,
    intervention). Fliers are drawn, nothing is dropped."""
    title = "KN erased / enhanced: relative change of P(true object)"
    groups = [(m, s) for m in ATTRIBUTIONS for s in ("kn", "kn_matched")]
    colors = {"fact": "C0", "related": "C1", "unrelated": "C2"}
    keys = [(key, op) for key in sorted(runs) for op in OPERATIONS]
    data = {}
    for key, op in keys:
        table = runs[key]
        sub = table[(table["operation"] == op) & table["neuron_set"].isin(["kn", "kn_matched"])]
        if sub["rel_change"].notna().any():
            data[(key, op)] = sub
    note = _left_out([f"{k} {op}" for k, op in keys], [f"{k} {op}" for k, op in data],
                     "no rows")
    with panels(out_png, out_svg, len(data), 6.0, 3.8, title=title, note=note) as (fig, axes):
        rng = np.random.default_rng(0)
        for ax, ((key, op), sub) in zip(axes, data.items()):
            for g, (method, name) in enumerate(groups):
                for t, target in enumerate(TARGETS):
                    v = sub.loc[(sub["method"] == method) & (sub["neuron_set"] == name)
                                & (sub["target"] == target), "rel_change"].dropna()
                    if v.empty:
                        continue
                    x = g + (t - 1) * 0.27
                    ax.boxplot([v.to_numpy()], positions=[x], widths=0.22, showfliers=True,
                               patch_artist=True,
                               boxprops=dict(facecolor=colors[target], alpha=0.35),
                               medianprops=dict(color="black"))
                    ax.scatter(x + rng.uniform(-0.07, 0.07, len(v)), v, s=6,
                               color=colors[target], alpha=0.7, zorder=3)
            ax.axhline(0, color="grey", linewidth=0.8)
            if op == "erase":
                ax.axhline(-0.5, color="grey", linewidth=0.8, linestyle=":")
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels([f"{m}\n{'KN' if s == 'kn' else 'matched'}" for m, s in groups],
                               fontsize="small")
            ax.set_ylabel("(after - before) / before")
            ax.set_title(f"{key}: {op}")
            for target in TARGETS:
                ax.scatter([], [], color=colors[target], label=target)
            ax.legend(fontsize="small", title="target")


def plot_localization_layers(runs: Mapping[str, pd.DataFrame], out_png, out_svg) -> None:
    """Knowledge neurons per layer of the sampled facts, AMIG and IG side by side, one panel
    per (model, language) with any KN."""
    title = "Knowledge neurons per layer: AMIG vs IG (localization sample)"
    counts = {key: layer_counts(runs[key]) for key in sorted(runs)}
    kept = [key for key, c in counts.items() if len(c)]
    note = _left_out(sorted(runs), kept, "no KN")
    with panels(out_png, out_svg, len(kept), 5.0, 3.6, title=title, note=note) as (fig, axes):
        for ax, key in zip(axes, kept):
            c = counts[key]
            bars = {method: c[c["method"] == method].set_index("layer")["count"]
                    for method in ATTRIBUTIONS}
            layer_bars(ax, bars, "knowledge neurons", key, title="method")


def localization_report(runs: Mapping[str, pd.DataFrame], out_csv, out_paired_csv,
                        out_completeness_csv, out_md, figures: Mapping[str, tuple], *,
                        seed: int = 0, n_boot: int | None = None
                        ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The cell statistics, paired tests (Holm over the whole table) and completeness tables
    (CSV and one Markdown file with the sample counts) and the FIGURES of every
    ``runs["<model>/<lang>"]``; bootstrap intervals seeded by ``seed``. Returns the three
    tables."""
    stats = _stack(runs, lambda t: cell_statistics(t, seed=seed, n_boot=n_boot))
    paired = _stack(runs, lambda t: paired_tests(t, seed=seed, n_boot=n_boot))
    if "p_value" not in paired:
        paired = paired.assign(p_value=pd.Series(dtype=float))
    paired = holm_table(paired)
    complete = _stack(runs, completeness_table)
    counts = counts_table(runs)
    for table, path in ((stats, out_csv), (paired, out_paired_csv),
                        (complete, out_completeness_csv)):
        write_csv(table, path)
    write_text(localization_markdown(stats, paired, complete, counts), out_md)
    plot_localization_curves(stats, *figures["localization_curves"], pairs=list(runs))
    plot_localization_change(runs, *figures["localization_change"])
    plot_localization_layers(runs, *figures["localization_layers"])
    return stats, paired, complete
