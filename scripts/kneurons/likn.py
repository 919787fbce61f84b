"""Language-independent knowledge neurons (LIKN) and the cross-lingual editing experiment.

Chen et al. (AAAI 2024), first discovery: in a multilingual model the knowledge neurons (KN)
of one fact found with English and with Chinese queries overlap, and an edit through the
shared neurons changes the fact in both languages.

**LIKN** (:func:`language_independent_neurons`, :func:`likn_table`). The KN of a fact in a
language are those of its true-object attribution record, chosen by the workflow's one rule
:func:`kneurons.neurons.knowledge_neurons_of` (score above ``kn_threshold`` x the record's
maximum, at most ``max_kn``, best first); only records whose attribution converged
(:func:`kneurons.records.converged`) are used, and the facts left out for it are counted
(``n_not_converged``). For a fact (uuid) present in several languages and for each *language
group* (every pair of the model's languages, and all of them together when there are more
than two; :func:`language_groups`) its LIKN is the intersection of its KN sets in the group's
languages, in the order of the first language's KN (best first). Per row of the table:
``n_likn`` = |LIKN|; ``share_of_kn`` = the mean over the group's languages l with a non-empty
KN set of |LIKN| / |KN_l| (NaN when every KN set is empty).

**Statistics** (:data:`STATISTICS`), over all facts of a group (``relation == "all"``) and
per relation: the share of facts with a non-empty LIKN, mean |LIKN|, mean ``share_of_kn``, and
(descriptive) mean |KN| over the facts and the group's languages. Each has its 95% interval
from a cluster bootstrap over facts (:func:`kneurons.statistics.bootstrap`).

**Permutation nulls** (:data:`NULLS`; :func:`likn_statistics`): how much of the overlap the
pairing of a fact with *itself* explains. The same statistics are computed with fact u's KN in
the group's first language intersected with fact π_l(u)'s KN in each other language l, π_l
uniformly random permutations (:func:`kneurons.statistics.permutation_null`, seeded from the
run's seed, the group and the null): ``shuffled`` permutes all facts of the group,
``within_relation`` only facts of the same relation (the harder null: a relation's facts
share object-type neurons). π may keep a fact in place (a uniform permutation, not a
derangement), so the observed pairing is one of the pairings the null draws from and the
Monte Carlo p-value (:func:`kneurons.statistics.one_sided_pvalue`, greater) is exact; the
null's mean is therefore the mean over random pairings, in which a fact meets itself with
probability 1/n (1/n_r within a relation of n_r facts). A relation with one fact has only the
identity pairing within its relation (p = 1). |KN| over all facts does not depend on the
pairing and is not tested. Per relation both nulls are read on the relation's facts: with
facts of any relation (``shuffled``) or of its own (``within_relation``).
The LIKN neurons per layer (summed over facts) are counted beside the nulls' mean and 95%
range of the same count.
These nulls replace the single seeded "other fact" pairing of earlier versions (one draw of
a null says nothing about its spread).

**Cross-lingual editing** (:func:`cross_lingual_editing`) on a seeded sample of discovery
facts (:func:`sample_edit_facts`): facts whose LIKN over all the model's languages is not
empty and whose KN of each single language (:func:`one_language_neurons`: KN_l minus the KN
of every other language, best first) has at least k = |LIKN| neurons. Four neuron sets of k
neurons each (:func:`edit_neuron_sets`): ``likn``; ``only_<lang>``: the k best neurons of
that language only; ``random``: per LIKN neuron a uniformly drawn neuron of the same layer
that is in no KN set of the fact (seeded per fact); and ``likn_other``: the k best LIKN
neurons of another fact (:func:`other_fact_likn`, seeded; absent when no other fact has k),
which tells whether it is *this fact's* shared neurons that matter or shared neurons as
such. Two operations, each with every set:

* ``erase`` (Dai et al. 2022's suppression, as :mod:`kneurons.dkn`): the set's activations
  (the input of the FFN output projection) are set to 0 at the object's position(s) of the
  query being scored.
* ``edit`` (Dai et al. 2022, "updating facts", which the authors' code follows): for each
  neuron i of layer l in the set, its *value slot* v_i (the column of the FFN output
  projection that neuron i writes into the residual stream: ``W_out[:, i]`` of an
  ``nn.Linear`` [hidden, d_ff], ``weight[i, :]`` of GPT-2's ``Conv1D`` [d_ff, hidden]) is
  changed to ``v_i - λ1 e(y_true) + λ2 e(y_wrong)``, where e(y) is the output word embedding
  (``get_output_embeddings().weight``, [vocab, hidden]) of the object, the mean over its
  tokens *in the edited language's tokenization* for multi-token objects. Dai et al. use
  λ1 = 1, λ2 = 8. The edit is done in one language (``edit_lang``) and measured in every
  language; the weights are restored exactly afterwards (:func:`edit_value_slots`; the slot
  layout is the architecture registry's, :attr:`kneurons.models.ArchSpec.value_rows`).

Scored in every language (``eval_lang``) before and after each intervention: the fact's true
object (P(true), mean over its tokens as everywhere in kneurons; top-1: every object token is
the argmax at its position, teacher-forced) and its wrong object (the fact's corrupted
object, the edit's target), and, as a locality control, the true objects of
``locality_facts`` discovery facts of *other* relations (seeded per edited fact) under the
same intervention. :func:`edit_summary` averages per (operation, neuron_set, edit_lang,
eval_lang, target), each mean with its n and a 95% cluster-bootstrap interval over the
edited facts (an edited fact's rows, its unrelated facts included, are resampled together).
:func:`edit_tests` compares LIKN with every control set on the same edited facts: the mean
per-fact difference of the change of P(true) (erase and edit) and of P(wrong) (edit: the
edit's target; an erase has none), its interval, and the paired swap test
(:func:`kneurons.statistics.swap_test`, two-sided); the report corrects the p-values of the
whole table with Holm's method.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from . import scoring
from .models import LanguageModel
from .neurons import (Neuron, knowledge_neurons_by_fact, random_neurons_like, seeded_rank,
                      seeded_rng)
from .queries import EncodedQuery, encode_query
from .records import converged
from .statistics import (LEVEL, N_BOOT, N_PERM, bootstrap, one_sided_pvalue,
                         permutation_null, swap_test)

NULLS = ("shuffled", "within_relation")
"""The permutation nulls of the overlap: facts shuffled across languages among all facts of
the group, and among the facts of the same relation."""
STATISTICS = ("share_with_likn", "mean_likn", "likn_share_of_kn", "mean_kn")
"""The LIKN statistics of a set of facts (see the module docstring)."""
TESTED = STATISTICS[:3]
"""The statistics tested against the nulls (mean |KN| is descriptive)."""

OPERATIONS = ("erase", "edit")
ANY_LANGUAGE = "-"
"""``edit_lang`` of erase rows (the suppression does not depend on a language)."""

LIKN_COLUMNS = ["languages", "uuid", "relation", "likn_layers", "likn_neurons", "n_likn",
                "n_kn", "kn_layers", "kn_neurons", "share_of_kn"]
_NULL_PARTS = ("mean", "low", "high")
STATS_COLUMNS = (["languages", "relation", "statistic", "n_facts", "n_not_converged",
                  "estimate", "low", "high", "n_boot", "n_perm"]
                 + [f"{null}_{part}" for null in NULLS for part in _NULL_PARTS + ("p",)])
"""One row per (languages, relation, statistic): the observed value with its bootstrap
interval over facts (``n_boot`` resamples on which it was defined), and per null its mean,
95% range (2.5% and 97.5% quantiles of ``n_perm`` draws) and one-sided p-value
(P(null >= observed)); the null columns are NaN for ``mean_kn``."""
LAYER_COLUMNS = (["languages", "layer", "n_facts", "n_likn", "low", "high"]
                 + [f"{null}_{part}" for null in NULLS for part in _NULL_PARTS])
"""LIKN neurons per layer summed over the ``n_facts`` facts, with its 95% bootstrap interval
over facts, and the same count's mean and 95% range under each null."""
NULL_COLUMNS = ["languages", "null", "draw", *TESTED]
"""The null draws of the tested statistics over all facts (for the report's figure)."""
EDIT_COLUMNS = ["operation", "neuron_set", "edit_lang", "eval_lang", "target", "edited_uuid",
                "uuid", "relation", "n_neurons", "p_true_before", "p_true_after",
                "top1_true_before", "top1_true_after", "p_wrong_before", "p_wrong_after",
                "top1_wrong_before", "top1_wrong_after"]
