"""The attribution shard format: one record per (fact, candidate); torch-free.

A shard holds one record per (fact, candidate), where the candidate is the fact's true object
(``candidate == "true"``) or its wrong object (``"wrong"``). Three parts, each sharded alike
(``kneurons.shards.shard_of``):

* ``discovery`` (rule ``attribute_shard``): the true object of every discovery fact, on every
  layer (its knowledge neurons are what DKN discovery needs). The facts of the calibration
  slice (``calibration == True``), on which an automatic fact-checking threshold is chosen,
  are *checked*: their records keep the full score matrix.
* ``evaluation`` (rule ``attribute_checked``, after ``aggregate_dkn``): the true and the wrong
  object of every evaluation fact.
* ``calibration`` (rule ``attribute_checked``): the wrong object of every calibration fact
  (its true object is in the discovery part).

Fact checking reads a checked record's scores only at its relation's DKN and control neurons,
so the ``evaluation`` and ``calibration`` records are attributed on the layers of these
neurons only (:func:`attributed_layers`; column ``layers``), and a relation without such
layers gets no attribution at all: its records hold the unpatched forward's ``prob``,
``token_probs``, ``rank`` and ``predicted``, no scores (``steps == 0``). With
``attribution.full_matrices`` every checked record is attributed on every layer instead, as
before this format. Every record keeps its ``keep_top`` best-scoring neurons (of its attributed
layers), among which its knowledge neurons are chosen later (so a change of the
knowledge-neuron threshold reruns no attribution).

Columns of a shard (one row per record):

==================  ===============  ====================================================
column              type             meaning
==================  ===============  ====================================================
uuid                str              the fact (LAMA T-REx uuid, the same in every language)
lineid              int64            the fact's line in LAMA T-REx
relation            str              Wikidata property, e.g. ``P36``
candidate           str              ``true`` or ``wrong``
obj_uri             str              the candidate's Wikidata id
obj_label           str              the candidate's label in this language
checked             bool             the fact is fact-checked (evaluation or calibration)
n_tokens            int64            the candidate's number of tokens
prob                float64          mean over its tokens of P(token | query), unpatched
token_probs         list<float64>    P(token | query) of each token
rank                int64            1-based rank of the first token at its position
predicted           bool             the model's own prediction equals the candidate
top_layers          list<int16>      layers of the ``keep_top`` best neurons, best first
top_neurons         list<int32>      their indices in the layer's FFN
top_scores          list<float32>    their attribution scores (probability units)
layers              list<int16>      the attributed layers, ascending (empty: none)
scores              binary or null   float32 [len(layers), d_ff] row-major, checked records only
completeness_error  float64          the convergence error (below), NaN without attribution
steps               int64            quadrature nodes the scores were made with (0: none)
converged           bool             completeness_error <= ``COMPLETENESS_TOLERANCE``
==================  ===============  ====================================================

Shards written before the ``layers`` column existed hold ``scores`` as float32
[n_layers, d_ff] (every layer); :func:`neuron_scores` reads both.

``scores`` are float32 (:data:`SCORE_DTYPE`): attributions of unlikely objects of a real
model are tiny (1e-7 and below), where float16 underflows (to 0 below ~6e-8, ~20% error near
1e-7) and would tie DKN scores; float32 keeps a relative error below 1e-7 down to ~1e-38, at
twice float16's size (the cost at paper scale is in docs/differences.md). A per-row scale with
float16 would halve that but still lose values ~1e-5 times smaller than the row's largest.

The parquet metadata holds ``n_layers``, ``d_ff``, ``method``, ``steps`` (the configured
nodes), ``max_steps`` and ``quadrature``.

Column ``completeness_error`` (float64, a ratio): the attribution's convergence error,
sum over layers |sum of the layer's scores - gap| / max(sum |gap|, ``COMPLETENESS_GAP_FLOOR``),
over the first, middle and last layer that were attributed (``shards.completeness_layers``),
gap = ``attribution.probability_gap`` (probability units). Above ``COMPLETENESS_TOLERANCE``
the scores do not integrate to the probability change: too few steps, or a degenerate path
(``ig`` on Gemma's post-normalised FFNs). Such a query is attributed again with twice the
nodes, up to ``attribution.max_steps``, before its record is written (column ``steps``); if it
still misses the tolerance its record is kept, counted, and marked ``converged == False``,
and every consumer leaves it out (:func:`converged`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .io import atomic_path

CANDIDATES = ("true", "wrong")
SCORE_DTYPE = np.dtype("<f4")
"""The stored dtype of the ``scores`` column (little-endian float32)."""

def write_shard(records: pd.DataFrame, path: str | Path, metadata: dict) -> None:
    """Write a shard with its metadata (n_layers, d_ff, method, steps) atomically."""
    table = pa.Table.from_pandas(records, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"kneurons"] = json.dumps(metadata, sort_keys=True).encode()
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(meta), tmp)

def read_shard(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """A shard's records and its metadata."""
    table = pq.read_table(path)
    metadata = json.loads(table.schema.metadata[b"kneurons"])
    return table.to_pandas(), metadata

