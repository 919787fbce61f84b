"""Fact checking with degenerate knowledge neurons (DKN), the paper's Table 3, with its
baselines, controls, intervals and tests.

Every checked fact (all evaluation facts, and the calibration slice of the discovery facts)
is shown to the model twice: with its true object (``candidate == "true"``, label 1, the
statement is correct) and with its wrong object (``"wrong"``, label 0, the statement is
wrong). Each of these candidates is one statement to judge, so a fact contributes one
positive and one negative example.

**with_DKN** (Chen et al., AAAI 2024, Sec. "Fact checking"): a statement is judged correct
when the mean attribution score of its relation's DKN exceeds a threshold λ::

    dkn_score(c) = mean over (l, i) in DKN(relation) of score_c[l, i]
    judged correct  <=>  dkn_score(c) > λ          (strictly greater)

``score_c`` is the candidate's [n_layers, d_ff] attribution matrix stored in its shard
(float32, probability units), read only through :func:`kneurons.records.neuron_scores`;
``DKN(relation)`` the set of distinct (layer, neuron) pairs of the relation's degenerate
knowledge neurons (duplicates in the input list count once). A relation with no DKN has
``dkn_score = NaN``; its statements are judged *not* correct by with_DKN (with_DKN
*abstains* on them) and stay in every denominator of the ``all_relations`` population (its
true candidates are false negatives, its wrong candidates true negatives), so relations
without DKN cost recall rather than silently leaving the evaluation; ``n_no_dkn`` /
``n_abstained`` count these candidates. The ``dkn_relations`` population
(:data:`POPULATIONS`) keeps only relations with DKN, for every method: the authors'
population. Both are reported.

**wo_DKN** (the authors' baseline): the model judges directly with its own prediction. A
statement is judged correct when the model's prediction for the query (argmax per mask for
masked LMs, greedy decoding for causal LMs) equals the candidate (the shard's ``predicted``
column). A model predicting neither object judges both statements wrong, so wo_DKN accepts
at most one statement of a fact and has nothing to tune.

**Baselines and controls** (:data:`ROW_METHODS`; ours, the paper has none of them):

- ``all_correct``: every statement is judged correct. Every fact gives one true and one
  wrong statement, so on any data P = 0.5, R = 1, F1 = 2/3: what a lenient λ can reach
  without any information.
- ``prob``: correct when the model's probability of the candidate (``prob``, the mean over
  its tokens) exceeds λ_p, chosen on the calibration slice by the rule of λ auto
  (:func:`choose_threshold` on the ``prob`` column). with_DKN against ``prob`` asks whether
  the DKN carry information about truth beyond the model's own probability.
- ``random_matched`` and ``frequent_kn``: the with_DKN rule applied to two control neuron
  sets of each relation, read from the DKN document
  (``document["relations"][r]["controls"]``): random neurons of the DKN's layers matched in
  activation magnitude, and the relation's most frequent knowledge neurons that are not DKN.
  Their λ is chosen as with_DKN's for each λ setting (``auto`` on their own calibration
  scores, a number as it is). A relation without the set is abstained on (as with_DKN
  without DKN) and counted (``n_relations_no_set``); where no relation of a population has
  the set, the row is not available: every metric is NaN.

**Pairwise accuracy** (column ``pairwise``): the share of facts whose true statement scores
above its wrong statement under the row's score (ties count 1/2): the DKN score for
with_DKN, the control set's score for the controls, ``prob`` for ``prob`` and wo_DKN (the
score of wo_DKN's AUROC), a constant for ``all_correct`` (every fact a tie: 0.5). A fact
without a finite score for both statements (its relation has no DKN, or no control set) is
left out of the row's pairwise accuracy; ``n_pairwise`` counts the facts it is over.

**Same facts for every method.** All methods read the same shard records, so they judge the
same statements. Facts without records (causal templates starting with ``[Y]``, which AMIG
cannot attribute: :func:`kneurons.shards.attributable`) are dropped for all and counted
(:func:`dropped_facts`, ``n_facts_dropped``). Only records whose attribution converged
(:func:`kneurons.records.converged`) are used: a fact whose true or wrong record did not
converge is dropped entirely, from the evaluation part and from the calibration slice, and
counted (:func:`converged_facts`, ``n_facts_unconverged``).

**Metrics** (:func:`fact_check_metrics`, :func:`table_rows`): precision, recall and F1 of the
class "the statement is correct" (label 1, judged correct), the paper's P/R/F1 up to the
authors' swap of P and R (see docs/differences.md), from integer counts: P = TP / (TP + FP),
NaN ("n/a") when nothing is accepted; R = TP / (TP + FN); F1 = 2 TP / (2 TP + FP + FN) (0
when nothing is accepted and there are true statements). The same three for the class "the
statement is wrong" (``*_wrong``). AUROC of a continuous score against the label (the
row's score as for ``pairwise``, where NaN ranks below every finite score; 0.5 for
``all_correct``); ``auroc_wrong`` = AUROC of the negated score for the class "wrong",
equal to ``auroc`` by symmetry. AUROC is NaN when only one class is present.

**Uncertainty** (:mod:`kneurons.statistics`): every P, R, F1, AUROC and pairwise accuracy of
a row has a 95% percentile interval from a cluster bootstrap over facts (a fact's true and
wrong statements resampled together), all rows and differences of one (model, language,
population) on the same resamples, seeded. Comparisons (:func:`comparisons`): the
absolute difference ΔF1 of with_DKN and each other method at the same λ setting (wo_DKN:
the paper's comparison; all_correct, prob, random_matched, frequent_kn), and the difference
of the pairwise accuracies of the DKN score and of ``prob`` on the facts that have both,
each with its bootstrap interval and a paired test (:func:`kneurons.statistics.swap_test`,
the two methods' judgements swapped within a fact); p-values are Holm-adjusted over all
comparisons of the (model, language) (both populations and every λ setting together).

**Thresholds**: :func:`check_facts` takes a list of λ settings (``factcheck.thresholds``),
each a row of Table 3: a number (e.g. the authors' fixed λ = 1e-6) or ``auto``, chosen by
:func:`choose_threshold`: λ maximising the F1 of a score column (``dkn_score`` for
with_DKN) over the candidate thresholds: the midpoints between consecutive distinct finite
values and one value below the minimum (``min - 1``, the *sentinel*, which judges every
statement with a score correct). F1 is computed from integer counts, so equal F1 values
compare equal exactly; among equally good thresholds the *smallest* λ is taken (the most
lenient one: more recall for the same F1). The workflow calls it on the calibration slice
of the discovery part only, never on the evaluation part; the function sees nothing but the
scores it is given. With no finite score at all it returns NaN, and the rule then judges
every statement not correct. When the chosen λ is the sentinel, the row is flagged
``accepts_all`` (printed "accept all" in the reports) and the log warns: λ auto picked
"every statement with a score is correct", whose F1 is 2/3 on a relation's facts whatever
the scores.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from . import statistics as stats
from .records import converged, neuron_scores

log = logging.getLogger(__name__)

METHODS = ("wo_DKN", "with_DKN")
"""The paper's two fact-checking methods, in table order (the baseline first)."""
CONTROLS = ("random_matched", "frequent_kn")
"""Control neuron sets of a relation (keys of ``document["relations"][r]["controls"]``)."""
ROW_METHODS = ("wo_DKN", "all_correct", "prob", "with_DKN") + CONTROLS
"""Every method of Table 3, in table order."""
SET_COLUMNS = {"with_DKN": "dkn_score", "random_matched": "random_matched_score",
               "frequent_kn": "frequent_kn_score"}
