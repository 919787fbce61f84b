"""Degenerate knowledge neurons (DKN), per query and per relation.

Paper definition (Chen et al., AAAI 2024, with the defaults of the authors' code): among the
knowledge neurons of a query, a pair (a, b) is *degenerate* when suppressing a alone and b alone
each keeps the probability of the true object at least ``(1 - single_drop)`` of the original,
while suppressing both together lowers it below ``(1 - pair_drop)`` of the original.
Suppressing a neuron sets its activation to 0 at the object position(s). The probability of a
multi-token object is the mean of its per-token probabilities (as everywhere in kneurons).

A relation's DKN set: each neuron of the relation's discovery queries gets a count, and the
set is the neurons whose count exceeds ``relation_threshold`` times the largest count. The
count (``neurons.dkn_count``, :data:`DKN_COUNTS`) is ours by default, ``query``: the number of
queries in which the neuron is in at least one degenerate pair; or the authors', ``pair``: the
number of degenerate pairs, over all queries, that the neuron is a member of (a neuron in
three pairs of one query counts 3). Both keep the rule "above a share of the largest count".

**No leakage into λ.** The calibration slice (:func:`kneurons.facts.mark_calibration`) is part
of the discovery split, but fact checking tunes its threshold λ on it, so its facts take no part
in DKN detection (:func:`detect_dkn_records` skips them) nor in aggregation
(:func:`aggregate_relations` drops their rows): the DKN sets do not depend on them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import pandas as pd
from tqdm import tqdm

from .checkpoint import Checkpoint
from .models import LanguageModel
from .neurons import Neuron, knowledge_neurons_of
from .queries import EncodedQuery, encode_query
from .scoring import Erasure

@dataclass
class QueryDKN:
    """What DKN detection measured for one query."""

    kn: list[Neuron]                     # the query's knowledge neurons
    base_prob: float                     # P(true object), nothing suppressed
    single_probs: list[float]            # P(true object) with kn[i] suppressed
    pairs: list[tuple[Neuron, Neuron]]   # degenerate pairs, in kn order
    pair_probs: list[float]              # P(true object) with each degenerate pair suppressed
    tested_pairs: int = 0                # pairs whose joint suppression was measured
    dkn: list[Neuron] = field(default_factory=list)  # neurons in at least one degenerate pair


def robust_singles(base_prob: float, single_probs: Sequence[float], single_drop: float) -> list[int]:
    """Indices of the neurons whose lone suppression keeps >= (1 - single_drop) of base_prob."""
    floor = (1.0 - single_drop) * base_prob
    return [i for i, prob in enumerate(single_probs) if prob >= floor]


def is_degenerate_drop(base_prob: float, pair_prob: float, pair_drop: float) -> bool:
    """Joint suppression lowers the probability below (1 - pair_drop) of base_prob."""
    return pair_prob < (1.0 - pair_drop) * base_prob


def detect_query_dkn(
    lm: LanguageModel,
    query: EncodedQuery,
    kn: Sequence[Neuron],
    *,
    single_drop: float,
    pair_drop: float,
    batch_size: int | None = 256,
) -> QueryDKN:
    """Measure single and pair suppressions of ``kn`` for ``query`` and return its DKN.

    One batched pass (in chunks of ``batch_size`` rows) measures the unpatched probability
    and every single suppression; a second measures every pair of robust singles (pairs with
    a non-robust member cannot be degenerate, so they are not measured). The rows run as
    the attribution's do (:class:`kneurons.scoring.Erasure`): from the cached
    input of the block of their lowest suppressed layer, on the object position(s) alone
    where that is exact. :func:`detect_queries_dkn` batches several queries.
    """
    return detect_queries_dkn(lm, [query], [kn], single_drop=single_drop, pair_drop=pair_drop,
                              batch_size=batch_size)[0]


def detect_queries_dkn(
    lm: LanguageModel,
    queries: Sequence[EncodedQuery],
    kns: Sequence[Sequence[Neuron]],
    *,
    single_drop: float,
    pair_drop: float,
    batch_size: int | None = 256,
) -> list[QueryDKN]:
    """:func:`detect_query_dkn` of each query with its knowledge neurons ``kns[i]``, the rows
    of all queries batched together: one pass for every query's unpatched and single rows,
    one for every query's robust pairs. The same results as one query at a time (float
    rounding apart)."""
    if len(kns) != len(queries):
        raise ValueError(f"{len(queries)} queries but {len(kns)} lists of knowledge neurons")
    kns = [[(int(layer), int(neuron)) for layer, neuron in kn] for kn in kns]
    # the queries are captured once for both passes
    rows = Erasure(lm, queries, batch_size=batch_size, lowest_layer=min(
        (layer for kn in kns for layer, _ in kn), default=lm.n_layers - 1))
    first = rows.token_probs([[[]] + [[neuron] for neuron in kn] for kn in kns])
    bases, singles, candidates = [], [], []
    for kn, probs in zip(kns, first):
        probs = probs.mean(axis=1)  # [1 + n_kn]: mean over the object's tokens
        bases.append(float(probs[0]))
        singles.append([float(p) for p in probs[1:]])
        robust = robust_singles(bases[-1], singles[-1], single_drop)
        candidates.append(list(combinations(robust, 2)))
    joint = rows.token_probs([[[kn[i], kn[j]] for i, j in cands]
                              for kn, cands in zip(kns, candidates)])
    out = []
    for kn, base_prob, single_probs, cands, probs in zip(kns, bases, singles, candidates,
                                                          joint):
        pairs, pair_probs = [], []
        for (i, j), prob in zip(cands, probs.mean(axis=1)):
            if is_degenerate_drop(base_prob, float(prob), pair_drop):
                pairs.append((kn[i], kn[j]))
                pair_probs.append(float(prob))
        members = sorted({neuron for pair in pairs for neuron in pair})
        out.append(QueryDKN(kn=kn, base_prob=base_prob, single_probs=single_probs, pairs=pairs,
                            pair_probs=pair_probs, tested_pairs=len(cands), dkn=members))
    return out


DKN_COUNTS = ("query", "pair")
"""How a relation's DKN counts are made (see the module docstring); ``query`` is ours."""


