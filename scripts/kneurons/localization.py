"""Are they knowledge neurons? The localization evaluation: deletion curves at equal k, matched
controls, KN erased and enhanced, AMIG vs IG vs gradient x input vs activation.

The check of Dai et al. (2022) (and of the authors' ``main_garns.py`` suppress/enhance step and
their ``ablation_wo_sig.py`` "without SIG", i.e. plain-IG, ablation), built so that it can fail:
every method is compared with the others at the same number of neurons and with a control
matched on what makes erasing a neuron matter at all, its activation.

**Sample** (:func:`sample_facts`). Discovery facts whose true-object record is in the run's
attribution shards and converged (:func:`kneurons.records.converged`) and that AMIG can
attribute (a query token to replace: :func:`kneurons.shards.attributable`), ranked by
sha256("localization-sample", seed, uuid), the first ``sample``. The facts left out for a
record that did not converge are counted (:func:`sample_counts`; in the table's ``attrs``).

**Rankings**, per fact, of every FFN neuron (the first ``depth`` = max(max k, ``max_kn``)):

* ``amig``, ``ig``: the attribution scores, best first. The run's method: the record's stored
  best neurons (``top_layers``/``top_neurons``); the other method: the sample only is
  attributed again with the run's steps and quadrature (the one extra attribution).
* ``gxi``: gradient x input, a_l * dP/da_l at the object position(s)
  (:func:`kneurons.attribution.gradient_x_input`: one forward and one backward), a method-free
  attribution (no baseline, no path).
* ``activation``: |a| at the object position(s) (mean over the object's tokens), no
  attribution at all.

**Neuron sets** (:func:`neuron_sets`): ``top``: a ranking's first k, for k in ``deletion_k``
(1, 2, 4, 8, 16: the deletion curve); ``matched``: its control, per neuron of the ranking a
neuron of the same layer drawn uniformly among the ``control_pool`` neurons of that layer
nearest to it in |a| (the fact's own activation at the object position), outside the ranking's
first ``depth`` neurons, without repeats, seeded per fact and ranking
(:func:`matched_controls`); the first k of the list. ``kn`` (``amig``, ``ig``): the workflow's
one KN rule (score above ``kn_threshold`` x the maximum, at most ``max_kn``, best first),
which is a prefix of the ranking; ``kn_matched``: the same prefix of the matched list. Rows of
curve sets carry their ``k``, rows of KN sets ``k = 0`` (their size is ``n_neurons``).

Why matched: most FFN activations at a position are near zero, so erasing neurons of the same
layers drawn uniformly changes nothing whatever any method picked; a control matched on |a|
takes neurons that are as "loud" as the method's, and asks whether the method's choice among
them matters.

**Interventions** (:mod:`kneurons.scoring`): ``erase`` (activation x 0) and, for KN sets,
``enhance`` (x ``enhance_factor``) at the object position(s) of the query being scored.
**Targets**: the fact itself (``fact``); ``n_related`` other *sampled* facts of its relation
(``related``; sampled so that their own KN are known: erasing fact u's KN on fact v's query
is compared with erasing v's own KN, the specificity test) and ``n_unrelated`` discovery facts
of other relations (``unrelated``), each seeded per fact. Curves are scored on the fact, KN
sets on every target. Measured per row: P(true object) and top-1 before and after, the
relative change (after - before) / before.

**Completeness** per fact and attribution method: the records' convergence error
(:func:`kneurons.records.completeness_error` on :func:`kneurons.shards.check_layers`): the
run's method's is its record's, the other method's is computed the same way. ``gxi_cosine``:
the cosine between the method's full score matrix and gradient x input (NaN where the run's
record keeps no matrix). **Zero-baseline IG on Gemma** is not noise: Gemma normalises the FFN
output with an RMSNorm, so P(alpha a) is the same for every alpha > 0, the gradient at alpha a
is the gradient at a divided by alpha, and every IG score is exactly the gradient x input
score times (1/m) sum_k 1/alpha_k (m nodes alpha_k); by Euler's theorem (P is homogeneous of
degree 0 in a) the scores of a layer sum to 0, while P(a) - P(0) does not, hence a
completeness error of 1. IG's ranking there *is* gradient x input's (cosine 1).

**Statistics** (model-free; :mod:`kneurons.statistics`): per cell (method, set, k, operation,
target) one value per fact (the mean over its target rows), n facts, the median with a 95%
bootstrap interval over facts (:func:`cell_statistics`). Paired tests by fact
(:func:`paired_tests`): every pair of rankings at each k, every ranking against its matched
control at each k, every KN set against its matched control (each operation and target), and
the specificity test; two-sided Wilcoxon signed-rank tests (:func:`wilcoxon_paired`) with the
median difference and its bootstrap interval; :func:`holm_table` corrects the p-values of a
whole table (every model and language of a report) with Holm's method.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import TextIO

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from . import scoring
from .attribution import METHODS, attribute, gradient_x_input, probability_gap
from .checkpoint import open_checkpoint
from .hooks import capture_ffn
from .models import LanguageModel
from .neurons import Neuron, knowledge_neurons, knowledge_neurons_of, seeded_rank, seeded_rng
from .neurons import top_neurons
from .queries import EncodedQuery, encode_query, pad_queries
from .records import completeness_error, converged, neuron_scores
from .shards import attributable, check_layers
from .statistics import bootstrap, holm

log = logging.getLogger(__name__)

ATTRIBUTIONS = ("amig", "ig")
RANKINGS = ("amig", "ig", "gxi", "activation")
NEURON_SETS = ("top", "matched", "kn", "kn_matched")
OPERATIONS = ("erase", "enhance")
TARGETS = ("fact", "related", "unrelated")
DELETION_K = (1, 2, 4, 8, 16)
CONTROL_POOL = 10
VERSION = 2
"""The row format and protocol of :func:`localize` (1: KN with uniform same-layer controls)."""
ROW_COLUMNS = ["uuid", "relation", "method", "neuron_set", "k", "operation", "factor",
               "target", "target_uuid", "target_relation", "n_neurons", "layers", "neurons",
               "mean_magnitude", "p_before", "p_after", "top1_before", "top1_after",
               "rel_change", "completeness_error", "gxi_cosine"]
"""Columns of :func:`localize`'s table: one row per (fact, ranking, set, k, operation, target
query). ``k``: the curve's set size (0 for KN sets); ``factor``: the activation multiplier
(0 = erase); ``layers``/``neurons``: the set; ``mean_magnitude``: mean |a| of the set at the
fact's object position(s); ``p_*`` = P(true object of the target query), mean over its
tokens; ``completeness_error``, ``gxi_cosine``: the fact's, for ``amig``/``ig`` (NaN
otherwise)."""
CELL_KEYS = ["method", "neuron_set", "k", "operation", "target"]
STATS_COLUMNS = CELL_KEYS + ["n_facts", "n_rows", "mean_neurons", "mean_magnitude",
                             "median_rel_change", "median_low", "median_high",
                             "mean_rel_change", "share_halved", "top1_before", "top1_after"]
PAIRED_COLUMNS = ["comparison", "a", "b", "neuron_set", "k", "operation", "target", "n_pairs",
                  "n_nonzero", "median_a", "median_b", "median_difference", "difference_low",
                  "difference_high", "statistic", "p_value", "note"]
ALPHA = 0.05
MIN_NONZERO = 6
"""Fewer non-zero paired differences cannot give a two-sided Wilcoxon p below 0.05."""


# ---- the sample, the sets (model-free) --------------------------------------------------------

def sample_counts(facts: pd.DataFrame, records: pd.DataFrame,
                  usable: pd.Series | None = None) -> tuple[list[str], dict[str, int]]:
    """The eligible uuids (sorted) and the counts: ``n_facts``, ``n_without_record`` (no
    true-object record), ``n_not_attributable`` (AMIG cannot attribute them),
    ``n_not_converged`` (their record did not converge: left out), ``n_eligible``."""
    facts = facts.drop_duplicates("uuid")
    true = records[records["candidate"] == "true"]
    with_record = set(true["uuid"])
    ok = set(true.loc[converged(true).to_numpy(bool), "uuid"])
    can = (set(facts["uuid"]) if usable is None else
           set(facts.loc[usable.reindex(facts.index).fillna(False).to_numpy(bool), "uuid"]))
    uuids = set(facts["uuid"])
    eligible = sorted(uuids & with_record & can & ok)
    counts = dict(n_facts=len(uuids), n_without_record=len(uuids - with_record),
                  n_not_attributable=len((uuids & with_record) - can),
                  n_not_converged=len((uuids & with_record & can) - ok),
                  n_eligible=len(eligible))
    return eligible, counts


def sample_facts(facts: pd.DataFrame, records: pd.DataFrame, n: int, seed: int,
                 usable: pd.Series | None = None) -> list[str]:
    """The sampled uuids, best-ranked first (see the module docstring)."""
    eligible, _ = sample_counts(facts, records, usable)
    return sorted(eligible, key=lambda u: seeded_rank("localization-sample", seed, u))[:n]


def target_facts(uuid: str, relation_of: dict[str, str], n_related: int, n_unrelated: int,
                 seed: int, related_pool: Sequence[str] | None = None
                 ) -> tuple[list[str], list[str]]:
    """(related, unrelated): other facts of ``uuid``'s relation (among ``related_pool``, the
    sample, when given) and facts of other relations, each ranked by sha256(purpose, seed,
    uuid, v)."""
    relation = relation_of[uuid]
    pool = relation_of if related_pool is None else set(related_pool)
    same = [v for v in pool if relation_of.get(v) == relation and v != uuid]
    other = [v for v, r in relation_of.items() if r != relation]
    related = sorted(same, key=lambda v: seeded_rank("localization-related", seed, uuid, v))
    unrelated = sorted(other, key=lambda v: seeded_rank("localization-unrelated", seed, uuid, v))
    return related[:n_related], unrelated[:n_unrelated]


def ranking(scores: np.ndarray, depth: int) -> list[Neuron]:
    """The ``depth`` best neurons of a [n_layers, d_ff] score matrix, best first (ties by
    index), the order of the KN rule."""
    layers, neurons, _ = top_neurons(np.asarray(scores, dtype=np.float32), depth)
    return [(int(a), int(b)) for a, b in zip(layers, neurons)]


def matched_controls(neurons: Sequence[Neuron], magnitude: np.ndarray, pool: int,
                     rng: np.random.Generator) -> list[Neuron]:
    """Per neuron of ``neurons``, a neuron of the same layer drawn uniformly among the
    ``pool`` neurons of that layer nearest to it in ``magnitude`` [n_layers, d_ff] (ties by
    index), none of ``neurons`` and none drawn before."""
    magnitude = np.asarray(magnitude, dtype=np.float64)
    free = np.ones(magnitude.shape, dtype=bool)
    for layer, j in neurons:
        free[int(layer), int(j)] = False
    out = []
    for layer, j in neurons:
        layer = int(layer)
        candidates = np.flatnonzero(free[layer])
        if candidates.size == 0:
            raise ValueError(f"no free neuron left in layer {layer}")
        distance = np.abs(magnitude[layer, candidates] - magnitude[layer, int(j)])
        nearest = candidates[np.lexsort((candidates, distance))[:max(1, int(pool))]]
        pick = int(nearest[rng.integers(nearest.size)])
        free[layer, pick] = False
        out.append((layer, pick))
    return out


def neuron_sets(rankings: dict[str, Sequence[Neuron]], kn: dict[str, Sequence[Neuron]],
                magnitude: np.ndarray, ks: Sequence[int], pool: int, seed: int, uuid: str
                ) -> dict[tuple[str, str, int], list[Neuron]]:
    """{(ranking, set, k): neurons}: ``top``/``matched`` for each k of ``ks`` that the
    ranking is long enough for, and ``kn``/``kn_matched`` (k = 0) for the rankings of ``kn``,
    whose KN must be a prefix of the ranking. ``magnitude`` [n_layers, d_ff]: the fact's |a|."""
    sets = {}
    for method, order in rankings.items():
        order = [(int(a), int(b)) for a, b in order]
        matched = matched_controls(order, magnitude, pool,
                                   seeded_rng("localization-matched", seed, uuid, method))
        for k in ks:
            if k <= len(order):
                sets[(method, "top", int(k))] = order[:k]
                sets[(method, "matched", int(k))] = matched[:k]
        if method in kn:
            mine = [(int(a), int(b)) for a, b in kn[method]]
            if mine != order[:len(mine)]:
                raise ValueError(f"{uuid}: the {method} KN are not the first neurons of its "
                                 "ranking (a record's stored list shorter than max_kn?)")
            sets[(method, "kn", 0)] = mine
            sets[(method, "kn_matched", 0)] = matched[:len(mine)]
    return sets


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two arrays (flattened); NaN when either is 0 or not finite."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    if not (np.isfinite(norm) and norm > 0):
        return np.nan
    return float(a @ b / norm)


