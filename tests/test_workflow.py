"""Workflow tests: the real DAG on the bundled sample (tiny settings) in a temp directory."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def tiny_config(**overrides) -> dict:
    """config.yaml with the source made absolute (the run happens elsewhere)."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["mlama"]["source"] = str(REPO / config["mlama"]["source"])
    for key, value in overrides.items():
        config[key] = value if not isinstance(value, dict) else {**config.get(key, {}), **value}
    return config


def run_workflow(workdir: Path, config: dict, *args: str, timeout: int = 1200, check: bool = True):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    result = subprocess.run(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args],
        capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def test_stage_one_on_the_bundled_sample(tmp_path):
    run_workflow(tmp_path, tiny_config(), "--until", "split_facts")
    results = tmp_path / "results" / "data"
    for lang in ("en", "zh"):
        report = json.loads((results / "mlama" / f"{lang}.report.json").read_text())
        assert report["facts_kept"] == 500
        parts = {part: pd.read_parquet(results / "facts" / lang / f"{part}.parquet")
                 for part in ("discovery", "evaluation")}
        assert len(parts["discovery"]) == 400 and len(parts["evaluation"]) == 100
        for part in parts.values():
            assert {"uuid", "lineid", "relation", "template", "sub_uri", "sub_label", "obj_uri",
                    "obj_label", "wrong_obj_uri", "wrong_obj_label"} <= set(part.columns)
            assert (part["wrong_obj_uri"] != part["obj_uri"]).all()
        assert parts["discovery"]["calibration"].sum() == 100
        assert (tmp_path / "logs" / "data" / "prepare_mlama" / f"{lang}.log").exists()
    en = pd.read_parquet(results / "facts" / "en" / "evaluation.parquet")
    zh = pd.read_parquet(results / "facts" / "zh" / "evaluation.parquet")
    assert en["uuid"].tolist() == zh["uuid"].tolist()
    assert en["wrong_obj_uri"].tolist() == zh["wrong_obj_uri"].tolist()
    # nothing else was run
    assert not (tmp_path / "results" / "attribution").exists()


def test_a_malformed_line_fails_with_its_place_and_leaves_no_output(tmp_path):
    import shutil

    source = tmp_path / "mlama1.1"
    shutil.copytree(REPO / "resources" / "mlama-mini" / "mlama1.1", source)
    facts = source / "en" / "P36.jsonl"
    lines = facts.read_text().splitlines()
    lines[6] = re.sub(r'"lineid": (\d+)', r'"lineid": "\1"', lines[6])  # line 7: a string lineid
    facts.write_text("\n".join(lines) + "\n")
    config = tiny_config()
    config["mlama"]["source"] = str(source)
    result = run_workflow(tmp_path / "run", config, "--until", "split_facts", check=False)
    assert result.returncode != 0
    log = (tmp_path / "run" / "logs" / "data" / "prepare_mlama" / "en.log").read_text()
    assert "P36.jsonl" in log and "line 7" in log and "lineid" in log
    assert not (tmp_path / "run" / "results" / "data" / "mlama" / "en.parquet").exists()
    leftovers = list((tmp_path / "run" / "results").rglob("*.tmp"))
    assert leftovers == []


