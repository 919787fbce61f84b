"""Attribution shards: the attribution of every candidate object of a slice of facts.

The record format is documented in :mod:`kneurons.records`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .attribution import attribute, probability_gap
from .checkpoint import Checkpoint, open_checkpoint
from .models import LanguageModel
from .neurons import top_neurons
from .queries import EncodedQuery, encode_query
from .records import COMPLETENESS_TOLERANCE, SCORE_DTYPE, completeness_error, write_shard
from .scoring import head_at, object_token_probs

log = logging.getLogger(__name__)


def shard_of(facts: pd.DataFrame, shard: int, n_shards: int) -> pd.DataFrame:
    """The facts of shard ``shard`` of ``n_shards``: every n-th fact, so relations spread evenly."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is not in 0..{n_shards - 1}")
    ordered = facts.sort_values(["relation", "lineid"], kind="stable").reset_index(drop=True)
    return ordered.iloc[shard::n_shards].reset_index(drop=True)


def attributable(lm: LanguageModel, facts: pd.DataFrame, method: str) -> pd.Series:
    """Which facts ``method`` can attribute: AMIG needs at least one query token to replace,
    which a causal model lacks when the template starts with ``[Y]`` (e.g. P1923). The others
    get no records, so fact checking scores both methods without them and counts them
    (:func:`kneurons.factcheck.dropped_facts`)."""
    if method != "amig" or lm.arch != "causal":
        return pd.Series(True, index=facts.index)
    return ~facts["template"].str.lstrip().str.startswith("[Y]")


PARTS = ("discovery", "evaluation", "calibration")
"""The attribution parts (see :mod:`kneurons.records`): ``discovery`` (true objects of the
discovery facts, every layer), ``evaluation`` and ``calibration`` (the candidates only fact
checking reads, on their relation's layers)."""