# ---- statistics (model-free) ------------------------------------------------------------------

def relative_change(before, after) -> np.ndarray:
    """(after - before) / before, NaN where before is not positive."""
    before = np.asarray(before, dtype=np.float64)
    after = np.asarray(after, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(before > 0, (after - before) / before, np.nan)


def spread(values) -> dict[str, float]:
    """median, q1, q3, iqr (numpy linear interpolation), mean of the finite values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return dict(median=np.nan, q1=np.nan, q3=np.nan, iqr=np.nan, mean=np.nan)
    q1, med, q3 = np.quantile(v, [0.25, 0.5, 0.75])
    return dict(median=float(med), q1=float(q1), q3=float(q3), iqr=float(q3 - q1),
                mean=float(v.mean()))


def _nanmedian(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else np.nan


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    orders = {"comparison": ("methods", "control", "specificity"), "method": RANKINGS,
              "a": RANKINGS, "neuron_set": NEURON_SETS, "operation": OPERATIONS,
              "target": TARGETS}
    if table.empty:
        return table.reset_index(drop=True)
    cols = [c for c in orders if c in table]
    keys = table.assign(**{f"_{c}": table[c].map({v: i for i, v in enumerate(orders[c])})
                           for c in cols})
    by = [f"_{c}" for c in cols] + (["k"] if "k" in table else [])
    return (keys.sort_values(by, kind="stable").drop(columns=[f"_{c}" for c in cols])
            .reset_index(drop=True))


def per_fact(rows: pd.DataFrame) -> pd.DataFrame:
    """One value per (fact, cell): the means over the fact's rows of the cell (its target
    queries) of rel_change (finite ones), of halved (after < before / 2), top-1 before and
    after, set size and |a|; ``n_rows``."""
    if rows.empty:
        return pd.DataFrame(columns=["uuid"] + CELL_KEYS + ["rel_change", "halved",
                                                            "top1_before", "top1_after",
                                                            "n_neurons", "mean_magnitude",
                                                            "n_rows"])
    work = rows.assign(halved=(rows["p_after"] < 0.5 * rows["p_before"]).astype(float),
                       top1_before=rows["top1_before"].astype(float),
                       top1_after=rows["top1_after"].astype(float),
                       n_neurons=rows["n_neurons"].astype(float))
    grouped = work.groupby(["uuid"] + CELL_KEYS, sort=False)
    out = grouped[["rel_change", "halved", "top1_before", "top1_after", "n_neurons",
                   "mean_magnitude"]].mean()  # pandas means skip NaN
    out["n_rows"] = grouped.size()
    return out.reset_index()


def cell_statistics(rows: pd.DataFrame, *, seed: int = 0, n_boot: int | None = None
                    ) -> pd.DataFrame:
    """STATS_COLUMNS per cell (CELL_KEYS), over facts: n facts (with a finite change), rows,
    mean set size and |a|, the median of the per-fact changes with its 95% bootstrap interval
    over facts, their mean, the mean share halved and top-1 before/after."""
    facts = per_fact(rows)
    out = []
    options = {} if n_boot is None else dict(n_boot=n_boot)
    for key, group in facts.groupby(CELL_KEYS, sort=False):
        values = group["rel_change"].to_numpy(float)
        finite = values[np.isfinite(values)]
        if finite.size:
            ci = bootstrap(lambda idx: {"median": _nanmedian(finite[idx])},
                           np.arange(finite.size), seed=seed, **options)["median"]
            low, high = ci.low, ci.high
        else:
            low = high = np.nan
        out.append(dict(zip(CELL_KEYS, key), n_facts=int(finite.size),
                        n_rows=int(group["n_rows"].sum()),
                        mean_neurons=float(group["n_neurons"].mean()),
                        mean_magnitude=float(group["mean_magnitude"].mean()),
                        median_rel_change=_nanmedian(values), median_low=low, median_high=high,
                        mean_rel_change=float(finite.mean()) if finite.size else np.nan,
                        share_halved=float(group["halved"].mean()),
                        top1_before=float(group["top1_before"].mean()),
                        top1_after=float(group["top1_after"].mean())))
    return _ordered(pd.DataFrame(out, columns=STATS_COLUMNS))


def wilcoxon_paired(a, b) -> dict:
    """Wilcoxon signed-rank test of a - b (two-sided; zero differences dropped). Never
    raises: too few non-zero differences give p NaN and a note saying so."""
    from scipy.stats import wilcoxon

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    d = d[np.isfinite(d)]
    nonzero = d[d != 0]
    out = dict(n_pairs=int(d.size), n_nonzero=int(nonzero.size),
               median_difference=float(np.median(d)) if d.size else np.nan,
               statistic=np.nan, p_value=np.nan, note="")
    if nonzero.size == 0:
        out["note"] = "no pairs" if d.size == 0 else "every difference is zero: not tested"
        return out
    notes = []
    if nonzero.size < d.size:
        notes.append(f"{d.size - nonzero.size} zero differences dropped")
    if nonzero.size < MIN_NONZERO:
        notes.append(f"only {nonzero.size} non-zero differences: p cannot fall below 0.05")
    ties = len(np.unique(np.abs(nonzero))) < nonzero.size
    exact = not ties and nonzero.size <= 50
    if not exact:
        notes.append("normal approximation" + (" (tied ranks)" if ties else ""))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = wilcoxon(nonzero, zero_method="wilcox", alternative="two-sided",
                       method="exact" if exact else "asymptotic")
    out.update(statistic=float(res.statistic), p_value=float(res.pvalue),
               note="; ".join(notes))
    return out


def paired_test(a: pd.Series, b: pd.Series, *, seed: int = 0, n_boot: int | None = None
                ) -> dict:
    """Per-fact values ``a``, ``b`` (Series indexed by fact) paired over the facts both have
    (finite): Wilcoxon (:func:`wilcoxon_paired`), the medians and the median difference
    a - b with its 95% bootstrap interval over facts."""
    both = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
    x, y = both["a"].to_numpy(float), both["b"].to_numpy(float)
    test = wilcoxon_paired(x, y)
    low = high = np.nan
    if len(both):
        d = x - y
        options = {} if n_boot is None else dict(n_boot=n_boot)
        ci = bootstrap(lambda idx: {"d": float(np.median(d[idx]))}, np.arange(len(d)),
                       seed=seed, **options)["d"]
        low, high = ci.low, ci.high
    return dict(median_a=float(np.median(x)) if len(x) else np.nan,
                median_b=float(np.median(y)) if len(y) else np.nan,
                difference_low=low, difference_high=high, **test)


def paired_tests(rows: pd.DataFrame, *, seed: int = 0, n_boot: int | None = None
                 ) -> pd.DataFrame:
    """PAIRED_COLUMNS: every comparison of the table, paired by fact (see the module
    docstring), uncorrected p-values (:func:`holm_table` corrects a whole table).

    ``methods``: a's top-k against b's, erased on the fact, for every pair of rankings and k;
    ``control``: a ranking's top-k (or KN) against its matched control (b = ``matched``);
    ``specificity``: erasing fact u's KN on the query of a related (sampled) fact v (a =
    ``other KN``), against erasing v's own KN (b = ``own KN``), per u the mean over its v."""
    facts = per_fact(rows)
    value = facts.set_index(["uuid"] + CELL_KEYS)["rel_change"]
    cells = set(facts[CELL_KEYS].itertuples(index=False, name=None))

    def series(method, neuron_set, k, operation, target):
        if (method, neuron_set, k, operation, target) not in cells:
            return None
        return value.xs((method, neuron_set, k, operation, target),
                        level=CELL_KEYS).rename(None)

    out = []
    ks = sorted({int(k) for k in facts["k"] if k > 0})
    present = [m for m in RANKINGS if m in set(facts["method"])]
    for k in ks:
        for i, a in enumerate(present):
            for b in present[i + 1:]:
                x, y = (series(a, "top", k, "erase", "fact"), series(b, "top", k, "erase", "fact"))
                if x is not None and y is not None:
                    out.append(dict(comparison="methods", a=a, b=b, neuron_set="top", k=k,
                                    operation="erase", target="fact",
                                    **paired_test(x, y, seed=seed, n_boot=n_boot)))
    for a in present:
        for k in ks:
            x, y = series(a, "top", k, "erase", "fact"), series(a, "matched", k, "erase", "fact")
            if x is not None and y is not None:
                out.append(dict(comparison="control", a=a, b="matched", neuron_set="top", k=k,
                                operation="erase", target="fact",
                                **paired_test(x, y, seed=seed, n_boot=n_boot)))
        for op in OPERATIONS:
            for target in TARGETS:
                x, y = series(a, "kn", 0, op, target), series(a, "kn_matched", 0, op, target)
                if x is not None and y is not None:
                    out.append(dict(comparison="control", a=a, b="matched", neuron_set="kn",
                                    k=0, operation=op, target=target,
                                    **paired_test(x, y, seed=seed, n_boot=n_boot)))
    for method in present:
        own, other = specificity_pairs(rows, method)
        if len(own):
            out.append(dict(comparison="specificity", a=method, b="own KN", neuron_set="kn",
                            k=0, operation="erase", target="related",
                            **paired_test(other, own, seed=seed, n_boot=n_boot)))
    table = pd.DataFrame(out, columns=PAIRED_COLUMNS)
    return _ordered(table)


