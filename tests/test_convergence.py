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
