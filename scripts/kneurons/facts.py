"""Corrupted facts (a wrong object per fact) and the discovery/evaluation split.

Both work on ``{lang: facts}`` tables as produced by :func:`kneurons.mlama.read_mlama` and
treat a fact as one entity-level triple identified by its ``uuid``, shared across
languages (in mLAMA a uuid has the same relation, subject and object in every language;
this is checked). Randomness is derived per uuid from ``sha256(purpose, seed, uuid)``, so
results do not depend on row order, and adding or removing one fact does not reshuffle
the others.

**Corruption** (:func:`corrupt_facts`): each fact gets one wrong object ``wrong_obj_uri``
from the objects of the same relation, with its label ``wrong_obj_label`` in each
language. Candidates for a fact with uuid ``u``, relation ``r`` and subject ``s``:

* the pool is the union over languages of ``r``'s objects (``obj_uri``), restricted to
  entities that have a label for ``r`` in *every* language where ``u`` appears, so the
  same wrong entity can be shown in each of them (a per-language pool could not give
  one entity for all languages);
* minus every true answer of ``(r, s)`` in any language (N-M relations: a subject with
  several objects never gets one of its other objects as the "wrong" one);
* minus every entity sharing a label, in a language where ``u`` appears, with a true
  answer of ``(r, s)`` (real mLAMA has homonyms, e.g. two P131 objects labelled
  "Hawaii" in en): the wrong label is never textually a right answer.

The label of an entity in a language is its ``obj_label`` in that language's table for
that relation (any fact); if it differs between facts, the most frequent one, ties broken
by string order. One candidate is drawn uniformly from the sorted candidate list with a
numpy Generator seeded from ``(seed, uuid)``. A fact without candidates (e.g. the only
object of its relation) is dropped in every language; :func:`corruption_report` counts
them.

**Split** (:func:`split_facts`): per relation, the union of uuids across languages is
ranked by ``sha256("split", seed, uuid)`` and the first ``n_discovery`` go to
``discovery``, the rest to ``evaluation``; a uuid is therefore in the same part in every
language. ``n_discovery = round(n * discovery_fraction)`` (Python ``round``: half to even),
clamped to ``[1, n - 1]`` when ``n >= 2`` so both parts get facts; a relation with one
fact gets it in discovery if the rounding gives 1, else in evaluation.

**Split by size** (``sizes``, :class:`SplitSizes`): instead of the fractions, per relation the
first ``discovery + calibration`` uuids of the same ranking go to ``discovery`` (of which
``calibration`` are marked, below) and the next ``evaluation`` to ``evaluation``; the rest are
unused. A relation with fewer facts than the sum is left out of both parts (warned and counted
in the split report), so every relation is measured with the same numbers; docs/method.md
("Power") says how to choose them.

**Calibration slice** (:func:`mark_calibration`): a ``calibration`` column marks, per
relation, a seeded share (or, with sizes, a seeded number) of the discovery part (same ranking scheme, purpose
``"calibration"``, aligned across languages). Fact checking may tune its threshold on
these facts; it never looks at the evaluation part for that. DKN detection and aggregation
leave these facts out (:mod:`kneurons.dkn`), so the DKN are not fitted to the facts the
threshold is tuned on.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

PARTS = ("discovery", "evaluation")
"""Names of the split parts, in order."""

CORRUPT_REQUIRED = ("uuid", "lineid", "relation", "sub_uri", "obj_uri", "obj_label")
SPLIT_REQUIRED = ("uuid", "lineid", "relation", "template", "sub_uri", "sub_label",
                  "obj_uri", "obj_label", "wrong_obj_uri", "wrong_obj_label")
SORT_KEYS = ["relation", "lineid"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitSizes:
    """Facts per relation: ``discovery`` (DKN-discovery queries: the discovery part without
    its calibration slice), ``calibration`` (the calibration slice) and ``evaluation``."""

    discovery: int
    calibration: int
    evaluation: int

    def __post_init__(self) -> None:
        for name, low in (("discovery", 1), ("calibration", 0), ("evaluation", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"split size {name} must be an integer >= {low}, got {value!r}")

    @classmethod
    def of(cls, sizes: "SplitSizes | Mapping | None") -> "SplitSizes | None":
        return sizes if sizes is None or isinstance(sizes, cls) else cls(**sizes)

    @property
    def total(self) -> int:
        return self.discovery + self.calibration + self.evaluation


def corrupt_facts(tables: dict[str, pd.DataFrame], seed: int) -> dict[str, pd.DataFrame]:
    """Add ``wrong_obj_uri`` and ``wrong_obj_label`` to every fact (see the module docstring).

    Args:
        tables: ``{lang: facts}``, each with at least the columns ``uuid, lineid, relation,
            sub_uri, obj_uri, obj_label`` and unique uuids. Inputs are not modified.
        seed: non-negative int.

    Returns:
        ``{lang: facts}`` with every input column plus ``wrong_obj_uri`` and
        ``wrong_obj_label`` (str), sorted by relation then lineid, fresh RangeIndex. Facts
        without a valid wrong object are left out (in every language where they appear).
        The same uuid gets the same ``wrong_obj_uri`` in every language.

    Raises:
        ValueError: bad seed, missing columns, duplicate uuids in a table, or a uuid whose
            relation, subject or object differs between languages.
    """
    _check_seed(seed)
    facts = _stack(tables, CORRUPT_REQUIRED)
    triples = _uuid_triples(facts)

    # Labels of each object entity, per (relation, lang): all of them, and the chosen one.
    label_counts = facts.groupby(["relation", "lang", "obj_uri", "obj_label"], sort=False).size()
    all_labels: dict[tuple[str, str], dict[str, set[str]]] = defaultdict(dict)
    chosen: dict[tuple[str, str], dict[str, tuple[int, str]]] = defaultdict(dict)
    for (rel, lang, obj, label), count in label_counts.items():
        all_labels[rel, lang].setdefault(obj, set()).add(label)
        best = chosen[rel, lang].get(obj)
        if best is None or (-count, label) < (-best[0], best[1]):
            chosen[rel, lang][obj] = (count, label)
    entity_label = {key: {obj: cl[1] for obj, cl in objs.items()} for key, objs in chosen.items()}
    by_label: dict[tuple[str, str], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for key, objs in all_labels.items():
        for obj, labels in objs.items():
            for label in labels:
                by_label[key][label].add(obj)

    pool = {rel: sorted(objs)
            for rel, objs in facts.groupby("relation")["obj_uri"].unique().items()}
    answers: dict[tuple[str, str], set[str]] = defaultdict(set)
    for rel, sub, obj in zip(facts["relation"], facts["sub_uri"], facts["obj_uri"]):
        answers[rel, sub].add(obj)
    langs_found: dict[str, list[str]] = defaultdict(list)
    for uuid, lang in zip(facts["uuid"], facts["lang"]):
        langs_found[uuid].append(lang)
    langs_of = {uuid: tuple(sorted(langs)) for uuid, langs in langs_found.items()}

    candidates_cache: dict[tuple[str, tuple[str, ...]], tuple[list[str], dict[str, int]]] = {}
    wrong: dict[str, str] = {}
    for uuid, (rel, sub, _obj) in sorted(triples.items()):
        langs = langs_of[uuid]
        key = (rel, langs)
        if key not in candidates_cache:
            labelled = [e for e in pool[rel] if all(e in entity_label[rel, L] for L in langs)]
            candidates_cache[key] = (labelled, {e: i for i, e in enumerate(labelled)})
        candidates, position = candidates_cache[key]
        excluded = set(answers[rel, sub])
        for lang in langs:
            for answer in answers[rel, sub]:
                for label in all_labels[rel, lang].get(answer, ()):
                    excluded |= by_label[rel, lang][label]
        skip = sorted(position[e] for e in excluded if e in position)
        n_valid = len(candidates) - len(skip)
        if n_valid <= 0:
            continue
        k = int(_rng("corrupt", seed, uuid).integers(n_valid))
        for p in skip:  # k-th valid candidate: step over excluded positions <= k
            if p <= k:
                k += 1
            else:
                break
        wrong[uuid] = candidates[k]

    out = {}
    for lang, table in tables.items():
        kept = table[table["uuid"].map(lambda u: u in wrong)].copy()
        kept["wrong_obj_uri"] = kept["uuid"].map(wrong).astype("str")
        kept["wrong_obj_label"] = [entity_label[rel, lang][w] for rel, w in
                                   zip(kept["relation"], kept["wrong_obj_uri"])]
        kept["wrong_obj_label"] = kept["wrong_obj_label"].astype("str")
        out[lang] = kept.sort_values(SORT_KEYS, kind="stable").reset_index(drop=True)
    return out


def corruption_report(tables_before: dict[str, pd.DataFrame],
                      tables_after: dict[str, pd.DataFrame]) -> dict:
    """Summarise :func:`corrupt_facts`: what was dropped for lack of a wrong object.

    Returns a JSON-able dict::

        {"facts_in": int, "facts_out": int, "dropped_no_wrong_object": int (facts, all
         languages), "dropped_uuids": [sorted distinct uuids],
         "languages": {lang: {"facts_in", "facts_out", "dropped_no_wrong_object",
                              "per_relation": {rel: {"facts_in", "facts_out",
                                                     "dropped_no_wrong_object",
                                                     "distinct_wrong_objects"}}}}}
    """
    if set(tables_before) != set(tables_after):
        raise ValueError(f"languages differ: {sorted(tables_before)} vs {sorted(tables_after)}")
    report: dict = {"facts_in": 0, "facts_out": 0, "dropped_no_wrong_object": 0,
                    "dropped_uuids": [], "languages": {}}
    dropped_all: set[str] = set()
    for lang in sorted(tables_before):
        before, after = tables_before[lang], tables_after[lang]
        extra = set(after["uuid"]) - set(before["uuid"])
        if extra:
            raise ValueError(f"{lang}: {len(extra)} uuids after corruption were not in the input")
        dropped = set(before["uuid"]) - set(after["uuid"])
        dropped_all |= dropped
        per_relation = {}
        n_in = before.groupby("relation").size()
        n_out = after.groupby("relation").size()
        n_wrong = after.groupby("relation")["wrong_obj_uri"].nunique()
        for rel in sorted(n_in.index):
            per_relation[rel] = {"facts_in": int(n_in[rel]),
                                 "facts_out": int(n_out.get(rel, 0)),
                                 "dropped_no_wrong_object": int(n_in[rel] - n_out.get(rel, 0)),
                                 "distinct_wrong_objects": int(n_wrong.get(rel, 0))}
        report["languages"][lang] = {"facts_in": len(before), "facts_out": len(after),
                                     "dropped_no_wrong_object": len(dropped),
                                     "per_relation": per_relation}
        report["facts_in"] += len(before)
        report["facts_out"] += len(after)
        report["dropped_no_wrong_object"] += len(dropped)
    report["dropped_uuids"] = sorted(dropped_all)
    return report


def split_facts(tables: dict[str, pd.DataFrame], discovery_fraction: float = 0.8,
                seed: int = 0, sizes: SplitSizes | Mapping | None = None
                ) -> dict[str, dict[str, pd.DataFrame]]:
    """Split each relation's facts into ``discovery`` and ``evaluation`` (module docstring).

    Args:
        tables: ``{lang: corrupted facts}`` with at least the columns in
            :data:`SPLIT_REQUIRED` and unique uuids; every column is kept.
        discovery_fraction: share of each relation's uuids in discovery, in (0, 1); the
            authors' code uses 0.8. Ignored when ``sizes`` are given.
        seed: non-negative int.
        sizes: facts per relation (:class:`SplitSizes` or a mapping with its fields), or
            None for the fractions.

    Returns:
        ``{lang: {"discovery": df, "evaluation": df}}``, each sorted by relation then lineid
        with a fresh RangeIndex.
    """
    _check_seed(seed)
    sizes = SplitSizes.of(sizes)
    if sizes is None and (isinstance(discovery_fraction, bool)
                          or not 0.0 < float(discovery_fraction) < 1.0):
        raise ValueError(f"discovery_fraction must be in (0, 1), got {discovery_fraction!r}")
    facts = _stack(tables, SPLIT_REQUIRED)
    triples = _uuid_triples(facts)

    by_relation: dict[str, list[str]] = defaultdict(list)
    for uuid, (rel, _sub, _obj) in triples.items():
        by_relation[rel].append(uuid)
    discovery: set[str] = set()
    evaluation: set[str] = set()
    for rel, uuids in sorted(by_relation.items()):
        ranked = sorted(uuids, key=lambda u: (_digest("split", seed, u), u))
        if sizes is None:
            k = discovery_count(len(ranked), discovery_fraction)
            discovery.update(ranked[:k])
            evaluation.update(ranked[k:])
        elif len(ranked) < sizes.total:
            log.warning("WARNING: relation %s left out of the split: %d facts, fewer than the "
                        "%d of split.sizes", rel, len(ranked), sizes.total)
        else:
            k = sizes.discovery + sizes.calibration
            discovery.update(ranked[:k])
            evaluation.update(ranked[k:k + sizes.evaluation])

    out = {}
    for lang, table in tables.items():
        masks = (table["uuid"].isin(discovery).to_numpy(bool),
                 table["uuid"].isin(evaluation).to_numpy(bool))
        out[lang] = {part: table[mask].sort_values(SORT_KEYS, kind="stable")
                     .reset_index(drop=True)
                     for part, mask in zip(PARTS, masks)}
    return out


def mark_calibration(splits: dict[str, dict[str, pd.DataFrame]], calibration_fraction: float,
                     seed: int, sizes: SplitSizes | Mapping | None = None
                     ) -> dict[str, dict[str, pd.DataFrame]]:
    """Add a bool ``calibration`` column: per relation, ``round(n * calibration_fraction)``
    discovery facts (at least one when the fraction is positive and the relation has
    discovery facts), or ``sizes.calibration`` of them, are True, the same uuids in every
    language; evaluation rows are False."""
    _check_seed(seed)
    sizes = SplitSizes.of(sizes)
    if sizes is None and (isinstance(calibration_fraction, bool)
                          or not 0.0 <= float(calibration_fraction) <= 1.0):
        raise ValueError(f"calibration_fraction must be in [0, 1], got {calibration_fraction!r}")
    by_relation: dict[str, set[str]] = defaultdict(set)
    for parts in splits.values():
        for uuid, rel in zip(parts["discovery"]["uuid"], parts["discovery"]["relation"]):
            by_relation[rel].add(uuid)
    chosen: set[str] = set()
    for uuids in by_relation.values():
        ranked = sorted(uuids, key=lambda u: (_digest("calibration", seed, u), u))
        if sizes is not None:
            k = sizes.calibration
        else:
            k = round(len(ranked) * calibration_fraction)
            if calibration_fraction > 0:
                k = max(k, 1)
        chosen.update(ranked[:k])
    return {lang: {"discovery": parts["discovery"].assign(
                       calibration=parts["discovery"]["uuid"].isin(chosen).astype(bool)),
                   "evaluation": parts["evaluation"].assign(calibration=False)}
            for lang, parts in splits.items()}


def discovery_count(n: int, discovery_fraction: float) -> int:
    """How many of a relation's ``n`` facts go to discovery (see the module docstring)."""
    k = round(n * discovery_fraction)
    if n >= 2:
        k = min(max(k, 1), n - 1)
    return int(k)


