"""The localization evaluation: hand-counted statistics, gradient x input, matched controls,
Holm over the table, a run on tiny models, and known answers (a planted neuron; IG on Gemma)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import build
from kneurons import localization as loc
from kneurons import scoring
from kneurons.attribution import attribute, gradient_x_input, quadrature_rule
from kneurons.neurons import knowledge_neurons, knowledge_neurons_of, random_neurons_like
from kneurons.neurons import seeded_rng
from kneurons.queries import encode_query
from kneurons.shards import attribute_candidates, candidate_table


# ---- statistics, hand-counted ----------------------------------------------------------------

def test_spread_median_quartiles_iqr_by_hand():
    # sorted 1 2 4 8 (n=4, linear interpolation): q1 at 0.75 -> 1.75, median 3, q3 at 2.25 -> 5
    s = loc.spread([8, 1, np.nan, 4, 2])
    assert s == dict(median=3.0, q1=1.75, q3=5.0, iqr=3.25, mean=3.75)
    assert np.isnan(loc.spread([np.nan])["median"])


def _rows(**columns) -> pd.DataFrame:
    n = len(columns["uuid"])
    base = dict(method="ig", neuron_set="top", k=1, operation="erase", target="fact",
                target_uuid=columns["uuid"], n_neurons=1, mean_magnitude=1.0,
                top1_before=True, top1_after=True)
    rows = pd.DataFrame({**{k: (v if np.ndim(v) else [v] * n) for k, v in base.items()},
                         **columns})
    rows["rel_change"] = loc.relative_change(rows["p_before"], rows["p_after"])
    return rows


def test_relative_change_and_cell_statistics_by_hand():
    np.testing.assert_allclose(loc.relative_change([0.5, 0.2, 0.0], [0.1, 0.3, 0.1]),
                               [-0.8, 0.5, np.nan])
    # ig: facts a, b, c with changes -0.75, -0.4, -0.5; amig: a -0.5 and b twice (related
    # targets: its mean, (0 + -0.75)/2 = -0.375, is one value) -> one value per fact
    rows = _rows(uuid=["a", "b", "c", "a", "b", "b"],
                 method=["ig", "ig", "ig", "amig", "amig", "amig"],
                 target=["fact"] * 3 + ["related"] * 3, n_neurons=[1, 2, 3, 4, 0, 0],
                 p_before=[0.4, 0.5, 0.2, 0.4, 0.5, 0.4], p_after=[0.1, 0.3, 0.1, 0.2, 0.5, 0.1],
                 top1_before=[True, True, False, True, True, True],
                 top1_after=[False, True, False, True, True, True])
    stats = loc.cell_statistics(rows, n_boot=500)
    assert stats["method"].tolist() == ["amig", "ig"]  # fixed order, not first-seen
    amig, ig = stats.iloc[0], stats.iloc[1]
    assert ig.n_facts == 3 and ig.n_rows == 3 and ig.mean_neurons == 2.0
    assert ig.median_rel_change == pytest.approx(-0.5)
    assert ig.mean_rel_change == pytest.approx(-1.65 / 3)
    # 0.1 < 0.2 yes, 0.3 < 0.25 no, 0.1 < 0.1 no (not *more* than half)
    assert ig.share_halved == pytest.approx(1 / 3)
    assert ig.top1_before == pytest.approx(2 / 3) and ig.top1_after == pytest.approx(1 / 3)
    # the bootstrap interval of a median of 3 values lies within their range, around it
    assert -0.75 - 1e-12 <= ig.median_low <= -0.5 <= ig.median_high <= -0.4 + 1e-12
    assert amig.n_facts == 2 and amig.n_rows == 3
    assert amig.median_rel_change == pytest.approx((-0.5 + -0.375) / 2)
    assert amig.share_halved == pytest.approx((0 + 0.5) / 2)  # b: one of its two rows halved
    again = loc.cell_statistics(rows, n_boot=500)
    pd.testing.assert_frame_equal(stats, again)  # seeded


def test_wilcoxon_paired_by_hand_and_its_edge_cases():
    # 3 positive untied differences: W = min(R+, R-) = 0, exact two-sided p = 2/2^3
    out = loc.wilcoxon_paired([3, 5, 9], [2, 3, 6])
    assert out["n_pairs"] == 3 and out["n_nonzero"] == 3 and out["statistic"] == 0.0
    assert out["p_value"] == pytest.approx(0.25)
    assert out["median_difference"] == 2.0 and "p cannot fall below 0.05" in out["note"]
    # 7 differences -1..-7 (one zero dropped): W=0, exact p = 2/2^7
    out = loc.wilcoxon_paired([0, 1, 2, 3, 4, 5, 6, 9], [1, 3, 5, 7, 9, 11, 13, 9])
    assert out["n_nonzero"] == 7 and out["p_value"] == pytest.approx(2 / 128)
    assert "1 zero differences dropped" in out["note"]
    # ties -> normal approximation, still a number
    out = loc.wilcoxon_paired([1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0])
    assert np.isfinite(out["p_value"]) and "normal approximation" in out["note"]
    # all zero / empty: no test, no crash
    out = loc.wilcoxon_paired([1, 2], [1, 2])
    assert np.isnan(out["p_value"]) and "every difference is zero" in out["note"]
    assert loc.wilcoxon_paired([], [])["note"] == "no pairs"


def test_paired_test_with_and_without_an_effect():
    rng = np.random.default_rng(0)
    facts = [f"f{i}" for i in range(30)]
    base = pd.Series(rng.normal(-0.3, 0.2, 30), index=facts)
    noise = pd.Series(rng.normal(0, 0.05, 30), index=facts)
    # an effect: b is a shifted by +0.2 on every fact (paired noise much smaller)
    with_effect = loc.paired_test(base, base + 0.2 + noise, n_boot=500)
    assert with_effect["p_value"] < 1e-4 and with_effect["n_pairs"] == 30
    assert with_effect["difference_low"] < -0.2 + 0.05 and with_effect["difference_high"] < 0
    # none: b is a with its paired noise mirrored, so the differences are symmetric about 0
    sym = pd.Series(np.r_[noise.to_numpy()[:15], -noise.to_numpy()[:15]], index=facts)
    without = loc.paired_test(base, base + sym, n_boot=500)
    assert without["p_value"] > 0.5
    assert without["difference_low"] < 0 < without["difference_high"]
    # pairs are by fact: a fact missing on one side is not paired
    assert loc.paired_test(base.iloc[:10], base, n_boot=50)["n_pairs"] == 10


def test_holm_over_the_whole_table_by_hand():
    paired = pd.DataFrame(dict(model=["m1", "m1", "m2", "m2", "m2"],
                               p_value=[0.01, 0.04, 0.03, np.nan, 0.005]))
    out = loc.holm_table(paired)
    # family of 4 (NaN not counted): sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1, monotone
    np.testing.assert_allclose(out["p_holm"], [0.03, 0.06, 0.06, np.nan, 0.02])
    assert out["significant"].tolist() == [True, False, False, False, True]
    assert (out["m"] == 4).all()
    # per model the family would be smaller and m2's 0.03 would survive: the table is one family
    alone = loc.holm_table(paired[paired["model"] == "m2"])
    assert alone["significant"].tolist() == [True, False, True]


def test_paired_tests_pair_rankings_at_equal_k_controls_and_specificity():
    rows = []
    for i, u in enumerate(["a", "b", "c"]):
        for method, shift in (("amig", 0.0), ("ig", -0.1)):
            for name, extra in (("top", 0.0), ("matched", 0.3)):
                for k in (1, 2):
                    rows.append(dict(uuid=u, method=method, neuron_set=name, k=k,
                                     p_before=1.0, p_after=0.5 + shift + extra - 0.01 * i))
        for method in ("amig", "ig"):
            rows.append(dict(uuid=u, method=method, neuron_set="kn", k=0, p_before=1.0,
                             p_after=0.2 + 0.01 * i))
            other = {"a": "b", "b": "c", "c": "a"}[u]
            rows.append(dict(uuid=u, method=method, neuron_set="kn", k=0, target="related",
                             target_uuid=other, p_before=1.0, p_after=0.9))
    table = _rows(**{c: [r.get(c, d) for r in rows] for c, d in
                     (("uuid", None), ("method", None), ("neuron_set", None), ("k", None),
                      ("target", "fact"), ("target_uuid", None), ("p_before", None),
                      ("p_after", None))})
    table["target_uuid"] = table["target_uuid"].fillna(table["uuid"])
    out = loc.paired_tests(table, n_boot=100)
    methods = out[out["comparison"] == "methods"]
    assert methods[["a", "b", "k"]].values.tolist() == [["amig", "ig", 1], ["amig", "ig", 2]]
    assert methods["median_difference"].to_numpy() == pytest.approx([0.1, 0.1])
    control = out[out["comparison"] == "control"]
    assert len(control) == 2 * 2  # top at k = 1, 2 per ranking; kn has no matched rows here
    assert control["median_difference"].to_numpy() == pytest.approx([-0.3] * 4)
    # specificity: per fact, another fact's KN (-0.1) vs the related fact's own KN (-0.8..-0.78)
    spec = out[out["comparison"] == "specificity"]
    assert spec["a"].tolist() == ["amig", "ig"] and (spec["n_pairs"] == 3).all()
    own, other = loc.specificity_pairs(table, "amig")
    assert other.to_dict() == pytest.approx({"a": -0.1, "b": -0.1, "c": -0.1})
    # a's related fact is b, whose own KN erase gives 0.21 - 1
    assert own.to_dict() == pytest.approx({"a": -0.79, "b": -0.78, "c": -0.8})


def test_completeness_table_and_layer_counts():
    rows = pd.DataFrame(dict(uuid=["a", "a", "b", "a", "b", "a"],
                             method=["amig", "amig", "amig", "ig", "ig", "gxi"],
                             neuron_set=["kn", "kn", "kn", "kn", "kn", "top"],
                             layers=[[0, 1, 1], [0, 1, 1], [1], [2], [], [0]],
                             completeness_error=[0.01, 0.01, np.nan, 1.0, 0.02, np.nan],
                             gxi_cosine=[0.2, 0.2, np.nan, 1.0, 0.99, np.nan]))
    table = loc.completeness_table(rows)
    assert table["method"].tolist() == ["amig", "ig"]
    amig, ig = table.iloc[0], table.iloc[1]
    assert amig.n_facts == 2 and amig.n_known == 1 and amig.median_error == pytest.approx(0.01)
    assert amig.n_cosine == 1 and ig.share_above_tolerance == 0.5
    assert ig.median_gxi_cosine == pytest.approx(0.995)
    counts = loc.layer_counts(rows)
    assert counts.to_dict("records") == [
        dict(method="amig", layer=0, count=1, facts=2), dict(method="amig", layer=1, count=3, facts=2),
        dict(method="ig", layer=2, count=1, facts=2)]


# ---- rankings, KN prefixes, matched controls ---------------------------------------------------

def _quantiles(magnitude: np.ndarray, neurons) -> np.ndarray:
    """Within-layer quantile of each neuron's magnitude."""
    ranks = magnitude.argsort(axis=1).argsort(axis=1)
    return np.array([ranks[a, b] / (magnitude.shape[1] - 1) for a, b in neurons])


