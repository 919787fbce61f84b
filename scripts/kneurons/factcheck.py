"""Fact checking with degenerate knowledge neurons (DKN), the paper's Table 3.

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
(float32, probability units; see :mod:`kneurons.records`), ``DKN(relation)`` the set of
distinct (layer, neuron) pairs of the relation's degenerate knowledge neurons (duplicates in
the input list count once). A relation with no DKN has ``dkn_score = NaN``; its statements
are judged *not* correct by with_DKN (with_DKN *abstains* on them) and stay in every
denominator of the ``all_relations`` population (its true candidates are false negatives, its
wrong candidates true negatives), so relations without DKN cost recall rather than silently
leaving the evaluation; ``n_no_dkn``/``n_abstained`` count these candidates. The
``dkn_relations`` population (:data:`POPULATIONS`) keeps only relations with DKN, for both
methods: the authors' population. Both are reported.

**wo_DKN** (the baseline): the model judges directly with its own prediction. A statement is
judged correct when the model's prediction for the query (argmax per mask for masked LMs,
greedy decoding for causal LMs) equals the candidate (the shard's ``predicted`` column). A
model predicting neither object judges both statements wrong.

**Same facts for both methods.** Both methods read the same shard records, so they judge the
same statements. Facts without records (causal templates starting with ``[Y]``, which AMIG
cannot attribute: :func:`kneurons.shards.attributable`) are dropped for both and counted
(:func:`dropped_facts`, ``n_facts_dropped``).

**Metrics** (:func:`fact_check_metrics`): precision, recall and F1 of the class "the
statement is correct" (label 1, judged correct), the paper's P/R/F1 up to the authors'
swap of P and R (see docs/differences.md), computed with
scikit-learn's ``precision_recall_fscore_support`` (``zero_division=0``). The same three for
the class "the statement is wrong" (``*_wrong``: label 0, judged not correct). AUROC of a
continuous score against the label: ``dkn_score`` for with_DKN, where NaN (no DKN) ranks
below every finite score (it is replaced by ``min - 1`` over the finite scores), and the
model's own probability ``prob`` of the candidate for wo_DKN. ``auroc_wrong`` is the AUROC of
the negated score against the "wrong" class, which equals ``auroc`` by symmetry; it is reported
for completeness. AUROC is NaN when only one class is present.

**Thresholds**: :func:`check_facts` takes a list of λ settings (``factcheck.thresholds``),
each a row of Table 3: a number (e.g. the authors' fixed λ = 1e-6) or ``auto``, chosen by
:func:`choose_threshold`: λ maximising the with_DKN F1 over the candidate
thresholds: the midpoints between consecutive distinct finite ``dkn_score`` values and one
value below the minimum (``min - 1``, which judges every statement with DKN correct). F1 is
computed from integer counts as ``2 TP / (2 TP + FP + FN)``, so equal F1 values compare
equal exactly; among equally good thresholds the *smallest* λ is taken (the most lenient
one: more recall for the same F1). The workflow calls it on the calibration slice of the
discovery part only, never on the evaluation part; the function sees nothing but the scores
it is given. With no finite score at all it returns NaN, and with_DKN then judges every
statement not correct.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

from .records import SCORE_DTYPE

METHODS = ("wo_DKN", "with_DKN")
"""Fact-checking methods, in table order (the baseline first)."""

SCORE_COLUMNS = ["uuid", "relation", "candidate", "label", "dkn_score", "prob", "predicted",
                 "has_dkn"]
CANDIDATES = ("true", "wrong")


def dkn_by_relation(document: Mapping) -> dict[str, list[tuple[int, int]]]:
    """Relation -> DKN neurons from the DKN stage's JSON (``{"relations": {r: {"dkn": ...}}}``)."""
    relations = document.get("relations", {})
    return {relation: [(int(layer), int(neuron)) for layer, neuron in entry.get("dkn", [])]
            for relation, entry in relations.items()}