"""The score column of each neuron-set method (the with_DKN rule at a set)."""
SCORE_COLUMN = {"wo_DKN": "prob", "prob": "prob", "all_correct": None, **SET_COLUMNS}
"""The continuous score of each method (its AUROC and pairwise accuracy); None: constant."""
COMPARED = ("wo_DKN", "all_correct", "prob") + CONTROLS
"""The methods with_DKN's F1 is compared with (at the same λ setting)."""

SCORE_COLUMNS = ["uuid", "relation", "candidate", "label", "dkn_score", "prob", "predicted",
                 "has_dkn"]
CONTROL_COLUMNS = [f"{name}_score" for name in CONTROLS] + [f"has_{name}" for name in CONTROLS]
CANDIDATES = ("true", "wrong")


# ---- neuron sets ---------------------------------------------------------------------------

def _pairs(neurons) -> list[tuple[int, int]]:
    return [(int(layer), int(neuron)) for layer, neuron in neurons or []]


def dkn_by_relation(document: Mapping) -> dict[str, list[tuple[int, int]]]:
    """Relation -> DKN neurons from the DKN stage's JSON (``{"relations": {r: {"dkn": ...}}}``)."""
    relations = document.get("relations", {})
    return {relation: _pairs(entry.get("dkn", [])) for relation, entry in relations.items()}


def controls_by_relation(document: Mapping) -> dict[str, dict[str, list[tuple[int, int]]]]:
    """Control -> relation -> neurons, from ``document["relations"][r]["controls"]`` (see the
    module docstring); a relation without the entry, or with an empty list, has no such set
    and is left out of that control's map."""
    out: dict[str, dict[str, list[tuple[int, int]]]] = {name: {} for name in CONTROLS}
    for relation, entry in document.get("relations", {}).items():
        controls = entry.get("controls") or {}
        for name in CONTROLS:
            neurons = _pairs(controls.get(name))
            if neurons:
                out[name][relation] = neurons
    return out


def neuron_sets(dkn: Mapping) -> dict[str, dict[str, list[tuple[int, int]]]]:
    """``{"dkn": relation -> DKN, "random_matched": ..., "frequent_kn": ...}`` from the DKN
    document (``{"relations": {r: {"dkn", "controls"}}}``) or from a plain map relation ->
    DKN neurons (then without controls)."""
    relations = dkn.get("relations")
    if isinstance(relations, Mapping) and all(isinstance(v, Mapping)
                                              for v in relations.values()):
        return {"dkn": dkn_by_relation(dkn), **controls_by_relation(dkn)}
    return {"dkn": {relation: _pairs(neurons) for relation, neurons in dkn.items()},
            **{name: {} for name in CONTROLS}}


# ---- scores of the statements ---------------------------------------------------------------

