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

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .checkpoint import Checkpoint
from .hooks import capture_ffn
from .io import atomic_path
from .models import LanguageModel
from .neurons import Neuron, knowledge_neurons_of, seeded_rank, seeded_rng
from .queries import EncodedQuery, encode_query
from .records import converged
from .scoring import Erasure
from .statistics import jaccard

log = logging.getLogger(__name__)

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


def detected_queries(facts: pd.DataFrame, records: pd.DataFrame) -> pd.DataFrame:
    """The true-object records of a discovery shard whose DKN are detected, with each fact's
    ``template`` and ``sub_label``: all but the calibration slice (``facts["calibration"]``;
    see the module docstring) and the records whose attribution did not converge
    (:func:`kneurons.records.converged`; their number is logged)."""
    facts = facts.assign(calibration=facts.get(
        "calibration", pd.Series(False, index=facts.index)).fillna(False).astype(bool))
    true = records[records["candidate"] == "true"].merge(
        facts[["uuid", "template", "sub_label", "calibration"]], on="uuid", how="left",
        validate="one_to_one")
    if true["template"].isna().any():
        missing = true.loc[true["template"].isna(), "uuid"].tolist()[:5]
        raise ValueError(f"attribution records without a fact: {missing}")
    true = true[~true["calibration"].astype(bool)]
    usable = converged(true)
    if not usable.all():
        log.warning("%d of %d discovery queries left out of DKN detection: their attribution "
                    "did not converge", int((~usable).sum()), len(true))
    return true[usable].reset_index(drop=True)


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
    the module docstring), as are records whose attribution did not converge
    (:func:`detected_queries`). Returns one row per other query: uuid, relation, kn_layers, kn_neurons, base_prob, single_probs, tested_pairs,
    pair_layers, pair_neurons ([a, b] per degenerate pair), pair_probs, dkn_layers,
    dkn_neurons. Queries are detected ``every`` at a time in one batch
    (:func:`detect_queries_dkn`), each batch's rows checkpointed.
    """
    true = detected_queries(facts, records)
    done = checkpoint.load() if checkpoint is not None else None
    chunks = [done] if done is not None else []
    start = 0 if done is None else len(done)
    bar = tqdm(total=len(true), initial=start, file=progress, desc="DKN", mininterval=5.0,
               unit="query")
    for begin in range(start, len(true), every):  # a chunk: one batched detection
        chunk_records = list(true.iloc[begin:begin + every].itertuples())
        kns = [knowledge_neurons_of(r.top_layers, r.top_neurons, r.top_scores, kn_threshold,
                                    max_kn) for r in chunk_records]
        queries = [encode_query(lm, r.template, r.sub_label, r.obj_label)
                   for r in chunk_records]
        found_all = detect_queries_dkn(lm, queries, kns, single_drop=single_drop,
                                       pair_drop=pair_drop)
        rows = [dict(
            uuid=record.uuid, relation=record.relation,
            kn_layers=[n[0] for n in found.kn], kn_neurons=[n[1] for n in found.kn],
            base_prob=found.base_prob, single_probs=found.single_probs,
            tested_pairs=found.tested_pairs,
            pair_layers=[[a[0], b[0]] for a, b in found.pairs],
            pair_neurons=[[a[1], b[1]] for a, b in found.pairs],
            pair_probs=found.pair_probs,
            dkn_layers=[n[0] for n in found.dkn], dkn_neurons=[n[1] for n in found.dkn])
            for record, found in zip(chunk_records, found_all)]
        bar.update(len(rows))
        chunk = pd.DataFrame(rows)
        if checkpoint is not None:
            checkpoint.append(chunk)
        chunks.append(chunk)
    bar.close()
    if not chunks:
        return pd.DataFrame(columns=["uuid", "relation", "kn_layers", "kn_neurons", "base_prob",
                                     "single_probs", "tested_pairs", "pair_layers",
                                     "pair_neurons", "pair_probs", "dkn_layers", "dkn_neurons"])
    return pd.concat(chunks, ignore_index=True)


def relation_activation_sums(lm: LanguageModel, queries: pd.DataFrame, *,
                             progress=None) -> dict[str, np.ndarray]:
    """Per relation, the sum over ``queries`` (rows of :func:`detected_queries`) of the mean
    over the object positions of |FFN activation| (the input of the FFN output projection,
    :func:`kneurons.hooks.capture_ffn`), unpatched, from one forward of the model's body per
    query (no LM head). Returns ``relations`` (str [R], sorted), ``sums`` (float64
    [R, n_layers, d_ff]) and ``counts`` (int64 [R]): what :func:`relation_activation` reads,
    summed over the shards of a model and language."""
    relations = sorted(set(queries["relation"]))
    index = {relation: i for i, relation in enumerate(relations)}
    sums = np.zeros((len(relations), lm.n_layers, lm.d_ff), dtype=np.float64)
    counts = np.zeros(len(relations), dtype=np.int64)
    bar = tqdm(total=len(queries), file=progress, desc="activation", mininterval=5.0,
               unit="query")
    for record in queries.itertuples():
        query = encode_query(lm, record.template, record.sub_label, record.obj_label)
        ids = torch.as_tensor([query.input_ids], device=lm.device)  # [1, S]
        pos = torch.as_tensor(query.target_positions, device=lm.device)  # [T]
        with torch.inference_mode(), capture_ffn(lm) as acts:
            lm.model.base_model(input_ids=ids)  # the activations only, no logits
            mean = torch.stack([acts[layer][0, pos].float().abs().mean(dim=0)
                                for layer in range(lm.n_layers)])  # [n_layers, d_ff]
        sums[index[record.relation]] += mean.double().cpu().numpy()
        counts[index[record.relation]] += 1
        bar.update(1)
    bar.close()
    return {"relations": np.asarray(relations, dtype=str), "sums": sums, "counts": counts}


def write_activation(stats: Mapping[str, np.ndarray], path) -> None:
    """Write :func:`relation_activation_sums`'s arrays to ``path`` (``.npz``) atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, relations=np.asarray(stats["relations"], dtype=str),
                 sums=np.asarray(stats["sums"], dtype=np.float64),
                 counts=np.asarray(stats["counts"], dtype=np.int64))