def specificity_pairs(rows: pd.DataFrame, method: str) -> tuple[pd.Series, pd.Series]:
    """(own, other) per fact u, both indexed by u: ``other``, the mean over u's related
    sampled facts v of the relative change of v's P(true) when u's KN (by ``method``) are
    erased on v's query; ``own``, the mean over the same v of the change when v's own KN are
    erased. Only v with both rows count."""
    kn = rows[(rows["method"] == method) & (rows["neuron_set"] == "kn")
              & (rows["operation"] == "erase")]
    own = kn[kn["target"] == "fact"].set_index("uuid")["rel_change"]
    cross = kn[(kn["target"] == "related") & kn["target_uuid"].isin(own.index)]
    if cross.empty:
        empty = pd.Series(dtype=float)
        return empty, empty
    pairs = pd.DataFrame(dict(uuid=cross["uuid"].to_numpy(),
                              other=cross["rel_change"].to_numpy(float),
                              own=own.reindex(cross["target_uuid"]).to_numpy(float)))
    means = pairs.groupby("uuid", sort=False)[["own", "other"]].mean()
    return means["own"], means["other"]


def holm_table(paired: pd.DataFrame, alpha: float = ALPHA) -> pd.DataFrame:
    """``paired`` with ``p_holm`` (Holm's adjustment over every p-value of the table, NaN
    ones not counted), ``significant`` (p_holm < alpha) and the family size ``m``."""
    out = paired.copy()
    p = out["p_value"].to_numpy(float) if len(out) else np.zeros(0)
    out["p_holm"] = holm(p)
    out["significant"] = np.isfinite(out["p_holm"]) & (out["p_holm"] < alpha)
    out["m"] = int(np.isfinite(p).sum())
    return out