def _flat_indices(relation: str, neurons: Iterable[Sequence[int]], n_layers: int,
                  d_ff: int) -> np.ndarray:
    """Sorted distinct row-major indices into a [n_layers, d_ff] matrix."""
    pairs = np.asarray([tuple(pair) for pair in neurons], dtype=np.int64).reshape(-1, 2)
    layers, units = pairs[:, 0], pairs[:, 1]
    bad = (layers < 0) | (layers >= n_layers) | (units < 0) | (units >= d_ff)
    if bad.any():
        layer, unit = pairs[np.argmax(bad)]
        raise ValueError(f"DKN of relation {relation}: neuron ({layer}, {unit}) is outside "
                         f"[0, {n_layers}) x [0, {d_ff})")
    return np.unique(layers * d_ff + units)


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
    checked = records.loc[records["checked"].astype(bool)]
    _check_pairs(checked)
    n_bytes = n_layers * d_ff * SCORE_DTYPE.itemsize
    dkn_score = np.full(len(checked), np.nan, dtype=np.float64)
    has_dkn = np.zeros(len(checked), dtype=bool)
    relations = checked["relation"].to_numpy()
    for relation in pd.unique(relations):
        neurons = dkn.get(relation) or []
        if len(neurons) == 0:
            continue
        flat = _flat_indices(relation, neurons, n_layers, d_ff)
        rows = np.flatnonzero(relations == relation)
        has_dkn[rows] = True
        for row in rows:
            blob = checked["scores"].iat[row]
            if blob is None or len(blob) != n_bytes:
                size = "no" if blob is None else f"{len(blob)} bytes of"
                raise ValueError(
                    f"checked record {checked['uuid'].iat[row]}/{checked['candidate'].iat[row]} "
                    f"has {size} scores; expected {n_bytes} bytes (float32 [{n_layers}, {d_ff}])")
            # Same layout as records.score_matrix; only the DKN entries are decoded.
            matrix = np.frombuffer(blob, dtype=SCORE_DTYPE)  # [n_layers * d_ff], row-major
            dkn_score[row] = matrix[flat].astype(np.float64).mean()
    out = pd.DataFrame({
        "uuid": checked["uuid"].to_numpy(),
        "relation": relations,
        "candidate": checked["candidate"].to_numpy(),
        "label": (checked["candidate"].to_numpy() == "true").astype(np.int64),
        "dkn_score": dkn_score,
        "prob": checked["prob"].to_numpy(np.float64),
        "predicted": checked["predicted"].to_numpy(bool),
        "has_dkn": has_dkn,
    })
    return out.sort_values(["relation", "uuid", "candidate"], kind="stable").reset_index(drop=True)


def _judged_correct(scores: pd.DataFrame, method: str, threshold: float | None) -> np.ndarray:
    if method == "wo_DKN":
        return scores["predicted"].to_numpy(bool)
    if method == "with_DKN":
        values = scores["dkn_score"].to_numpy(np.float64)
        if threshold is None or math.isnan(threshold):
            return np.zeros(len(values), dtype=bool)
        with np.errstate(invalid="ignore"):
            return values > threshold  # NaN > λ is False: no DKN -> not correct
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def ranking_score(scores: pd.DataFrame, method: str) -> np.ndarray:
    """The continuous score whose AUROC is reported: dkn_score (NaN lowest) or prob."""
    if method == "wo_DKN":
        return scores["prob"].to_numpy(np.float64)
    values = scores["dkn_score"].to_numpy(np.float64).copy()
    finite = np.isfinite(values)
    floor = values[finite].min() - 1.0 if finite.any() else 0.0
    values[~finite] = floor
    return values


def _auroc(labels: np.ndarray, values: np.ndarray) -> float:
    if len(np.unique(labels)) < 2:
        return math.nan
    return float(roc_auc_score(labels, values))


def _prf(labels: np.ndarray, judged: np.ndarray, positive: int) -> tuple[float, float, float]:
    if len(labels) == 0:
        return 0.0, 0.0, 0.0
    p, r, f, _ = precision_recall_fscore_support(
        labels, judged.astype(np.int64), labels=[positive], average=None, zero_division=0)
    return float(p[0]), float(r[0]), float(f[0])


def _method_metrics(scores: pd.DataFrame, method: str, threshold: float | None) -> dict:
    labels = scores["label"].to_numpy(np.int64)
    judged = _judged_correct(scores, method, threshold).astype(np.int64)
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
        "threshold": (None if method == "wo_DKN"
                      else (math.nan if threshold is None else float(threshold))),
    }


def fact_check_metrics(scores: pd.DataFrame, threshold: float | None) -> dict:
    """Metrics of both methods on ``scores`` (from :func:`dkn_scores`) at λ = ``threshold``.

    Returns ``{"wo_DKN": {...}, "with_DKN": {...}}``; each holds precision, recall, f1, auroc
    (class "statement is correct"), precision_wrong, recall_wrong, f1_wrong, auroc_wrong
    (class "statement is wrong"), n_true, n_wrong (candidates), n_facts, n_no_dkn
    (candidates of relations without DKN; the same count under both methods, but only
    with_DKN judges them not correct because of it), n_abstained (the candidates a method
    judged not correct for want of DKN: n_no_dkn for with_DKN, 0 for wo_DKN), n_relations,
    n_relations_no_dkn and threshold (λ for with_DKN, None for wo_DKN, which judges by ``predicted``).
    """
    return {method: _method_metrics(scores, method, threshold) for method in METHODS}


def candidate_thresholds(scores: pd.DataFrame) -> np.ndarray:
    """Midpoints between sorted distinct finite dkn_scores, preceded by ``min - 1``."""
    values = scores["dkn_score"].to_numpy(np.float64)
    distinct = np.unique(values[np.isfinite(values)])
    if len(distinct) == 0:
        return np.empty(0, dtype=np.float64)
    midpoints = distinct[:-1] + (distinct[1:] - distinct[:-1]) / 2.0
    return np.concatenate([[distinct[0] - 1.0], midpoints])