STABILITY_WARNING = 0.5
"""A relation's DKN set whose bootstrap Jaccard over discovery queries is below this is
reported as unstable (a warning in the log and the report)."""
CONTROL_POOL = 10
"""The matched random control draws each neuron among this many neurons of the same layer
closest in mean |activation| to the DKN neuron it stands for."""


def frequent_kn_control(query_kn: Iterable[Iterable[Neuron]], dkn: Sequence[Neuron]
                        ) -> list[Neuron]:
    """The relation's most frequent knowledge neurons that are not DKN, as many as it has DKN:
    a control set of neurons the attribution also picks, often, for the relation, without the
    degenerate property. Counted once per query; ties by (layer, neuron)."""
    counts: Counter = Counter()
    for kn in query_kn:
        counts.update({(int(layer), int(neuron)) for layer, neuron in kn})
    taken = {(int(a), int(b)) for a, b in dkn}
    ranked = sorted((n for n in counts if n not in taken), key=lambda n: (-counts[n], n))
    return ranked[:len(taken)]


def matched_random_control(dkn: Sequence[Neuron], activation: np.ndarray,
                           exclude: Iterable[Neuron], rng: np.random.Generator,
                           pool: int = CONTROL_POOL) -> list[Neuron]:
    """Per DKN neuron (layer l, index i) a random neuron of layer l, drawn uniformly among the
    ``pool`` neurons of that layer whose mean |activation| (``activation`` [n_layers, d_ff],
    over the relation's discovery queries at the object positions) is closest to neuron i's,
    outside ``exclude`` and the neurons already drawn (where ``exclude`` fills a layer, outside
    the DKN and the drawn ones only): same layers, same activation magnitude, no attribution.
    A ValueError only when the DKN and the drawn neurons fill a layer."""
    kept = {(int(a), int(b)) for a, b in dkn}
    taken = {(int(a), int(b)) for a, b in exclude} | kept
    out = []
    for layer, index in dkn:
        row = np.asarray(activation[int(layer)], dtype=np.float64)
        free = np.asarray([j for j in range(len(row)) if (int(layer), j) not in taken])
        if not len(free):  # the excluded neurons fill the layer (a small toy layer): any
            # neuron that is neither DKN nor drawn already
            free = np.asarray([j for j in range(len(row)) if (int(layer), j) not in kept
                               and (int(layer), j) not in out])
        if not len(free):
            raise ValueError(f"no free neuron left in layer {layer}")
        near = free[np.argsort(np.abs(row[free] - row[int(index)]), kind="stable")[:pool]]
        pick = (int(layer), int(near[rng.integers(len(near))]))
        taken.add(pick)
        out.append(pick)
    return out