def test_matched_controls_are_matched_in_activation_and_uniform_ones_are_not():
    rng = np.random.default_rng(1)
    d_ff = 400
    magnitude = np.abs(rng.standard_cauchy((3, d_ff)))  # mostly small, a heavy tail
    flat = np.argsort(-magnitude.reshape(-1))[:16]  # the loudest neurons, as a method picks
    ranking = [(int(i // d_ff), int(i % d_ff)) for i in flat]
    pool = 10
    matched = loc.matched_controls(ranking, magnitude, pool, seeded_rng("t", 0))
    assert [a for a, _ in matched] == [a for a, _ in ranking]  # same layers
    assert len(set(matched)) == len(matched) and not set(matched) & set(ranking)
    # within a layer the pool's neurons are no further than pool + |ranking| ranks away
    gap = np.abs(_quantiles(magnitude, matched) - _quantiles(magnitude, ranking))
    assert gap.max() <= (pool + len(ranking)) / (d_ff - 1)
    # the uniform same-layer control (the old one) draws mostly near-zero neurons
    uniform = random_neurons_like(ranking, ranking, d_ff, seeded_rng("t", 0))
    assert np.median(np.abs(_quantiles(magnitude, uniform) - _quantiles(magnitude, ranking))) > 0.2
    assert _quantiles(magnitude, matched).min() > 0.9  # the ranking's are the top 16 of 1200
    assert np.median(_quantiles(magnitude, uniform)) < 0.8
    # seeded, and different seeds give different draws
    assert matched == loc.matched_controls(ranking, magnitude, pool, seeded_rng("t", 0))
    assert len({tuple(loc.matched_controls(ranking, magnitude, pool, seeded_rng("t", s)))
                for s in range(5)}) > 1
    # pool 1: the nearest free neuron, deterministic; ties by index
    flat_mag = np.array([[5.0, 1.0, 4.0, 4.0, 6.0]])
    assert loc.matched_controls([(0, 0)], flat_mag, 1, seeded_rng("t", 0)) == [(0, 2)]
    # (0, 0): 3 and 4 are both 1 away, 3 by index; (0, 2): 4 is nearer than 1
    assert loc.matched_controls([(0, 0), (0, 2)], flat_mag, 1, seeded_rng("t", 0)) == [
        (0, 3), (0, 4)]


def test_neuron_sets_are_prefixes_and_kn_must_be_one():
    magnitude = np.arange(2 * 10, dtype=float).reshape(2, 10)
    rankings = {"amig": [(1, 9), (0, 3), (1, 2), (0, 0)], "gxi": [(0, 1), (0, 2)]}
    sets = loc.neuron_sets(rankings, {"amig": [(1, 9), (0, 3)]}, magnitude, [1, 2, 4], 3,
                           seed=0, uuid="u")
    assert sets[("amig", "top", 4)] == rankings["amig"]
    assert sets[("amig", "top", 2)] == rankings["amig"][:2] == sets[("amig", "kn", 0)]
    assert sets[("amig", "kn_matched", 0)] == sets[("amig", "matched", 2)]
    assert sets[("amig", "matched", 1)] == sets[("amig", "matched", 4)][:1]
    assert ("gxi", "top", 4) not in sets and ("gxi", "kn", 0) not in sets  # too short; no KN
    with pytest.raises(ValueError, match="not the first neurons"):
        loc.neuron_sets(rankings, {"amig": [(0, 3)]}, magnitude, [1], 3, seed=0, uuid="u")
    scores = np.array([[0.1, 0.5, 0.5], [0.9, -1.0, 0.0]])
    assert loc.ranking(scores, 3) == [(1, 0), (0, 1), (0, 2)]
    assert [(a, b) for a, b, _ in knowledge_neurons(scores, 0.2, 3)] == loc.ranking(scores, 3)


def test_sample_keeps_converged_records_counts_the_rest_and_targets_are_seeded():
    facts = pd.DataFrame(dict(uuid=list("abcdefg"), relation=["P1"] * 4 + ["P2"] * 3))
    records = pd.DataFrame(dict(uuid=list("abcdeffa"), candidate=["true"] * 6 + ["wrong"] * 2,
                                converged=[True, True, False, True, True, True, True, True]))
    usable = pd.Series([True, True, True, True, False, True, True], index=facts.index)
    eligible, counts = loc.sample_counts(facts, records, usable)
    assert eligible == ["a", "b", "d", "f"]
    assert counts == dict(n_facts=7, n_without_record=1, n_not_attributable=1,
                          n_not_converged=1, n_eligible=4)
    three = loc.sample_facts(facts, records, 3, seed=0, usable=usable)
    assert len(three) == 3 and set(three) <= set(eligible)
    assert three == loc.sample_facts(facts.iloc[::-1], records, 3, seed=0, usable=usable)
    # without the column every record counts as converged
    assert "c" in loc.sample_counts(facts, records.drop(columns="converged"))[0]
    relation_of = dict(zip(facts["uuid"], facts["relation"]))
    related, unrelated = loc.target_facts("a", relation_of, 5, 2, seed=0)
    assert sorted(related) == ["b", "c", "d"] and len(unrelated) == 2
    assert set(unrelated) <= {"e", "f", "g"}
    related, _ = loc.target_facts("a", relation_of, 5, 2, seed=0, related_pool=["a", "b", "f"])
    assert related == ["b"]


# ---- gradient x input ---------------------------------------------------------------------------

def _reference_gxi(lm, query):
    """a * dP/da per layer and object token by autograd, one layer replaced by a leaf at a
    time (the rest of the model recomputed): [n_layers, d_ff], mean over object tokens."""
    from kneurons.hooks import capture_ffn, ffn_hooks

    ids = torch.as_tensor([query.input_ids])
    with torch.no_grad(), capture_ffn(lm) as acts:
        lm.model(input_ids=ids)
    out = np.zeros((lm.n_layers, lm.d_ff))
    for layer in range(lm.n_layers):
        for pos, tgt in zip(query.target_positions, query.target_ids):
            a = acts[layer][0, pos].clone().requires_grad_(True)

            def put(act, a=a, pos=pos):
                return act.index_put((torch.tensor([0]), torch.tensor([pos])), a[None])

            with ffn_hooks(lm, {layer: put}):
                logits = lm.model(input_ids=ids).logits[0, pos]
            (grad,) = torch.autograd.grad(torch.softmax(logits, -1)[tgt], a)
            out[layer] += (a * grad).detach().numpy() / len(query.target_ids)
    return out


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_gradient_x_input_against_autograd_per_layer_and_finite_differences(kind):
    lm = build(kind)
    if kind == "bert":
        queries = [encode_query(lm, "the capital of [X] is [Y] .", "tanzania", "dodoma"),
                   encode_query(lm, "the capital of [X] is [Y] .", "france", "dar es salaam")]
    else:
        queries = [encode_query(lm, "The capital of [X] is [Y] .", "Tanzania", "Dodoma"),
                   encode_query(lm, "The capital of [X] is [Y] .", "France", "Kilimanjaro")]
    assert max(len(q.target_ids) for q in queries) > 1  # multi-token objects, padded batch
    scores = gradient_x_input(lm, queries, batch_size=3)  # units of both queries share batches
    for query, got in zip(queries, scores):
        want = _reference_gxi(lm, query)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    # one layer only: the others stay 0
    only = gradient_x_input(lm, queries[:1], layers=[1])[0]
    assert not only[[0, 2]].any() and np.allclose(only[1], scores[0][1], rtol=1e-5, atol=1e-9)
    # finite differences through the scoring path (a one-token object; a float64 copy): the
    # activation scaled by (1 + eps) changes P by ~ eps * a_j dP/da_j, gradient x input itself
    import copy

    from kneurons.models import wrap_model

    lm64 = wrap_model(copy.deepcopy(lm.model).double(), lm.tokenizer, lm.arch)
    words = ["dodoma", "paris", "berlin"] if kind == "bert" else [
        "Paris", "Rome", "the", "a", "in", "of", "is"]
    query = next(q for q in (encode_query(lm64, "the capital of [X] is [Y] .", "france", w)
                             if kind == "bert" else
                             encode_query(lm64, "The capital of [X] is [Y] .", "France", w)
                             for w in words) if len(q.target_ids) == 1)
    g = gradient_x_input(lm64, [query])[0]
    base = scoring.score(lm64, [query]).prob[0]
    eps = 1e-2
    for layer, j in loc.ranking(np.abs(g), 4):
        up = scoring.score(lm64, [query], [scoring.Intervention(((layer, j),), "scale", 1 + eps)])
        down = scoring.score(lm64, [query], [scoring.Intervention(((layer, j),), "scale", 1 - eps)])
        fd = (up.prob[0] - down.prob[0]) / (2 * eps)
        assert fd == pytest.approx(g[layer, j], rel=1e-3)


def test_ig_on_gemma_is_gradient_x_input_rescaled_and_sums_to_zero():
    # Gemma's RMSNorm on the FFN output makes P(alpha a) constant for alpha > 0: every IG
    # score is the gradient x input score times (1/m) sum_k 1/alpha_k, and a layer's scores sum
    # to ~0 (Euler, degree 0), while P(a) - P(0) does not: completeness error ~1, not noise
    from kneurons.attribution import probability_gap
    from kneurons.records import completeness_error

    lm = build("gemma3_text")
    queries = [encode_query(lm, "The capital of [X] is [Y] .", "Tanzania", "Dodoma"),
               encode_query(lm, "The capital of [X] is [Y] .", "France", "Paris")]
    for steps, quadrature in ((8, "riemann"), (5, "gauss-legendre")):
        alphas, weights = quadrature_rule(steps, quadrature)
        factor = float((weights / alphas).sum())
        ig = attribute(lm, queries, method="ig", steps=steps, quadrature=quadrature)
        gxi = gradient_x_input(lm, queries)
        for result, g in zip(ig, gxi):
            np.testing.assert_allclose(result.scores, factor * g, rtol=0,
                                       atol=1e-3 * np.abs(result.scores).max())
            sums = np.abs(result.scores.sum(axis=1)) / np.abs(result.scores).sum(axis=1)
            assert sums.max() < 1e-3
            assert loc.cosine(result.scores, g) > 0.9999
    gap = probability_gap(lm, queries[0], method="ig")
    assert np.abs(gap).sum() > 1e-3
    assert completeness_error(ig[0].scores, gap) == pytest.approx(1.0, abs=1e-2)
    # a model without a normalised FFN output is no such case
    gpt = build("gpt2")
    q = encode_query(gpt, "The capital of [X] is [Y] .", "Tanzania", "Dodoma")
    assert loc.cosine(attribute(gpt, [q], method="ig", steps=8)[0].scores,
                      gradient_x_input(gpt, [q])[0]) < 0.99


# ---- the whole stage on tiny models ---------------------------------------------------------

TEMPLATES = {"P36": "the capital of [X] is [Y] .", "P37": "the official language of [X] is [Y] ."}
FACTS = [("a", 1, "P36", "tanzania", "dodoma"), ("b", 2, "P36", "france", "paris"),
         ("c", 3, "P36", "germany", "berlin"), ("d", 4, "P37", "tanzania", "swahili"),
         ("e", 5, "P37", "kenya", "english"), ("f", 6, "P37", "france", "english")]


def _facts():
    return pd.DataFrame([dict(uuid=u, lineid=i, relation=r, template=TEMPLATES[r],
                              sub_label=s, obj_label=o, obj_uri=f"Q{i}",
                              wrong_obj_label="paris", wrong_obj_uri="Q0",
                              calibration=i % 2 == 1)
                         for u, i, r, s, o in FACTS])


@pytest.fixture(params=["tiny_bert", "tiny_gpt2"])
def lm(request):
    return request.getfixturevalue(request.param)


def test_localize_on_a_tiny_model(lm, tmp_path, monkeypatch):
    facts = _facts()
    records = attribute_candidates(lm, candidate_table(facts, "discovery"), method="amig",
                                   steps=3, quadrature="riemann", keep_top=30)
    records["converged"] = records["uuid"] != "f"  # f's record did not converge: left out
    kw = dict(run_method="amig", kn_threshold=0.2, max_kn=5, sample=4, n_related=1,
              n_unrelated=2, enhance_factor=2.0, steps=3, quadrature="riemann", seed=0,
              deletion_k=[1, 2, 4], control_pool=5, batch_facts=3)
    table = loc.localize(lm, facts, records, checkpoint_path=tmp_path / "ck", **kw)
    sampled = loc.sample_facts(facts, records, 4, 0)
    assert "f" not in sampled and table["uuid"].unique().tolist() == sampled
    assert table.attrs["n_not_converged"] == 1 and table.attrs["n_sampled"] == 4
    relation_of = dict(zip(facts["uuid"], facts["relation"]))
    index = facts.set_index("uuid")
    n_targets = {u: 1 + len(loc.target_facts(u, relation_of, 1, 2, 0, sampled)[0]) + 2
                 for u in sampled}
    # per fact: 4 rankings x 2 sets x 3 k on the fact; 2 KN sets x 2 x 2 operations x targets
    assert len(table) == sum(4 * 2 * 3 + 2 * 2 * 2 * n for n in n_targets.values())
    for u in sampled:
        f = index.loc[u]
        q = encode_query(lm, f.template, f.sub_label, f.obj_label)
        mine = table[table["uuid"] == u]
        rec = records[(records["uuid"] == u) & (records["candidate"] == "true")].iloc[0]
        ig_scores = attribute(lm, [q], method="ig", steps=3)[0].scores
        kn = {"amig": knowledge_neurons_of(rec.top_layers, rec.top_neurons, rec.top_scores,
                                           0.2, 5),
              "ig": [(a, b) for a, b, _ in knowledge_neurons(ig_scores, 0.2, 5)]}
        magnitude = loc.object_magnitude(lm, [q])[0]
        tops = {"amig": list(zip(rec.top_layers, rec.top_neurons))[:5],
                "ig": loc.ranking(ig_scores, 5),
                "gxi": loc.ranking(gradient_x_input(lm, [q])[0], 5),
                "activation": loc.ranking(magnitude, 5)}
        base = scoring.score(lm, [q]).prob[0]
        for method in loc.RANKINGS:
            rows = mine[mine["method"] == method].set_index(["neuron_set", "k", "operation",
                                                              "target"], drop=False)
            for k in (1, 2, 4):
                top = rows.loc[("top", k, "erase", "fact")]
                assert list(zip(top.layers, top.neurons)) == [tuple(map(int, n))
                                                              for n in tops[method][:k]]
                assert top.p_before == pytest.approx(base, rel=1e-5)
                assert top.p_after == pytest.approx(scoring.score(
                    lm, [q], [scoring.erase(tops[method][:k])]).prob[0], rel=1e-5)
                matched = rows.loc[("matched", k, "erase", "fact")]
                pairs = list(zip(matched.layers, matched.neurons))
                assert [a for a, _ in pairs] == [int(a) for a, _ in tops[method][:k]]
                assert not set(pairs) & {tuple(map(int, n)) for n in tops[method]}
                assert matched.mean_magnitude == pytest.approx(
                    np.mean([magnitude[a, b] for a, b in pairs]), rel=1e-5)
            if method in kn:
                erased = rows.loc[("kn", 0, "erase", "fact")]
                assert list(zip(erased.layers, erased.neurons)) == kn[method]
                assert erased.p_after == pytest.approx(
                    scoring.score(lm, [q], [scoring.erase(kn[method])]).prob[0], rel=1e-5)
                enh = rows.loc[("kn", 0, "enhance", "fact")]
                assert enh.factor == 2.0 and enh.p_after == pytest.approx(
                    scoring.score(lm, [q], [scoring.enhance(kn[method], 2.0)]).prob[0],
                    rel=1e-5)
                control = rows.loc[("kn_matched", 0, "erase", "fact")]
                assert control.n_neurons == len(kn[method])
                related = mine[(mine["method"] == method) & (mine["target"] == "related")]
                assert set(related["target_uuid"]) <= set(sampled) - {u}
                assert (related["target_relation"] == f.relation).all()
                assert (mine.loc[mine["target"] == "unrelated", "target_relation"]
                        != f.relation).all()
            else:
                assert not rows["neuron_set"].isin(["kn", "kn_matched"]).any()
        # completeness: the run's method from its record, IG computed; cosines with gxi
        by = mine.drop_duplicates("method").set_index("method")
        assert by.at["amig", "completeness_error"] == pytest.approx(rec.completeness_error)
        assert np.isfinite(by.at["ig", "completeness_error"])
        assert np.isfinite(by.at["ig", "gxi_cosine"])
        assert np.isfinite(by.at["amig", "gxi_cosine"]) == isinstance(rec.scores, bytes)
        assert np.isnan(by.at["gxi", "completeness_error"])
    # the statistics run on it
    stats = loc.cell_statistics(table, n_boot=50)
    assert len(stats) == 4 * 2 * 3 + 2 * 2 * 2 * 3
    paired = loc.holm_table(loc.paired_tests(table, n_boot=50))
    assert set(paired["comparison"]) == {"methods", "control", "specificity"}
    assert len(paired[paired["comparison"] == "methods"]) == 6 * 3
    # resumable: a finished checkpoint is read back, nothing attributed again
    monkeypatch.setattr(loc, "attribute", lambda *a, **k: pytest.fail("attributed again"))
    again = loc.localize(lm, facts, records, checkpoint_path=tmp_path / "ck", **kw)
    pd.testing.assert_frame_equal(again, table)
    # the parquet keeps the counts
    table.to_parquet(tmp_path / "t.parquet")
    read = pd.read_parquet(tmp_path / "t.parquet")
    assert read.attrs["n_not_converged"] == 1
    # the report: tables, Markdown and figures (and "no data" when there are no runs)
    from kneurons.localization_report import FIGURES, localization_report

    for runs, folder in (({"tiny/en": read}, tmp_path / "report"), ({}, tmp_path / "empty")):
        figures = {n: (folder / f"{n}.png", folder / f"{n}.svg") for n in FIGURES}
        stats, paired, complete = localization_report(
            runs, folder / "s.csv", folder / "p.csv", folder / "c.csv", folder / "l.md", figures,
            n_boot=50)
        for png, svg in figures.values():
            assert png.read_bytes()[:4] == b"\x89PNG" and svg.stat().st_size > 0
        md = (folder / "l.md").read_text()
        if runs:
            assert len(stats) == 48 and (stats["model"] == "tiny").all()
            assert len(pd.read_csv(folder / "s.csv")) == 48
            assert "## tiny / en (4 facts)" in md and "record not converged (left out) 1" in md
            assert "| AMIG | KN | erase | fact | 4 |" in md and "p (Holm)" in md
            assert set(complete["method"]) == {"amig", "ig"}
            assert {"p_holm", "significant", "m"} <= set(pd.read_csv(folder / "p.csv"))
        else:
            assert "No data." in md and stats.empty


def _png_size(path) -> tuple[int, int]:
    import struct

    return struct.unpack(">II", path.read_bytes()[16:24])


def test_report_figures_wrap_into_rows_and_leave_out_empty_panels(tmp_path):
    # eight model/language pairs (the old localization_change was one column per pair: 4892 px
    # for four) and one pair with no rows at all
    from kneurons.localization_report import FIGURES, localization_report

    rows = []
    for u in range(6):
        for method in loc.RANKINGS:
            for name in ("top", "matched"):
                for k in (1, 2):
                    rows.append(dict(uuid=f"u{u}", method=method, neuron_set=name, k=k,
                                     p_before=0.5, p_after=0.1 + 0.05 * u + 0.1 * k))
            if method in loc.ATTRIBUTIONS:
                for name in ("kn", "kn_matched"):
                    for op in loc.OPERATIONS:
                        rows.append(dict(uuid=f"u{u}", method=method, neuron_set=name, k=0,
                                         operation=op, p_before=0.5, p_after=0.3 + 0.01 * u,
                                         layers=[0, 1], neurons=[1, 2]))
    table = _rows(**{c: [r.get(c, d) for r in rows] for c, d in
                     (("uuid", None), ("method", None), ("neuron_set", None), ("k", None),
                      ("operation", "erase"), ("p_before", None), ("p_after", None),
                      ("layers", [0]), ("neurons", [1]))})
    table["relation"] = "P1"
    table["completeness_error"] = table["gxi_cosine"] = np.nan
    runs = {f"m{i}/en": table for i in range(8)}
    runs["empty/zh"] = table.iloc[:0]
    figures = {n: (tmp_path / f"{n}.png", tmp_path / f"{n}.svg") for n in FIGURES}
    localization_report(runs, tmp_path / "s.csv", tmp_path / "p.csv", tmp_path / "c.csv",
                        tmp_path / "l.md", figures, n_boot=20)
    for name in FIGURES:
        width, height = _png_size(figures[name][0])
        assert width <= 2000 and height > width / 3, (name, width, height)
        svg = figures[name][1].read_text()
        assert "left out" in svg and "empty" in svg, name


def test_matched_controls_hold_on_the_activation_of_a_real_forward(tiny_gpt2):
    # on a real forward (object_magnitude) the matched control's |a| quantiles follow the
    # ranking's within the pool's reach
    lm = tiny_gpt2
    q = encode_query(lm, "The capital of [X] is [Y] .", "France", "Paris")
    magnitude = loc.object_magnitude(lm, [q])[0]
    assert magnitude.shape == (lm.n_layers, lm.d_ff) and (magnitude >= 0).all()
    ranking = loc.ranking(magnitude, 8)
    matched = loc.matched_controls(ranking, magnitude, 3, seeded_rng("m", 0))
    gap = np.abs(_quantiles(magnitude, matched) - _quantiles(magnitude, ranking))
    assert gap.max() <= (3 + 8) / (lm.d_ff - 1)


# ---- the rules --------------------------------------------------------------------------------

def test_dry_run_plans_one_job_per_model_and_language_and_sample_0_turns_it_off(tmp_path):
    import yaml
    from test_workflow_static import REPO, job_counts, snakemake

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    pairs = sum(len(spec["languages"]) for spec in config["models"].values())
    result = snakemake("-n", "--forceall", "--cores", "1")
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    assert counts["localize_neurons"] == pairs and counts["report_localization"] == 1
    config["localization"]["sample"] = 0
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    counts = job_counts(snakemake("-n", "--forceall", "--cores", "1", "--configfile",
                                  str(path)).stdout)
    assert "localize_neurons" not in counts and "report_localization" not in counts
    config["localization"]["samples"] = 3  # unknown keys are rejected by name
    path.write_text(yaml.safe_dump(config))
    result = snakemake("-n", "--cores", "1", "--configfile", str(path))
    assert result.returncode != 0 and "samples" in result.stdout + result.stderr
    del config["localization"]["samples"]
    config["localization"]["deletion_k"] = [0, 2]  # set sizes are positive
    path.write_text(yaml.safe_dump(config))
    result = snakemake("-n", "--cores", "1", "--configfile", str(path))
    assert result.returncode != 0 and "deletion_k" in result.stdout + result.stderr


@pytest.mark.slow
def test_the_stage_in_a_workflow_run_and_what_its_config_reruns(tmp_path):
    import json

    from test_workflow import TINY_TOY, planned, run_workflow, tiny_config

    config = tiny_config()
    config["mlama"]["relations"] = ["P36", "P37"]
    config["toy"] = dict(TINY_TOY)
    config["attribution"].update(steps=3, shards=2)
    config["localization"].update(sample=4)
    until = ("--until", "report_localization")
    run_workflow(tmp_path, config, *until)
    reports = tmp_path / "results" / "reports"
    stats = pd.read_csv(reports / "localization.csv")
    assert set(zip(stats["model"], stats["language"])) == {
        (m, lang) for m in ("toy-bert", "toy-gpt") for lang in ("en", "zh")}
    assert set(stats["method"]) == set(loc.RANKINGS) and (stats["n_facts"] <= 4).all()
    assert (stats.loc[stats["target"] == "fact", "n_facts"] == 4).all()
    assert "## toy-bert / en (4 facts)" in (reports / "localization.md").read_text()
    paired = pd.read_csv(reports / "localization_paired.csv")
    assert paired["m"].nunique() == 1 and paired["m"].iat[0] == paired["p_value"].notna().sum()
    for name in ("localization_curves", "localization_change", "localization_layers"):
        png = reports / "figures" / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and _png_size(png)[0] <= 2000
    assert not list((tmp_path / "results" / "localization").rglob("*.checkpoint"))
    for change, expected in [
        (lambda c: c, {}),
        (lambda c: c["localization"].update(enhance_factor=3.0),
         {"localize_neurons": 4, "report_localization": 1}),
        (lambda c: c["localization"].update(unrelated_facts=1),
         {"localize_neurons": 4, "report_localization": 1}),
        (lambda c: c["localization"].update(deletion_k=[1, 3]),
         {"localize_neurons": 4, "report_localization": 1}),
        (lambda c: c["localization"].update(control_pool=4),
         {"localize_neurons": 4, "report_localization": 1}),
        (lambda c: c["neurons"].update(kn_threshold=0.3),
         {"localize_neurons": 4, "report_localization": 1}),
        (lambda c: c["neurons"].update(relation_threshold=0.5), {}),
        (lambda c: c["likn"].update(edit_sample=3), {}),
    ]:
        changed = json.loads(json.dumps(config))
        change(changed)
        assert planned(tmp_path, changed, *until) == expected


def test_a_neuron_built_to_write_the_object_is_found_and_its_curve_falls_below_the_control(
        tiny_gpt2):
    # last-layer neuron 7 fires with a constant 3.0 (bias only) and writes 20 x the output
    # embedding of the object's first token: IG and gradient x input must rank it first, and
    # their deletion curves must fall (P(true) below half at every k) while the control
    # matched on |activation| in the same layers stays put; AMIG gives it 0 (its activation
    # is the same for every baseline, so a - a' = 0): a query-independent neuron is no KN for
    # AMIG
    import copy

    from kneurons.models import wrap_model

    lm = wrap_model(copy.deepcopy(tiny_gpt2.model), tiny_gpt2.tokenizer, "causal")
    template = "The capital of [X] is [Y] ."
    facts = pd.DataFrame([dict(uuid=u, lineid=i, relation=r, template=template, sub_label=s,
                               obj_label=o, obj_uri=f"Q{i}", wrong_obj_label="Kenya",
                               wrong_obj_uri="Q0", calibration=False)
                          for u, i, r, s, o in [("p", 1, "P36", "France", "Paris"),
                                                ("b", 2, "P36", "Germany", "Berlin"),
                                                ("s", 3, "P37", "Tanzania", "Swahili")]])
    query = encode_query(lm, template, "France", "Paris")
    layer, neuron = lm.n_layers - 1, 7
    mlp = lm.model.transformer.h[layer].mlp
    with torch.no_grad():
        mlp.c_fc.weight[:, neuron] = 0.0
        mlp.c_fc.bias[neuron] = 3.0
        mlp.c_proj.weight[neuron, :] = 20.0 * lm.model.lm_head.weight[query.target_ids[0]]
    # the built neuron bends P along the path: 8 Riemann steps leave "p" 26% incomplete, and
    # a record that has not converged is not counted, so refine it (up to 64 steps)
    records = attribute_candidates(lm, candidate_table(facts, "discovery"), method="ig",
                                   steps=8, max_steps=64, quadrature="riemann", keep_top=30)
    assert records.set_index("uuid").loc["p", "converged"]
    table = loc.localize(lm, facts, records, run_method="ig", kn_threshold=0.2, max_kn=5,
                         sample=3, n_related=1, n_unrelated=1, enhance_factor=2.0, steps=8,
                         quadrature="riemann", seed=0)
    rows = table[(table["uuid"] == "p") & (table["target"] == "fact")
                 & (table["operation"] == "erase")].set_index(["method", "neuron_set", "k"])
    for method in ("ig", "gxi"):
        top1 = rows.loc[(method, "top", 1)]
        assert (top1.layers[0], top1.neurons[0]) == (layer, neuron)
        for k in loc.DELETION_K:
            assert rows.loc[(method, "top", k), "rel_change"] < -0.5
            assert abs(rows.loc[(method, "matched", k), "rel_change"]) < 0.2
            # matched: as loud as the ranking's neurons, in the same layers
            assert sorted(rows.loc[(method, "matched", k), "layers"]) == sorted(
                rows.loc[(method, "top", k), "layers"])
    assert rows.loc[("ig", "kn", 0), "rel_change"] < -0.5
    assert abs(rows.loc[("ig", "kn_matched", 0), "rel_change"]) < 0.2
    amig_kn = set(zip(rows.loc[("amig", "kn", 0), "layers"], rows.loc[("amig", "kn", 0), "neurons"]))
    assert (layer, neuron) not in amig_kn
    amig = attribute(lm, [query], method="amig", steps=8)[0].scores
    assert amig[layer, neuron] == 0.0