def _check_pairs(checked: pd.DataFrame) -> None:
    """Every checked fact has exactly one true and one wrong candidate."""
    unknown = sorted(set(checked["candidate"]) - set(CANDIDATES))
    if unknown:
        raise ValueError(f"unknown candidate values {unknown}; expected {list(CANDIDATES)}")
    counts = checked.groupby(["uuid", "candidate"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=list(CANDIDATES), fill_value=0)
    bad = counts[(counts["true"] != 1) | (counts["wrong"] != 1)]
    if len(bad):
        raise ValueError(f"{len(bad)} checked facts do not have exactly one true and one wrong "
                         f"candidate, e.g. {list(bad.index[:5])}")


def _set_scores(checked: pd.DataFrame, sets: Mapping[str, Sequence[tuple[int, int]]],
                n_layers: int, d_ff: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean stored score over each row's relation's distinct neurons of ``sets`` (NaN where
    the relation has none) and whether it has any."""
    score = np.full(len(checked), np.nan, dtype=np.float64)
    has = np.zeros(len(checked), dtype=bool)
    relations = checked["relation"].to_numpy()
    for relation in pd.unique(relations):
        neurons = sorted(set(_pairs(sets.get(relation))))
        if not neurons:
            continue
        rows = np.flatnonzero(relations == relation)
        part = checked.iloc[rows]
        missing = part["scores"].isna().to_numpy()
        if missing.any():
            k = int(np.argmax(missing))
            raise ValueError(f"checked record {part['uuid'].iat[k]}/{part['candidate'].iat[k]} "
                             f"has no scores; expected float32 [{n_layers}, {d_ff}]")
        try:
            values = neuron_scores(part, neurons, n_layers, d_ff)  # [rows, neurons]
        except ValueError as error:
            raise ValueError(f"{what} of relation {relation}: {error}") from None
        score[rows] = values.mean(axis=1)
        has[rows] = True
    return score, has


def statement_scores(records: pd.DataFrame, sets: Mapping[str, Mapping], n_layers: int,
                     d_ff: int) -> pd.DataFrame:
    """The scores of every checked candidate at every neuron set (:func:`neuron_sets`):
    :data:`SCORE_COLUMNS` (see :func:`dkn_scores`) and, per control, ``<control>_score``
    (mean over the relation's control set, NaN without one) and ``has_<control>``."""
    checked = records.loc[records["checked"].astype(bool)]
    _check_pairs(checked)
    dkn_score, has_dkn = _set_scores(checked, sets.get("dkn", {}), n_layers, d_ff, "DKN")
    out = pd.DataFrame({
        "uuid": checked["uuid"].to_numpy(),
        "relation": checked["relation"].to_numpy(),
        "candidate": checked["candidate"].to_numpy(),
        "label": (checked["candidate"].to_numpy() == "true").astype(np.int64),
        "dkn_score": dkn_score,
        "prob": checked["prob"].to_numpy(np.float64),
        "predicted": checked["predicted"].to_numpy(bool),
        "has_dkn": has_dkn,
    })
    for name in CONTROLS:
        score, has = _set_scores(checked, sets.get(name, {}), n_layers, d_ff, name)
        out[f"{name}_score"], out[f"has_{name}"] = score, has
    return out.sort_values(["relation", "uuid", "candidate"], kind="stable").reset_index(drop=True)


def dkn_scores(records: pd.DataFrame, dkn: Mapping[str, Sequence[tuple[int, int]]],
               n_layers: int, d_ff: int) -> pd.DataFrame:
    """The DKN score of every checked candidate (see the module docstring).

    ``records`` are attribution shard records (:mod:`kneurons.shards`); only rows with
    ``checked`` are used. ``dkn`` maps a relation to its DKN neurons ``(layer, neuron)``;
    a missing or empty entry means the relation has no DKN.

    Returns one row per checked candidate, sorted by relation, uuid and candidate, with
    columns ``uuid, relation, candidate, label`` (1 = true object: the statement is correct,
    0 = wrong object), ``dkn_score`` (float64, mean float32 attribution over the relation's
    distinct DKN neurons, NaN without DKN), ``prob`` (the model's mean per-token probability
    of the candidate), ``predicted`` (the model's prediction equals the candidate) and
    ``has_dkn``.
    """
    return statement_scores(records, {"dkn": dkn}, n_layers, d_ff)[SCORE_COLUMNS]


def converged_facts(records: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """``records`` without the checked facts whose true or wrong record did not converge
    (:func:`kneurons.records.converged`; unchecked rows are kept as they are), and
    ``{"n_facts", "relations"}`` of the facts left out."""
    checked = records["checked"].astype(bool).to_numpy()
    bad = checked & ~converged(records).to_numpy(bool)
    uuids = set(records.loc[bad, "uuid"])
    drop = checked & records["uuid"].isin(uuids).to_numpy()
    left_out = records.loc[drop]
    return (records.loc[~drop].reset_index(drop=True),
            {"n_facts": int(left_out["uuid"].nunique()),
             "relations": sorted(str(r) for r in set(left_out["relation"]))})


# ---- judgements and point metrics ----------------------------------------------------------

def _values(scores: pd.DataFrame, column: str | None) -> np.ndarray:
    """``column`` as float64; a constant 0 for None; NaN where the column is absent (a
    frame without control scores)."""
    if column is None:
        return np.zeros(len(scores), dtype=np.float64)
    if column not in scores:
        return np.full(len(scores), np.nan)
    return scores[column].to_numpy(np.float64)


def _judged_correct(scores: pd.DataFrame, method: str, threshold: float | None) -> np.ndarray:
    if method == "wo_DKN":
        return scores["predicted"].to_numpy(bool)
    if method == "all_correct":
        return np.ones(len(scores), dtype=bool)
    if method == "prob" or method in SET_COLUMNS:
        values = _values(scores, SCORE_COLUMN[method])
        if threshold is None or math.isnan(threshold):
            return np.zeros(len(values), dtype=bool)
        with np.errstate(invalid="ignore"):
            return values > threshold  # NaN > λ is False: no neuron set -> not correct
    raise ValueError(f"unknown method {method!r}; expected one of {ROW_METHODS}")


def judged_correct(scores: pd.DataFrame, method: str, threshold: float | None = None
                   ) -> np.ndarray:
    """Which statements ``method`` judges correct at λ = ``threshold`` (bool per row)."""
    return _judged_correct(scores, method, threshold)


def ranking_score(scores: pd.DataFrame, method: str) -> np.ndarray:
    """The continuous score whose AUROC is reported: the method's score column
    (:data:`SCORE_COLUMN`) with NaN (no neuron set) below every finite value, or 0 for
    ``all_correct``."""
    values = _values(scores, SCORE_COLUMN.get(method, "dkn_score")).copy()
    finite = np.isfinite(values)
    floor = values[finite].min() - 1.0 if finite.any() else 0.0
    values[~finite] = floor
    return values


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator > 0 else math.nan


def prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    """Precision (NaN when nothing is accepted), recall (NaN without positives) and
    F1 = 2 TP / (2 TP + FP + FN) (NaN when that is 0/0) from counts."""
    return _ratio(tp, tp + fp), _ratio(tp, tp + fn), _ratio(2 * tp, 2 * tp + fp + fn)


def _prf(labels: np.ndarray, judged: np.ndarray, positive: int) -> tuple[float, float, float]:
    hit = labels == positive
    said = judged if positive == 1 else ~judged
    tp = int((said & hit).sum())
    return prf(tp, int((said & ~hit).sum()), int((~said & hit).sum()))


class _Auroc:
    """AUROC of one score against labels on weighted rows (bootstrap multiplicities):
    the Mann-Whitney statistic with ties counting 1/2, O(rows) per call."""

    def __init__(self, values: np.ndarray, labels: np.ndarray):
        _, self.inverse = np.unique(values, return_inverse=True)
        self.n_unique = int(self.inverse.max()) + 1 if len(values) else 0
        self.positive = (labels == 1).astype(np.float64)
        self.negative = 1.0 - self.positive

    def __call__(self, weights: np.ndarray) -> float:
        if self.n_unique == 0:
            return math.nan
        pos = np.bincount(self.inverse, weights=weights * self.positive, minlength=self.n_unique)
        neg = np.bincount(self.inverse, weights=weights * self.negative, minlength=self.n_unique)
        n_pos, n_neg = pos.sum(), neg.sum()
        if n_pos == 0 or n_neg == 0:
            return math.nan
        below = np.cumsum(neg) - neg
        return float(np.dot(pos, below + 0.5 * neg) / (n_pos * n_neg))


def _auroc(labels: np.ndarray, values: np.ndarray) -> float:
    return _Auroc(values, labels)(np.ones(len(labels)))


def pairwise_values(scores: pd.DataFrame, method: str) -> np.ndarray:
    """Per row: on a fact's true row, 1 if its true statement scores above its wrong one
    under ``method``'s score, 1/2 on a tie, 0 below; NaN on wrong rows and where either
    score is not finite (see the module docstring)."""
    out = np.full(len(scores), np.nan)
    if len(scores) == 0:
        return out
    values = _values(scores, SCORE_COLUMN[method])
    frame = pd.DataFrame({"uuid": scores["uuid"].to_numpy(), "label": scores["label"].to_numpy(),
                          "value": values, "row": np.arange(len(scores))})
    true = frame[frame["label"] == 1].set_index("uuid")
    wrong = frame[frame["label"] == 0].set_index("uuid")["value"].reindex(true.index)
    a, b = true["value"].to_numpy(), wrong.to_numpy()
    with np.errstate(invalid="ignore"):
        v = np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))
    v[~(np.isfinite(a) & np.isfinite(b))] = np.nan
    out[true["row"].to_numpy()] = v
    return out


def _method_metrics(scores: pd.DataFrame, method: str, threshold: float | None) -> dict:
    labels = scores["label"].to_numpy(np.int64)
    judged = _judged_correct(scores, method, threshold)
    ranking = ranking_score(scores, method)
    precision, recall, f1 = _prf(labels, judged, 1)
    precision_wrong, recall_wrong, f1_wrong = _prf(labels, judged, 0)
    has_dkn = scores["has_dkn"].to_numpy(bool)
    relations = scores.groupby("relation")["has_dkn"].any()
    return {
        "precision": precision, "recall": recall, "f1": f1,
        "auroc": _auroc(labels, ranking),
        "precision_wrong": precision_wrong, "recall_wrong": recall_wrong, "f1_wrong": f1_wrong,
        "auroc_wrong": _auroc(1 - labels, -ranking),
        "n_true": int((labels == 1).sum()), "n_wrong": int((labels == 0).sum()),
        "n_facts": int(scores["uuid"].nunique()),
        "n_no_dkn": int((~has_dkn).sum()),
        "n_relations": int(len(relations)), "n_relations_no_dkn": int((~relations).sum()),
        "n_abstained": int((~has_dkn).sum()) if method == "with_DKN" else 0,
        "threshold": (None if method in ("wo_DKN", "all_correct")
                      else (math.nan if threshold is None else float(threshold))),
    }


def fact_check_metrics(scores: pd.DataFrame, threshold: float | None,
                       methods: Sequence[str] = METHODS) -> dict:
    """Point metrics of ``methods`` (default the paper's two) on ``scores`` (from
    :func:`dkn_scores`) at λ = ``threshold``.

    Returns ``{method: {...}}``; each holds precision, recall, f1, auroc (class "statement is
    correct"), precision_wrong, recall_wrong, f1_wrong, auroc_wrong (class "statement is
    wrong"), n_true, n_wrong (candidates), n_facts, n_no_dkn (candidates of relations without
    DKN; the same count under both methods, but only with_DKN judges them not correct
    because of it), n_abstained (the candidates a method judged not correct for want of DKN:
    n_no_dkn for with_DKN, 0 otherwise), n_relations, n_relations_no_dkn and threshold (λ;
    None for wo_DKN and all_correct, which have none). Precision is NaN when nothing is
    accepted.
    """
    return {method: _method_metrics(scores, method, threshold) for method in methods}


# ---- thresholds ----------------------------------------------------------------------------

def candidate_thresholds(scores: pd.DataFrame, column: str = "dkn_score") -> np.ndarray:
    """Midpoints between sorted distinct finite values of ``column``, preceded by the
    sentinel ``min - 1`` (accepts every statement with a finite value)."""
    values = scores[column].to_numpy(np.float64)
    distinct = np.unique(values[np.isfinite(values)])
    if len(distinct) == 0:
        return np.empty(0, dtype=np.float64)
    midpoints = distinct[:-1] + (distinct[1:] - distinct[:-1]) / 2.0
    return np.concatenate([[distinct[0] - 1.0], midpoints])


def f1_curve(scores: pd.DataFrame, thresholds: Iterable[float],
             column: str = "dkn_score") -> pd.DataFrame:
    """Precision, recall and F1 of the rule "``column`` > λ" at each λ in ``thresholds`` (in
    the given order).

    Columns ``threshold, tp, fp, fn, precision, recall, f1``; counts over all rows of
    ``scores`` (rows without a finite value are never judged correct). Precision is NaN
    where nothing is accepted (and recall, F1 where they are 0/0).
    """
    thresholds = np.asarray(list(thresholds), dtype=np.float64)
    values = scores[column].to_numpy(np.float64)
    labels = scores["label"].to_numpy(np.int64)
    finite = np.isfinite(values)
    order = np.argsort(values[finite], kind="stable")
    sorted_values = values[finite][order]
    sorted_labels = labels[finite][order]
    # positives (label 1) among the k largest finite scores, k = 0..n
    positives_from_top = np.concatenate([[0], np.cumsum(sorted_labels[::-1])])
    above = len(sorted_values) - np.searchsorted(sorted_values, thresholds, side="right")
    above = np.where(np.isnan(thresholds), 0, above)
    tp = positives_from_top[above]
    fp = above - tp
    fn = int((labels == 1).sum()) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), np.nan)
        recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), np.nan)
        denominator = 2 * tp + fp + fn
        f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), np.nan)
    return pd.DataFrame({"threshold": thresholds, "tp": tp.astype(np.int64),
                         "fp": fp.astype(np.int64), "fn": fn.astype(np.int64),
                         "precision": precision, "recall": recall, "f1": f1})


