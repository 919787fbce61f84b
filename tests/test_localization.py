"""The localization evaluation: hand-counted statistics, the sets, and a run on tiny models."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kneurons import localization as loc
from kneurons import scoring
from kneurons.attribution import attribute
from kneurons.neurons import knowledge_neurons, knowledge_neurons_of
from kneurons.queries import encode_query
from kneurons.shards import attribute_candidates, candidate_table


# ---- statistics, hand-counted ----------------------------------------------------------------

def test_spread_median_quartiles_iqr_by_hand():
    # sorted 1 2 4 8 (n=4, linear interpolation): q1 at 0.75 -> 1.75, median 3, q3 at 2.25 -> 5
    s = loc.spread([8, 1, np.nan, 4, 2])
    assert s == dict(median=3.0, q1=1.75, q3=5.0, iqr=3.25, mean=3.75)
    assert np.isnan(loc.spread([np.nan])["median"])


def test_relative_change_and_statistics_by_hand():
    np.testing.assert_allclose(loc.relative_change([0.5, 0.2, 0.0], [0.1, 0.3, 0.1]),
                               [-0.8, 0.5, np.nan])
    rows = pd.DataFrame(dict(
        uuid=["a", "b", "c", "a", "b"], method=["ig", "ig", "ig", "amig", "amig"],
        neuron_set="kn", operation="erase", target="fact", n_neurons=[1, 2, 3, 4, 0],
        p_before=[0.4, 0.5, 0.2, 0.4, 0.5], p_after=[0.1, 0.3, 0.1, 0.2, 0.5],
        top1_before=[True, True, False, True, True],
        top1_after=[False, True, False, True, True]))
    rows["rel_change"] = loc.relative_change(rows["p_before"], rows["p_after"])
    stats = loc.localization_statistics(rows)
    assert stats["method"].tolist() == ["amig", "ig"]  # fixed order, not first-seen
    amig, ig = stats.iloc[0], stats.iloc[1]
    # ig: changes -0.75, -0.4, -0.5 -> median -0.5, q1 -0.625, q3 -0.45
    assert ig.n == 3 and ig.n_facts == 3 and ig.mean_neurons == 2.0
    assert ig.median_rel_change == pytest.approx(-0.5)
    assert ig.q1_rel_change == pytest.approx(-0.625) and ig.q3_rel_change == pytest.approx(-0.45)
    assert ig.iqr_rel_change == pytest.approx(0.175)
    # 0.1 < 0.2 yes, 0.3 < 0.25 no, 0.1 < 0.1 no (not *more* than half)
    assert ig.share_halved == pytest.approx(1 / 3)
    assert ig.top1_before == pytest.approx(2 / 3) and ig.top1_after == pytest.approx(1 / 3)
    assert ig.top1_changed == pytest.approx(1 / 3)
    # amig: -0.5 (exactly half: not counted) and 0
    assert amig.median_rel_change == pytest.approx(-0.25) and amig.share_halved == 0.0


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


def test_paired_comparison_pairs_per_fact_means():
    rows = pd.DataFrame(dict(
        uuid=["a", "a", "b", "b", "a", "b", "c"], method=["amig"] * 4 + ["ig"] * 3,
        neuron_set="kn", operation="erase", target="related",
        rel_change=[-1.0, -0.5, -0.2, 0.0, -0.25, -0.1, -0.3]))
    out = loc.paired_comparison(rows)
    assert len(out) == 1
    row = out.iloc[0]
    # a: amig mean -0.75 vs ig -0.25; b: -0.1 vs -0.1 (zero difference); c: no amig
    assert row.n_pairs == 2 and row.n_nonzero == 1
    assert row.median_amig == pytest.approx(-0.425) and row.median_ig == pytest.approx(-0.175)
    assert row.median_difference == pytest.approx(-0.25)


def test_completeness_and_layer_counts():
    scores = np.array([[0.1, 0.2], [0.3, -0.1]])
    c = loc.completeness(scores, np.array([0.5, 0.1]))
    # per layer sums 0.3, 0.2 vs 0.5, 0.1: |err| 0.2 + 0.1 over |gap| 0.6
    assert c["score_total"] == pytest.approx(0.5) and c["gap_total"] == pytest.approx(0.6)
    assert c["completeness_error"] == pytest.approx(0.3)
    assert c["completeness_rel_error"] == pytest.approx(0.5)
    assert np.isnan(loc.completeness(None, np.array([0.5]))["completeness_rel_error"])
    rows = pd.DataFrame(dict(uuid=["a", "a", "b", "a"], method=["amig", "amig", "amig", "ig"],
                             neuron_set=["kn", "kn", "kn", "kn"],
                             layers=[[0, 1, 1], [0, 1, 1], [1], [2]]))
    counts = loc.layer_counts(rows)
    assert counts.to_dict("records") == [
        dict(method="amig", layer=0, count=1, facts=2), dict(method="amig", layer=1, count=3, facts=2),
        dict(method="ig", layer=2, count=1, facts=1)]


# ---- the sets and the sample ----------------------------------------------------------------

def test_control_sets_same_layers_disjoint_from_every_kn_and_activation_top():
    kn = {"amig": [(0, 1), (1, 2), (1, 3)], "ig": [(0, 4), (1, 2)]}
    activation = np.zeros((2, 6))
    activation[1, 5], activation[0, 0], activation[1, 0] = 3.0, 2.0, 2.0
    sets = loc.control_sets(kn, activation, d_ff=6, seed=1, uuid="u")
    every = {n for s in kn.values() for n in s}
    for method in kn:
        rnd = sets[(method, "random")]
        assert [layer for layer, _ in rnd] == [layer for layer, _ in kn[method]]
        assert len(set(rnd)) == len(rnd) and not set(rnd) & every
        assert sets[(method, "kn")] == kn[method]
    # highest activation first, ties by flat index
    assert sets[("amig", "activation")] == [(1, 5), (0, 0), (1, 0)]
    assert sets[("ig", "activation")] == [(1, 5), (0, 0)]
    assert sets == loc.control_sets(kn, activation, 6, 1, "u")  # seeded
    draws = {tuple(loc.control_sets(kn, activation, 6, s, "u")[("amig", "random")])
             for s in range(10)}
    assert len(draws) > 1


def test_sample_and_targets_are_seeded_and_prefer_stored_scores():
    facts = pd.DataFrame(dict(uuid=list("abcdef"), relation=["P1"] * 3 + ["P2"] * 3))
    records = pd.DataFrame(dict(uuid=list("abcdeff"), candidate=["true"] * 6 + ["wrong"],
                                scores=[b"x", None, b"x", b"x", None, None, b"x"]))
    assert set(loc.sample_facts(facts, records, 3, seed=0)) == {"a", "c", "d"}
    five = loc.sample_facts(facts, records, 5, seed=0)
    assert len(five) == 5 and five == loc.sample_facts(facts.iloc[::-1], records, 5, seed=0)
    usable = pd.Series([True, True, False, True, True, True], index=facts.index)
    assert "c" not in loc.sample_facts(facts, records, 6, 0, usable)
    relation_of = dict(zip(facts["uuid"], facts["relation"]))
    related, unrelated = loc.target_facts("a", relation_of, 5, 2, seed=0)
    assert sorted(related) == ["b", "c"] and len(unrelated) == 2
    assert set(unrelated) <= {"d", "e", "f"}


# ---- the whole stage on tiny models ---------------------------------------------------------

TEMPLATES = {"P36": "the capital of [X] is [Y] .", "P37": "the official language of [X] is [Y] ."}
FACTS = [("a", 1, "P36", "tanzania", "dodoma"), ("b", 2, "P36", "france", "paris"),
         ("c", 3, "P36", "germany", "berlin"), ("d", 4, "P37", "tanzania", "swahili"),
         ("e", 5, "P37", "kenya", "english")]


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
    kw = dict(run_method="amig", kn_threshold=0.2, max_kn=5, sample=3, n_related=1,
              n_unrelated=2, enhance_factor=2.0, steps=3, quadrature="riemann", seed=0,
              batch_facts=2)
    table = loc.localize(lm, facts, records, checkpoint_path=tmp_path / "ck", **kw)
    sampled = loc.sample_facts(facts, records, 3, 0)
    assert table["uuid"].unique().tolist() == sampled
    # per fact: 2 methods x 3 sets x 2 operations x (1 fact + 1 related + 2 unrelated)
    assert len(table) == 3 * 2 * 3 * 2 * 4
    by = {m: g for m, g in table.groupby("method")}
    index = facts.set_index("uuid")
    for u in sampled:
        f = index.loc[u]
        q = encode_query(lm, f.template, f.sub_label, f.obj_label)
        rec = records[(records["uuid"] == u) & (records["candidate"] == "true")].iloc[0]
        amig_kn = knowledge_neurons_of(rec.top_layers, rec.top_neurons, rec.top_scores, 0.2, 5)
        ig_kn = [(a, b) for a, b, _ in knowledge_neurons(
            attribute(lm, [q], method="ig", steps=3)[0].scores, 0.2, 5)]
        for method, kn in (("amig", amig_kn), ("ig", ig_kn)):
            mine = by[method][(by[method]["uuid"] == u)]
            erased = mine[(mine["neuron_set"] == "kn") & (mine["operation"] == "erase")]
            assert list(zip(erased.iloc[0].layers, erased.iloc[0].neurons)) == kn
            fact_row = erased[erased["target"] == "fact"].iloc[0]
            want = scoring.score(lm, [q], [scoring.erase(kn)])
            assert fact_row.p_after == pytest.approx(want.prob[0], rel=1e-5)
            assert fact_row.p_before == pytest.approx(scoring.score(lm, [q]).prob[0], rel=1e-5)
            enh = mine[(mine["neuron_set"] == "kn") & (mine["operation"] == "enhance")
                       & (mine["target"] == "fact")].iloc[0]
            assert enh.factor == 2.0 and enh.p_after == pytest.approx(
                scoring.score(lm, [q], [scoring.enhance(kn, 2.0)]).prob[0], rel=1e-5)
            rnd = mine[mine["neuron_set"] == "random"].iloc[0]
            assert sorted(rnd.layers) == sorted(n[0] for n in kn)
            assert not set(zip(rnd.layers, rnd.neurons)) & set(amig_kn + ig_kn)
            related = mine[mine["target"] == "related"]
            assert (related["target_relation"] == f.relation).all()
            assert (related["target_uuid"] != u).all()
            assert (mine.loc[mine["target"] == "unrelated", "target_relation"] != f.relation).all()
        # IG was attributed here: its completeness is known; AMIG's where the shard kept scores
        assert by["ig"].loc[by["ig"]["uuid"] == u, "completeness_rel_error"].notna().all()
        assert by["amig"].loc[by["amig"]["uuid"] == u, "completeness_rel_error"].notna().all() \
            == isinstance(rec.scores, bytes)
    # the statistics tables run on it
    assert len(loc.localization_statistics(table)) == 2 * 3 * 2 * 3
    assert set(loc.paired_comparison(table)["neuron_set"]) == set(loc.NEURON_SETS)
    # resumable: a finished checkpoint is read back, nothing attributed again
    monkeypatch.setattr(loc, "attribute", lambda *a, **k: pytest.fail("attributed again"))
    again = loc.localize(lm, facts, records, checkpoint_path=tmp_path / "ck", **kw)
    pd.testing.assert_frame_equal(again, table)
    # the report: tables, Markdown and figures (and "no data" when there are no runs)
    from kneurons.localization_report import FIGURES, localization_report

    for runs, folder in (({"tiny/en": table}, tmp_path / "report"), ({}, tmp_path / "empty")):
        figures = {n: (folder / f"{n}.png", folder / f"{n}.svg") for n in FIGURES}
        stats, paired, complete = localization_report(
            runs, folder / "s.csv", folder / "p.csv", folder / "c.csv", folder / "l.md", figures)
        for png, svg in figures.values():
            assert png.read_bytes()[:4] == b"\x89PNG" and svg.stat().st_size > 0
        md = (folder / "l.md").read_text()
        if runs:
            assert len(stats) == 36 and (stats["model"] == "tiny").all()
            assert len(pd.read_csv(folder / "s.csv")) == 36
            assert "## tiny / en (3 facts)" in md and "| amig | KN | erase | fact | 3 |" in md
            assert set(complete["method"]) == {"amig", "ig"} and len(paired) == 18
        else:
            assert "No data." in md and stats.empty


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
    assert set(stats["method"]) == {"amig", "ig"} and (stats["n_facts"] == 4).all()
    assert "## toy-bert / en (4 facts)" in (reports / "localization.md").read_text()
    for name in ("localization_change", "localization_layers"):
        assert (reports / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert not list((tmp_path / "results" / "localization").rglob("*.checkpoint"))
    for change, expected in [
        (lambda c: c, {}),
        (lambda c: c["localization"].update(enhance_factor=3.0),
         {"localize_neurons": 4, "report_localization": 1}),
        (lambda c: c["localization"].update(unrelated_facts=1),
         {"localize_neurons": 4, "report_localization": 1}),
        (lambda c: c["neurons"].update(kn_threshold=0.3),
         {"localize_neurons": 4, "report_localization": 1}),
        (lambda c: c["neurons"].update(relation_threshold=0.5), {}),
        (lambda c: c["likn"].update(edit_sample=3), {}),
    ]:
        changed = json.loads(json.dumps(config))
        change(changed)
        assert planned(tmp_path, changed, *until) == expected


def test_a_neuron_built_to_write_the_object_is_found_and_erasing_it_removes_the_fact(tiny_gpt2):
    # last-layer neuron 7 fires with a constant 3.0 (bias only) and writes 20 x the output
    # embedding of the object's first token: IG must find it and erasing it must remove the
    # fact, while random neurons of the same layer do not; AMIG gives it 0 (its activation is
    # the same for every baseline, so a - a' = 0): a query-independent neuron is no KN for AMIG
    import copy

    import torch

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
    records = attribute_candidates(lm, candidate_table(facts, "discovery"), method="ig",
                                   steps=8, quadrature="riemann", keep_top=30)
    table = loc.localize(lm, facts, records, run_method="ig", kn_threshold=0.2, max_kn=5,
                         sample=3, n_related=1, n_unrelated=1, enhance_factor=2.0, steps=8,
                         quadrature="riemann", seed=0)
    rows = table[(table["uuid"] == "p") & (table["target"] == "fact")
                 & (table["operation"] == "erase")].set_index(["method", "neuron_set"])
    ig_kn = list(zip(rows.loc[("ig", "kn"), "layers"], rows.loc[("ig", "kn"), "neurons"]))
    assert ig_kn[0] == (layer, neuron)
    assert rows.loc[("ig", "kn"), "rel_change"] < -0.5
    assert abs(rows.loc[("ig", "random"), "rel_change"]) < 0.2
    amig_kn = set(zip(rows.loc[("amig", "kn"), "layers"], rows.loc[("amig", "kn"), "neurons"]))
    assert (layer, neuron) not in amig_kn
    amig = attribute(lm, [query], method="amig", steps=8)[0].scores
    assert amig[layer, neuron] == 0.0