def f1_curve(scores: pd.DataFrame, thresholds: Iterable[float]) -> pd.DataFrame:
    """Precision, recall and F1 of with_DKN at each λ in ``thresholds`` (in the given order).

    Columns ``threshold, tp, fp, fn, precision, recall, f1``; counts over all rows of
    ``scores`` (rows without DKN are never judged correct). Zero divisions give 0.
    """
    thresholds = np.asarray(list(thresholds), dtype=np.float64)
    values = scores["dkn_score"].to_numpy(np.float64)
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
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
        denominator = 2 * tp + fp + fn
        f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
    return pd.DataFrame({"threshold": thresholds, "tp": tp.astype(np.int64),
                         "fp": fp.astype(np.int64), "fn": fn.astype(np.int64),
                         "precision": precision, "recall": recall, "f1": f1})


def choose_threshold(scores: pd.DataFrame) -> float:
    """λ maximising the with_DKN F1 on ``scores``; ties -> the smallest λ; NaN without scores.

    See the module docstring for the candidate thresholds. Only ``scores`` is looked at.
    """
    thresholds = candidate_thresholds(scores)
    if len(thresholds) == 0:
        return math.nan
    curve = f1_curve(scores, thresholds)
    best = curve["f1"].to_numpy()
    # thresholds are ascending, so the first maximum is the smallest λ among the best
    return float(thresholds[int(np.argmax(best))])


def per_relation_metrics(scores: pd.DataFrame, threshold: float | None) -> pd.DataFrame:
    """Precision, recall and F1 (class "correct") of both methods per relation.

    Columns ``relation, method, n`` (candidates), ``precision, recall, f1, has_dkn``; sorted by
    relation, then wo_DKN before with_DKN.
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
    starting with ``[Y]``, which AMIG cannot attribute and the shards leave out): both methods
    are scored without them. Returns ``{"n_facts", "relations"}`` (relations sorted)."""
    if facts is None:
        return {"n_facts": 0, "relations": []}
    missing = facts[~facts["uuid"].isin(set(scores["uuid"]))]
    return {"n_facts": int(missing["uuid"].nunique()),
            "relations": sorted(str(r) for r in set(missing["relation"]))}


def setting_name(threshold: float | str) -> str:
    """How a λ setting is named in the outputs: ``auto`` or the number (``1e-06``)."""
    return "auto" if threshold == "auto" else f"{float(threshold):g}"


def check_facts(evaluation: pd.DataFrame, calibration: pd.DataFrame,
                dkn: Mapping[str, Sequence[tuple[int, int]]], n_layers: int, d_ff: int,
                thresholds: Sequence[float | str] | float | str,
                facts: pd.DataFrame | None = None) -> dict:
    """The whole fact check of one model and language.

    ``evaluation``/``calibration``: attribution records of the evaluation part and of the
    discovery part (only their checked rows are used). ``thresholds``: the λ settings, each a
    number or ``"auto"`` (chosen on the calibration slice with :func:`choose_threshold`).
    ``facts``: the evaluation part's facts, to count those left without records.

    Returns ``{"settings", "dropped", "metrics", "scores", "calibration_scores", "f1_curve",
    "per_relation"}``: ``settings`` a list of ``{"setting", "threshold", "threshold_source"}``
    (source ``auto`` or ``config``); ``dropped`` (:func:`dropped_facts`); ``metrics`` a list
    with one ``{"setting", "threshold", "threshold_source", "population", "metrics"}`` per
    setting and population (:data:`POPULATIONS`; ``metrics`` from
    :func:`fact_check_metrics`, with ``n_facts_dropped`` added); tables: the scores, the F1
    curve over the evaluation scores at the calibration and evaluation candidate thresholds,
    and the per-relation metrics of every setting (column ``setting``).
    """
    if isinstance(thresholds, (str, int, float)):
        thresholds = [thresholds]
    scores = dkn_scores(evaluation, dkn, n_layers, d_ff)
    calibration_scores = dkn_scores(calibration, dkn, n_layers, d_ff)
    dropped = dropped_facts(facts, scores)
    settings, metrics, per_relation = [], [], []
    for threshold in thresholds:
        if threshold == "auto":
            lam, source = choose_threshold(calibration_scores), "auto"
        else:
            lam, source = float(threshold), "config"
        setting = {"setting": setting_name(threshold), "threshold": lam,
                   "threshold_source": source}
        settings.append(setting)
        for name in POPULATIONS:
            found = fact_check_metrics(population(scores, name), lam)
            for entry in found.values():
                entry["n_facts_dropped"] = dropped["n_facts"]
            metrics.append({**setting, "population": name, "metrics": found})
        per_relation.append(per_relation_metrics(scores, lam).assign(setting=setting["setting"]))
    grid = np.unique(np.concatenate([candidate_thresholds(calibration_scores),
                                     candidate_thresholds(scores)]))
    return {"settings": settings, "dropped": dropped, "metrics": metrics, "scores": scores,
            "calibration_scores": calibration_scores, "f1_curve": f1_curve(scores, grid),
            "per_relation": pd.concat(per_relation, ignore_index=True)}