def choose_threshold(scores: pd.DataFrame, column: str = "dkn_score") -> float:
    """λ maximising the F1 of "``column`` > λ" on ``scores``; ties -> the smallest λ; NaN
    without finite values.

    See the module docstring for the candidate thresholds. Only ``scores`` is looked at.
    """
    thresholds = candidate_thresholds(scores, column)
    if len(thresholds) == 0:
        return math.nan
    best = np.nan_to_num(f1_curve(scores, thresholds, column)["f1"].to_numpy(), nan=-1.0)
    # thresholds are ascending, so the first maximum is the smallest λ among the best
    return float(thresholds[int(np.argmax(best))])


def accepts_all(threshold: float | None, scores: pd.DataFrame,
                column: str = "dkn_score") -> bool:
    """λ lies below every finite value of ``column`` in ``scores`` (the sentinel of
    :func:`candidate_thresholds`): the rule accepts every statement that has a value."""
    if threshold is None or not math.isfinite(threshold):
        return False
    values = scores[column].to_numpy(np.float64)
    values = values[np.isfinite(values)]
    return bool(len(values)) and bool(threshold < values.min())


def per_relation_metrics(scores: pd.DataFrame, threshold: float | None) -> pd.DataFrame:
    """Precision, recall and F1 (class "correct") of both methods per relation.

    Columns ``relation, method, n`` (candidates), ``precision, recall, f1, has_dkn``; sorted by
    relation, then wo_DKN before with_DKN. with_DKN abstains on (judges not correct) the
    statements of a relation without DKN (``has_dkn`` False): precision n/a, F1 0.
    """
    rows = []
    for relation, group in scores.groupby("relation", sort=True):
        labels = group["label"].to_numpy(np.int64)
        for method in METHODS:
            judged = _judged_correct(group, method, threshold)
            precision, recall, f1 = _prf(labels, judged, 1)
            rows.append({"relation": relation, "method": method, "n": int(len(group)),
                         "precision": precision, "recall": recall, "f1": f1,
                         "has_dkn": bool(group["has_dkn"].any())})
    columns = ["relation", "method", "n", "precision", "recall", "f1", "has_dkn"]
    return pd.DataFrame(rows, columns=columns)


