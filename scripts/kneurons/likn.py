"""Language-independent knowledge neurons (LIKN) and the cross-lingual editing experiment.

Chen et al. (AAAI 2024), first discovery: in a multilingual model the knowledge neurons (KN)
of one fact found with English and with Chinese queries overlap, and an edit through the
shared neurons changes the fact in both languages.

**LIKN** (:func:`language_independent_neurons`, :func:`likn_table`). The KN of a fact in a
language are those of its true-object attribution record, chosen by the workflow's one rule
:func:`kneurons.neurons.knowledge_neurons_of` (score above ``kn_threshold`` x the record's
maximum, at most ``max_kn``, best first). For a fact (uuid) present in several languages and
for each *language group* (every pair of the model's languages, and all of them together
when there are more than two; :func:`language_groups`) its LIKN is the intersection of its KN
sets in the group's languages, in the order of the first language's KN (best first).

Per row of the table: ``n_likn`` = |LIKN|; ``share_of_kn`` = the mean over the group's
languages l with a non-empty KN set of |LIKN| / |KN_l| (the share of a language's knowledge
neurons that are language-independent; NaN when every KN set is empty).

**Controls** (how much overlap chance alone gives): the same intersection for *different*
facts, KN_{l1}(u) ∩ KN_{l2}(v) ∩ ... with u's KN in the group's first language and v's in the
others. ``control_random``: v is u's successor in a seeded random cyclic order of all facts
(so every fact is used once as u and once as v, never v = u); ``control_same_relation``: the
same within u's relation (facts of one relation share object-type neurons, so this is the
harder control; a relation with one fact gives no row).

**Statistics** (:func:`likn_statistics`) per (languages, kind, relation) and over all
relations (``relation == "all"``): facts, facts with a non-empty LIKN and their share, mean
|LIKN|, mean |KN| (over the facts and the group's languages) and mean ``share_of_kn``.
:func:`likn_layer_counts` counts LIKN neurons per layer.

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
eval_lang, target).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import combinations

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

KINDS = ("fact", "control_random", "control_same_relation")
"""Row kinds of the LIKN table: the real facts, then the two chance controls."""

OPERATIONS = ("erase", "edit")
ANY_LANGUAGE = "-"
"""``edit_lang`` of erase rows (the suppression does not depend on a language)."""

LIKN_COLUMNS = ["languages", "kind", "uuid", "partner_uuid", "relation", "likn_layers",
                "likn_neurons", "n_likn", "n_kn", "kn_layers", "kn_neurons", "share_of_kn"]
STATS_COLUMNS = ["languages", "kind", "relation", "n_facts", "facts_with_likn",
                 "share_with_likn", "mean_likn", "mean_kn", "likn_share_of_kn"]
EDIT_COLUMNS = ["operation", "neuron_set", "edit_lang", "eval_lang", "target", "edited_uuid",
                "uuid", "relation", "n_neurons", "p_true_before", "p_true_after",
                "top1_true_before", "top1_true_after", "p_wrong_before", "p_wrong_after",
                "top1_wrong_before", "top1_wrong_after"]
SUMMARY_COLUMNS = ["operation", "neuron_set", "edit_lang", "eval_lang", "target", "n",
                   "mean_neurons", "p_true_before", "p_true_after", "delta_p_true",
                   "rel_change_p_true", "top1_true_before", "top1_true_after",
                   "p_wrong_before", "p_wrong_after", "delta_p_wrong", "edit_success"]


# ---- LIKN: sets and statistics (model-free) -----------------------------------------------

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


def control_partners(uuids: Sequence[str], relations: Mapping[str, str], seed: int,
                     same_relation: bool) -> dict[str, str]:
    """u -> a different fact v: u's successor in a seeded random cyclic order of ``uuids``
    (of u's relation's uuids when ``same_relation``). Groups of one fact give no partner."""
    groups: dict[str, list[str]] = {}
    for uuid in sorted(set(uuids)):
        groups.setdefault(relations[uuid] if same_relation else "", []).append(uuid)
    partners = {}
    for key, members in sorted(groups.items()):
        if len(members) < 2:
            continue
        order = [members[i] for i in seeded_rng("likn-control", seed, key).permutation(len(members))]
        partners.update({u: order[(i + 1) % len(order)] for i, u in enumerate(order)})
    return partners


def share_of_kn(n_likn: int, n_kn: Sequence[int]) -> float:
    """Mean over the languages with a non-empty KN set of |LIKN| / |KN_l| (NaN if none)."""
    shares = [n_likn / n for n in n_kn if n > 0]
    return float(np.mean(shares)) if shares else float("nan")


def _likn_row(languages, kind, uuid, partner, relation, kn_sets) -> dict:
    likn = language_independent_neurons(kn_sets)
    n_kn = [len(s) for s in kn_sets]
    return dict(languages="+".join(languages), kind=kind, uuid=uuid, partner_uuid=partner,
                relation=relation, likn_layers=[n[0] for n in likn],
                likn_neurons=[n[1] for n in likn], n_likn=len(likn), n_kn=n_kn,
                kn_layers=[[n[0] for n in s] for s in kn_sets],
                kn_neurons=[[n[1] for n in s] for s in kn_sets],
                share_of_kn=share_of_kn(len(likn), n_kn))


def likn_table(kn: Mapping[str, Mapping[str, Sequence[Neuron]]], relations: Mapping[str, str],
               seed: int) -> pd.DataFrame:
    """The LIKN of every fact and the two controls, for every language group.

    ``kn[lang][uuid]``: the fact's KN in that language (best first); ``relations[uuid]``: its
    relation. Facts are those present in every language of a group. Columns: LIKN_COLUMNS
    (``kn_layers``/``kn_neurons``/``n_kn`` per language of the group, in its order; for a
    control row the first language's from ``uuid``, the others' from ``partner_uuid``).
    """
    rows = []
    for group in language_groups(sorted(kn)):
        uuids = sorted(set.intersection(*(set(kn[lang]) for lang in group)))
        for uuid in uuids:
            rows.append(_likn_row(group, "fact", uuid, uuid, relations[uuid],
                                  [kn[lang][uuid] for lang in group]))
        for kind, same in (("control_random", False), ("control_same_relation", True)):
            partners = control_partners(uuids, relations, seed, same)
            for uuid in uuids:
                if uuid in partners:
                    v = partners[uuid]
                    sets = [kn[group[0]][uuid]] + [kn[lang][v] for lang in group[1:]]
                    rows.append(_likn_row(group, kind, uuid, v, relations[uuid], sets))
    return pd.DataFrame(rows, columns=LIKN_COLUMNS)


def likn_statistics(table: pd.DataFrame) -> pd.DataFrame:
    """STATS_COLUMNS per (languages, kind, relation), with ``relation == "all"`` rows first
    in each (languages, kind); kinds in KINDS order."""
    rows = []
    for (languages, kind), group in table.groupby(["languages", "kind"], sort=True):
        parts = [("all", group)] + list(group.groupby("relation", sort=True))
        for relation, sub in parts:
            with_likn = int((sub["n_likn"] > 0).sum())
            shares = sub["share_of_kn"].dropna()
            rows.append(dict(languages=languages, kind=kind, relation=relation,
                             n_facts=int(len(sub)), facts_with_likn=with_likn,
                             share_with_likn=with_likn / len(sub),
                             mean_likn=float(sub["n_likn"].mean()),
                             mean_kn=float(np.mean([n for ns in sub["n_kn"] for n in ns])),
                             likn_share_of_kn=float(shares.mean()) if len(shares) else np.nan))
    stats = pd.DataFrame(rows, columns=STATS_COLUMNS)
    order = {k: i for i, k in enumerate(KINDS)}
    stats["_kind"] = stats["kind"].map(order)
    return (stats.sort_values(["languages", "_kind"], kind="stable").drop(columns="_kind")
            .reset_index(drop=True))


def likn_layer_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Number of LIKN neurons per (languages, kind, layer), summed over facts."""
    rows = []
    for (languages, kind), group in table.groupby(["languages", "kind"], sort=True):
        counts = Counter(int(layer) for layers in group["likn_layers"] for layer in layers)
        rows += [dict(languages=languages, kind=kind, layer=layer, n_likn=n)
                 for layer, n in sorted(counts.items())]
    return pd.DataFrame(rows, columns=["languages", "kind", "layer", "n_likn"])