def read_shards(paths: Sequence[str | Path]) -> tuple[pd.DataFrame, dict]:
    """The records of several shards of one model (their metadata must agree)."""
    frames, metadata = [], None
    for path in paths:
        records, meta = read_shard(path)
        if metadata is not None and meta != metadata:
            raise ValueError(f"{path}: metadata {meta} differs from {metadata} of the other shards")
        frames.append(records)
        metadata = meta
    if metadata is None:
        raise ValueError("no shards given")
    return pd.concat(frames, ignore_index=True), metadata


COMPLETENESS_TOLERANCE = 0.05  # completeness_error above which a shard warns
# probability units: below this total gap the error is measured against it instead (an
# object of P = 1e-6 has gaps of 1e-6, whose relative error says nothing about its scores)
COMPLETENESS_GAP_FLOOR = 1e-3


def completeness_error(scores: np.ndarray, gap: np.ndarray) -> float:
    """sum_l |sum_j scores[l, j] - gap[l]| / max(sum_l |gap[l]|, COMPLETENESS_GAP_FLOOR) for
    scores [n_layers, d_ff] and gap [n_layers] (probability units)."""
    total = max(float(np.abs(gap).sum()), COMPLETENESS_GAP_FLOOR)
    return float(np.abs(scores.sum(axis=1) - gap).sum() / total)


def score_matrix(record_scores: bytes, n_layers: int, d_ff: int) -> np.ndarray:
    """The float32 [n_layers, d_ff] score matrix of a checked record stored on every layer
    (a record stored on ``layers`` only: pass ``len(layers)``; or use :func:`neuron_scores`)."""
    return np.frombuffer(record_scores, dtype=SCORE_DTYPE).reshape(n_layers, d_ff).astype(np.float32)


def converged(records: pd.DataFrame) -> pd.Series:
    """Which records may be used: those whose attribution converged (column ``converged``;
    shards written before it existed count as converged). Every consumer of attribution
    records (knowledge neurons, DKN, LIKN, fact checking, localization) keeps these rows
    only and counts the others (docs/method.md, "Converged or not counted")."""
    if "converged" not in records:
        return pd.Series(True, index=records.index)
    return records["converged"].fillna(False).astype(bool)


def record_layers(records: pd.DataFrame, n_layers: int) -> list[np.ndarray]:
    """The layers each record's ``scores`` hold, ascending: its ``layers`` column, or every
    layer where the shard has no such column (shards of the earlier format) or the value is
    missing."""
    every = np.arange(n_layers, dtype=np.int64)
    if "layers" not in records:
        return [every] * len(records)
    return [every if value is None else np.asarray(value, dtype=np.int64).reshape(-1)
            for value in records["layers"]]


def neuron_scores(records: pd.DataFrame, neurons: Sequence[tuple[int, int]], n_layers: int,
                  d_ff: int) -> np.ndarray:
    """The stored scores of ``neurons`` [(layer, index), ...] for each record:
    [n_records, len(neurons)] float64, NaN where a record stores no scores (unchecked records,
    or relations without attributed layers) or none for that neuron's layer (a record
    attributed on other layers only). Reads both stored formats: ``scores`` float32
    [len(layers), d_ff] with a ``layers`` column, and [n_layers, d_ff] without one. The one
    way to read score matrices by neuron."""
    pairs = np.asarray([tuple(n) for n in neurons], dtype=np.int64).reshape(-1, 2)
    out = np.full((len(records), len(pairs)), np.nan)
    if not len(pairs):
        return out
    bad = (pairs[:, 0] < 0) | (pairs[:, 0] >= n_layers) | (pairs[:, 1] < 0) | (pairs[:, 1] >= d_ff)
    if bad.any():
        layer, unit = pairs[np.argmax(bad)]
        raise ValueError(f"neuron ({layer}, {unit}) is outside [0, {n_layers}) x [0, {d_ff})")
    row_of_layer = np.full(n_layers, -1, dtype=np.int64)
    for row, (blob, layers) in enumerate(zip(records["scores"], record_layers(records, n_layers))):
        if blob is None:
            continue
        n_bytes = len(layers) * d_ff * SCORE_DTYPE.itemsize
        if len(blob) != n_bytes:
            raise ValueError(f"record {records['uuid'].iat[row]}/{records['candidate'].iat[row]}"
                             f" has {len(blob)} bytes of scores; expected {n_bytes} "
                             f"(float32 [{len(layers)}, {d_ff}])")
        row_of_layer[:] = -1
        row_of_layer[layers] = np.arange(len(layers))
        stored = row_of_layer[pairs[:, 0]]  # [n_neurons]: the blob's row, -1 if not stored
        have = stored >= 0
        matrix = np.frombuffer(blob, dtype=SCORE_DTYPE)  # [len(layers) * d_ff], row-major
        out[row, have] = matrix[stored[have] * d_ff + pairs[have, 1]]
    return out


def attributed_layers(document: Mapping) -> dict[str, list[int]]:
    """relation -> the layers its fact-checked records are attributed on, from the DKN stage's
    JSON (``results/neurons/{model}/{lang}/dkn_by_relation.json``): each relation's
    ``layers`` (the layers of its DKN and control sets), or the layers of its DKN where a
    document has no ``layers``. Sorted by relation; a relation with none maps to []."""
    out = {}
    for relation, entry in sorted(document.get("relations", {}).items()):
        if "layers" in entry:
            layers = entry["layers"]
        else:
            layers = [layer for layer, _ in entry.get("dkn", [])]
        out[str(relation)] = sorted({int(layer) for layer in layers})
    return out
