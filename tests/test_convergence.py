"""The convergence check's summary, hand-counted."""

import numpy as np
import pandas as pd
import pytest

from kneurons.convergence import completeness_markdown, completeness_summary, completeness_table
from kneurons.records import COMPLETENESS_TOLERANCE


def test_summary_counts_errors_above_the_tolerance():
    errors = [0.001, 0.002, 0.003, 0.2, np.nan]  # NaN: a query without a checked gap
    summary = completeness_summary(errors)
    assert summary["n_queries"] == 4
    assert summary["median"] == pytest.approx(0.0025)
    assert summary["max"] == 0.2
    assert summary["n_above"] == 1 and summary["share_above"] == 0.25
    assert COMPLETENESS_TOLERANCE == 0.05  # the page names it; the counts above assume it


def test_empty_runs_and_flagging():
    good = pd.DataFrame({"completeness_error": [0.01, 0.02]})
    bad = pd.DataFrame({"completeness_error": [0.01, 0.9]})
    table = completeness_table([("m", "en", "discovery", good), ("m", "zh", "evaluation", bad),
                                ("t", "en", "discovery", pd.DataFrame({"prob": [0.5]}))])
    assert list(table["n_above"]) == [0, 1, 0] and table["n_queries"].tolist() == [2, 2, 0]
    page = completeness_markdown(table, "amig", 10, "riemann")
    assert "| m | zh | evaluation | 2 | 0.46 | 0.81 | 0.9 | 1 (50%) |" in page
    assert "WARNING" in page and "m zh evaluation" in page and "m en discovery" not in page
    clean = completeness_markdown(table.iloc[[0]], "amig", 10, "riemann")
    assert "WARNING" not in clean and "within the tolerance" in clean


def test_refined_and_non_converged_queries_are_counted():
    # steps 10: two queries refined (20, 40 nodes), one of them still above the tolerance;
    # a query without attribution (steps 0, NaN error) counts as neither
    records = pd.DataFrame({"completeness_error": [0.01, 0.03, 0.2, np.nan],
                            "steps": [10, 20, 40, 0], "converged": [True, True, False, True]})
    old = pd.DataFrame({"completeness_error": [0.01, 0.2]})  # a shard before these columns
    table = completeness_table([("m", "en", "evaluation", records), ("m", "en", "discovery", old)],
                               steps=10)
    assert table["n_queries"].tolist() == [3, 2]
    assert table["n_refined"].tolist() == [2, 0]
    assert table["n_not_converged"].tolist() == [1, 0]
    page = completeness_markdown(table, "amig", 10, "riemann", max_steps=40)
    assert "| m | en | evaluation | 3 | 0.03 | 0.17 | 0.2 | 1 (33%) | 2 | 1 |" in page
    assert "up to 40" in page and "left out of every result" in page
    assert "No refinement" in completeness_markdown(table, "amig", 10, "riemann")
