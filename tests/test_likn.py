"""Language-independent knowledge neurons: set logic and statistics on hand-made neuron sets,
the erase and edit operations against direct forwards on tiny models, and the experiment's
metrics on hand-counted cases."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

from kneurons.hooks import ffn_hooks
from kneurons.scoring import erased_token_probs
from kneurons.likn import (
    ANY_LANGUAGE, EDIT_COLUMNS, control_partners, cross_lingual_editing, dai_edit_delta,
    edit_neuron_sets, edit_summary, edit_value_slots, find_likn, language_groups,
    language_independent_neurons, likn_layer_counts, likn_statistics, likn_table,
    locality_facts, object_embedding, one_language_neurons, other_fact_likn, sample_edit_facts,
    score_queries, share_of_kn)
from kneurons.neurons import random_neurons_like
from kneurons.queries import encode_query

# ---- set logic ---------------------------------------------------------------------------


def test_likn_is_the_intersection_in_the_first_languages_order():
    en = [(1, 5), (0, 2), (2, 7), (0, 9)]
    zh = [(0, 9), (3, 3), (1, 5)]
    assert language_independent_neurons([en, zh]) == [(1, 5), (0, 9)]
    assert language_independent_neurons([zh, en]) == [(0, 9), (1, 5)]
    assert language_independent_neurons([en, zh, [(0, 9)]]) == [(0, 9)]
    assert language_independent_neurons([en, []]) == []
    assert language_independent_neurons([[(0, 1), (0, 1)], [(0, 1)]]) == [(0, 1)]
    assert language_independent_neurons([]) == []


def test_language_groups_are_every_pair_then_all():
    assert language_groups(["en", "zh"]) == [("en", "zh")]
    assert language_groups(["en", "fr", "zh"]) == [("en", "fr"), ("en", "zh"), ("fr", "zh"),
                                                    ("en", "fr", "zh")]
    assert language_groups(["en"]) == []


def test_control_partners_are_a_derangement_and_respect_relations():
    uuids = [f"u{i}" for i in range(9)]
    relations = {u: ("P1" if i < 5 else "P2" if i < 8 else "P3") for i, u in enumerate(uuids)}
    anywhere = control_partners(uuids, relations, seed=3, same_relation=False)
    assert set(anywhere) == set(uuids) and sorted(anywhere.values()) == sorted(uuids)
    assert all(u != v for u, v in anywhere.items())
    same = control_partners(uuids, relations, seed=3, same_relation=True)
    assert set(same) == set(uuids) - {"u8"}  # P3 has one fact: no partner
    assert all(u != v and relations[u] == relations[v] for u, v in same.items())
    assert control_partners(list(reversed(uuids)), relations, 3, False) == anywhere
    assert any(control_partners(uuids, relations, s, False) != anywhere for s in range(4, 9))


def test_share_of_kn():
    assert share_of_kn(2, [4, 8]) == pytest.approx((0.5 + 0.25) / 2)
    assert share_of_kn(0, [0, 3]) == 0.0
    assert math.isnan(share_of_kn(0, [0, 0]))


KN = {
    "en": {"a": [(0, 1), (0, 2), (1, 3)], "b": [(1, 9), (1, 5)], "c": [(0, 7)]},
    "zh": {"a": [(1, 3), (0, 2), (1, 9)], "b": [(0, 0)], "d": [(0, 7)]},
}
RELATIONS = {"a": "P1", "b": "P1", "c": "P2", "d": "P2"}


def test_likn_table_on_hand_made_sets():
    table = likn_table(KN, RELATIONS, seed=0)
    facts = table[table["kind"] == "fact"].set_index("uuid")
    assert sorted(facts.index) == ["a", "b"]  # c and d are in one language only
    assert set(table["languages"]) == {"en+zh"}
    assert list(zip(facts.at["a", "likn_layers"], facts.at["a", "likn_neurons"])) == [(0, 2), (1, 3)]
    assert facts.at["a", "n_likn"] == 2 and facts.at["b", "n_likn"] == 0
    assert list(facts.at["a", "n_kn"]) == [3, 3] and list(facts.at["b", "n_kn"]) == [2, 1]
    assert facts.at["a", "share_of_kn"] == pytest.approx(2 / 3)
    assert facts.at["b", "share_of_kn"] == 0.0
    # two facts: each control pairs a with b; en KN of the row's fact, zh KN of its partner
    for kind in ("control_random", "control_same_relation"):
        control = table[table["kind"] == kind].set_index("uuid")
        assert control.at["a", "partner_uuid"] == "b" and control.at["b", "partner_uuid"] == "a"
        assert control.at["a", "n_likn"] == 0  # en(a) ∩ zh(b) = {}
        assert list(zip(control.at["b", "likn_layers"], control.at["b", "likn_neurons"])) == [(1, 9)]
        assert list(control.at["b", "n_kn"]) == [2, 3]


def test_likn_statistics_and_layers_hand_counted():
    table = likn_table(KN, RELATIONS, seed=0)
    stats = likn_statistics(table)
    assert list(stats["kind"].drop_duplicates()) == ["fact", "control_random",
                                                     "control_same_relation"]
    fact = stats[(stats["kind"] == "fact") & (stats["relation"] == "all")].iloc[0]
    assert (fact.n_facts, fact.facts_with_likn, fact.share_with_likn) == (2, 1, 0.5)
    assert fact.mean_likn == 1.0
    assert fact.mean_kn == pytest.approx((3 + 3 + 2 + 1) / 4)
    assert fact.likn_share_of_kn == pytest.approx((2 / 3 + 0) / 2)
    per_relation = stats[(stats["kind"] == "fact") & (stats["relation"] == "P1")]
    assert len(per_relation) == 1 and per_relation.iloc[0].n_facts == 2
    control = stats[(stats["kind"] == "control_random") & (stats["relation"] == "all")].iloc[0]
    assert (control.facts_with_likn, control.mean_likn) == (1, 0.5)
    layers = likn_layer_counts(table)
    fact_layers = layers[layers["kind"] == "fact"]
    assert list(zip(fact_layers["layer"], fact_layers["n_likn"])) == [(0, 1), (1, 1)]
    control_layers = layers[layers["kind"] == "control_random"]
    assert list(zip(control_layers["layer"], control_layers["n_likn"])) == [(1, 1)]


def test_find_likn_reads_true_records_through_the_kn_rule():
    def records(rows):
        return pd.DataFrame([dict(uuid=u, relation=r, candidate=c, top_layers=ls,
                                  top_neurons=ns, top_scores=ss) for u, r, c, ls, ns, ss in rows])

    en = records([("a", "P1", "true", [0, 1, 1], [4, 5, 6], [1.0, 0.5, 0.1]),
                  ("a", "P1", "wrong", [0], [4], [1.0]),
                  ("b", "P2", "true", [1], [2], [0.3])])
    zh = records([("a", "P1", "true", [1, 0], [5, 4], [0.9, 0.25]),
                  ("b", "P2", "true", [1], [3], [0.3])])
    table, stats, _ = find_likn({"en": en, "zh": zh}, kn_threshold=0.2, max_kn=20, seed=0)
    facts = table[table["kind"] == "fact"].set_index("uuid")
    # en KN of a: scores > 0.2 x 1.0 -> (0, 4), (1, 5); zh: > 0.2 x 0.9 -> (1, 5), (0, 4)
    assert list(zip(facts.at["a", "likn_layers"], facts.at["a", "likn_neurons"])) == [(0, 4), (1, 5)]
    assert facts.at["b", "n_likn"] == 0
    assert stats.loc[(stats["kind"] == "fact") & (stats["relation"] == "all"),
                     "facts_with_likn"].item() == 1
    table, _, _ = find_likn({"en": en, "zh": zh}, kn_threshold=0.2, max_kn=1, seed=0)
    # max_kn = 1: en (0, 4) and zh (1, 5) no longer overlap
    assert table.set_index("uuid").query("kind == 'fact'").at["a", "n_likn"] == 0
    # τ per language: en 0.6 keeps only (0, 4); zh 0.2 keeps (1, 5) and (0, 4)
    table, _, _ = find_likn({"en": en, "zh": zh}, kn_threshold={"en": 0.6, "zh": 0.2},
                            max_kn=20, seed=0)
    facts = table[table["kind"] == "fact"].set_index("uuid")
    assert list(zip(facts.at["a", "likn_layers"], facts.at["a", "likn_neurons"])) == [(0, 4)]
    bad = zh.assign(relation=["P9", "P2"])
    with pytest.raises(ValueError, match="different relations"):
        find_likn({"en": en, "zh": bad}, 0.2, 20, 0)


# ---- neuron sets, sample, summary ----------------------------------------------------------


def test_one_language_neurons_and_equal_size_sets():
    kn = {"en": [(0, 1), (1, 2), (0, 3), (1, 4)], "zh": [(1, 2), (0, 5), (0, 1)]}
    assert one_language_neurons(kn, "en") == [(0, 3), (1, 4)]
    assert one_language_neurons(kn, "zh") == [(0, 5)]
    assert edit_neuron_sets(kn, d_ff=8, seed=0, uuid="x") is None  # zh has 1 < 2 = |LIKN|
    kn["zh"].append((1, 6))
    sets = edit_neuron_sets(kn, d_ff=8, seed=0, uuid="x")
    assert sets["likn"] == [(0, 1), (1, 2)]
    assert sets["only_en"] == [(0, 3), (1, 4)] and sets["only_zh"] == [(0, 5), (1, 6)]
    every_kn = set(kn["en"]) | set(kn["zh"])
    assert [layer for layer, _ in sets["random"]] == [0, 1]  # the LIKN's layers
    assert not set(sets["random"]) & every_kn
    assert edit_neuron_sets(kn, 8, 0, "x") == sets  # seeded
    assert edit_neuron_sets({"en": [(0, 1)], "zh": [(0, 2)]}, 8, 0, "x") is None  # no LIKN


def test_random_neurons_like_draws_distinct_free_neurons_of_the_same_layers():
    rng = np.random.default_rng(0)
    exclude = [(0, 0), (0, 1), (0, 2)]
    picked = random_neurons_like([(0, 0), (2, 0), (2, 1)], exclude=exclude, d_ff=4, rng=rng)
    assert picked[0] == (0, 3)  # the only free neuron of layer 0
    assert [layer for layer, _ in picked] == [0, 2, 2] and len(set(picked)) == 3
    draws = {random_neurons_like([(1, 0)], [], 4, np.random.default_rng(s))[0] for s in range(40)}
    assert draws == {(1, 0), (1, 1), (1, 2), (1, 3)}  # uniform over the layer's free neurons
    with pytest.raises(ValueError, match="no free neuron"):
        random_neurons_like([(0, 0), (0, 1)], exclude=exclude, d_ff=4, rng=rng)


def test_other_fact_likn_is_another_facts_large_enough_likn():
    likn_of = {"a": [(0, 1), (1, 2)], "b": [(0, 3)], "c": [(2, 5), (1, 1), (0, 0)],
               "d": [(1, 7), (0, 2)]}
    seen = set()
    for seed in range(20):
        got = other_fact_likn("a", 2, likn_of, seed)
        assert got in ([(2, 5), (1, 1)], [(1, 7), (0, 2)])  # never a itself, never b (too small)
        assert got == other_fact_likn("a", 2, dict(reversed(list(likn_of.items()))), seed)
        seen.add(tuple(got))
    assert len(seen) == 2  # the seed chooses among the candidates
    assert other_fact_likn("a", 3, likn_of, 0) == [(2, 5), (1, 1), (0, 0)]
    assert other_fact_likn("c", 4, likn_of, 0) is None


def test_sample_and_locality_are_seeded_and_order_independent():
    uuids = [f"u{i}" for i in range(20)]
    sample = sample_edit_facts(uuids, 5, seed=1)
    assert len(sample) == 5 and set(sample) <= set(uuids)
    assert sample_edit_facts(list(reversed(uuids)), 5, seed=1) == sample
    assert sample_edit_facts(uuids, 6, seed=1)[:5] == sample  # a larger sample extends it
    assert sample_edit_facts(uuids, 5, seed=2) != sample
    assert sorted(sample_edit_facts(uuids[:3], 5, seed=1)) == uuids[:3]
    relations = {u: f"P{i % 3}" for i, u in enumerate(uuids)}
    local = locality_facts("u0", relations, 4, seed=1)
    assert len(local) == 4 and all(relations[u] != "P0" for u in local)


def test_edit_summary_hand_counted():
    base = dict(operation="edit", neuron_set="likn", edit_lang="en", edited_uuid="a",
                relation="P1", n_neurons=2)
    rows = [
        dict(base, eval_lang="en", target="fact", uuid="a", p_true_before=0.8,
             p_true_after=0.2, top1_true_before=True, top1_true_after=False,
             p_wrong_before=0.1, p_wrong_after=0.7, top1_wrong_before=False,
             top1_wrong_after=True),
        dict(base, eval_lang="en", target="fact", uuid="b", p_true_before=0.5,
             p_true_after=0.5, top1_true_before=True, top1_true_after=True,
             p_wrong_before=0.2, p_wrong_after=0.1, top1_wrong_before=False,
             top1_wrong_after=False),
        dict(base, eval_lang="en", target="unrelated", uuid="c", p_true_before=0.4,
             p_true_after=0.3, top1_true_before=True, top1_true_after=True,
             p_wrong_before=None, p_wrong_after=None, top1_wrong_before=None,
             top1_wrong_after=None),
        dict(base, operation="erase", edit_lang=ANY_LANGUAGE, eval_lang="zh", target="fact",
             uuid="a", p_true_before=0.0, p_true_after=0.0, top1_true_before=False,
             top1_true_after=False, p_wrong_before=0.3, p_wrong_after=0.3,
             top1_wrong_before=False, top1_wrong_after=False),
    ]
    summary = edit_summary(pd.DataFrame(rows, columns=EDIT_COLUMNS))
    assert list(summary["operation"]) == ["erase", "edit", "edit"]
    fact = summary[(summary["operation"] == "edit") & (summary["target"] == "fact")].iloc[0]
    assert fact.n == 2
    assert fact.delta_p_true == pytest.approx((-0.6 + 0.0) / 2)
    assert fact.rel_change_p_true == pytest.approx((-0.75 + 0.0) / 2)
    assert (fact.top1_true_before, fact.top1_true_after) == (1.0, 0.5)
    assert fact.delta_p_wrong == pytest.approx((0.6 - 0.1) / 2)
    assert fact.edit_success == 0.5
    unrelated = summary[summary["target"] == "unrelated"].iloc[0]
    assert unrelated.rel_change_p_true == pytest.approx(-0.25)
    assert math.isnan(unrelated.edit_success) and math.isnan(unrelated.delta_p_wrong)
    erase = summary[summary["operation"] == "erase"].iloc[0]
    assert math.isnan(erase.rel_change_p_true)  # P(true) before = 0: no relative change


# ---- the operations against direct forwards --------------------------------------------------

QUERIES = {
    "masked": [("the capital of [X] is [Y] .", "tanzania", "dodoma"),
               ("[X] is located in [Y] .", "kilimanjaro", "dar es salaam")],
    "causal": [("The capital of [X] is [Y] .", "Tanzania", "Dodoma"),
               ("[X] is located in [Y] .", "Kilimanjaro", "Tanzania")],
}


@pytest.fixture(params=["tiny_bert", "tiny_gpt2"])
def lm(request):
    return request.getfixturevalue(request.param)


def _direct_probs(lm, query, erase):
    """P(object) and top-1 of one query, unbatched, with a hand-written zeroing hook."""
    pos = torch.as_tensor(query.target_positions)
    by_layer = {}
    for layer, neuron in erase:
        by_layer.setdefault(layer, []).append(neuron)

    def zero(neurons):
        def fn(act):  # act: [1, seq, d_ff]
            act = act.clone()
            for n in neurons:
                act[0, pos, n] = 0.0
            return act
        return fn

    with torch.no_grad(), ffn_hooks(lm, {layer: zero(ns) for layer, ns in by_layer.items()}):
        logits = lm.model(input_ids=torch.as_tensor([query.input_ids])).logits[0]  # [seq, V]
    probs = torch.softmax(logits[pos], -1)[torch.arange(len(pos)), torch.as_tensor(query.target_ids)]
    top1 = bool((logits[pos].argmax(-1) == torch.as_tensor(query.target_ids)).all())
    return float(probs.mean()), top1


def test_erasing_matches_a_direct_forward_with_patched_activations(lm):
    queries = [encode_query(lm, *q) for q in QUERIES[lm.arch]]
    assert len({len(q.input_ids) for q in queries}) == 2  # padding is exercised
    erase = [(0, 3), (lm.n_layers - 1, 7), (lm.n_layers - 1, 11)]
    for neurons in ([], erase):
        probs, top1 = score_queries(lm, queries, erase=neurons)
        for q, p, t in zip(queries, probs, top1):
            direct_p, direct_t = _direct_probs(lm, q, neurons)
            assert p == pytest.approx(direct_p, rel=1e-5, abs=1e-7)
            assert t == direct_t
    plain, _ = score_queries(lm, queries)
    erased, _ = score_queries(lm, queries, erase=erase)
    assert not np.allclose(plain, erased)
    for q, p in zip(queries, erased):  # the DKN suppression convention, too
        assert p == pytest.approx(float(erased_token_probs(lm, q, [erase]).mean()), rel=1e-5)


def test_a_value_slot_edit_adds_activation_times_delta_to_the_ffn_output(lm):
    proj = lm.ffn_site(1)
    x = torch.randn(2, 3, lm.d_ff)  # [batch, seq, d_ff]
    hidden = lm.value_slot(1, 5).shape[0]
    delta = torch.randn(hidden)
    with torch.no_grad():
        before = proj(x)  # [batch, seq, hidden]
        with edit_value_slots(lm, [(1, 5), (1, 5)], delta):  # duplicates count once
            after = proj(x)
    expected = x[..., 5:6] * delta  # neuron 5's activation times the added vector
    torch.testing.assert_close(after - before, expected, rtol=1e-4, atol=1e-5)


def test_edit_value_slots_matches_hand_changed_weights_and_restores_them(lm):
    neurons = [(0, 2), (lm.n_layers - 1, 9)]
    query = encode_query(lm, *QUERIES[lm.arch][0])
    ids = torch.as_tensor([query.input_ids])
    hidden = lm.value_slot(0, 0).shape[0]
    delta = torch.linspace(-1, 1, hidden)
    manual = copy.deepcopy(lm.model)
    with torch.no_grad():
        for layer, neuron in neurons:
            proj = lm.spec.ffn_site(lm.spec.blocks(manual)[layer])
            if lm.model.config.model_type == "gpt2":  # Conv1D weight [d_ff, hidden]
                proj.weight[neuron, :] += delta
            else:  # nn.Linear weight [hidden, d_ff]
                proj.weight[:, neuron] += delta
        expected = manual(input_ids=ids).logits
    original = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with torch.no_grad():
        with edit_value_slots(lm, neurons, delta):
            edited = lm.model(input_ids=ids).logits
        restored = lm.model(input_ids=ids).logits
    torch.testing.assert_close(edited, expected)
    assert not torch.allclose(edited, restored)
    for key, value in lm.model.state_dict().items():
        assert torch.equal(value, original[key]), key
    with pytest.raises(RuntimeError, match="boom"), edit_value_slots(lm, neurons, delta):
        raise RuntimeError("boom")
    for key, value in lm.model.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_dai_edit_delta_uses_the_output_embeddings(tiny_bert):
    weight = tiny_bert.model.get_output_embeddings().weight.detach()
    assert torch.equal(object_embedding(tiny_bert, [3, 5]), (weight[3] + weight[5]) / 2)
    delta = dai_edit_delta(tiny_bert, [3], [4, 6], lambda1=1.0, lambda2=8.0)
    torch.testing.assert_close(delta, -weight[3] + 8 * (weight[4] + weight[6]) / 2)


# ---- the experiment on a tiny model ------------------------------------------------------------


def _facts(template, rows):
    return pd.DataFrame([dict(uuid=u, relation=r, template=template[r], sub_label=s,
                              obj_label=o, wrong_obj_label=w) for u, r, s, o, w in rows])


def test_cross_lingual_editing_on_a_tiny_model(tiny_bert):
    rows = [("a", "P36", "tanzania", "dodoma", "paris"),
            ("b", "P36", "france", "paris", "berlin"),
            ("c", "P37", "tanzania", "swahili", "english"),
            ("d", "P37", "kenya", "english", "swahili")]
    facts = {"en": _facts({"P36": "the capital of [X] is [Y] .",
                           "P37": "the official language of [X] is [Y] ."}, rows),
             "zh": _facts({"P36": "[X]的首都是[Y]。", "P37": "[X]的官方语言是[Y]。"}, rows)}
    kn = {"en": {"a": [(0, 1), (1, 2), (2, 3)], "b": [(0, 1)], "c": [(0, 4)], "d": [(0, 4)]},
          "zh": {"a": [(0, 1), (1, 4), (2, 5)], "b": [(0, 2)], "c": [(0, 4)], "d": [(1, 1)]}}
    table = likn_table(kn, {u: r for u, r, *_ in rows}, seed=0)
    results = cross_lingual_editing(tiny_bert, facts, table, edit_sample=5, n_locality=2,
                                    lambda1=1.0, lambda2=8.0, seed=0)
    # only a is eligible (b: no LIKN; c: no one-language neurons; d: no LIKN)
    assert set(results["edited_uuid"]) == {"a"}
    # 5 sets x (2 erase + 2 x 2 edit) scorings x (1 fact + 2 unrelated) rows
    assert len(results) == 5 * 6 * 3
    assert set(results["neuron_set"]) == {"likn", "likn_other", "only_en", "only_zh", "random"}
    assert (results["n_neurons"] == 1).all()
    # likn_other: c's LIKN, the only other fact with one (c itself is not eligible)
    other = results[(results["operation"] == "erase") & (results["neuron_set"] == "likn_other")
                    & (results["target"] == "fact") & (results["eval_lang"] == "en")].iloc[0]
    fact_a = facts["en"].iloc[0]
    a_queries = [encode_query(tiny_bert, fact_a.template, fact_a.sub_label, fact_a.obj_label)]
    assert other.p_true_after == pytest.approx(
        score_queries(tiny_bert, a_queries, erase=[(0, 4)])[0][0], rel=1e-6)
    unrelated = results[results["target"] == "unrelated"]
    assert set(unrelated["uuid"]) == {"c", "d"} and unrelated["p_wrong_after"].isna().all()
    for lang in ("en", "zh"):
        fact = facts[lang].iloc[0]
        queries = [encode_query(tiny_bert, fact.template, fact.sub_label, fact.obj_label),
                   encode_query(tiny_bert, fact.template, fact.sub_label, fact.wrong_obj_label)]
        plain, _ = score_queries(tiny_bert, queries)
        erased, _ = score_queries(tiny_bert, queries, erase=[(0, 1)])
        mine = results[(results["target"] == "fact") & (results["eval_lang"] == lang)]
        assert np.allclose(mine["p_true_before"], plain[0]) and \
            np.allclose(mine["p_wrong_before"], plain[1])
        erase = mine[(mine["operation"] == "erase") & (mine["neuron_set"] == "likn")].iloc[0]
        assert erase.p_true_after == pytest.approx(erased[0], rel=1e-6)
        assert erase.p_wrong_after == pytest.approx(erased[1], rel=1e-6)
        assert erase.edit_lang == ANY_LANGUAGE
        edit = mine[(mine["operation"] == "edit") & (mine["neuron_set"] == "likn")
                    & (mine["edit_lang"] == "en")].iloc[0]
        delta = dai_edit_delta(tiny_bert, queries[0].target_ids, queries[1].target_ids, 1.0, 8.0)
        if lang == "en":
            with edit_value_slots(tiny_bert, [(0, 1)], delta):
                edited, _ = score_queries(tiny_bert, queries)
            assert edit.p_true_after == pytest.approx(edited[0], rel=1e-6)
            assert edit.p_wrong_after == pytest.approx(edited[1], rel=1e-6)
    summary = edit_summary(results)
    assert set(summary["target"]) == {"fact", "unrelated"} and (summary["n"] > 0).all()


def test_likn_report_tables_markdown_and_figures(tmp_path):
    from kneurons.likn_report import LIKN_FIGURES, likn_report

    table = likn_table(KN, RELATIONS, seed=0)
    rows = [dict(operation=op, neuron_set=name, edit_lang=ANY_LANGUAGE if op == "erase" else "en",
                 eval_lang=lang, target=target, edited_uuid="a", uuid="a", relation="P1",
                 n_neurons=2, p_true_before=0.9, p_true_after=0.45, top1_true_before=True,
                 top1_true_after=False, p_wrong_before=0.1 if target == "fact" else None,
                 p_wrong_after=0.5 if target == "fact" else None, top1_wrong_before=False,
                 top1_wrong_after=(target == "fact") or None)
            for op in ("erase", "edit") for name in ("likn", "random")
            for lang in ("en", "zh") for target in ("fact", "unrelated")]
    run = {"model": "m", "stats": likn_statistics(table), "layers": likn_layer_counts(table),
           "edits": edit_summary(pd.DataFrame(rows, columns=EDIT_COLUMNS))}
    figures = {name: (tmp_path / f"{name}.png", tmp_path / f"{name}.svg") for name in LIKN_FIGURES}
    stats, edits = likn_report([run], tmp_path / "likn.csv", tmp_path / "edit.csv",
                               tmp_path / "likn.md", figures)
    assert list(stats.columns[:3]) == ["model", "languages", "kind"]
    assert pd.read_csv(tmp_path / "edit.csv")["model"].eq("m").all()
    text = (tmp_path / "likn.md").read_text()
    assert "| m | en+zh | same fact (LIKN) | 2 | 50.00 | 1.00 |" in text
    assert "| m | likn | 2.00 | en | 1 | 0.900 | 0.450 | -50.0 | 100.00 | 0.00 | -50.0 | 0.00 |" in text
    assert "| m | en | likn | zh | 100.00 | 0.100 | 0.500 |" in text
    for png, svg in figures.values():
        assert png.read_bytes()[:4] == b"\x89PNG" and svg.stat().st_size > 0
    empty = {"model": "e", "stats": run["stats"].iloc[0:0], "layers": run["layers"].iloc[0:0],
             "edits": run["edits"].iloc[0:0]}
    likn_report([empty], tmp_path / "e.csv", tmp_path / "e2.csv", tmp_path / "e.md", figures)
    assert "(no data)" in (tmp_path / "e.md").read_text()
