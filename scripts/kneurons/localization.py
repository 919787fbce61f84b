"""Are they knowledge neurons? The localization evaluation: erase and enhance, AMIG vs IG.

The check of Dai et al. (2022) (and of the authors' ``main_garns.py`` suppress/enhance step and
their ``ablation_wo_sig.py`` "without SIG", i.e. plain-IG, ablation): intervene on a fact's
knowledge neurons (KN) and measure what happens to the fact, to other facts, and with neurons
picked by chance.

**Sample** (:func:`sample_facts`). Discovery facts whose true object has a record in the run's
attribution shards and that both methods can attribute (AMIG needs a query token:
:func:`kneurons.shards.attributable`), ranked by sha256("localization-sample", seed, uuid),
the first ``sample``. Facts whose record keeps its full score matrix (the checked facts) are
preferred when there are at least ``sample`` of them, so that the completeness error of the
run's method is known without attributing again.

**Neuron sets**, per fact and per method m in (``amig``, ``ig``), the workflow's one KN rule
(score above ``kn_threshold`` x the record's maximum, at most ``max_kn``, best first):

* ``kn``: the KN by m. The run's method: read from its shard record
  (:func:`kneurons.neurons.knowledge_neurons_of`); the other method: the sample only is
  attributed again with the run's steps and quadrature
  (:func:`kneurons.neurons.knowledge_neurons`).
* ``random``: per KN neuron a uniformly drawn distinct neuron of the same layer that is in
  neither method's KN (:func:`kneurons.neurons.random_neurons_like`, seeded per fact and method).
* ``activation``: the |KN| neurons with the highest activation (mean over the object
  positions, the unpatched model), in any layer: a method-free baseline.

**Interventions** (:mod:`kneurons.scoring`): ``erase`` (activation x 0) and ``enhance``
(activation x ``enhance_factor``) at the object position(s) of the query being scored.
**Targets**: the fact itself (``fact``), ``n_related`` other discovery facts of its relation
(``related``) and ``n_unrelated`` discovery facts of other relations (``unrelated``), each
seeded per fact. Measured per (fact, method, set, operation, target): P(true object) and top-1
before and after, and the relative change (after - before) / before.

**Completeness** (the attribution's convergence check, next to the localization numbers):
per fact and method, the per-layer sums of the scores against
:func:`kneurons.attribution.probability_gap` (what they must add up to):
``completeness_error`` = sum over layers of |sum_j score_lj - gap_l|, relative to sum over
layers of |gap_l|. A zero-baseline IG whose path is flat (Gemma: an RMSNorm after the FFN
output makes P(alpha a) constant for alpha > 0) has scores near 0 and a relative error near
1: its "knowledge neurons" are then noise. NaN for the run's method where the shard kept no
full score matrix.

**Statistics** (:func:`localization_statistics`, :func:`paired_comparison`, model-free): per
(method, set, operation, target) over the rows, with no outlier dropped: median, quartiles
(numpy's linear interpolation) and IQR of the relative change, the share of rows whose P(true)
falls by more than half (after < before / 2), top-1 accuracy before/after and the share of
rows whose top-1 changed. AMIG vs IG: per fact the mean relative change over its rows of a
target group, paired over the facts both methods have, Wilcoxon signed-rank test of
AMIG - IG (two-sided; zero differences dropped; the exact distribution for up to 50 untied
differences, else the normal approximation; every such choice, and too few non-zero
differences, is written in the row's ``note``; nothing raises).
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
from .attribution import METHODS, attribute, probability_gap
from .checkpoint import open_checkpoint
from .hooks import capture_ffn
from .models import LanguageModel
from .neurons import (Neuron, knowledge_neurons, knowledge_neurons_of, random_neurons_like,
                      seeded_rank, seeded_rng)
from .queries import EncodedQuery, encode_query, pad_queries
from .records import score_matrix
from .shards import attributable

log = logging.getLogger(__name__)

NEURON_SETS = ("kn", "random", "activation")
OPERATIONS = ("erase", "enhance")
TARGETS = ("fact", "related", "unrelated")
ROW_COLUMNS = ["uuid", "relation", "method", "neuron_set", "operation", "factor", "target",
               "target_uuid", "target_relation", "n_neurons", "layers", "neurons", "p_before",
               "p_after", "top1_before", "top1_after", "rel_change", "gap_total",
               "score_total", "completeness_error", "completeness_rel_error"]
"""Columns of :func:`localize`'s table: one row per (fact, method, set, operation, target
query). ``factor``: the activation multiplier (0 = erase); ``layers``/``neurons``: the set;
``p_*`` = P(true object of the target query), mean over its tokens; ``gap_total``,
``score_total``: sums over layers of the probability gap and of the method's scores (the
fact's, repeated on every row of the method)."""
STATS_COLUMNS = ["method", "neuron_set", "operation", "target", "n", "n_facts",
                 "mean_neurons", "median_rel_change", "q1_rel_change", "q3_rel_change",
                 "iqr_rel_change", "mean_rel_change", "share_halved", "top1_before",
                 "top1_after", "top1_changed"]