TINY_TOY = {"layers": 1, "hidden": 32, "ffn": 64, "heads": 2, "epochs": 8}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The whole default DAG on two relations with tiny models, once for the module."""
    workdir = tmp_path_factory.mktemp("full")
    config = tiny_config()
    config["mlama"]["relations"] = ["P36", "P37"]
    config["toy"] = dict(TINY_TOY)
    config["attribution"].update(steps=3, shards=2)
    # any pair whose joint suppression lowers P(true) is degenerate: every relation has DKN,
    # so the fact-checked candidates are attributed on their DKN's layers (none otherwise)
    config["neurons"]["dkn_pair_drop"] = 0.0
    run_workflow(workdir, config)
    return workdir, config


def test_the_whole_dag_produces_table_3(finished_run):
    workdir, config = finished_run
    reports = workdir / "results" / "reports"
    table = pd.read_csv(reports / "fact_check.csv")
    assert list(table.columns[:12]) == ["language", "model", "population", "method", "setting",
                                        "precision", "recall", "f1", "auroc", "n_true",
                                        "n_wrong", "threshold"]
    # languages x models x populations x (wo_DKN, all_correct, prob + with_DKN and its two
    # control neuron sets at each of the 2 λ settings)
    assert len(table) == 2 * 2 * 2 * (3 + 3 * 2)
    assert set(table["method"]) == {"wo_DKN", "all_correct", "prob", "with_DKN",
                                    "random_matched", "frequent_kn"}
    assert set(table["population"]) == {"all_relations", "dkn_relations"}
    assert set(table.loc[table["method"] == "with_DKN", "setting"]) == {"auto", "1e-06"}
    every = table[table["population"] == "all_relations"]
    assert (every["n_true"] == 20).all() and (every["n_wrong"] == 20).all()  # 2 relations x 10
    assert (table["n_true"] <= 20).all()
    assert "| Dataset | Model | Relations | Method |" in (reports / "fact_check.md").read_text()
    for name in ("dkn_layers", "f1_vs_lambda", "roc", "per_relation_f1"):
        assert (reports / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert (reports / "figures" / f"{name}.svg").stat().st_size > 0
    attribution = workdir / "results" / "attribution" / "toy-bert" / "en"
    records = pd.read_parquet(attribution / "evaluation" / "shard-0.parquet")
    assert set(records["candidate"]) == {"true", "wrong"} and records["checked"].all()
    # attributed on the layers of the relation's DKN and control sets, read from aggregate_dkn
    dkn = json.loads((workdir / "results" / "neurons" / "toy-bert" / "en" /
                      "dkn_by_relation.json").read_text())["relations"]
    assert any(entry["layers"] for entry in dkn.values())
    for row in records.itertuples():
        layers = dkn[row.relation]["layers"]
        assert list(row.layers) == layers
        assert (row.scores is not None) == bool(layers)
        assert (row.steps >= 3) if layers else (row.steps == 0)
    calibration = pd.read_parquet(attribution / "calibration" / "shard-0.parquet")
    assert (calibration["candidate"] == "wrong").all() and calibration["checked"].all()
    discovery = pd.read_parquet(attribution / "discovery" / "shard-0.parquet")
    assert (discovery["candidate"] == "true").all()
    assert set(calibration["uuid"]) == set(discovery.loc[discovery["checked"], "uuid"])
    with np.load(workdir / "results" / "neurons" / "toy-bert" / "en" / "dkn" /
                 "shard-0.activation.npz") as activation:
        detected = pd.read_parquet(workdir / "results" / "neurons" / "toy-bert" / "en" / "dkn" /
                                   "shard-0.parquet")
        assert activation["counts"].sum() == len(detected)
    completeness = pd.read_csv(reports / "completeness.csv")
    assert len(completeness) == 4 * 3  # model-language pairs x parts
    assert {"n_refined", "n_not_converged"} <= set(completeness.columns)
    metrics = json.loads((workdir / "results" / "models" / "toy-gpt" / "train_metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"en", "zh"}
    log = (workdir / "logs" / "attribution" / "toy-bert" / "en" / "evaluation" / "shard-0.log").read_text()
    assert "attribution" in log  # the progress bar went to the rule's log
    assert not list((workdir / "results").rglob("*.checkpoint"))


def test_the_whole_dag_finds_likn_and_edits_across_languages(finished_run):
    workdir, config = finished_run
    neurons = workdir / "results" / "neurons"
    for model in ("toy-bert", "toy-gpt"):
        table = pd.read_parquet(neurons / model / "likn.parquet")
        assert set(table["languages"]) == {"en+zh"}
        facts = table  # the real pairing only: chance is the permutation null (likn_null)
        assert len(facts) == 80 and facts["uuid"].is_unique  # 2 relations x 40 discovery facts
        assert (table["n_likn"] <= table["n_kn"].map(min)).all()
        null = pd.read_parquet(neurons / model / "likn_null.parquet")
        assert len(null) > 0
        edits = pd.read_parquet(neurons / model / "likn_edit.parquet")
        assert 0 < edits["edited_uuid"].nunique() <= config["likn"]["edit_sample"]
        assert set(edits["operation"]) == {"erase", "edit"}
        sets = {"likn", "only_en", "only_zh", "random"}
        # likn_other: only where another fact has a large enough LIKN
        assert sets <= set(edits["neuron_set"]) <= sets | {"likn_other"}
        # the unpatched P(true) is the attribution shard's own prob of the same query
        for lang in ("en", "zh"):
            shards = sorted((workdir / "results" / "attribution" / model / lang / "discovery")
                            .glob("shard-*.parquet"))
            records = pd.concat([pd.read_parquet(p) for p in shards])
            prob = records[records["candidate"] == "true"].set_index("uuid")["prob"]
            mine = edits[(edits["eval_lang"] == lang)].drop_duplicates("uuid")
            assert (mine["p_true_before"] - prob.loc[mine["uuid"]].to_numpy()).abs().max() < 1e-4
    reports = workdir / "results" / "reports"
    stats = pd.read_csv(reports / "likn.csv")
    overall = stats[stats["relation"] == "all"]
    assert len(overall) == 2 * 4  # models x 4 statistics, each with its nulls
    share = overall.loc[overall["statistic"] == "share_with_likn", "estimate"]
    assert len(share) == 2 and share.between(0, 1).all()
    summary = pd.read_csv(reports / "likn_edit.csv")
    assert set(summary["model"]) == {"toy-bert", "toy-gpt"}
    assert set(summary["target"]) == {"fact", "unrelated"}
    text = (reports / "likn.md").read_text()
    assert "## LIKN of the discovery facts" in text and "## Editing" in text
    for name in ("likn_layers", "likn_erase", "likn_edit", "likn_null"):
        assert (reports / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert (reports / "figures" / f"{name}.svg").stat().st_size > 0


def planned(workdir: Path, config: dict, *args: str) -> dict[str, int]:
    """{rule: jobs} that a dry run after ``config`` changes would run."""
    from test_workflow_static import job_counts

    result = run_workflow(workdir, config, "-n", *args)
    if "Nothing to be done" in result.stdout + result.stderr:
        return {}
    return job_counts(result.stdout)


# A dry run cannot know the layer sets that aggregate_dkn (a checkpoint) will write: after a
# DKN change it plans every attribute_checked job of the model-language pairs whose DKN are
# aggregated again ("DAG of jobs will be updated after completion"), and the convergence report
# that reads their shards. What then really runs is tested below
# (test_a_dkn_change_reruns_the_checked_attribution_only_where_its_layers_change).
PENDING_CHECKED = {"attribute_checked": 16, "report_completeness": 1}


@pytest.mark.parametrize(("change", "expected"), [
    (lambda c: c, {}),
    (lambda c: c["factcheck"].update(thresholds=["auto", 0.001]),
     {"fact_check": 4, "report_fact_check": 1, "summarize_run": 1, "all": 1}),
    (lambda c: c["neurons"].update(kn_threshold={"en": 0.2, "zh": 0.3}),
     {"localize_neurons": 2, "report_localization": 1, "detect_dkn": 4, "aggregate_dkn": 2, "fact_check": 2, "report_fact_check": 1,
      "find_likn": 2, "edit_likn": 2, "report_likn": 1, "summarize_run": 1, "all": 1,
      "attribute_checked": 8, "report_completeness": 1}),
    (lambda c: c["neurons"].update(dkn_count="pair"),
     {"aggregate_dkn": 4, "fact_check": 4, "report_fact_check": 1, "summarize_run": 1, "all": 1,
      **PENDING_CHECKED}),
    (lambda c: c["neurons"].update(dkn_pair_drop=0.3),
     {"detect_dkn": 8, "aggregate_dkn": 4, "fact_check": 4, "report_fact_check": 1, "summarize_run": 1, "all": 1,
      **PENDING_CHECKED}),
    (lambda c: c["neurons"].update(relation_threshold=0.5),
     {"aggregate_dkn": 4, "fact_check": 4, "report_fact_check": 1, "summarize_run": 1, "all": 1,
      **PENDING_CHECKED}),
    (lambda c: c["split"].update(discovery_fraction=0.7),
     {"localize_neurons": 4, "report_localization": 1, "split_facts": 1, "attribute_shard": 8, "report_completeness": 1, "detect_dkn": 8, "aggregate_dkn": 4,
      "fact_check": 4, "report_fact_check": 1, "find_likn": 2, "edit_likn": 2,
      "report_likn": 1, "summarize_run": 1, "all": 1, "attribute_checked": 16}),
    (lambda c: c.update(seed=7),
     {"localize_neurons": 4, "report_localization": 1, "corrupt_facts": 1, "split_facts": 1, "train_toy_model": 2, "attribute_shard": 8, "report_completeness": 1,
      "detect_dkn": 8, "aggregate_dkn": 4, "fact_check": 4, "report_fact_check": 1,
      "find_likn": 2, "edit_likn": 2, "report_likn": 1, "summarize_run": 1, "all": 1,
      "attribute_checked": 16}),
    (lambda c: c["likn"].update(edit_sample=3), {"edit_likn": 2, "report_likn": 1, "summarize_run": 1, "all": 1}),
    (lambda c: c["likn"].update(lambda2=4.0), {"edit_likn": 2, "report_likn": 1, "summarize_run": 1, "all": 1}),
    (lambda c: c["neurons"].update(max_kn=10),
     {"localize_neurons": 4, "report_localization": 1, "detect_dkn": 8, "aggregate_dkn": 4, "fact_check": 4, "report_fact_check": 1,
      "find_likn": 2, "edit_likn": 2, "report_likn": 1, "summarize_run": 1, "all": 1,
      **PENDING_CHECKED}),
    (lambda c: c["models"].update({"toy-gpt-en": {"toy": True, "arch": "causal", "languages": ["en"]}}),
     {"localize_neurons": 1, "report_localization": 1, "train_toy_model": 1, "attribute_shard": 2, "report_completeness": 1, "detect_dkn": 2, "aggregate_dkn": 1,
      "fact_check": 1, "report_fact_check": 1, "summarize_run": 1, "all": 1, "attribute_checked": 4}),
    # every layer for the fact-checked candidates: their jobs only, not the discovery part
    (lambda c: c["attribution"].update(full_matrices=True),
     {"attribute_checked": 16, "fact_check": 4, "report_completeness": 1, "report_fact_check": 1,
      "summarize_run": 1, "all": 1}),
])
def test_config_changes_rerun_only_what_they_change(finished_run, change, expected):
    workdir, config = finished_run
    changed = json.loads(json.dumps(config))
    change(changed)
    counts = planned(workdir, changed)
    assert counts == expected
    run_workflow(workdir, config, "-n")  # leave the config as it was


def executed(result) -> dict[str, int]:
    """{rule: jobs} that a (real) run started, from its console output."""
    counts: dict[str, int] = {}
    for rule in re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):$", result.stdout + result.stderr,
                           flags=re.M):
        counts[rule] = counts.get(rule, 0) + 1
    return counts


def layer_sets(workdir: Path) -> dict:
    return {str(path.relative_to(workdir)): {r: e["layers"] for r, e in
                                             json.loads(path.read_text())["relations"].items()}
            for path in sorted((workdir / "results" / "neurons").glob("*/*/dkn_by_relation.json"))}


@pytest.mark.parametrize(("change", "alters", "expected"), [
    # no degenerate pair at all: every relation loses its DKN, controls and layers
    (lambda c: c["neurons"].update(dkn_pair_drop=1.0), True,
     {"attribute_checked": 16, "fact_check": 4, "report_completeness": 1,
      "report_fact_check": 1, "summarize_run": 1, "all": 1}),
    # fewer DKN, the same layers
    (lambda c: c["neurons"].update(relation_threshold=0.9), False,
     {"fact_check": 4, "report_fact_check": 1, "summarize_run": 1, "all": 1}),
])
def test_a_dkn_change_reruns_the_checked_attribution_only_where_its_layers_change(
        finished_run, change, alters, expected):
    """Once aggregate_dkn (a checkpoint) has run, the layer sets are known: a DKN change that
    alters a model-language's layer sets reruns its attribute_checked jobs (and fact checking
    and the reports), one that keeps them reruns none of them; a dry run after the DKN stage
    says exactly that, and a real run does it."""
    workdir, config = finished_run
    before = layer_sets(workdir)
    changed = json.loads(json.dumps(config))
    change(changed)
    run_workflow(workdir, changed, "--until", "aggregate_dkn")
    after = layer_sets(workdir)
    assert (after != before) == alters
    if alters:
        assert all(not layers for sets in after.values() for layers in sets.values())
    assert planned(workdir, changed) == expected
    # back to the run's config, for real: the DKN are those of before, so are the layer sets,
    # and no attribute_checked job runs (the dry run before it planned them all); nor does
    # fact checking, whose DKN file has the content it last read (Snakemake compares checksums)
    restored = run_workflow(workdir, config)
    ran = executed(restored)
    assert ran["aggregate_dkn"] == 4
    assert not {"attribute_checked", "attribute_shard", "fact_check"} & set(ran), ran
    assert layer_sets(workdir) == before
    assert planned(workdir, config) == {}


def test_execution_knobs_rerun_nothing(finished_run):
    workdir, config = finished_run
    assert planned(workdir, config, "--set-resources", "attribute_shard:batch_queries=2",
                   "--set-threads", "attribute_shard=2") == {}


def test_rule_scripts_import_the_checkouts_library(tmp_path, monkeypatch):
    """A kneurons earlier on the path (PYTHONPATH here; an editable install or a release in
    site-packages alike) is not what the rule scripts run."""
    fake = tmp_path / "elsewhere" / "kneurons"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('an installed kneurons was imported')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    config = tiny_config()
    config["mlama"]["languages"] = ["en"]
    config["models"] = {"m": {"toy": True, "arch": "masked", "languages": ["en"]}}
    run_workflow(tmp_path / "run", config, "results/data/mlama/en.parquet")
    log = (tmp_path / "run" / "logs" / "data" / "prepare_mlama" / "en.log").read_text()
    assert "kept" in log and "installed kneurons" not in log


def test_a_data_stage_error_comes_before_any_training(tmp_path):
    import shutil

    source = tmp_path / "mlama1.1"
    shutil.copytree(REPO / "resources" / "mlama-mini" / "mlama1.1", source)
    facts = source / "zh" / "P36.jsonl"
    lines = facts.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    first["obj_uri"] = "Q999999999"  # zh and en disagree on the object: corrupt_facts fails
    lines[0] = json.dumps(first, ensure_ascii=False)
    facts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = tiny_config()
    config["mlama"]["source"] = str(source)
    config["toy"] = dict(TINY_TOY)
    result = run_workflow(tmp_path / "run", config, check=False)
    assert result.returncode != 0
    assert "Error in rule corrupt_facts" in result.stdout + result.stderr
    assert not (tmp_path / "run" / "logs" / "models").exists()  # no training started


def test_dropped_relations_are_warnings_on_the_console_or_errors_with_strict(tmp_path):
    import shutil

    source = tmp_path / "mlama1.1"
    shutil.copytree(REPO / "resources" / "mlama-mini" / "mlama1.1", source)
    first = (source / "en" / "P36.jsonl").read_text().splitlines()[0]
    (source / "en" / "P999.jsonl").write_text(first.replace('"uuid": "', '"uuid": "x') + "\n")
    (source / "zh" / "P36.jsonl").unlink()  # zh ends without P36
    config = tiny_config()
    config["mlama"]["source"] = str(source)
    result = run_workflow(tmp_path / "run", config, "--until", "corrupt_facts")
    drop = "en/P999.jsonl: relation P999 dropped (no_template, 1 facts)"
    differ = "relation P36 is in en but not in zh"
    assert drop in result.stderr and differ in result.stderr  # Snakemake's console
    logs = tmp_path / "run" / "logs" / "data"
    assert drop in (logs / "prepare_mlama" / "en.log").read_text()
    assert differ in (logs / "corrupt_facts.log").read_text()
    config["mlama"]["strict"] = True
    result = run_workflow(tmp_path / "strict", config, "--until", "prepare_mlama", check=False)
    assert result.returncode != 0
    assert "mlama.strict" in result.stderr and drop in result.stderr
    assert not (tmp_path / "strict" / "results" / "data" / "mlama" / "en.parquet").exists()


def test_after_snakemake_is_killed_unlock_and_rerun_recover(tmp_path):
    """SIGKILL of snakemake itself while a job runs: the job finishes on its own (its output is
    renamed into place) but Snakemake's bookkeeping never hears of it. ``--unlock`` and a
    plain rerun (the profile's rerun-incomplete) recover, as docs/operations.md says."""
    import os
    import signal
    import time

    config = tiny_config()
    config["mlama"]["relations"] = ["P36", "P37"]
    config["models"] = {"m": {"toy": True, "arch": "masked", "languages": ["en"]}}
    config["toy"] = {**TINY_TOY, "epochs": 20}
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    args = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "config.yaml"), "--cores", "2"]
    target = "results/models/m/train_metrics.json"
    job = subprocess.Popen([*args, target], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    training = workdir / "logs" / "models" / "train_toy_model" / "m.log"
    deadline = time.monotonic() + 300
    while not training.exists() and time.monotonic() < deadline:
        assert job.poll() is None, "snakemake ended before it could be killed"
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGKILL)  # snakemake only: the training job runs on, orphaned
    job.wait()
    while not (workdir / target).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (workdir / target).exists(), "the orphaned training job did not finish"
    time.sleep(1)  # the orphan exits after its last write
    locked = run_workflow(workdir, config, target, check=False)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    run_workflow(workdir, config, "--unlock", target)
    rerun = run_workflow(workdir, config, target)  # no --rerun-incomplete needed
    assert "train_toy_model" in rerun.stdout + rerun.stderr  # the incomplete job ran again
    assert json.loads((workdir / target).read_text())["accuracy"]
