"""The fact-checking report: the paper's Table 3 with baselines, controls and intervals (CSV,
Markdown), the comparisons (ΔF1, pairwise accuracy) and four figures.

:func:`fact_check_table` collects the Table 3 rows of several (language, model) runs
(:func:`kneurons.factcheck.table_rows`: one row per population, method and λ setting, with n
and 95% bootstrap intervals); :func:`comparison_table` their comparisons (absolute
differences with interval, paired-test p and Holm-adjusted p). :func:`fact_check_markdown`
lays both out: every metric as ``estimate [low, high]`` in percent, λ auto's "accept all"
named instead of its number, and a reading of the question the baselines are there for
(do DKN carry information about truth beyond the model's own probability?), stated from the
intervals alone.

Figures (:mod:`kneurons.figures`, at most ~2000 px wide: panels wrap into rows; panels
without data are left out and named in a note).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .factcheck import CONTROLS, POPULATIONS, ROW_METHODS, ranking_score
from .figures import layer_bars, panels
from .io import write_csv, write_text
from .statistics import LEVEL, N_BOOT, N_PERM

FACT_CHECK_COLUMNS = ["language", "model", "population", "method", "setting", "precision",
                      "recall", "f1", "auroc", "n_true", "n_wrong", "threshold"]
"""The leading columns of :func:`fact_check_table`."""

INTERVAL_METRICS = ("precision", "recall", "f1", "auroc", "pairwise")
FACT_CHECK_EXTRA_COLUMNS = (
    ["n_facts"]
    + [f"{m}_{end}" for m in ("precision", "recall", "f1", "auroc") for end in ("low", "high")]
    + ["pairwise", "pairwise_low", "pairwise_high", "n_pairwise", "accepts_all", "available",
       "threshold_source", "precision_wrong", "recall_wrong", "f1_wrong", "auroc_wrong",
       "n_no_dkn", "n_abstained", "n_relations", "n_relations_no_set", "n_relations_no_dkn",
       "n_facts_dropped", "n_facts_unconverged", "n_calibration_unconverged"])
"""The columns after :data:`FACT_CHECK_COLUMNS` (``<metric>_low``/``_high``: the 95%
interval; ``n_pairwise``: facts in the pairwise accuracy; ``n_relations_no_set``: relations
without the row's neuron set, on whose statements the row abstains)."""

COMPARISON_COLUMNS = ["language", "model", "population", "setting", "metric", "method",
                      "baseline", "estimate", "low", "high", "n_facts", "p", "p_holm"]
"""Columns of :func:`comparison_table` (difference method − baseline of ``metric``)."""

THRESHOLD_SOURCES = ("auto", "config", "")
METHOD_LABELS = {"wo_DKN": "wo DKN", "with_DKN": "with DKN", "all_correct": "all correct",
                 "prob": "P(candidate) > λ_p", "random_matched": "random matched neurons",
                 "frequent_kn": "frequent KN (not DKN)"}
"""How the methods are named in the Markdown table (the paper's "wo DKN" / "with DKN")."""
POPULATION_LABELS = {"all_relations": "all", "dkn_relations": "DKN only"}
"""How the populations (:data:`kneurons.factcheck.POPULATIONS`) are named in the Markdown."""
ACCEPT_ALL = "accept all"
"""How a λ below every score (λ auto's sentinel) is printed."""


# ---- Table 3 ------------------------------------------------------------------------------

def fact_check_rows(model: str, language: str, document: Mapping) -> list[dict]:
    """The rows of :func:`fact_check_table` from one fact_check metrics JSON document."""
    return [{"language": language, "model": model, **row} for row in document["rows"]]


def comparison_rows(model: str, language: str, document: Mapping) -> list[dict]:
    """The rows of :func:`comparison_table` from one fact_check metrics JSON document."""
    return [{"language": language, "model": model, **row}
            for row in document.get("comparisons", [])]


def _order(table: pd.DataFrame) -> pd.DataFrame:
    """Sorted by language, model, population; within those, in the given order."""
    order = {p: i for i, p in enumerate(POPULATIONS)}
    table = table.assign(_population=table["population"].map(lambda p: order.get(p, len(order))))
    table = table.sort_values(["language", "model", "_population"], kind="stable")
    return table.drop(columns=["_population"]).reset_index(drop=True)


def _numeric(table: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    for column in columns:
        if column in table:
            table[column] = pd.to_numeric(table[column], errors="coerce").astype(float)
    return table


def fact_check_table(rows: Sequence[Mapping]) -> pd.DataFrame:
    """Table 3: per (language, model, population) the rows in the order given (the order of
    :func:`kneurons.factcheck.row_specs`: wo_DKN, all_correct, prob, then per λ setting
    with_DKN and the controls); sorted by language, model, then population.

    Each input row is a :func:`kneurons.factcheck.table_rows` row with ``language`` and
    ``model`` (:func:`fact_check_rows`); JSON nulls become NaN. Missing columns are NaN.
    """
    table = pd.DataFrame(list(rows))
    columns = FACT_CHECK_COLUMNS + FACT_CHECK_EXTRA_COLUMNS
    table = table.reindex(columns=columns)
    if table.empty:
        return table
    bad = ~table["threshold_source"].fillna("").isin(THRESHOLD_SOURCES)
    if bad.any():
        row = table[bad].iloc[0]
        raise ValueError(f"threshold_source {row['threshold_source']!r} of {row['model']}/"
                         f"{row['language']} is not one of {THRESHOLD_SOURCES}")
    unknown = sorted(set(table["method"]) - set(ROW_METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected {list(ROW_METHODS)}")
    table["setting"] = table["setting"].fillna("")
    table["threshold_source"] = table["threshold_source"].fillna("")
    if table.duplicated(["language", "model", "population", "method", "setting"]).any():
        raise ValueError("fact_check_table: a (language, model, population, method, setting) "
                         "row appears more than once")
    numeric = [c for c in columns if c not in ("language", "model", "population", "method",
                                               "setting", "threshold_source", "accepts_all",
                                               "available")]
    table = _numeric(table, numeric)
    for flag, default in (("accepts_all", False), ("available", True)):
        table[flag] = table[flag].map(lambda v, d=default: d if v is None or pd.isna(v)
                                      else bool(v))
    return _order(table)


def comparison_table(rows: Sequence[Mapping]) -> pd.DataFrame:
    """The comparisons of every run (:func:`comparison_rows`), sorted like Table 3."""
    table = pd.DataFrame(list(rows)).reindex(columns=COMPARISON_COLUMNS)
    if table.empty:
        return table
    table["setting"] = table["setting"].fillna("")
    table = _numeric(table, ["estimate", "low", "high", "n_facts", "p", "p_holm"])
    return _order(table)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or pd.isna(value)


def _percent(value) -> str:
    return "n/a" if _missing(value) else f"{100 * float(value):.1f}"


def interval_cell(estimate, low, high, *, scale: float = 100.0, signed: bool = False) -> str:
    """``75.0 [40.0, 100.0]`` (values × ``scale``), the estimate alone without an interval,
    ``n/a`` without an estimate."""
    if _missing(estimate):
        return "n/a"
    fmt = "{:+.1f}" if signed else "{:.1f}"
    text = fmt.format(scale * float(estimate))
    if _missing(low) or _missing(high):
        return text
    return f"{text} [{fmt.format(scale * float(low))}, {fmt.format(scale * float(high))}]"


def lambda_cell(row) -> str:
    """λ of a row: empty for methods without one, the setting and its value, "accept all"
    for a λ below every score, "n/a" where no λ could be chosen."""
    if row["method"] in ("wo_DKN", "all_correct"):
        return ""
    if not bool(row.get("available", True)):
        return "n/a"
    setting, lam = row["setting"], row["threshold"]
    if bool(row.get("accepts_all", False)):
        value = ACCEPT_ALL
    elif _missing(lam):
        value = "n/a"
    else:
        value = f"{float(lam):.3g}"
    return value if setting != "auto" and value == setting else f"{setting} = {value}"


def _count(row, column) -> str:
    value = row.get(column) if hasattr(row, "get") else None
    return "n/a" if _missing(value) else str(int(value))


def _p(value) -> str:
    if _missing(value):
        return "n/a"
    return "<0.001" if float(value) < 0.001 else f"{float(value):.3f}"


def _comparison_label(row) -> str:
    if row["metric"] == "pairwise":
        return "pairwise: DKN score − P(candidate)"
    baseline = METHOD_LABELS.get(row["baseline"], row["baseline"])
    return f"F1: {METHOD_LABELS[row['method']]} − {baseline}"


def _side(low, high) -> str:
    if _missing(low) or _missing(high):
        return "no interval"
    if float(low) > 0:
        return "above 0"
    if float(high) < 0:
        return "below 0"
    return "includes 0"


def _reading(comparisons: pd.DataFrame) -> list[str]:
    """One line per (model, language, population): with DKN against P(candidate)."""
    lines = []
    beyond = comparisons[comparisons["baseline"] == "prob"]
    for (language, model, population), group in beyond.groupby(
            ["language", "model", "population"], sort=False):
        parts = []
        for row in group.to_dict("records"):
            what = ("pairwise accuracy" if row["metric"] == "pairwise"
                    else f"F1 at λ {row['setting']}")
            cell = interval_cell(row["estimate"], row["low"], row["high"], signed=True)
            parts.append(f"{what} {cell} ({_side(row['low'], row['high'])}, "
                         f"n = {_count(row, 'n_facts')} facts)")
        relations = POPULATION_LABELS.get(population, population)
        lines.append(f"- {model} / mLAMA-{language}, {relations} relations: with DKN − "
                     f"P(candidate): " + "; ".join(parts))
    return lines


def fact_check_markdown(table: pd.DataFrame, comparisons: pd.DataFrame | None = None,
                        uncertainty: Mapping | None = None) -> str:
    """Table 3 and the comparisons as Markdown, with notes.

    Table 3: Dataset, Model, Relations, Method, λ, Facts, Statements, P, R, F1, AUROC,
    Pairwise (each ``est [low, high]`` in %), Abstained. Comparisons: the difference (in
    points) with its interval, n facts, p and Holm-adjusted p. Then how to read the question
    the baselines answer, how each λ was chosen and the counts per (model, language).
    ``uncertainty``: ``{"n_boot", "n_perm", "seed", "level"}`` (for the notes).
    """
    uncertainty = {"n_boot": N_BOOT, "n_perm": N_PERM, "level": LEVEL, **(uncertainty or {})}
    header = ["Dataset", "Model", "Relations", "Method", "λ", "Facts", "Statements", "P", "R",
              "F1", "AUROC", "Pairwise", "Abstained"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 4 + ["---:"] * 9) + "|"]
    empty = set()
    for row in table.to_dict("records"):
        if _missing(row["n_facts"]) or int(row["n_facts"]) == 0:
            key = (row["language"], row["model"], row["population"])
            if key not in empty:
                empty.add(key)
                lines.append(f"| mLAMA-{row['language']} | {row['model']} | "
                             f"{POPULATION_LABELS.get(row['population'], row['population'])} | "
                             "(no facts: every method n/a) |  | 0 | 0 |" + " |" * 6)
            continue
        n = int(row["n_true"] or 0) + int(row["n_wrong"] or 0) if not (
            _missing(row["n_true"]) or _missing(row["n_wrong"])) else 0
        if n and row["available"]:
            rates = [interval_cell(row[m], row[f"{m}_low"], row[f"{m}_high"])
                     for m in ("precision", "recall", "f1", "auroc")]
            pairwise = interval_cell(row["pairwise"], row["pairwise_low"], row["pairwise_high"])
            if not _missing(row["n_pairwise"]) and row["n_pairwise"] != row["n_facts"]:
                pairwise += f" (n = {int(row['n_pairwise'])})"
        else:
            rates, pairwise = ["n/a"] * 4, "n/a"
        abstained = (_count(row, "n_abstained") if row["available"] and (
            row["method"] == "with_DKN" or row["method"] in CONTROLS) else "")
        cells = [f"mLAMA-{row['language']}", str(row["model"]),
                 POPULATION_LABELS.get(row["population"], row["population"]),
                 METHOD_LABELS.get(row["method"], row["method"]), lambda_cell(row),
                 _count(row, "n_facts"), str(n), *rates, pairwise, abstained]
        lines.append("| " + " | ".join(cells) + " |")
    if table.empty:
        lines.append("| (no data) |" + " |" * (len(header) - 1))
    level = int(round(100 * float(uncertainty["level"])))
    text = [
        "\n".join(lines), "",
        "P, R and F1 in % for the class \"the statement is correct\" over the true and wrong "
        "statements of the evaluation facts (each fact gives one of each), AUROC of the row's "
        "score; P is n/a where nothing is accepted. **wo DKN** (the paper's baseline): the "
        "model judges by its own prediction (at most one statement of a fact). **with DKN**: "
        "correct when the mean attribution of the relation's DKN exceeds λ. **all correct**: "
        "every statement accepted (P = 50, R = 100, F1 = 66.7 on any data: what a lenient λ "
        "reaches without information). **P(candidate) > λ_p**: the model's own probability of "
        "the object above λ_p, chosen on the calibration slice by λ auto's rule. **random "
        "matched neurons** and **frequent KN (not DKN)**: the with-DKN rule at two control "
        "neuron sets of each relation (random neurons of the DKN's layers matched in "
        "activation magnitude; the relation's most frequent knowledge neurons that are not "
        "DKN), λ chosen as with DKN's. Pairwise: the share of facts whose true statement "
        "scores above its wrong one under the row's score (ties 1/2; the DKN score, a control "
        "set's score, or P(candidate) for wo DKN and P(candidate) > λ_p); facts whose "
        "relation has no such set are left out (n given where fewer than Facts). Relations: "
        "all (with DKN and the controls abstain on relations without their neuron set: "
        "judged not correct, counted under Abstained, in statements) or DKN only (the "
        "authors' population). λ: auto = " + ACCEPT_ALL + " where λ auto chose a threshold "
        "below every score (it accepts every statement that has a score). The paper's P and "
        "R columns correspond to our R and P (the authors' cal_hallucination.py swaps them; "
        "see docs/differences.md).",
        "",
        f"Uncertainty: [low, high] are {level}% percentile intervals from "
        f"{int(uncertainty['n_boot'])} bootstrap resamples of facts (a fact's two statements "
        "resampled together), all rows and differences of a model, language and population "
        "on the same resamples"
        + (f", seed {uncertainty['seed']}" if "seed" in uncertainty else "") + ".",
    ]
    if comparisons is not None:  # populations without facts have nothing to compare
        comparisons = comparisons[pd.to_numeric(comparisons["n_facts"]).fillna(0) > 0]
    if comparisons is not None and len(comparisons):
        rows = ["| Dataset | Model | Relations | λ | Comparison | Facts | Δ (points) | p | "
                "p (Holm) |", "|---|---|---|---|---|---:|---:|---:|---:|"]
        for row in comparisons.to_dict("records"):
            rows.append("| " + " | ".join([
                f"mLAMA-{row['language']}", str(row["model"]),
                POPULATION_LABELS.get(row["population"], row["population"]),
                row["setting"], _comparison_label(row), _count(row, "n_facts"),
                interval_cell(row["estimate"], row["low"], row["high"], signed=True),
                _p(row["p"]), _p(row["p_holm"])]) + " |")
        text += [
            "", "## Comparisons", "", "\n".join(rows), "",
            "Δ: absolute difference in percentage points (first minus second), with its "
            f"{level}% bootstrap interval on the resamples of Table 3. F1 rows compare with DKN "
            "with each other method at the same λ setting (the methods without λ at every "
            "setting); the pairwise row compares the pairwise accuracy of the DKN score with "
            "that of P(candidate) on the facts that have a DKN score. p: paired "
            f"approximate-randomization test ({int(uncertainty['n_perm'])} random swaps of the "
            "two methods' judgements within facts; two-sided). p (Holm): adjusted by Holm's "
            "method over all comparisons of the same model and language (both populations and "
            "every λ setting together). Rows of a control without neuron sets are n/a; "
            "comparisons over no facts (a population without facts) are left out.",
            "",
            "**Do DKN carry information about truth beyond the model's own probability?** "
            "Table 3's P(candidate) > λ_p row and the comparisons \"with DKN − P(candidate)\" "
            "answer it: an interval above 0 says yes on these facts, one including 0 says "
            "these facts cannot tell, one below 0 says the probability alone does better. The "
            "pairwise accuracy needs no λ. Against wo DKN (the paper's comparison) with DKN has "
            "a tuned λ and wo DKN accepts at most one statement per fact; against all correct "
            "and the control neuron sets it shows what the DKN add over any lenient threshold "
            "and over other neurons.",
            "",
        ]
        text += _reading(comparisons)
    notes = _notes(table)
    if notes:
        text += [""] + notes
    return "\n".join(text) + "\n"


def _notes(table: pd.DataFrame) -> list[str]:
    """Per (model, language): the λ settings, counts, dropped facts, missing controls."""
    notes = []
    for (language, model), run in table.groupby(["language", "model"], sort=False):
        every = run[run["population"] == POPULATIONS[0]]
        first = (every if len(every) else run).iloc[0].to_dict()
        lams = "; ".join(
            f"{METHOD_LABELS[r['method']]} {lambda_cell(r)}"
            for r in (every if len(every) else run).to_dict("records")
            if r["method"] in ("with_DKN", "prob"))
        accepting = sorted({f"{METHOD_LABELS[r['method']]} ({r['setting']})"
                            for r in run.to_dict("records")
                            if r["accepts_all"] and r["method"] != "all_correct"})
        missing = [f"{METHOD_LABELS[c]}: {_count(r, 'n_relations_no_set')} of "
                   f"{_count(r, 'n_relations')}"
                   for c in CONTROLS
                   for r in (every if len(every) else run)[lambda t, c=c: t["method"] == c]
                   .head(1).to_dict("records")]
        note = (f"- {model} / mLAMA-{language}: λ {lams or 'n/a'}; "
                f"{_count(first, 'n_facts')} facts ({_count(first, 'n_true')} true / "
                f"{_count(first, 'n_wrong')} wrong statements); relations without DKN: "
                f"{_count(first, 'n_relations_no_dkn')} of {_count(first, 'n_relations')} "
                f"({_count(first, 'n_no_dkn')} statements, on which with DKN abstains); "
                f"relations without a control set (those rows abstain there; n/a where none "
                f"has one): {'; '.join(missing) or 'n/a'}; facts left out for every method: "
                f"{_count(first, 'n_facts_dropped')} without attribution records (e.g. causal "
                f"templates starting with [Y]), {_count(first, 'n_facts_unconverged')} whose "
                f"attribution did not converge (and {_count(first, 'n_calibration_unconverged')}"
                f" of the calibration slice)")
        if accepting:
            note += (f". λ auto accepts every statement with a score ({ACCEPT_ALL}) for: "
                     + ", ".join(accepting))
        notes.append(note)
    return notes


# ---- figures ------------------------------------------------------------------------------

def _left_out(names: Sequence[str], why: str) -> str | None:
    return f"Left out ({why}): {', '.join(names)}." if names else None


def plot_dkn_layers(layer_counts: pd.DataFrame, out_png, out_svg,
                    models: Sequence[str] | None = None) -> None:
    """Number of DKN neurons per layer: one panel per model, one bar group per language.

    ``layer_counts`` has columns ``model, language, layer, count``; ``models``: every model
    of the run (those without DKN are left out and named in the note).
    """
    title = "Degenerate knowledge neurons per layer"
    data = layer_counts if layer_counts is not None else pd.DataFrame()
    found = sorted(data["model"].unique()) if len(data) else []
    left = [m for m in (models or []) if m not in found]
    with panels(out_png, out_svg, len(found), 5.0, 3.6, title=title,
                note=_left_out(left, "no DKN")) as (fig, axes):
        for ax, model in zip(axes, found):
            sub = data[data["model"] == model]
            bars = {f"mLAMA-{language}": sub[sub["language"] == language]
                    .groupby("layer")["count"].sum()
                    for language in sorted(sub["language"].unique())}
            layer_bars(ax, bars, "DKN neurons", f"{model}", title="dataset")


def _linthresh(values: np.ndarray) -> float:
    """The linear range of a symlog axis: the smallest non-zero |value| (at least 1e-12)."""
    values = np.abs(values[np.isfinite(values)])
    values = values[values > 0]
    return float(max(values.min(), 1e-12)) if len(values) else 1e-6


def _lambda_ticks(ax, linthresh: float, sentinel_at: float | None, most: int = 6) -> None:
    """At most ``most`` decade ticks on a symlog λ axis (not ±linthresh beside 0, whose
    labels collide), and the sentinel's position labelled "accept all"."""
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high
             and not (t != 0 and abs(abs(t) - linthresh) <= 1e-9 * linthresh)]
    if sentinel_at is not None:
        ticks = [t for t in ticks if t > sentinel_at * 0.5 or t >= 0]
    step = -(-len(ticks) // most)
    ticks = ticks[::max(step, 1)]
    labels = [ax.xaxis.get_major_formatter()(t) for t in ticks]
    if sentinel_at is not None:
        ticks, labels = [sentinel_at] + ticks, [ACCEPT_ALL] + labels
    ax.set_xticks(ticks, labels)


def plot_f1_vs_lambda(curves: Mapping[str, pd.DataFrame], chosen: Mapping[str, float],
                      out_png, out_svg, references: Mapping[str, Mapping[str, float]] | None
                      = None, accepting: Mapping[str, Sequence[str]] | None = None) -> None:
    """F1 of with_DKN against λ on a symlog axis: one panel per key (e.g. ``"toy-bert/en"``).

    ``curves[key]`` has columns ``threshold`` and ``f1`` (see
    :func:`~kneurons.factcheck.f1_curve`) and optionally ``accepts_all`` (λ below every
    score: the sentinel, marked and named "accept all"); ``chosen[key]`` is λ or a map
    setting -> λ, one vertical line per setting (NaN or missing: no line), named "accept all"
    for the settings in ``accepting[key]``; ``references[key]`` maps a label (e.g. "wo DKN")
    to an F1 drawn as a horizontal line. Keys with an empty curve are left out and named in
    the note.
    """
    title = "Fact checking with DKN: F1 against the threshold λ (symlog axis)"
    keys = [key for key in sorted(curves) if len(curves[key])]
    left = [key for key in sorted(curves) if not len(curves[key])]
    with panels(out_png, out_svg, len(keys), 5.0, 3.8, title=title,
                note=_left_out(left, "no DKN score")) as (fig, axes):
        for ax, key in zip(axes, keys):
            curve = curves[key].sort_values("threshold")
            lam = curve["threshold"].to_numpy(np.float64)
            sentinel = (curve["accepts_all"].to_numpy(bool) if "accepts_all" in curve
                        else np.zeros(len(curve), dtype=bool))
            lams = chosen.get(key, math.nan)
            if not isinstance(lams, Mapping):
                lams = {"chosen": lams}
            marks = np.asarray([float(v) for v in lams.values() if not _missing(v)], float)
            real = lam[~sentinel]
            linthresh = _linthresh(np.concatenate([real, marks]))
            ax.set_xscale("symlog", linthresh=linthresh)
            # the sentinel (min - 1) is drawn two decades left of the data, not at its value,
            # which would stretch the axis over decades that hold nothing
            left = min(real.min() if len(real) else 0.0,
                       marks[marks >= (real.min() if len(real) else -np.inf)].min()
                       if len(marks) else 0.0)
            at = left * 100 if left < -linthresh else -100 * linthresh
            (line,) = ax.plot(real, 100 * curve["f1"].to_numpy()[~sentinel], marker=".",
                              label="with DKN")
            if sentinel.any():
                ax.plot([at], [100 * curve["f1"].to_numpy()[sentinel][0]], marker="x",
                        linestyle="none", color="black", markersize=8,
                        label=f"{ACCEPT_ALL} (λ below every score)")
            for (setting, value), style in zip(lams.items(), ["--", ":", "-."] * len(lams)):
                if _missing(value):
                    continue
                below = setting in (accepting or {}).get(key, ())
                ax.axvline(at if below else float(value), color=line.get_color(),
                           linestyle=style,
                           label=f"λ {setting} = {ACCEPT_ALL if below else f'{float(value):.3g}'}")
            for (label, f1), style in zip((references or {}).get(key, {}).items(),
                                          [(0, (1, 1)), (0, (4, 2)), (0, (6, 2, 1, 2))]):
                if not _missing(f1):
                    ax.axhline(100 * float(f1), color="grey", linestyle=style, linewidth=1,
                               label=f"{label}: F1 {100 * float(f1):.1f}")
            ax.set_ylim(-3, 103)
            _lambda_ticks(ax, linthresh, at if sentinel.any() or any(
                s in (accepting or {}).get(key, ()) for s in lams) else None)
            ax.set_xlabel("λ (mean DKN attribution threshold)")
            ax.set_ylabel("F1 (%)")
            ax.set_title(key)
            ax.legend(fontsize="x-small")


def _roc_points(labels: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, values)
    return fpr, tpr


ROC_SCORES = {"with_DKN": "DKN score", "wo_DKN": "model probability",
              "random_matched": "random matched neurons", "frequent_kn": "frequent KN (not DKN)"}
"""The scores drawn in :func:`plot_roc` (the controls where the scores have them)."""


def plot_roc(scores_by_key: Mapping[str, pd.DataFrame], out_png, out_svg) -> None:
    """ROC curves, one panel per key: of ``dkn_score`` (NaN ranked lowest), of ``prob`` and
    of the control sets' scores where some statement has one.

    ``scores_by_key[key]`` is a :func:`~kneurons.factcheck.statement_scores` frame. Keys
    whose scores hold one class only have no ROC and are left out (named in the note).
    """
    title = "Fact checking: ROC (positive class: the statement is correct)"
    keys = [key for key in sorted(scores_by_key) if scores_by_key[key]["label"].nunique() == 2]
    left = [key for key in sorted(scores_by_key) if key not in keys]
    with panels(out_png, out_svg, len(keys), 4.4, 4.2, title=title,
                note=_left_out(left, "one class only")) as (fig, axes):
        for ax, key in zip(axes, keys):
            scores = scores_by_key[key]
            labels = scores["label"].to_numpy(np.int64)
            for (method, label), style in zip(ROC_SCORES.items(), ["-", "--", ":", "-."]):
                column = f"has_{method}"
                if method in CONTROLS and not (column in scores and scores[column].any()):
                    continue
                fpr, tpr = _roc_points(labels, ranking_score(scores, method))
                ax.plot(fpr, tpr, linestyle=style, label=label)
            ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, label="chance")
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
            ax.set_title(key)
            ax.legend(fontsize="x-small")


def plot_per_relation_f1(per_relation: pd.DataFrame, out_png, out_svg,
                         lambdas: Mapping[tuple[str, str], str] | None = None) -> None:
    """F1 per relation of both methods: one panel per (model, language), one bar pair per
    relation. Where with DKN abstains (the relation has no DKN: column ``has_dkn`` False) its
    bar is replaced by the words "abstains (no DKN)"; an F1 of 0 is written "F1 = 0".

    ``per_relation`` has columns ``model, language, relation, method, f1`` (and
    ``has_dkn``); ``lambdas[(model, language)]``: the λ shown, e.g. "auto = 0.0002" (in the
    panel's title).
    """
    data = per_relation if per_relation is not None else pd.DataFrame()
    keys = (sorted(data[["model", "language"]].drop_duplicates().itertuples(index=False,
                                                                          name=None))
            if len(data) else [])
    relations = sorted(data["relation"].unique()) if len(data) else []
    settings = sorted(set(data["setting"])) if "setting" in data and len(data) else []
    title = ("Fact-checking F1 per relation" + (f", with DKN at λ {settings[0]}"
                                                if len(settings) == 1 else ""))
    height = max(3.0, 0.28 * len(relations) + 1.5)
    colors = {"wo_DKN": "tab:blue", "with_DKN": "tab:orange"}
    with panels(out_png, out_svg, len(keys), 4.6, height, title=title) as (fig, axes):
        positions = np.arange(len(relations))
        for ax, (model, language) in zip(axes, keys):
            sub = data[(data["model"] == model) & (data["language"] == language)]
            for k, method in enumerate(("wo_DKN", "with_DKN")):
                part = sub[sub["method"] == method].set_index("relation").reindex(relations)
                f1 = 100 * part["f1"].to_numpy(np.float64)
                y = positions + (k - 0.5) * 0.4
                abstains = (~part["has_dkn"].fillna(True).astype(bool).to_numpy()
                            if method == "with_DKN" and "has_dkn" in part
                            else np.zeros(len(relations), dtype=bool))
                shown = np.where(abstains, np.nan, f1)
                ax.barh(y, np.nan_to_num(shown), height=0.4, color=colors[method],
                        label=METHOD_LABELS[method])
                for yy in y[shown == 0]:
                    ax.text(1, yy, "F1 = 0", va="center", fontsize="x-small",
                            color=colors[method], fontweight="bold")
                for yy in y[abstains]:
                    ax.text(1, yy, "abstains (no DKN)", va="center", fontsize="x-small",
                            color="dimgrey", style="italic")
            ax.set_yticks(positions)
            ax.set_yticklabels(relations)
            ax.invert_yaxis()
            ax.set_xlim(0, 100)
            ax.set_xlabel("F1 (%)")
            ax.set_ylabel("relation")
            shown_lambda = (lambdas or {}).get((model, language))
            ax.set_title(f"{model} / mLAMA-{language}"
                         + (f"\nwith DKN at λ {shown_lambda}" if shown_lambda else ""),
                         fontsize="medium")
            ax.legend(fontsize="x-small", loc="lower right")


# ---- the whole fact-checking report -------------------------------------------------------

def _first_setting(per_relation: pd.DataFrame) -> pd.DataFrame:
    if "setting" not in per_relation or per_relation.empty:
        return per_relation
    first = per_relation["setting"].astype(str).iloc[0]
    return per_relation[per_relation["setting"].astype(str) == first]


FIGURES = ("dkn_layers", "f1_vs_lambda", "roc", "per_relation_f1")


def dkn_sets_markdown(stats: pd.DataFrame) -> str:
    """The relations' DKN sets as Markdown: per model, language and relation the discovery
    queries counted (n), those with DKN, the size of the DKN set and its stability (mean
    Jaccard of bootstrap sets with the set of all queries, with its 2.5-97.5 percentiles;
    :func:`kneurons.dkn.dkn_stability`), flagged "unstable" below
    :data:`kneurons.dkn.STABILITY_WARNING`. ``stats``: rows of the ``neuron_stats.csv`` tables
    with ``model`` and ``language`` columns."""
    from .dkn import STABILITY_WARNING

    lines = ["## DKN sets", "",
             "Each relation's DKN set, found on its discovery queries, and how stable it is: "
             "the mean Jaccard similarity between the sets found on bootstrap resamples of the "
             f"queries and the set found on all of them (95% interval); below "
             f"{100 * STABILITY_WARNING:.0f}% the set is marked unstable, and Table 3 rows that rest on it "
             "say little about the relation.", "",
             "| Model | Language | Relation | Queries (n) | With DKN | DKN | Stability (Jaccard, %) | |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for row in stats.sort_values(["model", "language", "relation"]).to_dict("records"):
        if int(row["n_dkn"]) == 0 or _missing(row["stability"]):
            stability, flag = "n/a", "no DKN"
        else:
            stability = interval_cell(row["stability"], row["stability_low"],
                                      row["stability_high"])
            flag = "" if bool(row["stable"]) else "unstable"
        lines.append(f"| {row['model']} | {row['language']} | {row['relation']} | "
                     f"{int(row['n_queries'])} | {int(row['queries_with_dkn'])} | "
                     f"{int(row['n_dkn'])} | {stability} | {flag} |")
    return "\n".join(lines) + "\n"


def fact_check_report(runs: Sequence[Mapping], out_csv, out_md,
                      figures: Mapping[str, tuple], out_comparisons=None) -> pd.DataFrame:
    """Table 3 (CSV and Markdown), the comparisons (CSV, and in the Markdown) and the four
    figures from every (model, language) run.

    Each run: ``{"model", "language", "metrics"`` (the fact_check metrics JSON: settings,
    prob_threshold, dropped, uncertainty, rows, comparisons), ``"scores"``, ``"f1_curve"``,
    ``"per_relation"``, ``"dkn_layers"`` (tables)}. ``figures[name] = (png, svg)`` for each
    name in FIGURES. Returns Table 3.
    """
    table = fact_check_table([row for run in runs for row in fact_check_rows(
        run["model"], run["language"], run["metrics"])])
    compared = comparison_table([row for run in runs for row in comparison_rows(
        run["model"], run["language"], run["metrics"])])
    write_csv(table, out_csv)
    if out_comparisons is not None:
        write_csv(compared, out_comparisons)
    uncertainty = next((run["metrics"].get("uncertainty") for run in runs
                        if run["metrics"].get("uncertainty")), None)
    markdown = fact_check_markdown(table, compared, uncertainty)
    stats = [run["dkn_stats"].assign(model=run["model"], language=run["language"])
             for run in runs if run.get("dkn_stats") is not None]
    if stats:
        markdown += "\n" + dkn_sets_markdown(pd.concat(stats, ignore_index=True))
    write_text(markdown, out_md)
    key = lambda run: f"{run['model']}/{run['language']}"  # noqa: E731
    layers = [run["dkn_layers"].groupby("layer", as_index=False)["n_dkn"].sum()
              .rename(columns={"n_dkn": "count"}).assign(model=run["model"],
                                                          language=run["language"])
              for run in runs if len(run["dkn_layers"])]
    plot_dkn_layers(pd.concat(layers, ignore_index=True) if layers else pd.DataFrame(
        columns=["model", "language", "layer", "count"]), *figures["dkn_layers"],
        models=sorted({run["model"] for run in runs}))
    chosen = {key(run): {s["setting"]: (math.nan if s["threshold"] is None
                                        else float(s["threshold"]))
                         for s in run["metrics"]["settings"]} for run in runs}
    references = {}
    for run in runs:
        every = table[(table["model"] == run["model"]) & (table["language"] == run["language"])
                      & (table["population"] == POPULATIONS[0])]
        references[key(run)] = {METHOD_LABELS[m]: every.loc[every["method"] == m, "f1"].iloc[0]
                                for m in ("wo_DKN", "all_correct", "prob")
                                if (every["method"] == m).any()}
    accepting = {key(run): [s["setting"] for s in run["metrics"]["settings"]
                            if s.get("accepts_all")] for run in runs}
    plot_f1_vs_lambda({key(run): run["f1_curve"] for run in runs}, chosen,
                      *figures["f1_vs_lambda"], references=references, accepting=accepting)
    plot_roc({key(run): run["scores"] for run in runs}, *figures["roc"])
    # per relation: at the first λ setting (config order), all relations
    per_relation, lambdas = [], {}
    for run in runs:
        first = _first_setting(run["per_relation"])
        per_relation.append(first.assign(model=run["model"], language=run["language"]))
        settings = run["metrics"]["settings"]
        if settings:
            lambdas[(run["model"], run["language"])] = lambda_cell(
                {"method": "with_DKN", **settings[0]})
    plot_per_relation_f1(pd.concat(per_relation, ignore_index=True) if per_relation
                         else pd.DataFrame(), *figures["per_relation_f1"], lambdas=lambdas)
    return table
