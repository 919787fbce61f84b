"""Knowledge-neuron basics, model-free: the neuron type, the one KN rule, seeded draws.

A neuron is ``(layer, index in the layer's FFN)``. The workflow's one knowledge-neuron rule
(Dai et al. 2022, with the authors' defaults): the neurons whose attribution score is above
``threshold`` x the largest score (none when that is not positive), best first, at most
``max_kn``. :func:`knowledge_neurons_of` applies it to a record's stored best neurons
(``top_layers``/``top_neurons``/``top_scores`` of an attribution shard, made by
:func:`top_neurons`), :func:`knowledge_neurons` to a full [n_layers, d_ff] score matrix, and
:func:`knowledge_neurons_by_fact` to every true-object record of a table. DKN
(:mod:`kneurons.dkn`), LIKN (:mod:`kneurons.likn`), fact checking and the localization
evaluation all take their KN from here.

Seeded draws (:func:`seeded_rng`, :func:`seeded_rank`) depend only on their parts (a purpose,
the seed, uuids), never on row order, so a sample or a control set does not change when other
facts are added or reordered.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

Neuron = tuple[int, int]  # (layer, index in the layer's FFN)


def top_neurons(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` best neurons of a [n_layers, d_ff] score matrix, best first (ties by index)."""
    flat = scores.reshape(-1)
    k = min(k, flat.size)
    order = np.lexsort((np.arange(flat.size), -flat))[:k]
    layers, neurons = np.divmod(order, scores.shape[1])
    return layers.astype(np.int16), neurons.astype(np.int32), flat[order].astype(np.float32)


def knowledge_neurons_of(top_layers: Sequence[int], top_neurons: Sequence[int],
                         top_scores: Sequence[float], threshold: float, max_kn: int
                         ) -> list[Neuron]:
    """Knowledge neurons from a record's stored best neurons (best first): score above
    ``threshold`` x the record's maximum score, at most ``max_kn``."""
    scores = np.asarray(top_scores, dtype=np.float64)
    if scores.size == 0 or scores[0] <= 0:
        return []
    keep = scores > threshold * scores[0]
    chosen = [(int(layer), int(neuron)) for layer, neuron, k in
              zip(top_layers, top_neurons, keep) if k]
    return chosen[:max_kn]


def knowledge_neurons(scores: np.ndarray, threshold: float, max_kn: int | None
                      ) -> list[tuple[int, int, float]]:
    """Neurons with ``score > threshold * max(scores)``, as (layer, neuron, score) sorted by
    score (descending; ties by layer, neuron), at most ``max_kn`` of them. Nothing is
    selected when the maximum score is not positive. The rule of :func:`knowledge_neurons_of`
    (which works on a record's stored best neurons), applied to a full score matrix."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError("scores must be [n_layers, d_ff]")
    top = float(scores.max()) if scores.size else 0.0
    if not top > 0:
        return []
    k = int((scores > threshold * top).sum())
    layers, neurons, vals = top_neurons(scores, k)  # best first, ties by (layer, neuron)
    chosen = knowledge_neurons_of(layers, neurons, vals, threshold,
                                  k if max_kn is None else max(0, int(max_kn)))
    return [(layer, neuron, float(scores[layer, neuron])) for layer, neuron in chosen]


def knowledge_neurons_by_fact(records: pd.DataFrame, kn_threshold: float, max_kn: int
                              ) -> dict[str, list[Neuron]]:
    """uuid -> KN (best first) of each true-object record of an attribution table."""
    true = records[records["candidate"] == "true"]
    if true["uuid"].duplicated().any():
        raise ValueError("several true-object records of one fact")
    return {uuid: knowledge_neurons_of(layers, neurons, scores, kn_threshold, max_kn)
            for uuid, layers, neurons, scores in zip(true["uuid"], true["top_layers"],
                                                     true["top_neurons"], true["top_scores"])}


def seeded_rank(*parts) -> bytes:
    """sha256 of ``parts`` (joined by NUL): a sort key that depends on nothing else."""
    return hashlib.sha256("\x00".join(str(p) for p in parts).encode("utf-8")).digest()


def seeded_rng(*parts) -> np.random.Generator:
    """A generator seeded from sha256 of ``parts`` (independent of row order)."""
    return np.random.default_rng(int.from_bytes(seeded_rank(*parts)[:16], "little"))


def random_neurons_like(neurons: Sequence[Neuron], exclude: Iterable[Neuron], d_ff: int,
                        rng: np.random.Generator) -> list[Neuron]:
    """Per neuron of ``neurons`` a uniformly drawn distinct neuron of the same layer outside
    ``exclude``."""
    taken = {(int(a), int(b)) for a, b in exclude}
    out = []
    for layer, _ in neurons:
        free = [i for i in range(d_ff) if (int(layer), i) not in taken]
        if not free:
            raise ValueError(f"no free neuron left in layer {layer}")
        pick = (int(layer), int(free[rng.integers(len(free))]))
        taken.add(pick)
        out.append(pick)
    return out