def find_likn(records: Mapping[str, pd.DataFrame], kn_threshold: float | Mapping[str, float],
              max_kn: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The LIKN table, its statistics and layer counts from each language's attribution
    records (``records[lang]``, the discovery shards of one model). ``kn_threshold``: one τ
    for every language, or a map language -> τ (the authors use 0.3 for en, 0.2 for zh)."""
    def tau(lang: str) -> float:
        return kn_threshold[lang] if isinstance(kn_threshold, Mapping) else kn_threshold

    kn = {lang: knowledge_neurons_by_fact(table, tau(lang), max_kn)
          for lang, table in records.items()}
    relations: dict[str, str] = {}
    for table in records.values():
        true = table[table["candidate"] == "true"]
        for uuid, relation in zip(true["uuid"], true["relation"]):
            if relations.setdefault(uuid, relation) != relation:
                raise ValueError(f"fact {uuid} has different relations across languages")
    table = likn_table(kn, relations, seed)
    return table, likn_statistics(table), likn_layer_counts(table)


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


def edit_summary(results: pd.DataFrame) -> pd.DataFrame:
    """SUMMARY_COLUMNS: means per (operation, neuron_set, edit_lang, eval_lang, target).

    ``delta_*`` = mean(after - before); ``rel_change_p_true`` = mean((after - before) /
    before) over rows with before > 0; ``top1_*`` = accuracy (share of rows); ``edit_success``
    = share of rows whose wrong object is top-1 after the intervention (NaN for unrelated
    facts, which have no wrong object).
    """
    rows = []
    keys = ["operation", "neuron_set", "edit_lang", "eval_lang", "target"]
    for key, group in results.groupby(keys, sort=True):
        before, after = group["p_true_before"], group["p_true_after"]
        positive = before > 0
        wrong_before = group["p_wrong_before"].astype(float)
        wrong_after = group["p_wrong_after"].astype(float)
        has_wrong = wrong_after.notna()
        rows.append(dict(
            zip(keys, key), n=int(len(group)), mean_neurons=float(group["n_neurons"].mean()),
            p_true_before=float(before.mean()), p_true_after=float(after.mean()),
            delta_p_true=float((after - before).mean()),
            rel_change_p_true=float(((after - before)[positive] / before[positive]).mean())
            if positive.any() else np.nan,
            top1_true_before=float(group["top1_true_before"].astype(float).mean()),
            top1_true_after=float(group["top1_true_after"].astype(float).mean()),
            p_wrong_before=float(wrong_before.mean()) if has_wrong.any() else np.nan,
            p_wrong_after=float(wrong_after.mean()) if has_wrong.any() else np.nan,
            delta_p_wrong=float((wrong_after - wrong_before).mean())
            if has_wrong.any() else np.nan,
            edit_success=float(group.loc[has_wrong, "top1_wrong_after"].astype(float).mean())
            if has_wrong.any() else np.nan))
    summary = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    summary["_op"] = summary["operation"].map({op: i for i, op in enumerate(OPERATIONS)})
    return (summary.sort_values(["_op", "target", "edit_lang", "neuron_set", "eval_lang"],
                                kind="stable").drop(columns="_op").reset_index(drop=True))


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
    fact rows of the group of all ``facts`` languages give each fact's KN per language).
    See the module docstring for the sets, operations and measures.
    """
    languages = sorted(facts)
    group = "+".join(languages)
    rows = likn[(likn["kind"] == "fact") & (likn["languages"] == group)]
    if rows.empty:
        raise ValueError(f"the LIKN table has no fact rows for the languages {group}")
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