def split_report(splits: dict[str, dict[str, pd.DataFrame]],
                 tables: dict[str, pd.DataFrame] | None = None) -> dict:
    """Counts per language, part and relation: ``{lang: {part: {"facts": n,
    "per_relation": {rel: n}}}}`` (JSON-able), with ``calibration`` counts per relation where
    the column is set; given the input ``tables``, also the facts in neither part
    (``unused``) and the relations left out entirely (``relations_left_out``)."""
    out: dict = {}
    for lang, parts in sorted(splits.items()):
        out[lang] = {part: {"facts": len(parts[part]),
                            "per_relation": {rel: int(n) for rel, n in
                                             parts[part].groupby("relation").size().items()}}
                     for part in PARTS}
        disc = parts["discovery"]
        if "calibration" in disc:
            out[lang]["calibration"] = {
                "facts": int(disc["calibration"].sum()),
                "per_relation": {rel: int(n) for rel, n in
                                 disc.groupby("relation")["calibration"].sum().items()}}
        if tables is not None and lang in tables:
            used = set(disc["uuid"]) | set(parts["evaluation"]["uuid"])
            table = tables[lang]
            kept = set(disc["relation"]) | set(parts["evaluation"]["relation"])
            out[lang]["unused"] = int((~table["uuid"].isin(used)).sum())
            out[lang]["relations_left_out"] = sorted(set(table["relation"]) - kept)
    return out