POPULATIONS = ("all_relations", "dkn_relations")
"""Table 3's populations: every relation (with_DKN abstains on, i.e. judges not correct, the
statements of relations without DKN, and these are counted), and only the relations with DKN
(the authors' population: their scripts skip relations without DKN for both methods)."""


def population(scores: pd.DataFrame, name: str) -> pd.DataFrame:
    """The rows of ``scores`` in population ``name`` (see :data:`POPULATIONS`)."""
    if name == "all_relations":
        return scores
    if name == "dkn_relations":
        return scores[scores["has_dkn"].to_numpy(bool)].reset_index(drop=True)
    raise ValueError(f"unknown population {name!r}; expected one of {POPULATIONS}")


def dropped_facts(facts: pd.DataFrame | None, scores: pd.DataFrame) -> dict:
    """Facts of the checked part that have no scored candidates (e.g. causal templates
    starting with ``[Y]``, which AMIG cannot attribute and the shards leave out): every
    method is scored without them. ``scores``: any frame with the scored facts' ``uuid``.
    Returns ``{"n_facts", "relations"}`` (relations sorted)."""
    if facts is None:
        return {"n_facts": 0, "relations": []}
    missing = facts[~facts["uuid"].isin(set(scores["uuid"]))]
    return {"n_facts": int(missing["uuid"].nunique()),
            "relations": sorted(str(r) for r in set(missing["relation"]))}