def layer_counts(rows: pd.DataFrame, neuron_set: str = "kn") -> pd.DataFrame:
    """Neurons per (method, layer) of ``neuron_set`` over the sampled facts (each fact's set
    counted once): columns method, layer, count, facts."""
    sets = rows[rows["neuron_set"] == neuron_set].drop_duplicates(["uuid", "method"])
    out = []
    for method, group in sets.groupby("method", sort=True):
        layers = [int(x) for ls in group["layers"] for x in ls]
        counts = pd.Series(layers, dtype=np.int64).value_counts().sort_index()
        out += [dict(method=method, layer=int(layer), count=int(c), facts=int(len(group)))
                for layer, c in counts.items()]
    return pd.DataFrame(out, columns=["method", "layer", "count", "facts"])


def completeness_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per attribution method: facts, facts with a known error, median and IQR of the
    completeness error, the share above the records' tolerance, median cosine with
    gradient x input."""
    from .records import COMPLETENESS_TOLERANCE

    per = rows[rows["method"].isin(ATTRIBUTIONS)].drop_duplicates(["uuid", "method"])
    out = []
    for method, group in per.groupby("method", sort=True):
        err = group["completeness_error"].to_numpy(float)
        s = spread(err)
        known = np.isfinite(err)
        out.append(dict(method=method, n_facts=int(len(group)), n_known=int(known.sum()),
                        median_error=s["median"], iqr_error=s["iqr"],
                        share_above_tolerance=float(np.mean(err[known] > COMPLETENESS_TOLERANCE))
                        if known.any() else np.nan,
                        median_gxi_cosine=spread(group["gxi_cosine"])["median"],
                        n_cosine=int(group["gxi_cosine"].notna().sum())))
    return pd.DataFrame(out, columns=["method", "n_facts", "n_known", "median_error",
                                      "iqr_error", "share_above_tolerance",
                                      "median_gxi_cosine", "n_cosine"])


# ---- the model ---------------------------------------------------------------------------------

def object_magnitude(lm: LanguageModel, queries: Sequence[EncodedQuery]) -> list[np.ndarray]:
    """|a| [n_layers, d_ff] of the unpatched model at each query's object positions (mean
    over them), one padded forward for all queries."""
    if not queries:
        return []
    ids, mask = pad_queries(lm, queries)  # [B, S]
    with torch.inference_mode(), capture_ffn(lm) as acts:
        lm.model.base_model(input_ids=ids, attention_mask=mask)
    out = []
    for b, q in enumerate(queries):
        pos = torch.as_tensor(q.target_positions, device=lm.device)
        out.append(torch.stack([acts[layer][b, pos].float().abs().mean(0)
                                for layer in range(lm.n_layers)]).cpu().numpy())
    return out


def _rows(fact: str, relation: str, sets: dict, magnitude: np.ndarray,
          targets: list[tuple[str, str, str]], enhance_factor: float, complete: dict,
          cosines: dict) -> list[tuple[dict, str, scoring.Intervention]]:
    """(row without scores, target uuid, intervention) of one fact: curves on the fact, KN
    sets (erase and enhance) on every target."""
    planned = []
    for (method, name, k), neurons in sets.items():
        ops = [("erase", 0.0, scoring.erase(neurons))]
        if k == 0:
            ops.append(("enhance", enhance_factor, scoring.enhance(neurons, enhance_factor)))
        mean_mag = (float(np.mean([magnitude[a, b] for a, b in neurons])) if neurons
                    else np.nan)
        for op, factor, intervention in ops:
            for group, uuid, rel in (targets if k == 0 else targets[:1]):
                planned.append((dict(uuid=fact, relation=relation, method=method,
                                     neuron_set=name, k=int(k), operation=op, factor=factor,
                                     target=group, target_uuid=uuid, target_relation=rel,
                                     n_neurons=len(neurons), layers=[n[0] for n in neurons],
                                     neurons=[n[1] for n in neurons], mean_magnitude=mean_mag,
                                     completeness_error=complete.get(method, np.nan),
                                     gxi_cosine=cosines.get(method, np.nan)),
                                uuid, intervention))
    return planned


def _score_plan(lm: LanguageModel, planned: list, encode, batch_rows: int) -> list[dict]:
    """Score every planned row, each distinct (target query, intervention) once, all in
    batched forwards; the unpatched score of each target query once."""
    targets = list(dict.fromkeys(u for _, u, _ in planned))
    keys = list(dict.fromkeys((u, iv) for _, u, iv in planned))
    queries = {u: encode(u) for u in targets}
    todo = [(u, scoring.NONE) for u in targets] + keys
    order = sorted(range(len(todo)), key=lambda i: len(queries[todo[i][0]].input_ids))
    scored = scoring.score(lm, [queries[todo[i][0]] for i in order],
                           [todo[i][1] for i in order], batch_size=batch_rows)
    prob, top1 = {}, {}
    for j, i in enumerate(order):
        key = ("base", todo[i][0]) if i < len(targets) else todo[i]
        prob[key], top1[key] = float(scored.prob[j]), bool(scored.top1[j])
    rows = []
    for row, u, iv in planned:
        p0, p1 = prob[("base", u)], prob[(u, iv)]
        rows.append(dict(row, p_before=p0, p_after=p1, top1_before=top1[("base", u)],
                         top1_after=top1[(u, iv)], rel_change=float(relative_change(p0, p1))))
    return rows


def localize(lm: LanguageModel, facts: pd.DataFrame, records: pd.DataFrame, *,
             run_method: str, kn_threshold: float, max_kn: int, sample: int, n_related: int,
             n_unrelated: int, enhance_factor: float, steps: int, quadrature: str, seed: int,
             deletion_k: Sequence[int] = DELETION_K, control_pool: int = CONTROL_POOL,
             batch_facts: int = 4, batch_rows: int = 32, checkpoint_path=None,
             identity: dict | None = None, progress: TextIO | None = None) -> pd.DataFrame:
    """The localization table (ROW_COLUMNS) of a sample of ``facts`` (one language's discovery
    facts); ``records``: the run's attribution records of these facts by ``run_method``.
    ``table.attrs``: the counts of :func:`sample_counts`.

    Per batch of ``batch_facts`` facts: one attribution with the other method, one gradient
    x input pass, one activation forward, the other method's completeness on the check
    layers, and every scored row of the batch in forwards of ``batch_rows`` rows.
    Resumable: with ``checkpoint_path``, every batch is appended to a
    :class:`~kneurons.checkpoint.Checkpoint` there, and facts already there are skipped."""
    if run_method not in METHODS:
        raise ValueError(f"run_method must be one of {METHODS}, got {run_method!r}")
    other = next(m for m in METHODS if m != run_method)
    ks = sorted({int(k) for k in deletion_k})
    if not ks or ks[0] < 1:
        raise ValueError(f"deletion_k must be positive set sizes, got {list(deletion_k)}")
    depth = max(ks[-1], int(max_kn))
    facts = facts.drop_duplicates("uuid").reset_index(drop=True)
    usable = attributable(lm, facts, "amig")
    eligible, counts = sample_counts(facts, records, usable)
    uuids = sorted(eligible, key=lambda u: seeded_rank("localization-sample", seed, u))[:sample]
    log.info("%d of %d facts sampled (%s); %s from the shards, %s attributed again",
             len(uuids), len(facts), counts, run_method, other)
    by_uuid = facts.set_index("uuid", drop=False)
    relation_of = dict(zip(facts["uuid"], facts["relation"]))
    true = records[records["candidate"] == "true"].drop_duplicates("uuid").set_index("uuid")
    options = dict(run_method=run_method, kn_threshold=kn_threshold, max_kn=max_kn,
                   n_related=n_related, n_unrelated=n_unrelated, enhance_factor=enhance_factor,
                   steps=steps, quadrature=quadrature, seed=seed, deletion_k=ks,
                   control_pool=int(control_pool), identity=identity or {}, version=VERSION)
    columns = [c for c in ("top_layers", "top_neurons", "top_scores", "completeness_error",
                           "converged") if c in true]
    kn_input = true.loc[uuids, columns].map(
        lambda v: np.asarray(v).tolist() if isinstance(v, (list, np.ndarray)) else v
    ).reset_index()
    checkpoint = (open_checkpoint(checkpoint_path, options={**options, "uuids": list(uuids)},
                                  model=identity or None,
                                  tables={"facts": facts, "records": kn_input})
                  if checkpoint_path is not None else None)
    done = checkpoint.load() if checkpoint is not None else None
    finished = set(done["uuid"]) if done is not None else set()
    todo = [u for u in uuids if u not in finished]
    if finished:
        log.info("resuming: %d of %d facts in the checkpoint", len(finished), len(uuids))
    chunks = [done] if done is not None else []
    checked = check_layers(lm.n_layers)
    every_neuron = [(layer, j) for layer in range(lm.n_layers) for j in range(lm.d_ff)]

    def encode(u: str) -> EncodedQuery:
        f = by_uuid.loc[u]
        return encode_query(lm, f.template, f.sub_label, f.obj_label)

    bar = tqdm(total=len(uuids), initial=len(uuids) - len(todo), file=progress,
               desc="localization", mininterval=5.0, unit="fact")
    for begin in range(0, len(todo), batch_facts):
        batch = todo[begin:begin + batch_facts]
        queries = [encode(u) for u in batch]
        fresh = attribute(lm, queries, method=other, steps=steps, quadrature=quadrature)
        gxi = gradient_x_input(lm, queries)
        magnitudes = object_magnitude(lm, queries)
        planned = []
        for u, q, result, g, magnitude in zip(batch, queries, fresh, gxi, magnitudes):
            record = true.loc[u]
            stored = list(zip(record["top_layers"], record["top_neurons"]))[:depth]
            rankings = {run_method: [(int(a), int(b)) for a, b in stored],
                        other: ranking(result.scores, depth), "gxi": ranking(g, depth),
                        "activation": ranking(magnitude, depth)}
            rankings = {m: rankings[m] for m in RANKINGS}
            kn = {run_method: knowledge_neurons_of(record["top_layers"], record["top_neurons"],
                                                   record["top_scores"], kn_threshold, max_kn),
                  other: [(a, b) for a, b, _ in knowledge_neurons(result.scores, kn_threshold,
                                                                  max_kn)]}
            sets = neuron_sets(rankings, {m: kn[m] for m in ATTRIBUTIONS}, magnitude, ks,
                               control_pool, seed, u)
            gap = probability_gap(lm, q, method=other, layers=checked)
            complete = {run_method: float(record.get("completeness_error", np.nan)),
                        other: completeness_error(result.scores[checked], gap[checked])}
            blob = record.get("scores")
            run_scores = (neuron_scores(true.loc[[u]].reset_index(), every_neuron, lm.n_layers,
                                        lm.d_ff)[0].reshape(lm.n_layers, lm.d_ff)
                          if isinstance(blob, (bytes, bytearray)) else None)
            cosines = {other: cosine(result.scores, g),
                       run_method: cosine(run_scores, g) if run_scores is not None else np.nan}
            related, unrelated = target_facts(u, relation_of, n_related, n_unrelated, seed,
                                              related_pool=uuids)
            targets = [("fact", u, relation_of[u])]
            targets += [("related", v, relation_of[v]) for v in related]
            targets += [("unrelated", v, relation_of[v]) for v in unrelated]
            planned += _rows(u, relation_of[u], sets, magnitude, targets, enhance_factor,
                             complete, cosines)
        cache = dict(zip(batch, queries))
        chunk = _table(_score_plan(lm, planned, lambda v: cache.get(v) or encode(v),
                                   batch_rows))
        if checkpoint is not None:
            checkpoint.append(chunk)
        chunks.append(chunk)
        bar.update(len(batch))
    bar.close()
    table = pd.concat(chunks, ignore_index=True) if chunks else _table([])
    order = {u: i for i, u in enumerate(uuids)}
    table = table.sort_values("uuid", key=lambda s: s.map(order), kind="stable")
    table = table.reset_index(drop=True)
    table.attrs = dict(counts, n_sampled=len(uuids))
    return table


def _table(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=ROW_COLUMNS)
    for column in ("factor", "mean_magnitude", "p_before", "p_after", "rel_change",
                   "completeness_error", "gxi_cosine"):
        table[column] = table[column].astype(np.float64)
    for column in ("top1_before", "top1_after"):
        table[column] = table[column].astype(bool)
    for column in ("n_neurons", "k"):
        table[column] = table[column].astype(np.int64)
    return table


def localize_to(lm: LanguageModel, facts: pd.DataFrame, shards: Sequence, output, *,
                run_method: str, **options) -> pd.DataFrame:
    """:func:`localize` of one language with the run's discovery ``shards`` (paths), written
    to ``output`` (parquet, atomically, with the sample counts in its pandas ``attrs``),
    resumably through ``<output>.checkpoint``, which is removed once the output is written."""
    import shutil
    from pathlib import Path

    from .io import write_parquet
    from .records import read_shards

    records, metadata = read_shards(shards)
    if metadata.get("method") != run_method:
        raise ValueError(f"the shards were attributed with {metadata.get('method')!r}, "
                         f"not {run_method!r}")
    folder = Path(str(output) + ".checkpoint")
    table = localize(lm, facts, records, run_method=run_method, checkpoint_path=folder,
                     **options)
    write_parquet(table, output)
    shutil.rmtree(folder, ignore_errors=True)
    return table