def dkn_stability(members: Sequence[Sequence[Neuron]], relation_threshold: float,
                  distinct: bool, dkn: Sequence[Neuron], *, n_boot: int = 200,
                  seed: int = 0) -> dict:
    """How stable a relation's DKN set is: its queries resampled with replacement
    ``n_boot`` times, the DKN set recomputed by :func:`relation_dkn` each time, and its
    Jaccard with the set of all queries. Returns ``jaccard`` (the mean), ``jaccard_low`` and
    ``jaccard_high`` (2.5 and 97.5 percentiles), ``n_boot`` and ``stable`` (mean at least
    :data:`STABILITY_WARNING`). An empty DKN set from an empty relation is stable (1)."""
    rng = np.random.default_rng(seed)
    reference = {(int(a), int(b)) for a, b in dkn}
    values = []
    for _ in range(n_boot):
        picked = [members[k] for k in rng.integers(0, len(members), len(members))]
        kept, _ = relation_dkn(picked, relation_threshold, distinct=distinct)
        values.append(jaccard(kept, reference))
    values = np.asarray(values) if values else np.ones(1)
    low, high = np.quantile(values, [0.025, 0.975])
    mean = float(values.mean())
    return {"jaccard": mean, "jaccard_low": float(low), "jaccard_high": float(high),
            "n_boot": int(n_boot), "stable": bool(mean >= STABILITY_WARNING)}


def relation_activation(paths: Sequence) -> dict[str, np.ndarray] | None:
    """relation -> mean |activation| [n_layers, d_ff] over the discovery queries of DKN
    detection's activation files (``shard-N.activation.npz``: ``relations`` [R], ``sums``
    [R, n_layers, d_ff], ``counts`` [R]); ``None`` without files."""
    if not len(paths):
        return None
    sums: dict[str, np.ndarray] = {}
    counts: Counter = Counter()
    for path in paths:
        with np.load(path, allow_pickle=False) as data:
            for relation, total, n in zip(data["relations"], data["sums"], data["counts"]):
                relation = str(relation)
                sums[relation] = sums.get(relation, 0.0) + np.asarray(total, dtype=np.float64)
                counts[relation] += int(n)
    return {r: sums[r] / counts[r] for r in sums if counts[r] > 0}


