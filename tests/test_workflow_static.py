"""The workflow as Snakemake sees it: lint, formatting, config validation, dry runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def snakemake(*args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "snakemake"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    block = output.split("Job stats:")[1].split("\n\n")[0]
    counts = {}
    for line in block.splitlines():
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if match and match.group(1) != "total":
            counts[match.group(1)] = int(match.group(2))
    return counts


def test_lint_is_clean():
    result = snakemake("--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations, your workflow is in a good condition" in result.stdout + result.stderr


def test_snakefmt_is_clean():
    files = ["Snakefile", *sorted(str(p.relative_to(REPO)) for p in (REPO / "workflow/rules").glob("*.smk"))]
    result = subprocess.run([str(BIN / "snakefmt"), "--check", *files], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_dry_run_plans_every_stage():
    result = snakemake("-n", "--forceall", "--cores", "1", "--configfile", "config.yaml")
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    pairs = sum(len(spec["languages"]) for spec in config["models"].values())
    assert counts["prepare_mlama"] == len(config["mlama"]["languages"])
    assert counts["train_toy_model"] == len(config["models"])
    # the discovery part before DKN detection; the evaluation and calibration parts after
    # aggregate_dkn (a checkpoint: their inputs are known once it ran)
    assert counts["attribute_shard"] == pairs * config["attribution"]["shards"]
    assert counts["attribute_checked"] == pairs * 2 * config["attribution"]["shards"]
    assert counts["aggregate_dkn"] == counts["fact_check"] == pairs
    assert "DAG of jobs will be updated after completion" in result.stdout + result.stderr
    multilingual = sum(len(spec["languages"]) >= 2 for spec in config["models"].values())
    assert counts["find_likn"] == counts["edit_likn"] == multilingual
    assert counts["report_likn"] == 1


def test_paper_config_plans_without_toy_models_or_our_data_folder():
    """A user's checkout: the official archive is the source (downloaded, verified file by
    file against resources/mlama1.1-en-zh.sha256), no folder outside the repository."""
    result = snakemake("-n", "--forceall", "--cores", "1", "--configfile", "configs/paper.yaml")
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    assert counts["download_mlama"] == 1
    assert "train_toy_model" not in counts  # the default's toy models are not merged in
    # m-bert and m-gpt on en and zh, bert and gpt2 on en: 6 pairs, 16 shards; the discovery
    # part before the DKN, evaluation and calibration after
    assert counts["attribute_shard"] == 6 * 16
    assert counts["attribute_checked"] == 6 * 2 * 16
    assert counts["find_likn"] == counts["edit_likn"] == 2  # m-bert and m-gpt only


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"attribution": {"stepz": 3}}, "stepz"),
        ({"attribution": {"steps": "many"}}, "many"),
        ({"neurons": {"max_kn": 500}}, "max_kn"),
        ({"models": {"x": {"toy": True, "arch": "masked", "languages": ["fr"]}}}, "models.x.languages"),
        # a URL needs the archive's sha256 where the shipped list does not cover a language
        ({"mlama": {"source": "https://example.org/mlama1.1.zip",
                    "languages": ["en", "zh", "fr"]}}, "sha256"),
        ({"likn": {"edit_samples": 3}}, "edit_samples"),
        ({"likn": {"edit_sample": 0}}, "edit_sample"),
        ({"factcheck": {"threshold": "auto"}}, "threshold"),  # now factcheck.thresholds
        ({"factcheck": {"thresholds": ["often"]}}, "often"),
        ({"neurons": {"kn_threshold": {"en": 0.3, "zh": 1.5}}}, "kn_threshold"),
        ({"neurons": {"kn_threshold": {"en": 0.3}}}, "no value for language 'zh'"),
        ({"neurons": {"dkn_count": "member"}}, "member"),
    ],
)
def test_bad_config_stops_before_any_job(tmp_path, patch, needle):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for key, value in patch.items():
        if key == "models":
            config["models"] = value
        else:
            config[key].update(value)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake("-n", "--cores", "1", "--configfile", str(path))
    assert result.returncode != 0
    assert needle in result.stdout + result.stderr
    assert "rule prepare_mlama" not in result.stdout


def rerun_blind_spots(rows: list) -> list[str]:
    """Params of a job that a change could slip past: Snakemake compares a job's params as a
    *set* of serialized values without their names (persistence.params_changed), so two plain
    params can swap, or one can take a value another param has, with no rerun. A param that is
    a dict serializes with its keys; dicts with different key sets can never be equal."""
    problems, keys = [], {}
    for rule, name, value in rows:
        if not isinstance(value, dict):
            problems.append(f"{rule}: param {name}={value!r} is not a dict")
            continue
        for other, other_keys in keys.get(rule, {}).items():
            if other != name and other_keys == set(value):
                problems.append(f"{rule}: params {name} and {other} have the same keys")
        keys.setdefault(rule, {})[name] = set(value)
    return problems


def test_rerun_blind_spots_are_found():
    old = [["localize_neurons", "unrelated_facts", 3], ["localize_neurons", "version", 1]]
    assert len(rerun_blind_spots(old)) == 2
    twins = [["r", "a", {"x": 1}], ["r", "b", {"x": 2}]]
    assert rerun_blind_spots(twins) == ["r: params b and a have the same keys"]


PENDING = "<TBD>"
"""A param read from a checkpoint's output that a dry run before the checkpoint ran cannot know
(attribute_checked's layer sets, from aggregate_dkn); its value is checked with
attribution.full_matrices (no checkpoint read) here, and after aggregate_dkn ran in
tests/test_workflow.py."""


@pytest.mark.parametrize(("configfile", "full_matrices"), [
    ("config.yaml", False), ("config.yaml", True), ("configs/real.yaml", False)])
def test_every_param_change_reruns(tmp_path, configfile, full_matrices):
    """Every planned job's params are dicts with distinct keys, so no change goes unseen."""
    if full_matrices:
        config = yaml.safe_load((REPO / configfile).read_text())
        config["attribution"]["full_matrices"] = True
        configfile = str(tmp_path / "config.yaml")
        Path(configfile).write_text(yaml.safe_dump(config))
    out = tmp_path / "params.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "tests/job_params.py"), str(out), "-n", "--forceall",
         "--cores", "1", "--quiet", "--configfile", configfile],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text(encoding="utf-8"))
    rules = {rule for rule, _, _ in rows}
    assert {"attribute_shard", "attribute_checked", "detect_dkn", "fact_check", "edit_likn",
            "localize_neurons"} <= rules
    pending = {(rule, name) for rule, name, value in rows if value == PENDING}
    assert pending == (set() if full_matrices else {("attribute_checked", "layers")})
    assert rerun_blind_spots([row for row in rows if row[2] != PENDING]) == []
    if full_matrices:
        layers = [value for rule, name, value in rows if (rule, name) == ("attribute_checked", "layers")]
        assert layers and all(value == {"relation_layers": None} for value in layers)
