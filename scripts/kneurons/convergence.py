"""The convergence check across a run: how well each model's attributions satisfy completeness.

Every attribution record carries ``completeness_error`` (see :mod:`kneurons.records`): the
share of the probability gap P(a) - P(a') that the layer sums of its scores miss, on the layers
the shard checks. A query above the tolerance was attributed again with more steps (column
``steps``) up to ``attribution.max_steps``; one still above it is marked ``converged == False``
and left out of every result. This module summarises these per model, language and part (the
final errors, how many queries were refined, how many did not converge), so that the report
shows next to Table 3 whether the scores it rests on converged, and what was left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .records import COMPLETENESS_TOLERANCE

COLUMNS = ["model", "lang", "part", "n_queries", "median", "p90", "max", "n_above",
           "share_above", "n_refined", "n_not_converged"]


def completeness_summary(errors: Sequence[float]) -> dict:
    """n, median, 90th percentile, max, and how many errors exceed COMPLETENESS_TOLERANCE."""
    values = np.asarray(errors, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return dict(n_queries=0, median=np.nan, p90=np.nan, max=np.nan, n_above=0,
                    share_above=np.nan)
    above = int((values > COMPLETENESS_TOLERANCE).sum())
    return dict(n_queries=int(values.size), median=float(np.median(values)),
                p90=float(np.percentile(values, 90)), max=float(values.max()), n_above=above,
                share_above=above / values.size)


def completeness_table(runs: Sequence[tuple[str, str, str, pd.DataFrame]],
                       steps: int | None = None) -> pd.DataFrame:
    """One row per (model, language, part) from its attribution records: the error summary
    (:func:`completeness_summary`, over the attributed queries), ``n_refined`` (queries
    attributed with more than ``steps`` nodes) and ``n_not_converged`` (column ``converged``
    False; records without these columns count as neither)."""
    rows = []
    for model, lang, part, records in runs:
        errors = records["completeness_error"] if "completeness_error" in records else []
        refined = (int((records["steps"] > steps).sum())
                   if steps is not None and "steps" in records else 0)
        failed = int((~records["converged"].astype(bool)).sum()) if "converged" in records else 0
        rows.append(dict(model=model, lang=lang, part=part, **completeness_summary(errors),
                         n_refined=refined, n_not_converged=failed))
    return pd.DataFrame(rows, columns=COLUMNS)


def completeness_markdown(table: pd.DataFrame, method: str, steps: int, quadrature: str,
                          max_steps: int | None = None) -> str:
    """The table as a Markdown page, with the runs above the tolerance flagged."""
    refinement = (f"A query above the tolerance is attributed again with twice the nodes, up to "
                  f"{max_steps}; one still above it is not converged and left out of every "
                  "result (KN, DKN, LIKN, Table 3, localization)." if max_steps else
                  "No refinement (attribution.max_steps): a query above the tolerance is not "
                  "converged and left out of every result (KN, DKN, LIKN, Table 3, "
                  "localization).")
    lines = [
        "# Convergence check (completeness)",
        "",
        f"Attribution: `{method}`, {steps} {quadrature} nodes. Error per query: "
        "Σ over checked layers |Σ scores − gap| / Σ |gap| (gap = P(a) − P(a') by direct "
        f"forwards; floor 1e-3 on the denominator). Tolerance {COMPLETENESS_TOLERANCE:.0%}. "
        + refinement + " The errors are those of the records as written (after refinement); "
        "queries without attribution (relations without DKN in the fact-checked parts) are "
        "not counted.",
        "",
        "| model | lang | part | queries | median | p90 | max | above tolerance | refined "
        "| not converged |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    flagged = []
    for row in table.itertuples(index=False):
        if row.n_queries == 0:
            lines.append(f"| {row.model} | {row.lang} | {row.part} | 0 | | | | | | |")
            continue
        lines.append(f"| {row.model} | {row.lang} | {row.part} | {row.n_queries} | "
                     f"{row.median:.2g} | {row.p90:.2g} | {row.max:.2g} | "
                     f"{row.n_above} ({row.share_above:.0%}) | {row.n_refined} | "
                     f"{row.n_not_converged} |")
        if row.n_above:
            flagged.append(f"{row.model} {row.lang} {row.part}")
    lines.append("")
    if flagged:
        lines.append("**WARNING: scores that miss completeness by more than the tolerance** in "
                     + ", ".join(flagged) + ": these queries are left out of every result "
                     "(more steps, or another baseline, are needed to keep them).")
    else:
        lines.append("Every query is within the tolerance.")
    return "\n".join(lines) + "\n"