EDIT_METRICS = ("p_true_before", "p_true_after", "delta_p_true", "rel_change_p_true",
                "top1_true_before", "top1_true_after", "p_wrong_before", "p_wrong_after",
                "delta_p_wrong", "edit_success")
"""The means of :func:`edit_summary`, each with ``_low`` and ``_high`` columns."""
SUMMARY_COLUMNS = (["operation", "neuron_set", "edit_lang", "eval_lang", "target", "n",
                    "n_facts", "mean_neurons"]
                   + [f"{m}{s}" for m in EDIT_METRICS for s in ("", "_low", "_high")])
"""``n``: rows (a fact's unrelated facts are rows of their own); ``n_facts``: edited facts,
the clusters of the bootstrap."""
TEST_MEASURES = {"erase": ("delta_p_true",), "edit": ("delta_p_true", "delta_p_wrong")}
"""What :func:`edit_tests` compares per operation (an erase has no target object)."""
STRONGER = {"delta_p_true": -1, "delta_p_wrong": +1}
"""The sign of (LIKN - control) when the LIKN change is the stronger one."""
TEST_COLUMNS = ["operation", "edit_lang", "eval_lang", "measure", "control", "n_facts",
                "likn", "likn_low", "likn_high", "control_value", "control_value_low",
                "control_value_high", "difference", "difference_low", "difference_high", "p"]
"""One row per paired comparison of :func:`edit_tests`: the means over the ``n_facts``
edited facts that both sets have, LIKN - control, intervals and the two-sided p-value."""


def _seed(*parts) -> int:
    """An integer seed from sha256 of ``parts`` (for the :mod:`kneurons.statistics` calls)."""
    return int.from_bytes(seeded_rank(*parts)[:8], "little")


