"""Attribution shards: the attribution of every candidate object of a slice of facts.

The record format is documented in :mod:`kneurons.records`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import numpy as np
import pandas as pd
from tqdm import tqdm

from .attribution import attribute, probability_gap
from .checkpoint import Checkpoint, open_checkpoint
from .models import LanguageModel
from .neurons import top_neurons
from .queries import encode_query
from .records import COMPLETENESS_TOLERANCE, SCORE_DTYPE, completeness_error, write_shard

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


def candidate_table(facts: pd.DataFrame, part: str) -> pd.DataFrame:
    """One row per (fact, candidate) to attribute, in a fixed order."""
    checked = np.ones(len(facts), bool) if part == "evaluation" else facts.get(
        "calibration", pd.Series(False, index=facts.index)).to_numpy(bool)
    base = facts.assign(checked=checked)
    keep = ["uuid", "lineid", "relation", "template", "sub_label", "checked"]
    true = base[keep + ["obj_uri", "obj_label"]].assign(candidate="true")
    wrong = base.loc[base["checked"], keep + ["wrong_obj_uri", "wrong_obj_label"]]
    wrong = wrong.rename(columns={"wrong_obj_uri": "obj_uri", "wrong_obj_label": "obj_label"})
    table = pd.concat([true, wrong.assign(candidate="wrong")], ignore_index=True)
    order = {"true": 0, "wrong": 1}
    table["_order"] = table["candidate"].map(order)
    table = table.sort_values(["relation", "lineid", "_order"], kind="stable")
    return table.drop(columns="_order").reset_index(drop=True)




def attribute_candidates(
    lm: LanguageModel,
    candidates: pd.DataFrame,
    *,
    method: str,
    steps: int,
    quadrature: str,
    keep_top: int,
    batch_queries: int = 8,
    checkpoint: Checkpoint | None = None,
    progress: TextIO | None = None,
) -> pd.DataFrame:
    """Attribute every row of ``candidates`` (see ``candidate_table``); returns the records.

    Records are written to ``checkpoint`` every ``batch_queries`` rows; rows already there are
    not attributed again.
    """
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
        tic = time.perf_counter()
        results = attribute(lm, queries, method=method, steps=steps, quadrature=quadrature)
        log.debug("%d queries in %.2f s", len(queries), time.perf_counter() - tic)
        chunk = _records(rows, queries, results, keep_top)
        tic = time.perf_counter()
        checked = check_layers(lm.n_layers)
        chunk["completeness_error"] = [  # direct forwards: 3 layers x object tokens per query
            completeness_error(result.scores[checked],
                               probability_gap(lm, query, method=method, layers=checked)[checked])
            for query, result in zip(queries, results)]
        log.debug("completeness of %d queries in %.2f s", len(queries), time.perf_counter() - tic)
        if checkpoint is not None:
            checkpoint.append(chunk)
        records.append(chunk)
        bar.update(len(rows))
    bar.close()
    if not records:
        return _records(candidates.iloc[:0], [], [], keep_top).assign(
            completeness_error=np.zeros(0))
    return pd.concat(records, ignore_index=True)


def _records(rows: pd.DataFrame, queries: Sequence, results: Sequence, keep_top: int) -> pd.DataFrame:
    out = rows[["uuid", "lineid", "relation", "candidate", "obj_uri", "obj_label", "checked"]]
    out = out.reset_index(drop=True).copy()
    tops = [top_neurons(result.scores, keep_top) for result in results]
    out["n_tokens"] = np.array([len(query.target_ids) for query in queries], dtype=np.int64)
    out["prob"] = np.array([result.prob for result in results], dtype=np.float64)
    out["token_probs"] = [np.asarray(result.token_probs, np.float64).tolist() for result in results]
    out["rank"] = np.array([result.rank for result in results], dtype=np.int64)
    out["predicted"] = np.array([result.predicted for result in results], dtype=bool)
    out["top_layers"] = [top[0].tolist() for top in tops]
    out["top_neurons"] = [top[1].tolist() for top in tops]
    out["top_scores"] = [top[2].tolist() for top in tops]
    out["scores"] = [
        result.scores.astype(SCORE_DTYPE).tobytes() if checked else None
        for result, checked in zip(results, out["checked"])
    ]
    return out










def check_layers(n_layers: int, n_checked: int = 3) -> list[int]:
    """The layers whose completeness a shard checks: first, middle and last (a full check
    costs one forward per layer and object token, more than a Gauss-Legendre attribution)."""
    return sorted({round(i * (n_layers - 1) / max(1, n_checked - 1)) for i in range(n_checked)})


def _warn_incomplete(records: pd.DataFrame, method: str, model_type: str) -> int:
    """Log a WARNING when queries' scores miss the completeness property; returns their count."""
    errors = records["completeness_error"] if "completeness_error" in records else pd.Series([])
    bad = int((errors > COMPLETENESS_TOLERANCE).sum())
    if bad:
        why = (f"{method} with the zero baseline is degenerate on {model_type}, whose FFN output "
               "is normalised (P(alpha a) is flat for alpha > 0): use amig" if method == "ig"
               and model_type in ("gemma2", "gemma3_text") else "more steps may be needed")
        log.warning("WARNING: %d of %d queries have a completeness error above %.0f%% "
                    "(median %.3g, max %.3g): their scores do not add up to the probability "
                    "gap; %s", bad, len(records), 100 * COMPLETENESS_TOLERANCE,
                    float(errors.median()), float(errors.max()), why)
    else:
        log.info("completeness error of %d queries: median %.3g, max %.3g (tolerance %.0f%%)",
                 len(records), float(errors.median()) if len(errors) else float("nan"),
                 float(errors.max()) if len(errors) else float("nan"),
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
    batch_queries: int = 8,
    progress: TextIO | None = None,
    identity: dict | None = None,
) -> pd.DataFrame:
    """Attribute one shard of a part's facts and write it to ``output``, resumably.

    ``identity`` (the model's ``source`` folder or hub id, ``revision``...) binds the checkpoint
    to the model's weights (see ``kneurons.checkpoint.open_checkpoint``).
    """
    facts = shard_of(facts, shard, n_shards)
    usable = attributable(lm, facts, method)
    if not usable.all():
        log.warning("%d facts skipped: %s cannot attribute them (relations %s)",
                    int((~usable).sum()), method, sorted(set(facts.loc[~usable, "relation"])))
    candidates = candidate_table(facts[usable], part)
    checkpoint = open_checkpoint(
        Path(str(output) + ".checkpoint"), model=identity, tables={"candidates": candidates},
        options=dict(method=method, steps=steps, quadrature=quadrature, keep_top=keep_top,
                     score_dtype=str(SCORE_DTYPE)))
    log.info("%s shard %d/%d: %d candidates of %d facts", part, shard, n_shards, len(candidates),
             candidates["uuid"].nunique())
    records = attribute_candidates(lm, candidates, method=method, steps=steps,
                                   quadrature=quadrature, keep_top=keep_top,
                                   batch_queries=batch_queries, checkpoint=checkpoint,
                                   progress=progress)
    _warn_incomplete(records, method, lm.spec.model_type)
    write_shard(records, output, dict(n_layers=lm.n_layers, d_ff=lm.d_ff, method=method,
                                      steps=steps, quadrature=quadrature))
    checkpoint.remove()
    return records