def candidate_table(facts: pd.DataFrame, part: str) -> pd.DataFrame:
    """One row per (fact, candidate) of ``part`` to attribute, in a fixed order.

    ``discovery``: the true object of every fact (``checked``: the calibration slice);
    ``evaluation``: the true and the wrong object of every fact; ``calibration`` (``facts``:
    the discovery facts): the wrong object of the calibration slice, whose true objects are
    in the discovery part."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")
    calibration = facts.get("calibration", pd.Series(False, index=facts.index))
    calibration = calibration.fillna(False).to_numpy(bool)
    checked = np.ones(len(facts), bool) if part == "evaluation" else calibration
    base = facts.assign(checked=checked)
    keep = ["uuid", "lineid", "relation", "template", "sub_label", "checked"]
    true = base[keep + ["obj_uri", "obj_label"]].assign(candidate="true")
    wrong = base.loc[base["checked"], keep + ["wrong_obj_uri", "wrong_obj_label"]]
    wrong = wrong.rename(columns={"wrong_obj_uri": "obj_uri", "wrong_obj_label": "obj_label"})
    wrong = wrong.assign(candidate="wrong")
    parts = {"discovery": [true], "evaluation": [true, wrong], "calibration": [wrong]}[part]
    table = pd.concat(parts, ignore_index=True)
    order = {"true": 0, "wrong": 1}
    table["_order"] = table["candidate"].map(order)
    table = table.sort_values(["relation", "lineid", "_order"], kind="stable")
    return table.drop(columns="_order").reset_index(drop=True)


def completeness_layers(n_layers: int, layers: Sequence[int]) -> list[int]:
    """The attributed ``layers`` whose completeness a record checks: those of
    :func:`check_layers` (first, middle, last of the model), or where none of them was
    attributed, the middle one of ``layers``."""
    layers = sorted(int(layer) for layer in layers)
    if not layers:
        return []
    checked = sorted(set(check_layers(n_layers)) & set(layers))
    return checked or [layers[len(layers) // 2]]


@dataclass
class Unpatched:
    """The unpatched forward of a query that is not attributed (no ``scores``); the fields
    of :class:`kneurons.attribution.Attribution` the records read."""

    token_probs: np.ndarray
    prob: float
    rank: int
    predicted: bool
    scores: None = None


def unpatched(lm: LanguageModel, query: EncodedQuery) -> Unpatched:
    """P(object token t) at its position, the first token's rank and the model's own
    prediction (argmax at every object position), from one forward of ``query`` (the head
    runs at the object positions only), as :func:`kneurons.attribution.attribute` reports
    them."""
    ids = torch.as_tensor([query.input_ids], device=lm.device)  # [1, S]
    pos = torch.as_tensor(query.target_positions, device=lm.device)  # [T]
    tgt = torch.as_tensor(query.target_ids, device=lm.device)  # [T]
    with torch.inference_mode(), head_at(lm, pos[None, :]) as sliced:
        logits = lm.model(input_ids=ids).logits  # [1, T or S, vocab]
    row = (logits[0] if sliced[0] else logits[0, pos]).float()  # [T, vocab]
    token_probs = object_token_probs(row, query.target_ids).cpu().numpy().astype(np.float32)
    rank = int((row[0] > row[0, tgt[0]]).sum().item()) + 1
    predicted = bool((row.argmax(-1) == tgt).all().item())
    return Unpatched(token_probs, float(token_probs.mean()), rank, predicted)


def attribute_until_converged(
    lm: LanguageModel,
    queries: Sequence[EncodedQuery],
    layers: Sequence[int],
    *,
    method: str,
    steps: int,
    quadrature: str,
    max_steps: int | None = None,
) -> tuple[list, np.ndarray, np.ndarray]:
    """Attribute ``queries`` on ``layers``; each query whose completeness error (on
    :func:`completeness_layers`) exceeds ``COMPLETENESS_TOLERANCE`` is attributed again with
    twice the steps (the last try with ``max_steps`` itself), until it is within the tolerance
    or ``max_steps`` is reached (``None`` or <= ``steps``: no refinement).

    Returns the attributions, the completeness errors [n] and the steps used [n] (int64)."""
    layers = sorted(int(layer) for layer in layers)
    checked = completeness_layers(lm.n_layers, layers)
    tic = time.perf_counter()
    gaps = [probability_gap(lm, query, method=method, layers=checked)[checked]
            for query in queries]  # direct forwards: checked layers x object tokens per query
    log.debug("completeness gaps of %d queries in %.2f s", len(queries), time.perf_counter() - tic)
    results = list(attribute(lm, queries, method=method, steps=steps, quadrature=quadrature,
                             layers=layers))
    errors = np.array([completeness_error(result.scores[checked], gap)
                       for result, gap in zip(results, gaps)], dtype=np.float64)
    used = np.full(len(queries), steps, dtype=np.int64)
    cap = steps if max_steps is None else max(int(max_steps), steps)
    todo = [i for i in range(len(queries)) if errors[i] > COMPLETENESS_TOLERANCE]
    current = steps
    while todo and current < cap:
        current = min(2 * current, cap)
        redo = attribute(lm, [queries[i] for i in todo], method=method, steps=current,
                         quadrature=quadrature, layers=layers)
        for i, result in zip(todo, redo):
            results[i] = result
            errors[i] = completeness_error(result.scores[checked], gaps[i])
            used[i] = current
        log.debug("%d queries attributed again with %d steps", len(todo), current)
        todo = [i for i in todo if errors[i] > COMPLETENESS_TOLERANCE]
    return results, errors, used


def attribute_candidates(
    lm: LanguageModel,
    candidates: pd.DataFrame,
    *,
    method: str,
    steps: int,
    quadrature: str,
    keep_top: int,
    max_steps: int | None = None,
    relation_layers: Mapping[str, Sequence[int]] | None = None,
    batch_queries: int = 8,
    checkpoint: Checkpoint | None = None,
    progress: TextIO | None = None,
) -> pd.DataFrame:
    """Attribute every row of ``candidates`` (see ``candidate_table``); returns the records.

    ``relation_layers``: relation -> the layers to attribute (``None``: every layer for every
    relation); a relation missing from it, or with no layers, gets the unpatched forward only
    (:func:`unpatched`). Non-converged queries are refined up to ``max_steps``
    (:func:`attribute_until_converged`). Records are written to ``checkpoint`` every
    ``batch_queries`` rows; rows already there are not attributed again.
    """
    every = tuple(range(lm.n_layers))

    def layers_of(relation: str) -> tuple[int, ...]:
        if relation_layers is None:
            return every
        return tuple(sorted({int(layer) for layer in relation_layers.get(relation, ())}))

    done = checkpoint.load() if checkpoint is not None else None
    start = 0 if done is None else len(done)
    if start:
        log.info("resuming after %d of %d records from the checkpoint", start, len(candidates))
    records = [done] if done is not None else []
    bar = tqdm(total=len(candidates), initial=start, file=progress, desc="attribution",
               mininterval=5.0, unit="query")
    for begin in range(start, len(candidates), batch_queries):
        rows = candidates.iloc[begin:begin + batch_queries]
        queries = [encode_query(lm, row.template, row.sub_label, row.obj_label)
                   for row in rows.itertuples()]
        row_layers = [layers_of(relation) for relation in rows["relation"]]
        results: list = [None] * len(rows)
        errors = np.full(len(rows), np.nan)
        used = np.zeros(len(rows), dtype=np.int64)
        tic = time.perf_counter()
        for layers in dict.fromkeys(row_layers):  # one call per layer set, in row order
            index = [i for i, mine in enumerate(row_layers) if mine == layers]
            if not layers:
                for i in index:
                    results[i] = unpatched(lm, queries[i])
                continue
            found, errors[index], used[index] = attribute_until_converged(
                lm, [queries[i] for i in index], layers, method=method, steps=steps,
                quadrature=quadrature, max_steps=max_steps)
            for i, result in zip(index, found):
                results[i] = result
        log.debug("%d queries in %.2f s", len(queries), time.perf_counter() - tic)
        chunk = _records(rows, queries, results, keep_top, row_layers)
        chunk["completeness_error"] = errors
        chunk["steps"] = used
        chunk["converged"] = ~(errors > COMPLETENESS_TOLERANCE)  # NaN (not attributed): True
        if checkpoint is not None:
            checkpoint.append(chunk)
        records.append(chunk)
        bar.update(len(rows))
    bar.close()
    if not records:
        return _records(candidates.iloc[:0], [], [], keep_top).assign(
            completeness_error=np.zeros(0), steps=np.zeros(0, np.int64),
            converged=np.zeros(0, bool))
    return pd.concat(records, ignore_index=True)


def _records(rows: pd.DataFrame, queries: Sequence, results: Sequence, keep_top: int,
             layers: Sequence[Sequence[int]] | None = None) -> pd.DataFrame:
    """The record columns of ``rows`` from their attributions (``layers``: each row's
    attributed layers, default every layer of the scores; none: an :class:`Unpatched`)."""
    out = rows[["uuid", "lineid", "relation", "candidate", "obj_uri", "obj_label", "checked"]]
    out = out.reset_index(drop=True).copy()
    if layers is None:
        layers = [range(len(result.scores)) for result in results]
    stored = [np.asarray(list(mine), dtype=np.int64) for mine in layers]
    tops = []
    for result, mine in zip(results, stored):
        if result.scores is None or not len(mine):
            tops.append((np.zeros(0, np.int16), np.zeros(0, np.int32), np.zeros(0, np.float32)))
            continue
        top_layer, top_neuron, top_score = top_neurons(result.scores[mine], keep_top)
        tops.append((mine[top_layer].astype(np.int16), top_neuron, top_score))
    out["n_tokens"] = np.array([len(query.target_ids) for query in queries], dtype=np.int64)
    out["prob"] = np.array([result.prob for result in results], dtype=np.float64)
    out["token_probs"] = [np.asarray(result.token_probs, np.float64).tolist() for result in results]
    out["rank"] = np.array([result.rank for result in results], dtype=np.int64)
    out["predicted"] = np.array([result.predicted for result in results], dtype=bool)
    out["top_layers"] = [top[0].tolist() for top in tops]
    out["top_neurons"] = [top[1].tolist() for top in tops]
    out["top_scores"] = [top[2].tolist() for top in tops]
    out["layers"] = [mine.astype(np.int16).tolist() for mine in stored]
    out["scores"] = [
        result.scores[mine].astype(SCORE_DTYPE).tobytes()
        if checked and result.scores is not None and len(mine) else None
        for result, mine, checked in zip(results, stored, out["checked"])
    ]
    return out


def check_layers(n_layers: int, n_checked: int = 3) -> list[int]:
    """The layers whose completeness a shard checks: first, middle and last (a full check
    costs one forward per layer and object token, more than a Gauss-Legendre attribution)."""
    return sorted({round(i * (n_layers - 1) / max(1, n_checked - 1)) for i in range(n_checked)})


def _warn_incomplete(records: pd.DataFrame, method: str, model_type: str, steps: int) -> int:
    """Log how many queries were refined and a WARNING when some still miss the completeness
    property (they are kept, marked ``converged == False``, and left out downstream); returns
    their count."""
    errors = records["completeness_error"] if "completeness_error" in records else pd.Series([])
    attributed = errors[np.isfinite(errors.to_numpy(np.float64))]
    refined = int((records["steps"] > steps).sum()) if "steps" in records else 0
    if refined:
        log.info("%d of %d queries attributed again with more steps (up to %d)", refined,
                 len(attributed), int(records["steps"].max()))
    bad = int((attributed > COMPLETENESS_TOLERANCE).sum())
    if bad:
        why = (f"{method} with the zero baseline is degenerate on {model_type}, whose FFN output "
               "is normalised (P(alpha a) is flat for alpha > 0): use amig" if method == "ig"
               and model_type in ("gemma2", "gemma3_text") else "more steps may be needed "
               "(attribution.max_steps)")
        log.warning("WARNING: %d of %d queries have a completeness error above %.0f%% "
                    "(median %.3g, max %.3g): their scores do not add up to the probability "
                    "gap; they are marked not converged and left out downstream; %s", bad,
                    len(attributed), 100 * COMPLETENESS_TOLERANCE, float(attributed.median()),
                    float(attributed.max()), why)
    else:
        log.info("completeness error of %d queries: median %.3g, max %.3g (tolerance %.0f%%)",
                 len(attributed), float(attributed.median()) if len(attributed) else float("nan"),
                 float(attributed.max()) if len(attributed) else float("nan"),
                 100 * COMPLETENESS_TOLERANCE)
    return bad


def run_shard(
    lm: LanguageModel,
    facts: pd.DataFrame,
    *,
    part: str,
    shard: int,
    n_shards: int,
    method: str,
    steps: int,
    quadrature: str,
    keep_top: int,
    output: str | Path,
    max_steps: int | None = None,
    relation_layers: Mapping[str, Sequence[int]] | None = None,
    batch_queries: int = 8,
    progress: TextIO | None = None,
    identity: dict | None = None,
) -> pd.DataFrame:
    """Attribute one shard of a part's candidates and write it to ``output``, resumably.

    ``facts``: the part's facts (for ``calibration``, the discovery facts).
    ``relation_layers``: relation -> layers to attribute (``None``: every layer; see
    :func:`attribute_candidates`). ``identity`` (the model's ``source`` folder or hub id,
    ``revision``...) binds the checkpoint to the model's weights (see
    ``kneurons.checkpoint.open_checkpoint``).
    """
    facts = shard_of(facts, shard, n_shards)
    usable = attributable(lm, facts, method)
    if not usable.all():
        log.warning("%d facts skipped: %s cannot attribute them (relations %s)",
                    int((~usable).sum()), method, sorted(set(facts.loc[~usable, "relation"])))
    candidates = candidate_table(facts[usable], part)
    if relation_layers is not None:
        relation_layers = {str(r): sorted(int(x) for x in layers)
                           for r, layers in sorted(relation_layers.items())}
        forward_only = sorted(set(candidates["relation"]) - {r for r, layers in
                                                             relation_layers.items() if layers})
        log.info("layers by relation %s; without layers (one forward each, no attribution): %s",
                 {r: layers for r, layers in relation_layers.items() if layers}, forward_only)
    checkpoint = open_checkpoint(
        Path(str(output) + ".checkpoint"), model=identity, tables={"candidates": candidates},
        options=dict(method=method, steps=steps, quadrature=quadrature, keep_top=keep_top,
                     max_steps=max_steps, relation_layers=relation_layers,
                     score_dtype=str(SCORE_DTYPE), format=2))
    log.info("%s shard %d/%d: %d candidates of %d facts", part, shard, n_shards, len(candidates),
             candidates["uuid"].nunique())
    records = attribute_candidates(lm, candidates, method=method, steps=steps,
                                   quadrature=quadrature, keep_top=keep_top,
                                   max_steps=max_steps, relation_layers=relation_layers,
                                   batch_queries=batch_queries, checkpoint=checkpoint,
                                   progress=progress)
    _warn_incomplete(records, method, lm.spec.model_type, steps)
    write_shard(records, output, dict(n_layers=lm.n_layers, d_ff=lm.d_ff, method=method,
                                      steps=steps, max_steps=max_steps, quadrature=quadrature))
    checkpoint.remove()
    return records