PAIRED_COLUMNS = ["neuron_set", "operation", "target", "n_pairs", "n_nonzero",
                  "median_amig", "median_ig", "median_difference", "statistic", "p_value",
                  "note"]
MIN_NONZERO = 6
"""Fewer non-zero paired differences cannot give a two-sided Wilcoxon p below 0.05."""


# ---- the sample, the sets (model-free) --------------------------------------------------------

def sample_facts(facts: pd.DataFrame, records: pd.DataFrame, n: int, seed: int,
                 usable: pd.Series | None = None) -> list[str]:
    """The sampled uuids, best-ranked first (see the module docstring)."""
    true = records[records["candidate"] == "true"]
    pool = facts[facts["uuid"].isin(set(true["uuid"]))]
    if usable is not None:
        pool = pool[usable.reindex(pool.index).fillna(False).to_numpy(bool)]
    uuids = sorted(set(pool["uuid"]))
    with_scores = set(true.loc[true["scores"].notna(), "uuid"]) if "scores" in true else set()
    preferred = [u for u in uuids if u in with_scores]
    if len(preferred) >= n:
        uuids = preferred
    return sorted(uuids, key=lambda u: seeded_rank("localization-sample", seed, u))[:n]


def target_facts(uuid: str, relation_of: dict[str, str], n_related: int, n_unrelated: int,
                 seed: int) -> tuple[list[str], list[str]]:
    """(related, unrelated): other facts of ``uuid``'s relation and facts of other relations,
    each ranked by sha256(purpose, seed, uuid, v)."""
    relation = relation_of[uuid]
    same = [v for v, r in relation_of.items() if r == relation and v != uuid]
    other = [v for v, r in relation_of.items() if r != relation]
    related = sorted(same, key=lambda v: seeded_rank("localization-related", seed, uuid, v))
    unrelated = sorted(other, key=lambda v: seeded_rank("localization-unrelated", seed, uuid, v))
    return related[:n_related], unrelated[:n_unrelated]