def setting_name(threshold: float | str) -> str:
    """How a λ setting is named in the outputs: ``auto`` or the number (``1e-06``)."""
    return "auto" if threshold == "auto" else f"{float(threshold):g}"


# ---- Table 3 with intervals -----------------------------------------------------------------

def row_specs(calibration: pd.DataFrame, thresholds: Sequence[float | str]) -> list[dict]:
    """The rows of Table 3 of one population, in table order: wo_DKN, all_correct, prob
    (λ_p chosen on ``calibration``), then per λ setting with_DKN and the two controls (λ
    chosen on ``calibration`` at their own scores for ``auto``). Each
    ``{"method", "setting", "threshold", "threshold_source", "accepts_all"}``."""
    def chosen(method: str, setting) -> dict:
        column = SCORE_COLUMN[method]
        if setting == "auto":
            lam = (choose_threshold(calibration, column) if column in calibration
                   else math.nan)
            flag = accepts_all(lam, calibration, column) if column in calibration else False
            return {"method": method, "setting": "auto", "threshold": lam,
                    "threshold_source": "auto", "accepts_all": flag}
        return {"method": method, "setting": setting_name(setting), "threshold": float(setting),
                "threshold_source": "config", "accepts_all": False}

    specs = [{"method": m, "setting": "", "threshold": None, "threshold_source": "",
              "accepts_all": m == "all_correct"} for m in ("wo_DKN", "all_correct")]
    specs.append(chosen("prob", "auto"))
    for setting in thresholds:
        specs += [chosen(method, setting) for method in ("with_DKN",) + CONTROLS]
    return specs


def _available(scores: pd.DataFrame, method: str) -> bool:
    """A control row is available where some relation of ``scores`` has the control set."""
    if method not in CONTROLS:
        return True
    column = f"has_{method}"
    return column in scores and bool(scores[column].to_numpy(bool).any())


def _no_set(scores: pd.DataFrame, method: str) -> tuple[int, int]:
    """(relations, statements) of ``scores`` without the method's neuron set."""
    if method not in SET_COLUMNS:
        return 0, 0
    column = "has_dkn" if method == "with_DKN" else f"has_{method}"
    has = (scores[column].to_numpy(bool) if column in scores
           else np.zeros(len(scores), dtype=bool))
    relations = pd.Series(has).groupby(scores["relation"].to_numpy()).any()
    return int((~relations).sum()), int((~has).sum())


METRICS = ("precision", "recall", "f1", "auroc", "pairwise")
"""The metrics of a Table 3 row that carry an interval (``<m>_low``, ``<m>_high``)."""


def _f1_of(labels: np.ndarray) -> Callable[[np.ndarray, np.ndarray], float]:
    positive = labels == 1

    def f1(judged: np.ndarray, rows: np.ndarray) -> float:
        judged = judged.astype(bool)
        tp = float((judged & positive).sum())
        return _ratio(2 * tp, tp + float(judged.sum()) + float(positive.sum()))
    return f1


def _mean_of(values: np.ndarray, rows: np.ndarray) -> float:
    return float(values.mean()) if len(values) else math.nan