def _nanmean(values: np.ndarray) -> float:
    """Mean of the finite values; NaN when there are none (without a warning)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else math.nan


# ---- LIKN: sets (model-free) ---------------------------------------------------------------

def language_independent_neurons(kn_sets: Sequence[Iterable[Neuron]]) -> list[Neuron]:
    """The neurons in every one of ``kn_sets``, in the order of the first set (no duplicates)."""
    if not kn_sets:
        return []
    sets = [{(int(a), int(b)) for a, b in s} for s in kn_sets]
    shared = set.intersection(*sets)
    return [n for n in dict.fromkeys((int(a), int(b)) for a, b in kn_sets[0]) if n in shared]


def language_groups(languages: Sequence[str]) -> list[tuple[str, ...]]:
    """Every pair of ``languages`` (in the given order), then all of them when more than two."""
    languages = list(languages)
    groups = list(combinations(languages, 2))
    if len(languages) > 2:
        groups.append(tuple(languages))
    return groups


def share_of_kn(n_likn: int, n_kn: Sequence[int]) -> float:
    """Mean over the languages with a non-empty KN set of |LIKN| / |KN_l| (NaN if none)."""
    shares = [n_likn / n for n in n_kn if n > 0]
    return float(np.mean(shares)) if shares else float("nan")


def _likn_row(languages, uuid, relation, kn_sets) -> dict:
    likn = language_independent_neurons(kn_sets)
    n_kn = [len(s) for s in kn_sets]
    return dict(languages="+".join(languages), uuid=uuid, relation=relation,
                likn_layers=[n[0] for n in likn], likn_neurons=[n[1] for n in likn],
                n_likn=len(likn), n_kn=n_kn,
                kn_layers=[[n[0] for n in s] for s in kn_sets],
                kn_neurons=[[n[1] for n in s] for s in kn_sets],
                share_of_kn=share_of_kn(len(likn), n_kn))


def likn_table(kn: Mapping[str, Mapping[str, Sequence[Neuron]]], relations: Mapping[str, str]
               ) -> pd.DataFrame:
    """The LIKN of every fact, for every language group (LIKN_COLUMNS).

    ``kn[lang][uuid]``: the fact's KN in that language (best first); ``relations[uuid]``: its
    relation. Facts are those present in every language of a group, sorted by uuid;
    ``kn_layers``/``kn_neurons``/``n_kn`` are per language of the group, in its order.
    """
    rows = []
    for group in language_groups(sorted(kn)):
        uuids = sorted(set.intersection(*(set(kn[lang]) for lang in group)))
        rows += [_likn_row(group, uuid, relations[uuid], [kn[lang][uuid] for lang in group])
                 for uuid in uuids]
    return pd.DataFrame(rows, columns=LIKN_COLUMNS)


# ---- LIKN: statistics and permutation nulls (model-free) -----------------------------------

@dataclass(frozen=True)
class CodedSets:
    """The KN sets of one language group's facts, coded for fast intersection under many
    pairings: each neuron gets a code (0..n_codes-1), each language a [n, k] matrix of its
    facts' codes (a row per fact, padded with -1 to the largest set)."""

    uuids: tuple[str, ...]
    """The facts (sorted), index u = 0..n-1."""
    relations: np.ndarray
    """[n] int: index of each fact's relation in ``relation_names``."""
    relation_names: tuple[str, ...]
    codes: tuple[np.ndarray, ...]
    """Per language: [n, k] int32, the codes of each fact's KN (distinct), -1 after them."""
    n_kn: np.ndarray
    """[n_languages, n] |KN| of each fact in each language."""
    layer_of_code: np.ndarray
    """[n_codes] the layer of each neuron code."""
    n_layers: int


def coded_sets(kn_sets: Sequence[Mapping[str, Sequence[Neuron]]], uuids: Sequence[str],
               relations: Mapping[str, str]) -> CodedSets:
    """:class:`CodedSets` of ``uuids`` from one map uuid -> KN per language of the group."""
    uuids = tuple(sorted(uuids))
    code: dict[Neuron, int] = {}
    matrices, n_kn = [], []
    for by_uuid in kn_sets:
        rows = [[code.setdefault(neuron, len(code))
                 for neuron in dict.fromkeys((int(a), int(b)) for a, b in by_uuid[uuid])]
                for uuid in uuids]
        sizes = [len(row) for row in rows]
        matrix = np.full((len(uuids), max(sizes, default=0)), -1, dtype=np.int32)
        for u, row in enumerate(rows):
            matrix[u, :len(row)] = row
        matrices.append(matrix)
        n_kn.append(sizes)
    names = tuple(sorted({relations[u] for u in uuids}))
    index = {name: i for i, name in enumerate(names)}
    layer_of_code = np.asarray([layer for layer, _ in code], dtype=np.int64)
    return CodedSets(uuids, np.asarray([index[relations[u]] for u in uuids], dtype=np.int64),
                     names, tuple(matrices),
                     np.asarray(n_kn, dtype=np.int64).reshape(len(kn_sets), len(uuids)),
                     layer_of_code, int(layer_of_code.max()) + 1 if len(code) else 0)


def shared_mask(sets: CodedSets, partners: Sequence[np.ndarray]) -> np.ndarray:
    """[n, k] bool: which of fact u's KN codes in the first language are in the KN of fact
    ``partners[l-1][u]`` in every other language l (each ``partners`` entry a permutation of
    0..n-1; the identity is the real pairing). One vectorised comparison per column of the
    other language's matrix (KN sets are small: at most ``max_kn``)."""
    first = sets.codes[0]
    shared = first >= 0  # the padding (-1) is never shared
    for matrix, partner in zip(sets.codes[1:], partners):
        other = matrix[partner]  # [n, k_l]: the partner's codes
        hit = np.zeros_like(shared)
        for column in range(other.shape[1]):
            hit |= first == other[:, column:column + 1]
        shared &= hit
    return shared