# --- internals -----------------------------------------------------------------------------

def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def _digest(purpose: str, seed: int, uuid: str) -> bytes:
    return hashlib.sha256(f"{purpose}\x00{int(seed)}\x00{uuid}".encode("utf-8")).digest()


def _rng(purpose: str, seed: int, uuid: str) -> np.random.Generator:
    """A Generator that depends only on (purpose, seed, uuid)."""
    return np.random.default_rng(int.from_bytes(_digest(purpose, seed, uuid)[:16], "little"))


def _stack(tables: dict[str, pd.DataFrame], required: tuple[str, ...]) -> pd.DataFrame:
    """Validate the tables and stack their ``required`` columns with a ``lang`` column."""
    frames = []
    for lang, table in tables.items():
        missing = [c for c in required if c not in table.columns]
        if missing:
            raise ValueError(f"{lang}: facts table lacks columns {missing}")
        dup = table["uuid"][table["uuid"].duplicated()]
        if len(dup):
            raise ValueError(f"{lang}: duplicate uuid(s) {sorted(set(dup))[:5]}")
        frames.append(table[list(required)].assign(lang=lang))
    if not frames:
        return pd.DataFrame(columns=[*required, "lang"])
    return pd.concat(frames, ignore_index=True)


def _uuid_triples(facts: pd.DataFrame) -> dict[str, tuple[str, str, str]]:
    """uuid -> (relation, sub_uri, obj_uri); ValueError if languages disagree."""
    triples: dict[str, tuple[str, str, str]] = {}
    where: dict[str, str] = {}
    for uuid, rel, sub, obj, lang in zip(facts["uuid"], facts["relation"], facts["sub_uri"],
                                         facts["obj_uri"], facts["lang"]):
        triple = (rel, sub, obj)
        seen = triples.setdefault(uuid, triple)
        if seen != triple:
            raise ValueError(f"uuid {uuid} is {seen} (relation, sub_uri, obj_uri) in "
                             f"{where[uuid]} but {triple} in {lang}")
        where.setdefault(uuid, lang)
    return triples