def relation_dkn(query_dkns: Iterable[Iterable[Neuron]], relation_threshold: float,
                 distinct: bool = True) -> tuple[list[Neuron], Counter]:
    """A relation's DKN set from its queries' neurons, and the per-neuron counts.

    Each item of ``query_dkns`` holds one query's neurons: with ``distinct`` (the ``query``
    count) a neuron counts once per query; without it (the ``pair`` count, items holding the
    members of every pair) once per occurrence. Neurons counted more than
    ``relation_threshold`` x (largest count) times are kept, sorted by count (descending),
    then layer and index.
    """
    counts: Counter = Counter()
    for members in query_dkns:
        neurons = [(int(layer), int(neuron)) for layer, neuron in members]
        counts.update(set(neurons) if distinct else neurons)
    if not counts:
        return [], counts
    cutoff = relation_threshold * max(counts.values())
    kept = [neuron for neuron, count in counts.items() if count > cutoff]
    kept.sort(key=lambda neuron: (-counts[neuron], neuron))
    return kept, counts


def detect_dkn_records(
    lm: LanguageModel,
    facts: pd.DataFrame,
    records: pd.DataFrame,
    *,
    kn_threshold: float,
    max_kn: int,
    single_drop: float,
    pair_drop: float,
    checkpoint: Checkpoint | None = None,
    every: int = 16,
    progress=None,
) -> pd.DataFrame:
    """DKN of every true-object record of a discovery attribution shard.

    ``facts`` gives each uuid's template and subject (to rebuild the query) and, in its
    ``calibration`` column (absent: none), the calibration slice, whose facts are skipped (see
    the module docstring). Returns one row per other query: uuid, relation, kn_layers, kn_neurons, base_prob, single_probs, tested_pairs,
    pair_layers, pair_neurons ([a, b] per degenerate pair), pair_probs, dkn_layers,
    dkn_neurons. Rows are checkpointed every ``every`` queries.
    """
    facts = facts.assign(calibration=facts.get(
        "calibration", pd.Series(False, index=facts.index)).fillna(False).astype(bool))
    true = records[records["candidate"] == "true"].merge(
        facts[["uuid", "template", "sub_label", "calibration"]], on="uuid", how="left",
        validate="one_to_one")
    if true["template"].isna().any():
        missing = true.loc[true["template"].isna(), "uuid"].tolist()[:5]
        raise ValueError(f"attribution records without a fact: {missing}")
    true = true[~true["calibration"].astype(bool)].reset_index(drop=True)
    done = checkpoint.load() if checkpoint is not None else None
    rows: list[dict] = []
    chunks = [done] if done is not None else []
    start = 0 if done is None else len(done)
    bar = tqdm(total=len(true), initial=start, file=progress, desc="DKN", mininterval=5.0,
               unit="query")
    for record in true.iloc[start:].itertuples():
        kn = knowledge_neurons_of(record.top_layers, record.top_neurons, record.top_scores,
                                  kn_threshold, max_kn)
        query = encode_query(lm, record.template, record.sub_label, record.obj_label)
        found = detect_query_dkn(lm, query, kn, single_drop=single_drop, pair_drop=pair_drop)
        rows.append(dict(
            uuid=record.uuid, relation=record.relation,
            kn_layers=[n[0] for n in found.kn], kn_neurons=[n[1] for n in found.kn],
            base_prob=found.base_prob, single_probs=found.single_probs,
            tested_pairs=found.tested_pairs,
            pair_layers=[[a[0], b[0]] for a, b in found.pairs],
            pair_neurons=[[a[1], b[1]] for a, b in found.pairs],
            pair_probs=found.pair_probs,
            dkn_layers=[n[0] for n in found.dkn], dkn_neurons=[n[1] for n in found.dkn]))
        bar.update(1)
        if len(rows) == every:
            chunk = pd.DataFrame(rows)
            if checkpoint is not None:
                checkpoint.append(chunk)
            chunks.append(chunk)
            rows = []
    bar.close()
    if rows:
        chunks.append(pd.DataFrame(rows))
    if not chunks:
        return pd.DataFrame(columns=["uuid", "relation", "kn_layers", "kn_neurons", "base_prob",
                                     "single_probs", "tested_pairs", "pair_layers",
                                     "pair_neurons", "pair_probs", "dkn_layers", "dkn_neurons"])
    return pd.concat(chunks, ignore_index=True)