def comparisons(scores: pd.DataFrame, specs: Sequence[dict], *, seed: int = 0,
                n_boot: int = stats.N_BOOT, n_perm: int = stats.N_PERM,
                level: float = stats.LEVEL) -> tuple[list[dict], list[dict]]:
    """Table 3 rows of one population (``specs`` from :func:`row_specs`) with intervals, and
    the comparisons (see the module docstring), all on the same bootstrap resamples.

    Returns ``(rows, comparisons)``: each row is its spec with :data:`METRICS` (estimate,
    ``_low``, ``_high``), precision/recall/f1 of the class "wrong", auroc_wrong, n_facts,
    n_true, n_wrong, n_pairwise (facts in the pairwise accuracy), n_relations,
    n_relations_no_set, n_abstained (statements of relations without the row's neuron
    set), n_no_dkn, n_relations_no_dkn, available. Each comparison: ``{"setting", "metric"``
    (``f1`` or ``pairwise``), ``"method", "baseline", "estimate", "low", "high", "n_facts",
    "p"}`` (difference method - baseline; p of the paired swap test, NaN where a side is
    not available).
    """
    labels = scores["label"].to_numpy(np.int64)
    n = len(scores)
    uuids = scores["uuid"].to_numpy()
    positive = (labels == 1).astype(np.float64)
    negative = 1.0 - positive
    prepared = []
    for spec in specs:
        method = spec["method"]
        available = _available(scores, method)
        judged = _judged_correct(scores, method, spec["threshold"]).astype(np.float64)
        pairs = pairwise_values(scores, method)
        prepared.append({
            "available": available, "judged": judged,
            "tp": judged * positive, "fp": judged * negative, "fn": (1 - judged) * positive,
            "auroc": _Auroc(ranking_score(scores, method), labels),
            "pair_rows": np.isfinite(pairs).astype(np.float64), "pairs": np.nan_to_num(pairs)})
    index = {(s["method"], s["setting"]): k for k, s in enumerate(specs)}
    wanted = []  # (metric, setting, method k, baseline k)
    for (method, setting), k in index.items():
        if method != "with_DKN":
            continue
        for other in COMPARED:
            j = index.get((other, setting), index.get((other, "auto" if other == "prob" else "")))
            if j is not None:
                wanted.append(("f1", setting, k, j))
    dkn_pair = next((k for (m, _), k in index.items() if m == "with_DKN"), None)
    prob_pair = index.get(("prob", "auto"))
    if dkn_pair is not None and prob_pair is not None:
        wanted.append(("pairwise", "", dkn_pair, prob_pair))
    both = (prepared[dkn_pair]["pair_rows"] * prepared[prob_pair]["pair_rows"]
            if dkn_pair is not None and prob_pair is not None else np.zeros(n))

    def row_values(k: int, w: np.ndarray) -> dict:
        p = prepared[k]
        if not p["available"]:
            return {m: math.nan for m in METRICS}
        precision, recall, f1 = prf(np.dot(w, p["tp"]), np.dot(w, p["fp"]), np.dot(w, p["fn"]))
        return {"precision": precision, "recall": recall, "f1": f1, "auroc": p["auroc"](w),
                "pairwise": _ratio(np.dot(w, p["pairs"] * p["pair_rows"]),
                                   np.dot(w, p["pair_rows"]))}

    def statistic(rows: np.ndarray) -> dict:
        w = np.bincount(rows, minlength=n).astype(np.float64)
        out, values = {}, {}
        for k in range(len(specs)):
            values[k] = row_values(k, w)
            out.update({f"{k}.{m}": v for m, v in values[k].items()})
        for c, (metric, _, k, j) in enumerate(wanted):
            if metric == "f1":
                out[f"cmp{c}"] = values[k]["f1"] - values[j]["f1"]
            else:
                d = prepared[k]["pairs"] - prepared[j]["pairs"]
                out[f"cmp{c}"] = _ratio(np.dot(w, d * both), np.dot(w, both))
        return out

    intervals = stats.bootstrap(statistic, uuids, n_boot=n_boot, seed=seed, level=level) \
        if n else {}
    n_facts = int(pd.Series(uuids).nunique())
    relations = scores.groupby("relation")["has_dkn"].any() if n else pd.Series(dtype=bool)
    rows = []
    for k, spec in enumerate(specs):
        method = spec["method"]
        metrics = {**fact_check_metrics(scores, spec["threshold"], [method])[method]}
        n_relations_no_set, n_no_set = _no_set(scores, method)
        row = {**spec, "available": prepared[k]["available"]}
        for m in METRICS:
            iv = intervals.get(f"{k}.{m}")
            row[m] = iv.estimate if iv else math.nan
            row[f"{m}_low"] = iv.low if iv else math.nan
            row[f"{m}_high"] = iv.high if iv else math.nan
        for m in ("precision_wrong", "recall_wrong", "f1_wrong", "auroc_wrong"):
            row[m] = metrics[m] if prepared[k]["available"] else math.nan
        row.update(n_facts=n_facts, n_true=int((labels == 1).sum()),
                   n_wrong=int((labels == 0).sum()),
                   n_pairwise=int(prepared[k]["pair_rows"].sum()),
                   n_relations=int(len(relations)), n_relations_no_set=n_relations_no_set,
                   n_abstained=n_no_set, n_no_dkn=metrics["n_no_dkn"],
                   n_relations_no_dkn=metrics["n_relations_no_dkn"])
        rows.append(row)
    out = []
    f1 = _f1_of(labels)
    for c, (metric, setting, k, j) in enumerate(wanted):
        iv = intervals.get(f"cmp{c}")
        entry = {"setting": setting, "metric": metric, "method": specs[k]["method"],
                 "baseline": specs[j]["method"],
                 "estimate": iv.estimate if iv else math.nan,
                 "low": iv.low if iv else math.nan, "high": iv.high if iv else math.nan,
                 "n_facts": n_facts, "p": math.nan}
        if metric == "pairwise":
            entry["setting"] = ""
            entry["n_facts"] = int(both.sum())
        usable = prepared[k]["available"] and prepared[j]["available"] and n
        if usable and metric == "f1":
            _, entry["p"] = stats.swap_test(f1, prepared[k]["judged"], prepared[j]["judged"],
                                            uuids, n_perm=n_perm, seed=seed)
        elif usable and both.any():
            keep = both.astype(bool)
            _, entry["p"] = stats.swap_test(_mean_of, prepared[k]["pairs"][keep],
                                            prepared[j]["pairs"][keep], uuids[keep],
                                            n_perm=n_perm, seed=seed)
        out.append(entry)
    return rows, out


def table_rows(scores: pd.DataFrame, calibration: pd.DataFrame,
               thresholds: Sequence[float | str], *, seed: int = 0, n_boot: int = stats.N_BOOT,
               n_perm: int = stats.N_PERM) -> tuple[list[dict], list[dict]]:
    """Table 3 of one model and language: every population's rows (:func:`row_specs`,
    :func:`comparisons`, each with ``population``), and the comparisons with ``p_holm``
    (Holm over all of them)."""
    specs = row_specs(calibration, thresholds)
    rows, compared = [], []
    for name in POPULATIONS:
        found, tests = comparisons(population(scores, name), specs, seed=seed, n_boot=n_boot,
                                   n_perm=n_perm)
        rows += [{"population": name, **row} for row in found]
        compared += [{"population": name, **test} for test in tests]
    adjusted = stats.holm([c["p"] for c in compared])
    for entry, p in zip(compared, adjusted):
        entry["p_holm"] = float(p)
    return rows, compared