def control_sets(kn: dict[str, Sequence[Neuron]], activation: np.ndarray, d_ff: int,
                 seed: int, uuid: str) -> dict[tuple[str, str], list[Neuron]]:
    """{(method, set): neurons} for every method of ``kn`` and every set of NEURON_SETS.

    ``activation`` [n_layers, d_ff]: the fact's activation (mean over object positions)."""
    every_kn = [n for s in kn.values() for n in s]
    flat = activation.reshape(-1)
    order = np.lexsort((np.arange(flat.size), -flat))  # highest first, ties by index
    sets = {}
    for method, neurons in kn.items():
        neurons = [(int(a), int(b)) for a, b in neurons]
        sets[(method, "kn")] = neurons
        sets[(method, "random")] = random_neurons_like(
            neurons, every_kn, d_ff, seeded_rng("localization-random", seed, uuid, method))
        top = order[:len(neurons)]
        sets[(method, "activation")] = [(int(i // d_ff), int(i % d_ff)) for i in top]
    return sets


def completeness(scores: np.ndarray | None, gap: np.ndarray) -> dict[str, float]:
    """Sums over layers of the gap and the scores, and the completeness error (absolute:
    sum_l |sum_j scores[l, j] - gap[l]|, relative: that / sum_l |gap[l]|)."""
    gap = np.asarray(gap, dtype=np.float64)
    if scores is None:
        return dict(gap_total=float(gap.sum()), score_total=np.nan, completeness_error=np.nan,
                    completeness_rel_error=np.nan)
    per_layer = np.asarray(scores, dtype=np.float64).sum(axis=1)  # [n_layers]
    error = float(np.abs(per_layer - gap).sum())
    scale = float(np.abs(gap).sum())
    return dict(gap_total=float(gap.sum()), score_total=float(per_layer.sum()),
                completeness_error=error,
                completeness_rel_error=error / scale if scale > 0 else np.nan)


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


def localization_statistics(rows: pd.DataFrame) -> pd.DataFrame:
    """STATS_COLUMNS per (method, neuron_set, operation, target), in the fixed orders."""
    out = []
    keys = ["method", "neuron_set", "operation", "target"]
    for key, group in rows.groupby(keys, sort=False):
        s = spread(group["rel_change"])
        before, after = group["p_before"].to_numpy(float), group["p_after"].to_numpy(float)
        t0 = group["top1_before"].to_numpy(bool)
        t1 = group["top1_after"].to_numpy(bool)
        out.append(dict(zip(keys, key), n=int(len(group)), n_facts=int(group["uuid"].nunique()),
                        mean_neurons=float(group["n_neurons"].mean()),
                        median_rel_change=s["median"], q1_rel_change=s["q1"],
                        q3_rel_change=s["q3"], iqr_rel_change=s["iqr"],
                        mean_rel_change=s["mean"],
                        share_halved=float(np.mean(after < 0.5 * before)),
                        top1_before=float(t0.mean()), top1_after=float(t1.mean()),
                        top1_changed=float(np.mean(t0 != t1))))
    table = pd.DataFrame(out, columns=STATS_COLUMNS)
    return _ordered(table)


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    orders = {"method": ("amig", "ig"), "neuron_set": NEURON_SETS, "operation": OPERATIONS,
              "target": TARGETS}
    cols = [c for c in orders if c in table]
    if table.empty:
        return table.reset_index(drop=True)
    sort = table.assign(**{f"_{c}": table[c].map({v: i for i, v in enumerate(orders[c])})
                           for c in cols})
    return (sort.sort_values([f"_{c}" for c in cols], kind="stable")
            .drop(columns=[f"_{c}" for c in cols]).reset_index(drop=True))


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


def paired_comparison(rows: pd.DataFrame) -> pd.DataFrame:
    """AMIG vs IG over the same facts: PAIRED_COLUMNS per (neuron_set, operation, target).

    Per fact the mean relative change over its rows of the group; the difference is
    AMIG - IG (for erase a better localizer has the more negative change on ``fact``)."""
    out = []
    keys = ["neuron_set", "operation", "target"]
    for key, group in rows.groupby(keys, sort=False):
        per_fact = group.groupby(["uuid", "method"])["rel_change"].mean().unstack("method")
        if not {"amig", "ig"} <= set(per_fact.columns):
            continue
        both = per_fact[["amig", "ig"]].dropna()
        test = wilcoxon_paired(both["amig"], both["ig"])
        out.append(dict(zip(keys, key), median_amig=float(both["amig"].median())
                        if len(both) else np.nan,
                        median_ig=float(both["ig"].median()) if len(both) else np.nan, **test))
    return _ordered(pd.DataFrame(out, columns=PAIRED_COLUMNS))


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
    """Per method: facts, facts with a known error, median and IQR of the relative
    completeness error, median |gap| and median score sum."""
    per = rows.drop_duplicates(["uuid", "method"])
    out = []
    for method, group in per.groupby("method", sort=True):
        s = spread(group["completeness_rel_error"])
        out.append(dict(method=method, n_facts=int(len(group)),
                        n_known=int(group["completeness_rel_error"].notna().sum()),
                        median_rel_error=s["median"], iqr_rel_error=s["iqr"],
                        median_gap_total=float(group["gap_total"].median()),
                        median_score_total=float(group["score_total"].median())))
    return pd.DataFrame(out, columns=["method", "n_facts", "n_known", "median_rel_error",
                                      "iqr_rel_error", "median_gap_total",
                                      "median_score_total"])


# ---- the model ---------------------------------------------------------------------------------

def object_activation(lm: LanguageModel, query: EncodedQuery) -> np.ndarray:
    """The FFN activation [n_layers, d_ff] of the unpatched model, mean over the object
    positions."""
    ids, mask = pad_queries(lm, [query])  # [1, S]
    pos = torch.as_tensor(query.target_positions, device=lm.device)
    with torch.inference_mode(), capture_ffn(lm) as acts:
        lm.model(input_ids=ids, attention_mask=mask)
    return torch.stack([acts[layer][0, pos].float().mean(0) for layer in range(lm.n_layers)]
                       ).cpu().numpy()


def _fact_rows(lm: LanguageModel, fact_uuid: str, query: EncodedQuery,
               targets: list[tuple[str, str, str, EncodedQuery]],
               sets: dict[tuple[str, str], list[Neuron]], complete: dict[str, dict],
               enhance_factor: float, relation: str, batch_rows: int) -> list[dict]:
    """Score every (set, operation, target) of one fact; ``targets``: (group, uuid,
    relation, query), the fact itself first."""
    tq = [t[3] for t in targets]
    base = scoring.score(lm, tq, batch_size=batch_rows)
    plan = []  # (method, set, operation, factor, intervention)
    for (method, name), neurons in sets.items():
        plan.append((method, name, "erase", 0.0, scoring.erase(neurons)))
        plan.append((method, name, "enhance", enhance_factor,
                     scoring.enhance(neurons, enhance_factor)))
    after = scoring.score(lm, tq * len(plan), [iv for *_, iv in plan for _ in tq],
                          batch_size=batch_rows)
    rows = []
    for k, (method, name, op, factor, iv) in enumerate(plan):
        neurons = sets[(method, name)]
        for j, (group, uuid, rel, _) in enumerate(targets):
            p0, p1 = float(base.prob[j]), float(after.prob[k * len(tq) + j])
            rows.append(dict(uuid=fact_uuid, relation=relation, method=method, neuron_set=name,
                             operation=op, factor=factor, target=group, target_uuid=uuid,
                             target_relation=rel, n_neurons=len(neurons),
                             layers=[n[0] for n in neurons], neurons=[n[1] for n in neurons],
                             p_before=p0, p_after=p1, top1_before=bool(base.top1[j]),
                             top1_after=bool(after.top1[k * len(tq) + j]),
                             rel_change=float(relative_change(p0, p1)),
                             **complete[method]))
    return rows


def localize(lm: LanguageModel, facts: pd.DataFrame, records: pd.DataFrame, *,
             run_method: str, kn_threshold: float, max_kn: int, sample: int, n_related: int,
             n_unrelated: int, enhance_factor: float, steps: int, quadrature: str, seed: int,
             batch_facts: int = 4, batch_rows: int = 32, checkpoint_path=None,
             identity: dict | None = None, progress: TextIO | None = None) -> pd.DataFrame:
    """The localization table (ROW_COLUMNS) of a sample of ``facts`` (one language's discovery
    facts); ``records``: the run's attribution records of these facts by ``run_method``.

    Resumable: with ``checkpoint_path``, every ``batch_facts`` facts are appended to a
    :class:`~kneurons.checkpoint.Checkpoint` there, and facts already there are skipped.
    ``batch_rows``: scored rows per forward (the model computes logits [rows, seq, vocab])."""
    if run_method not in METHODS:
        raise ValueError(f"run_method must be one of {METHODS}, got {run_method!r}")
    other = next(m for m in METHODS if m != run_method)
    facts = facts.drop_duplicates("uuid").reset_index(drop=True)
    uuids = sample_facts(facts, records, sample, seed, attributable(lm, facts, "amig"))
    log.info("%d of %d facts sampled; %s from the shards, %s attributed again", len(uuids),
             len(facts), run_method, other)
    by_uuid = facts.set_index("uuid", drop=False)
    relation_of = dict(zip(facts["uuid"], facts["relation"]))
    true = records[records["candidate"] == "true"].drop_duplicates("uuid").set_index("uuid")
    options = dict(run_method=run_method, kn_threshold=kn_threshold, max_kn=max_kn,
                   n_related=n_related, n_unrelated=n_unrelated, enhance_factor=enhance_factor,
                   steps=steps, quadrature=quadrature, seed=seed, identity=identity or {},
                   version=1)
    kn_input = true.loc[uuids, ["top_layers", "top_neurons", "top_scores"]].map(
        lambda v: np.asarray(v).tolist()).reset_index()
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

    def encode(u: str) -> EncodedQuery:
        f = by_uuid.loc[u]
        return encode_query(lm, f.template, f.sub_label, f.obj_label)

    bar = tqdm(total=len(uuids), initial=len(uuids) - len(todo), file=progress,
               desc="localization", mininterval=5.0, unit="fact")
    for begin in range(0, len(todo), batch_facts):
        batch = todo[begin:begin + batch_facts]
        queries = [encode(u) for u in batch]
        fresh = attribute(lm, queries, method=other, steps=steps, quadrature=quadrature)
        rows = []
        for u, q, result in zip(batch, queries, fresh):
            record = true.loc[u]
            kn = {run_method: knowledge_neurons_of(record["top_layers"], record["top_neurons"],
                                                   record["top_scores"], kn_threshold, max_kn),
                  other: [(a, b) for a, b, _ in knowledge_neurons(result.scores, kn_threshold,
                                                                  max_kn)]}
            kn = {m: kn[m] for m in METHODS}
            stored = record.get("scores")
            run_scores = (score_matrix(stored, lm.n_layers, lm.d_ff)
                          if isinstance(stored, (bytes, bytearray)) else None)
            complete = {run_method: completeness(run_scores, probability_gap(
                            lm, q, method=run_method)),
                        other: completeness(result.scores, probability_gap(lm, q, method=other))}
            sets = control_sets(kn, object_activation(lm, q), lm.d_ff, seed, u)
            related, unrelated = target_facts(u, relation_of, n_related, n_unrelated, seed)
            targets = [("fact", u, relation_of[u], q)]
            targets += [("related", v, relation_of[v], encode(v)) for v in related]
            targets += [("unrelated", v, relation_of[v], encode(v)) for v in unrelated]
            rows += _fact_rows(lm, u, q, targets, sets, complete, enhance_factor,
                               relation_of[u], batch_rows)
        chunk = _table(rows)
        if checkpoint is not None:
            checkpoint.append(chunk)
        chunks.append(chunk)
        bar.update(len(batch))
    bar.close()
    table = pd.concat(chunks, ignore_index=True) if chunks else _table([])
    order = {u: i for i, u in enumerate(uuids)}
    table = table.sort_values("uuid", key=lambda s: s.map(order), kind="stable")
    return table.reset_index(drop=True)


def _table(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=ROW_COLUMNS)
    for column in ("factor", "p_before", "p_after", "rel_change", "gap_total", "score_total",
                   "completeness_error", "completeness_rel_error"):
        table[column] = table[column].astype(np.float64)
    for column in ("top1_before", "top1_after"):
        table[column] = table[column].astype(bool)
    table["n_neurons"] = table["n_neurons"].astype(np.int64)
    return table


def localize_to(lm: LanguageModel, facts: pd.DataFrame, shards: Sequence, output, *,
                run_method: str, **options) -> pd.DataFrame:
    """:func:`localize` of one language with the run's discovery ``shards`` (paths), written
    to ``output`` (parquet, atomically), resumably through ``<output>.checkpoint``, which is
    removed once the output is written."""
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