def aggregate_relations(query_dkn: pd.DataFrame, relation_threshold: float,
                        calibration: Iterable[str] = (), count: str = "query"
                        ) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Per relation: the DKN set (see ``relation_dkn``) and statistics.

    ``query_dkn``: rows of ``detect_dkn_records``; rows of the uuids in ``calibration`` (the
    calibration slice) are dropped first. ``count``: one of :data:`DKN_COUNTS`. Returns the JSON-able
    ``{"relation_threshold", "relations": {rel: {"dkn": [[layer, neuron], ...],
    "counts": [...], "n_queries", "queries_with_dkn"}}}``; a statistics table with one row per
    relation (n_queries, mean_kn, mean_pairs, queries_with_dkn, n_dkn, mean_base_prob); and the
    layer distribution of the DKN sets (relation, layer, n_dkn).
    """
    if count not in DKN_COUNTS:
        raise ValueError(f"unknown DKN count {count!r}; expected one of {DKN_COUNTS}")
    query_dkn = query_dkn[~query_dkn["uuid"].isin(set(calibration))]
    relations: dict = {}
    stats, layers = [], []
    for relation, group in query_dkn.groupby("relation", sort=True):
        members = [list(zip(ls, ns)) for ls, ns in zip(group["dkn_layers"], group["dkn_neurons"])]
        if count == "query":
            kept, counts = relation_dkn(members, relation_threshold)
        else:
            pair_members = [[(layer, neuron) for ls, ns in zip(pls, pns)
                             for layer, neuron in zip(ls, ns)]
                            for pls, pns in zip(group["pair_layers"], group["pair_neurons"])]
            kept, counts = relation_dkn(pair_members, relation_threshold, distinct=False)
        with_dkn = int(sum(1 for m in members if len(m)))
        relations[relation] = {
            "dkn": [[layer, neuron] for layer, neuron in kept],
            "counts": [counts[neuron] for neuron in kept],
            "n_queries": int(len(group)),
            "queries_with_dkn": with_dkn,
        }
        stats.append(dict(relation=relation, n_queries=int(len(group)),
                          mean_kn=float(np.mean([len(k) for k in group["kn_layers"]])),
                          mean_pairs=float(np.mean([len(p) for p in group["pair_layers"]])),
                          queries_with_dkn=with_dkn, n_dkn=len(kept),
                          mean_base_prob=float(group["base_prob"].mean())))
        for layer, n in sorted(Counter(layer for layer, _ in kept).items()):
            layers.append(dict(relation=relation, layer=int(layer), n_dkn=int(n)))
    summary = {"relation_threshold": relation_threshold, "count": count, "relations": relations}
    stats_df = pd.DataFrame(stats, columns=["relation", "n_queries", "mean_kn", "mean_pairs",
                                            "queries_with_dkn", "n_dkn", "mean_base_prob"])
    layers_df = pd.DataFrame(layers, columns=["relation", "layer", "n_dkn"])
    return summary, stats_df, layers_df
