"""The convergence check across a run: how well each model's attributions satisfy completeness.

Every attribution record carries ``completeness_error`` (see :mod:`kneurons.records`): the
share of the probability gap P(a) - P(a') that the layer sums of its scores miss, on the layers
the shard checks. This module summarises it per model, language and part, so that the report
shows next to Table 3 whether the scores it rests on converged, and flags the runs that did not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .records import COMPLETENESS_TOLERANCE

COLUMNS = ["model", "lang", "part", "n_queries", "median", "p90", "max", "n_above",
           "share_above"]


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


def completeness_table(runs: Sequence[tuple[str, str, str, pd.DataFrame]]) -> pd.DataFrame:
    """One row per (model, language, part) from its attribution records."""
    rows = []
    for model, lang, part, records in runs:
        errors = records["completeness_error"] if "completeness_error" in records else []
        rows.append(dict(model=model, lang=lang, part=part, **completeness_summary(errors)))
    return pd.DataFrame(rows, columns=COLUMNS)


def completeness_markdown(table: pd.DataFrame, method: str, steps: int, quadrature: str) -> str:
    """The table as a Markdown page, with the runs above the tolerance flagged."""
    lines = [
        "# Convergence check (completeness)",
        "",
        f"Attribution: `{method}`, {steps} {quadrature} nodes. Error per query: "
        "Σ over checked layers |Σ scores − gap| / Σ |gap| (gap = P(a) − P(a') by direct "
        f"forwards; floor 1e-3 on the denominator). Tolerance {COMPLETENESS_TOLERANCE:.0%}.",
        "",
        "| model | lang | part | queries | median | p90 | max | above tolerance |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    flagged = []
    for row in table.itertuples(index=False):
        if row.n_queries == 0:
            lines.append(f"| {row.model} | {row.lang} | {row.part} | 0 | | | | |")
            continue
        lines.append(f"| {row.model} | {row.lang} | {row.part} | {row.n_queries} | "
                     f"{row.median:.2g} | {row.p90:.2g} | {row.max:.2g} | "
                     f"{row.n_above} ({row.share_above:.0%}) |")
        if row.n_above:
            flagged.append(f"{row.model} {row.lang} {row.part}")
    lines.append("")
    if flagged:
        lines.append("**WARNING: scores that miss completeness by more than the tolerance** in "
                     + ", ".join(flagged) + ": their knowledge neurons rest on integrals that "
                     "did not converge (more steps, or another baseline, are needed).")
    else:
        lines.append("Every query is within the tolerance.")
    return "\n".join(lines) + "\n"