def aggregate_relations(query_dkn: pd.DataFrame, relation_threshold: float,
                        calibration: Iterable[str] = (), count: str = "query", *,
                        activation: Mapping[str, np.ndarray] | None = None, seed: int = 0,
                        n_boot: int = 200) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Per relation: the DKN set (see ``relation_dkn``), its control sets, its stability and
    statistics.

    ``query_dkn``: rows of ``detect_dkn_records``; rows of the uuids in ``calibration`` (the
    calibration slice) are dropped first. ``count``: one of :data:`DKN_COUNTS`.
    ``activation``: relation -> mean |activation| [n_layers, d_ff] of its discovery queries
    (from DKN detection); without it the matched random control is not drawn (``None``).
    Returns the JSON-able ``{"relation_threshold", "count", "relations": {rel: {"dkn":
    [[layer, neuron], ...], "counts": [...], "n_queries", "queries_with_dkn", "controls":
    {"random_matched": [[layer, neuron], ...] or None, "frequent_kn": [...]}, "stability":
    {...} (:func:`dkn_stability`), "layers": the sorted layers of the DKN and control sets
    (what fact checking reads)}}}``; a statistics table with one row per relation
    (n_queries, mean_kn, mean_pairs, queries_with_dkn, n_dkn, mean_base_prob, stability,
    stability_low, stability_high, stable); and the layer distribution of the DKN sets
    (relation, layer, n_dkn).
    """
    if count not in DKN_COUNTS:
        raise ValueError(f"unknown DKN count {count!r}; expected one of {DKN_COUNTS}")
    query_dkn = query_dkn[~query_dkn["uuid"].isin(set(calibration))]
    relations: dict = {}
    stats, layers = [], []
    for relation, group in query_dkn.groupby("relation", sort=True):
        members = [list(zip(ls, ns)) for ls, ns in zip(group["dkn_layers"], group["dkn_neurons"])]
        if count == "query":
            counted = members
        else:
            counted = [[(layer, neuron) for ls, ns in zip(pls, pns)
                        for layer, neuron in zip(ls, ns)]
                       for pls, pns in zip(group["pair_layers"], group["pair_neurons"])]
        kept, counts = relation_dkn(counted, relation_threshold, distinct=count == "query")
        query_kn = [list(zip(ls, ns)) for ls, ns in zip(group["kn_layers"], group["kn_neurons"])]
        frequent = frequent_kn_control(query_kn, kept)
        matched = None
        if activation is not None and relation in activation:
            relation_kn = {n for kn in query_kn for n in kn}
            matched = matched_random_control(
                kept, activation[relation], relation_kn,
                seeded_rng("dkn-control", seed, relation))
        stability = dkn_stability(counted, relation_threshold, count == "query", kept,
                                  n_boot=n_boot, seed=int.from_bytes(
                                      seeded_rank("dkn-stability", seed, relation)[:4],
                                      "little"))
        if kept and not stability["stable"]:
            log.warning("WARNING: relation %s: the DKN set is unstable over its %d discovery "
                        "queries (bootstrap Jaccard %.2f [%.2f, %.2f] < %.1f)", relation,
                        len(group), stability["jaccard"], stability["jaccard_low"],
                        stability["jaccard_high"], STABILITY_WARNING)
        used = {int(layer) for layer, _ in [*kept, *frequent, *(matched or [])]}
        with_dkn = int(sum(1 for m in members if len(m)))
        relations[relation] = {
            "dkn": [[layer, neuron] for layer, neuron in kept],
            "counts": [counts[neuron] for neuron in kept],
            "n_queries": int(len(group)),
            "queries_with_dkn": with_dkn,
            "controls": {"random_matched": None if matched is None else
                         [[layer, neuron] for layer, neuron in matched],
                         "frequent_kn": [[layer, neuron] for layer, neuron in frequent]},
            "stability": stability,
            "layers": sorted(used),
        }
        stats.append(dict(relation=relation, n_queries=int(len(group)),
                          mean_kn=float(np.mean([len(k) for k in group["kn_layers"]])),
                          mean_pairs=float(np.mean([len(p) for p in group["pair_layers"]])),
                          queries_with_dkn=with_dkn, n_dkn=len(kept),
                          mean_base_prob=float(group["base_prob"].mean()),
                          stability=stability["jaccard"],
                          stability_low=stability["jaccard_low"],
                          stability_high=stability["jaccard_high"],
                          stable=stability["stable"]))
        for layer, n in sorted(Counter(layer for layer, _ in kept).items()):
            layers.append(dict(relation=relation, layer=int(layer), n_dkn=int(n)))
    summary = {"relation_threshold": relation_threshold, "count": count, "relations": relations}
    stats_df = pd.DataFrame(stats, columns=["relation", "n_queries", "mean_kn", "mean_pairs",
                                            "queries_with_dkn", "n_dkn", "mean_base_prob",
                                            "stability", "stability_low", "stability_high",
                                            "stable"])
    layers_df = pd.DataFrame(layers, columns=["relation", "layer", "n_dkn"])
    return summary, stats_df, layers_df