def pairing_overlap(sets: CodedSets, partners: Sequence[np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The overlap when fact u's KN in the first language meets fact ``partners[l-1][u]``'s
    KN in language l (:func:`shared_mask`). Returns |LIKN| [n], the paired |KN|
    [n_languages, n] and the LIKN neurons per layer summed over facts [n_layers]."""
    shared = shared_mask(sets, partners)
    n_kn = np.vstack([sets.n_kn[0]] + [sizes[partner] for sizes, partner
                                       in zip(sets.n_kn[1:], partners)])
    layers = np.bincount(sets.layer_of_code[sets.codes[0][shared]], minlength=sets.n_layers)
    return shared.sum(axis=1), n_kn, layers


def shares_of_kn(n_likn: np.ndarray, n_kn: np.ndarray) -> np.ndarray:
    """:func:`share_of_kn` of every fact: |LIKN| [n], |KN| [n_languages, n] -> [n]."""
    valid = n_kn > 0
    ratio = np.where(valid, n_likn / np.where(valid, n_kn, 1), 0.0).sum(axis=0)
    count = valid.sum(axis=0)
    return np.where(count > 0, ratio / np.maximum(count, 1), np.nan)


def group_statistics(n_likn: np.ndarray, n_kn: np.ndarray, groups: np.ndarray,
                     n_groups: int) -> np.ndarray:
    """[n_groups, len(STATISTICS)]: the statistics of the facts of each group (``groups``:
    [n] each fact's group index); NaN for a group without facts (or without a defined
    share)."""
    groups = np.asarray(groups, dtype=np.int64)
    share = shares_of_kn(n_likn, n_kn)
    ok = np.isfinite(share)

    def mean(weights, where=None):
        g = groups if where is None else groups[where]
        w = weights if where is None else weights[where]
        total = np.bincount(g, weights=w, minlength=n_groups)
        size = np.bincount(g, minlength=n_groups)
        return np.where(size > 0, total / np.maximum(size, 1), np.nan)

    return np.column_stack([mean((n_likn > 0).astype(float)), mean(n_likn.astype(float)),
                            mean(share, ok), mean(n_kn.mean(axis=0))])


def within_groups_permutation(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation of 0..n-1 that maps each index to one of the same
    group (``groups``: [n] labels)."""
    groups = np.asarray(groups)
    base = np.argsort(groups, kind="stable")
    shuffled = np.lexsort((rng.random(len(groups)), groups))
    partner = np.empty(len(groups), dtype=np.int64)
    partner[base] = shuffled
    return partner


def _draw(sets: CodedSets, null: str, rng: np.random.Generator) -> np.ndarray:
    """One null draw: the statistics of all facts then of each relation (flattened), then the
    per-layer counts."""
    n, n_lang = len(sets.uuids), len(sets.codes)
    if null == "shuffled":
        partners = [rng.permutation(n) for _ in range(n_lang - 1)]
    elif null == "within_relation":
        partners = [within_groups_permutation(sets.relations, rng) for _ in range(n_lang - 1)]
    else:
        raise ValueError(f"unknown null {null!r}; expected one of {NULLS}")
    return _pairing_vector(sets, partners)


def _pairing_vector(sets: CodedSets, partners) -> np.ndarray:
    n_likn, n_kn, layers = pairing_overlap(sets, partners)
    overall = group_statistics(n_likn, n_kn, np.zeros(len(n_likn), np.int64), 1)
    per_relation = group_statistics(n_likn, n_kn, sets.relations, len(sets.relation_names))
    return np.concatenate([overall.ravel(), per_relation.ravel(), layers.astype(float)])


def _quantiles(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and central 95% range of the finite values (NaN when none)."""
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan, math.nan
    low, high = np.quantile(values, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return float(values.mean()), float(low), float(high)


class LiknStatistics(NamedTuple):
    """The outputs of :func:`likn_statistics` and :func:`find_likn`."""

    stats: pd.DataFrame
    """STATS_COLUMNS."""
    layers: pd.DataFrame
    """LAYER_COLUMNS."""
    null: pd.DataFrame
    """NULL_COLUMNS."""


def likn_statistics(table: pd.DataFrame, seed: int, *, not_converged: Mapping | None = None,
                    n_perm: int = N_PERM, n_boot: int = N_BOOT) -> LiknStatistics:
    """The statistics of a :func:`likn_table` against both permutation nulls, per language
    group over all facts (``relation == "all"``, first) and per relation (sorted); the LIKN
    neurons per layer; the null draws over all facts.

    ``not_converged[languages]``: uuid -> relation of the group's facts left out because an
    attribution did not converge (counted in ``n_not_converged``; a relation whose facts were
    all left out gets rows with no facts). Seeds: the nulls from (seed, group, null), the
    bootstrap from (seed, group, relation)."""
    not_converged = not_converged or {}
    stats_rows, layer_rows, null_frames = [], [], []
    for languages in _groups_in_order(table, not_converged):
        rows = table[table["languages"] == languages].sort_values("uuid", kind="stable")
        n_lang = languages.count("+") + 1
        kn_sets = [{row.uuid: list(zip(row.kn_layers[i], row.kn_neurons[i]))
                    for row in rows.itertuples(index=False)} for i in range(n_lang)]
        relations = dict(zip(rows["uuid"], rows["relation"]))
        sets = coded_sets(kn_sets, list(relations), relations)
        identity = [np.arange(len(sets.uuids))] * (n_lang - 1)
        observed = _pairing_vector(sets, identity)
        draws = {null: permutation_null(lambda rng, null=null: _draw(sets, null, rng),
                                        n_perm=n_perm,
                                        seed=_seed("likn-null", seed, languages, null))
                 if len(sets.uuids) else np.full((0, len(observed)), np.nan)
                 for null in NULLS}
        stats_rows += _statistics_rows(sets, languages, draws,
                                       not_converged.get(languages, {}), seed, n_boot)
        layer_rows += _layer_rows(sets, languages, observed, draws,
                                  _seed("likn-layers", seed, languages), n_boot)
        for null in NULLS:
            frame = pd.DataFrame(draws[null][:, [STATISTICS.index(s) for s in TESTED]],
                                 columns=list(TESTED))
            null_frames.append(frame.assign(languages=languages, null=null,
                                            draw=np.arange(len(frame)))[NULL_COLUMNS])
    null_table = (pd.concat(null_frames, ignore_index=True) if null_frames
                  else pd.DataFrame(columns=NULL_COLUMNS))
    return LiknStatistics(pd.DataFrame(stats_rows, columns=STATS_COLUMNS),
                          pd.DataFrame(layer_rows, columns=LAYER_COLUMNS), null_table)


def _statistics_rows(sets: CodedSets, languages: str, draws: Mapping[str, np.ndarray],
                     excluded: Mapping[str, str], seed: int, n_boot: int) -> list[dict]:
    """STATS_COLUMNS rows of one language group: all facts, then each relation (then the
    relations whose facts were all left out). ``draws[null]``: [n_perm, m] vectors of
    :func:`_pairing_vector`."""
    identity = [np.arange(len(sets.uuids))] * (len(sets.codes) - 1)
    n_likn, n_kn, _ = pairing_overlap(sets, identity)
    scopes = [("all", np.arange(len(sets.uuids)))] + [
        (name, np.flatnonzero(sets.relations == r))
        for r, name in enumerate(sets.relation_names)]
    n_tested = len(scopes)  # the scopes with facts, in the order of the draw vectors
    scopes += [(name, np.zeros(0, np.int64))
               for name in sorted(set(excluded.values()) - set(sets.relation_names))]
    rows = []
    for s, (name, facts) in enumerate(scopes):
        intervals = _fact_bootstrap(n_likn[facts], n_kn[:, facts],
                                    [sets.uuids[u] for u in facts], n_boot,
                                    _seed("likn-boot", seed, languages, name))
        for j, statistic in enumerate(STATISTICS):
            interval = intervals[statistic]
            row = dict(languages=languages, relation=name, statistic=statistic,
                       n_facts=len(facts),
                       n_not_converged=sum(1 for r in excluded.values() if name in ("all", r)),
                       estimate=interval.estimate, low=interval.low, high=interval.high,
                       n_boot=interval.n_boot, n_perm=len(draws[NULLS[0]]))
            tested = statistic in TESTED and s < n_tested and len(facts) > 0
            for null in NULLS:
                column = draws[null][:, s * len(STATISTICS) + j] if tested else np.zeros(0)
                mean, low, high = _quantiles(column)
                row.update({f"{null}_mean": mean, f"{null}_low": low, f"{null}_high": high,
                            f"{null}_p": one_sided_pvalue(interval.estimate, column)})
            rows.append(row)
    return rows


def fact_layer_counts(sets: CodedSets) -> np.ndarray:
    """[n, n_layers]: each fact's LIKN neurons per layer under the real pairing."""
    n = len(sets.uuids)
    shared = shared_mask(sets, [np.arange(n)] * (len(sets.codes) - 1))
    fact = np.nonzero(shared)[0]
    counts = np.zeros((n, sets.n_layers), dtype=np.int64)
    np.add.at(counts, (fact, sets.layer_of_code[sets.codes[0][shared]]), 1)
    return counts


def _layer_rows(sets: CodedSets, languages: str, observed: np.ndarray,
                draws: Mapping[str, np.ndarray], seed: int, n_boot: int) -> list[dict]:
    """LAYER_COLUMNS rows of one language group: the layers with LIKN neurons under the real
    pairing or under some null draw."""
    offset = (1 + len(sets.relation_names)) * len(STATISTICS)
    counts = fact_layer_counts(sets).astype(float)
    intervals = bootstrap(lambda idx: dict(enumerate(counts[idx].sum(axis=0).tolist())),
                          list(sets.uuids), n_boot=n_boot, seed=seed) if len(counts) else {}
    rows = []
    for layer in range(sets.n_layers):
        row = dict(languages=languages, layer=layer, n_facts=len(sets.uuids),
                   n_likn=int(observed[offset + layer]), low=intervals[layer].low,
                   high=intervals[layer].high)
        for null in NULLS:
            row.update(zip((f"{null}_{part}" for part in _NULL_PARTS),
                           _quantiles(draws[null][:, offset + layer])))
        if row["n_likn"] > 0 or any(row[f"{null}_high"] > 0 for null in NULLS):
            rows.append(row)
    return rows


def _groups_in_order(table: pd.DataFrame, not_converged: Mapping) -> list[str]:
    """The language groups of a table (and of the counts of left-out facts), in
    :func:`language_groups` order."""
    present = set(table["languages"]) | set(not_converged)
    languages = sorted({lang for group in present for lang in group.split("+")})
    return [g for g in ("+".join(t) for t in language_groups(languages)) if g in present]


def _fact_bootstrap(n_likn: np.ndarray, n_kn: np.ndarray, uuids: Sequence[str], n_boot: int,
                    seed: int) -> dict:
    """Bootstrap intervals of STATISTICS over facts (one row per fact)."""
    has = (n_likn > 0).astype(float)
    share = shares_of_kn(n_likn, n_kn)
    kn_mean = n_kn.mean(axis=0) if n_kn.size else np.zeros(0)

    def statistic(rows):
        return {"share_with_likn": _nanmean(has[rows]), "mean_likn": _nanmean(n_likn[rows]),
                "likn_share_of_kn": _nanmean(share[rows]), "mean_kn": _nanmean(kn_mean[rows])}

    return bootstrap(statistic, list(uuids), n_boot=n_boot, seed=seed)


def find_likn(records: Mapping[str, pd.DataFrame], kn_threshold: float | Mapping[str, float],
              max_kn: int, seed: int, *, n_perm: int = N_PERM, n_boot: int = N_BOOT
              ) -> tuple[pd.DataFrame, LiknStatistics]:
    """The LIKN table and its statistics (:func:`likn_statistics`) from each language's
    attribution records (``records[lang]``, the discovery shards of one model). Only the
    true-object records whose attribution converged are used; a fact whose record did not
    converge in a language of a group is left out of that group and counted.
    ``kn_threshold``: one τ for every language, or a map language -> τ (the authors use 0.3
    for en, 0.2 for zh)."""
    def tau(lang: str) -> float:
        return kn_threshold[lang] if isinstance(kn_threshold, Mapping) else kn_threshold

    relations: dict[str, str] = {}
    present, kept, kn = {}, {}, {}
    for lang, table in records.items():
        true = table[table["candidate"] == "true"]
        for uuid, relation in zip(true["uuid"], true["relation"]):
            if relations.setdefault(uuid, relation) != relation:
                raise ValueError(f"fact {uuid} has different relations across languages")
        ok = converged(true)
        present[lang], kept[lang] = set(true["uuid"]), set(true.loc[ok, "uuid"])
        kn[lang] = knowledge_neurons_by_fact(true[ok], tau(lang), max_kn)
    not_converged = {}
    for group in language_groups(sorted(records)):
        left_out = (set.intersection(*(present[lang] for lang in group))
                    - set.intersection(*(kept[lang] for lang in group)))
        not_converged["+".join(group)] = {u: relations[u] for u in sorted(left_out)}
    table = likn_table(kn, relations)
    return table, likn_statistics(table, seed, not_converged=not_converged, n_perm=n_perm,
                                  n_boot=n_boot)


# ---- editing: neuron sets, sample, summary (model-free) -------------------------------------

def one_language_neurons(kn_by_lang: Mapping[str, Sequence[Neuron]], lang: str) -> list[Neuron]:
    """KN of ``lang`` that are in no other language's KN, best first."""
    others = {(int(a), int(b)) for other, s in kn_by_lang.items() if other != lang for a, b in s}
    return [n for n in dict.fromkeys((int(a), int(b)) for a, b in kn_by_lang[lang])
            if n not in others]


def edit_neuron_sets(kn_by_lang: Mapping[str, Sequence[Neuron]], d_ff: int, seed: int,
                     uuid: str) -> dict[str, list[Neuron]] | None:
    """The four equal-size sets of one fact (``likn``, ``only_<lang>`` per language,
    ``random``), or None when the fact is not eligible (empty LIKN, or some language has
    fewer one-language neurons than |LIKN|)."""
    languages = sorted(kn_by_lang)
    likn = language_independent_neurons([kn_by_lang[lang] for lang in languages])
    k = len(likn)
    if k == 0:
        return None
    sets = {"likn": likn}
    for lang in languages:
        only = one_language_neurons(kn_by_lang, lang)
        if len(only) < k:
            return None
        sets[f"only_{lang}"] = only[:k]
    every_kn = [n for s in kn_by_lang.values() for n in s]
    sets["random"] = random_neurons_like(likn, every_kn, d_ff, seeded_rng("likn-random", seed, uuid))
    return sets


def other_fact_likn(uuid: str, k: int, likn_of: Mapping[str, Sequence[Neuron]], seed: int
                    ) -> list[Neuron] | None:
    """The ``k`` best LIKN neurons of *another* fact: the first fact, in an order seeded by
    (seed, uuid), whose LIKN has at least ``k`` neurons; None when there is none. The control
    that tells "this fact's shared neurons" from "neurons shared by many facts"."""
    candidates = sorted((v for v, s in likn_of.items() if v != uuid and len(s) >= k),
                        key=lambda v: seeded_rank("likn-other", seed, uuid, v))
    if not candidates:
        return None
    return [(int(a), int(b)) for a, b in likn_of[candidates[0]][:k]]


def sample_edit_facts(uuids: Iterable[str], n: int, seed: int) -> list[str]:
    """``n`` of ``uuids`` (all when fewer), ranked by sha256("likn-edit", seed, uuid)."""
    return sorted(set(uuids), key=lambda u: seeded_rank("likn-edit", seed, u))[:n]


def locality_facts(edited: str, candidates: Mapping[str, str], n: int, seed: int) -> list[str]:
    """``n`` facts of ``candidates`` (uuid -> relation) of another relation than ``edited``,
    ranked by sha256("likn-locality", seed, edited, uuid)."""
    relation = candidates[edited]
    other = [u for u, r in candidates.items() if r != relation]
    return sorted(other, key=lambda u: seeded_rank("likn-locality", seed, edited, u))[:n]


def _edit_arrays(group: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per row of an edit-results group, the values whose means EDIT_METRICS are (NaN where
    a row has no value: no wrong object, or P(true) before = 0 for the relative change)."""
    before = group["p_true_before"].to_numpy(float)
    after = group["p_true_after"].to_numpy(float)
    wrong_before = pd.to_numeric(group["p_wrong_before"], errors="coerce").to_numpy(float)
    wrong_after = pd.to_numeric(group["p_wrong_after"], errors="coerce").to_numpy(float)
    has_wrong = np.isfinite(wrong_after)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(before > 0, (after - before) / before, np.nan)
    success = np.where(has_wrong, pd.to_numeric(group["top1_wrong_after"], errors="coerce")
                       .to_numpy(float), np.nan)
    return {"p_true_before": before, "p_true_after": after, "delta_p_true": after - before,
            "rel_change_p_true": rel,
            "top1_true_before": group["top1_true_before"].astype(float).to_numpy(),
            "top1_true_after": group["top1_true_after"].astype(float).to_numpy(),
            "p_wrong_before": wrong_before, "p_wrong_after": wrong_after,
            "delta_p_wrong": wrong_after - wrong_before, "edit_success": success}


def edit_summary(results: pd.DataFrame, seed: int = 0, *, n_boot: int = N_BOOT
                 ) -> pd.DataFrame:
    """SUMMARY_COLUMNS: means per (operation, neuron_set, edit_lang, eval_lang, target), each
    with its 95% cluster-bootstrap interval over the edited facts.

    ``delta_*`` = mean(after - before); ``rel_change_p_true`` = mean((after - before) /
    before) over rows with before > 0; ``top1_*`` = accuracy (share of rows); ``edit_success``
    = share of rows whose wrong object is top-1 after the intervention (NaN for unrelated
    facts, which have no wrong object). The resamples are seeded by (seed, operation,
    edit_lang, eval_lang, target), so the neuron sets of one scoring share them.
    """
    rows = []
    keys = ["operation", "neuron_set", "edit_lang", "eval_lang", "target"]
    for key, group in results.groupby(keys, sort=True):
        values = _edit_arrays(group)

        def statistic(idx, values=values):
            return {m: _nanmean(values[m][idx]) for m in EDIT_METRICS}

        operation, _, edit_lang, eval_lang, target = key
        intervals = bootstrap(statistic, group["edited_uuid"].tolist(), n_boot=n_boot,
                              seed=_seed("likn-edit", seed, operation, edit_lang, eval_lang,
                                         target))
        row = dict(zip(keys, key), n=int(len(group)), n_facts=int(group["edited_uuid"].nunique()),
                   mean_neurons=float(group["n_neurons"].mean()))
        for m in EDIT_METRICS:
            row.update({m: intervals[m].estimate, f"{m}_low": intervals[m].low,
                        f"{m}_high": intervals[m].high})
        rows.append(row)
    summary = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    summary["_op"] = summary["operation"].map({op: i for i, op in enumerate(OPERATIONS)})
    return (summary.sort_values(["_op", "target", "edit_lang", "neuron_set", "eval_lang"],
                                kind="stable").drop(columns="_op").reset_index(drop=True))


def control_sets(names: Iterable[str]) -> list[str]:
    """The control neuron sets among ``names`` in report order: likn_other, only_<lang>...,
    random."""
    rank = {"likn_other": 0, "random": 2}
    return sorted({n for n in names if n != "likn"}, key=lambda n: (rank.get(n, 1), n))


def edit_tests(results: pd.DataFrame, seed: int = 0, *, n_perm: int = N_PERM,
               n_boot: int = N_BOOT) -> pd.DataFrame:
    """TEST_COLUMNS: LIKN against every control set, paired by edited fact.

    Per (operation, edit_lang, eval_lang), measure of TEST_MEASURES and control set: the
    edited facts that both sets have (``likn_other`` lacks the facts without a large enough
    other LIKN); the mean change under LIKN and under the control, the mean per-fact
    difference LIKN - control with 95% bootstrap intervals over the facts (one resample for
    all three), and the two-sided p-value of the swap test (the two sets' changes swapped
    within a fact; :func:`kneurons.statistics.swap_test`). Uncorrected: the report corrects
    its whole table (:func:`kneurons.statistics.holm`). Seeded by (seed, operation,
    edit_lang, eval_lang, measure, control)."""
    facts = results[results["target"] == "fact"]
    rows = []
    for (operation, edit_lang, eval_lang), group in facts.groupby(
            ["operation", "edit_lang", "eval_lang"], sort=True):
        by_set = {name: sub.drop_duplicates("edited_uuid").set_index("edited_uuid")
                  for name, sub in group.groupby("neuron_set", sort=True)}
        if "likn" not in by_set:
            continue
        for measure in TEST_MEASURES.get(operation, ()):
            for control in control_sets(by_set):
                shared = sorted(set(by_set["likn"].index) & set(by_set[control].index))
                if not shared:
                    continue
                a = _edit_arrays(by_set["likn"].loc[shared])[measure]
                b = _edit_arrays(by_set[control].loc[shared])[measure]
                ok = np.isfinite(a) & np.isfinite(b)
                a, b, uuids = a[ok], b[ok], [u for u, k in zip(shared, ok) if k]
                if not len(uuids):
                    continue
                parts = ("likn-test", seed, operation, edit_lang, eval_lang, measure, control)
                intervals = bootstrap(
                    lambda idx: {"likn": float(a[idx].mean()), "control": float(b[idx].mean()),
                                 "difference": float((a[idx] - b[idx]).mean())},
                    uuids, n_boot=n_boot, seed=_seed(*parts))
                _, p = swap_test(lambda v, idx: float(v[idx].mean()), a, b, uuids,
                                 n_perm=n_perm, seed=_seed(*parts, "swap"))
                row = dict(operation=operation, edit_lang=edit_lang, eval_lang=eval_lang,
                           measure=measure, control=control, n_facts=len(uuids), p=p)
                for name, out in (("likn", "likn"), ("control", "control_value"),
                                  ("difference", "difference")):
                    row.update({out: intervals[name].estimate, f"{out}_low": intervals[name].low,
                                f"{out}_high": intervals[name].high})
                rows.append(row)
    tests = pd.DataFrame(rows, columns=TEST_COLUMNS)
    tests["_op"] = tests["operation"].map({op: i for i, op in enumerate(OPERATIONS)})
    return (tests.sort_values(["_op", "edit_lang", "eval_lang", "measure"], kind="stable")
            .drop(columns="_op").reset_index(drop=True))


# ---- the model: scoring, erasing, editing value slots ----------------------------------------

def score_queries(lm: LanguageModel, queries: Sequence[EncodedQuery],
                  erase: Sequence[Neuron] = ()) -> tuple[np.ndarray, np.ndarray]:
    """P(object) [n] (mean over its tokens) and top-1 [n] (every object token is the argmax)
    of ``queries`` in one padded forward, with the activations of ``erase`` set to 0 at each
    query's object position(s) (:func:`kneurons.scoring.score`, head at every position)."""
    result = scoring.score(lm, queries, [scoring.erase(erase)] * len(queries), batch_size=None,
                           head="full")
    return result.prob, result.top1


@contextlib.contextmanager
def edit_value_slots(lm: LanguageModel, neurons: Sequence[Neuron], delta: torch.Tensor
                     ) -> Iterator[None]:
    """Add ``delta`` [hidden] to the value slot of each distinct neuron of ``neurons`` in the
    body; the original weights are copied back in ``finally`` (also when the body raises)."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for layer, neuron in dict.fromkeys((int(a), int(b)) for a, b in neurons):
                slot = lm.value_slot(layer, neuron)  # [hidden], a view of the weight
                if slot.shape != delta.shape:
                    raise ValueError(f"value slot of ({layer}, {neuron}) has shape "
                                     f"{tuple(slot.shape)}, the edit {tuple(delta.shape)}")
                saved.append((slot, slot.clone()))
                slot.add_(delta.to(slot.dtype))
        yield
    finally:
        with torch.no_grad():
            for slot, original in reversed(saved):
                slot.copy_(original)


def object_embedding(lm: LanguageModel, token_ids: Sequence[int]) -> torch.Tensor:
    """e(y) [hidden]: the mean output word embedding of an object's tokens."""
    weight = lm.model.get_output_embeddings().weight  # [vocab, hidden]
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=weight.device)
    return weight.detach()[ids].float().mean(0)


def dai_edit_delta(lm: LanguageModel, true_ids: Sequence[int], wrong_ids: Sequence[int],
                   lambda1: float, lambda2: float) -> torch.Tensor:
    """-λ1 e(y_true) + λ2 e(y_wrong) [hidden] (Dai et al. 2022, updating facts)."""
    return -lambda1 * object_embedding(lm, true_ids) + lambda2 * object_embedding(lm, wrong_ids)


# ---- the experiment --------------------------------------------------------------------------

def _fact_queries(lm: LanguageModel, fact) -> tuple[EncodedQuery, EncodedQuery]:
    return (encode_query(lm, fact.template, fact.sub_label, fact.obj_label),
            encode_query(lm, fact.template, fact.sub_label, fact.wrong_obj_label))


def _rows(common: dict, lang: str, uuids: Sequence[str], relations: Sequence[str],
          before: tuple, after: tuple) -> list[dict]:
    """Rows of one scored batch: [true, wrong, unrelated true...] of one language."""
    (p0, t0), (p1, t1) = before, after
    rows = [dict(common, eval_lang=lang, target="fact", uuid=uuids[0], relation=relations[0],
                 p_true_before=p0[0], p_true_after=p1[0], top1_true_before=t0[0],
                 top1_true_after=t1[0], p_wrong_before=p0[1], p_wrong_after=p1[1],
                 top1_wrong_before=t0[1], top1_wrong_after=t1[1])]
    for j, (uuid, relation) in enumerate(zip(uuids[1:], relations[1:]), start=2):
        rows.append(dict(common, eval_lang=lang, target="unrelated", uuid=uuid,
                         relation=relation, p_true_before=p0[j], p_true_after=p1[j],
                         top1_true_before=t0[j], top1_true_after=t1[j], p_wrong_before=None,
                         p_wrong_after=None, top1_wrong_before=None, top1_wrong_after=None))
    return rows


def cross_lingual_editing(lm: LanguageModel, facts: Mapping[str, pd.DataFrame],
                          likn: pd.DataFrame, *, edit_sample: int, n_locality: int,
                          lambda1: float, lambda2: float, seed: int, progress=None
                          ) -> pd.DataFrame:
    """Erase and edit a sample of facts through four neuron sets; EDIT_COLUMNS rows.

    ``facts[lang]``: the discovery facts of each of the model's languages (uuid, relation,
    template, sub_label, obj_label, wrong_obj_label); ``likn``: a :func:`likn_table` (its
    rows of the group of all ``facts`` languages give each fact's KN per language).
    See the module docstring for the sets, operations and measures.
    """
    languages = sorted(facts)
    group = "+".join(languages)
    rows = likn[likn["languages"] == group]
    if rows.empty:
        raise ValueError(f"the LIKN table has no rows for the languages {group}")
    indexed = {lang: table.set_index("uuid", drop=False) for lang, table in facts.items()}
    common_uuids = set.intersection(*(set(t.index) for t in indexed.values()))
    sets = {}
    for row in rows.itertuples(index=False):
        if row.uuid not in common_uuids:
            continue
        kn_by_lang = {lang: list(zip(ls, ns)) for lang, ls, ns in
                      zip(group.split("+"), row.kn_layers, row.kn_neurons)}
        found = edit_neuron_sets(kn_by_lang, lm.d_ff, seed, row.uuid)
        if found is not None:
            sets[row.uuid] = found
    sample = sample_edit_facts(sets, edit_sample, seed)
    likn_of = {row.uuid: list(zip(row.likn_layers, row.likn_neurons))
               for row in rows.itertuples(index=False)
               if row.uuid in common_uuids and row.n_likn > 0}
    for uuid in sample:
        other = other_fact_likn(uuid, len(sets[uuid]["likn"]), likn_of, seed)
        if other is not None:  # after the fact's own LIKN, in the reports too
            sets[uuid] = {"likn": sets[uuid]["likn"], "likn_other": other,
                          **{n: v for n, v in sets[uuid].items() if n != "likn"}}
    relation_of = {u: indexed[languages[0]].at[u, "relation"] for u in sorted(common_uuids)}
    out = []
    bar = tqdm(total=len(sample), file=progress, desc="LIKN editing", mininterval=5.0,
               unit="fact")
    for uuid in sample:
        unrelated = locality_facts(uuid, relation_of, n_locality, seed)
        uuids = [uuid] + unrelated
        relations = [relation_of[u] for u in uuids]
        queries, edits = {}, {}
        for lang in languages:
            true_q, wrong_q = _fact_queries(lm, indexed[lang].loc[uuid])
            queries[lang] = [true_q, wrong_q] + [
                encode_query(lm, f.template, f.sub_label, f.obj_label)
                for f in (indexed[lang].loc[u] for u in unrelated)]
            edits[lang] = dai_edit_delta(lm, true_q.target_ids, wrong_q.target_ids,
                                         lambda1, lambda2)
        before = {lang: score_queries(lm, queries[lang]) for lang in languages}
        for name, neurons in sets[uuid].items():
            common = dict(neuron_set=name, edited_uuid=uuid, n_neurons=len(neurons))
            for lang in languages:
                after = score_queries(lm, queries[lang], erase=neurons)
                out += _rows(dict(common, operation="erase", edit_lang=ANY_LANGUAGE), lang,
                             uuids, relations, before[lang], after)
            for edit_lang in languages:
                with edit_value_slots(lm, neurons, edits[edit_lang]):
                    for lang in languages:
                        after = score_queries(lm, queries[lang])
                        out += _rows(dict(common, operation="edit", edit_lang=edit_lang),
                                     lang, uuids, relations, before[lang], after)
        bar.update(1)
    bar.close()
    table = pd.DataFrame(out, columns=EDIT_COLUMNS)
    for column in ("p_true_before", "p_true_after", "p_wrong_before", "p_wrong_after"):
        table[column] = table[column].astype(float)
    return table