def check_facts(evaluation: pd.DataFrame, calibration: pd.DataFrame, dkn: Mapping,
                n_layers: int, d_ff: int, thresholds: Sequence[float | str] | float | str,
                facts: pd.DataFrame | None = None, *, seed: int = 0,
                n_boot: int = stats.N_BOOT, n_perm: int = stats.N_PERM) -> dict:
    """The whole fact check of one model and language.

    ``evaluation``/``calibration``: attribution records of the evaluation part and of the
    discovery part (only their checked rows are used, and of those only the facts whose
    records converged). ``dkn``: the DKN document (``{"relations": {r: {"dkn", "controls"}}}``)
    or a map relation -> DKN neurons (no controls). ``thresholds``: the λ settings, each a
    number or ``"auto"`` (chosen on the calibration slice with :func:`choose_threshold`).
    ``facts``: the evaluation part's facts, to count those left without records. ``seed``:
    of the bootstrap and the paired tests.

    Returns ``{"settings", "prob_threshold", "dropped", "metrics", "rows", "comparisons",
    "uncertainty", "scores", "calibration_scores", "f1_curve", "per_relation"}``:
    ``settings`` a list of ``{"setting", "threshold", "threshold_source", "accepts_all"}``
    (with_DKN's λ; source ``auto`` or ``config``); ``prob_threshold`` λ_p of the ``prob``
    baseline and its ``accepts_all``; ``dropped``: facts without records (``n_facts``,
    ``relations``; :func:`dropped_facts`) and facts left out because a record did not
    converge (``unconverged``, ``calibration_unconverged``: :func:`converged_facts`);
    ``metrics`` the paper's two methods' point metrics per setting and population (as
    :func:`fact_check_metrics`, with ``n_facts_dropped``); ``rows`` and ``comparisons``
    (:func:`table_rows`; every row with ``n_facts_dropped``, ``n_facts_unconverged`` and
    ``n_calibration_unconverged``);
    ``uncertainty`` the bootstrap and test settings; tables: the scores (with the control
    columns), the F1 curve of with_DKN over the evaluation scores at the calibration and
    evaluation candidate thresholds (column ``accepts_all``: λ below every finite score), and
    the per-relation metrics of every setting (column ``setting``).
    """
    if isinstance(thresholds, (str, int, float)):
        thresholds = [thresholds]
    sets = neuron_sets(dkn)
    with_records = evaluation.loc[evaluation["checked"].astype(bool)]
    evaluation, unconverged = converged_facts(evaluation)
    calibration, calibration_unconverged = converged_facts(calibration)
    scores = statement_scores(evaluation, sets, n_layers, d_ff)
    calibration_scores = statement_scores(calibration, sets, n_layers, d_ff)
    dropped = {**dropped_facts(facts, with_records), "unconverged": unconverged,
               "calibration_unconverged": calibration_unconverged}
    rows, compared = table_rows(scores, calibration_scores, thresholds, seed=seed,
                                n_boot=n_boot, n_perm=n_perm)
    for row in rows:
        row.update(n_facts_dropped=dropped["n_facts"],
                   n_facts_unconverged=unconverged["n_facts"],
                   n_calibration_unconverged=calibration_unconverged["n_facts"])
        if row["accepts_all"] and row["method"] != "all_correct" and \
                row["population"] == POPULATIONS[0]:
            log.warning("%s at λ %s = %.6g accepts every statement with a score (λ below every "
                        "calibration score): it is the 'accept all' classifier",
                        row["method"], row["setting"], row["threshold"])
    settings, metrics, per_relation = [], [], []
    for spec in (r for r in rows if r["method"] == "with_DKN"
                 and r["population"] == POPULATIONS[0]):
        setting = {key: spec[key] for key in ("setting", "threshold", "threshold_source",
                                              "accepts_all")}
        settings.append(setting)
        lam = spec["threshold"]
        for name in POPULATIONS:
            found = fact_check_metrics(population(scores, name), lam)
            for entry in found.values():
                entry["n_facts_dropped"] = dropped["n_facts"]
            metrics.append({**setting, "population": name, "metrics": found})
        per_relation.append(per_relation_metrics(scores, lam).assign(setting=setting["setting"]))
    prob = next(r for r in rows if r["method"] == "prob")
    grid = np.unique(np.concatenate([candidate_thresholds(calibration_scores),
                                     candidate_thresholds(scores)]))
    curve = f1_curve(scores, grid)
    finite = scores["dkn_score"].to_numpy(np.float64)
    finite = finite[np.isfinite(finite)]
    curve["accepts_all"] = curve["threshold"] < finite.min() if len(finite) else False
    return {"settings": settings,
            "prob_threshold": {"threshold": prob["threshold"],
                               "accepts_all": prob["accepts_all"]},
            "dropped": dropped, "metrics": metrics, "rows": rows, "comparisons": compared,
            "uncertainty": {"seed": seed, "n_boot": n_boot, "n_perm": n_perm,
                            "level": stats.LEVEL, "clusters": "facts",
                            "p_adjust": "holm over the (model, language)'s comparisons"},
            "scores": scores, "calibration_scores": calibration_scores, "f1_curve": curve,
            "per_relation": pd.concat(per_relation, ignore_index=True) if per_relation
            else pd.DataFrame(columns=["relation", "method", "n", "precision", "recall",
                                       "f1", "has_dkn", "setting"])}
