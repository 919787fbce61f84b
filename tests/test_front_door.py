"""What a new user meets first: --config overrides, the generated docs, the README's commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kneurons.docs import (configuration_reference, invocation_seconds, job_seconds,
                           run_summary, schema_keys)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCHEMA = REPO / "workflow/schemas/config.schema.yaml"
SHARED = REPO.parent / "shared/data/mlama-en-zh/mlama1.1"


def snakemake(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "snakemake"), "-n", "--cores", "1", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def planned_rules(output: str) -> set[str]:
    block = output.split("Job stats:")[1].split("\n\n")[0]
    return {m.group(1) for m in re.finditer(r"^(\w+)\s+\d+$", block, re.M)} - {"total"}


def test_config_overrides_one_key_of_the_default():
    result = snakemake("--config", "seed=1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "train_toy_model" in planned_rules(result.stdout)  # the default's models are kept


def test_nested_config_override_keeps_the_rest_of_the_default():
    result = snakemake("--config", 'neurons={"max_kn": 10}')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "train_toy_model" in planned_rules(result.stdout)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/mlama-en-zh is absent")
def test_a_configfile_replaces_the_default_and_config_still_overrides():
    result = snakemake("--configfile", "configs/paper.yaml", "--config", "seed=1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "train_toy_model" not in planned_rules(result.stdout)  # no toy models leak in


def test_without_the_profile_the_workflow_asks_for_a_config():
    result = snakemake("--workflow-profile", "none")
    assert result.returncode != 0
    assert "no configuration" in result.stdout + result.stderr


def test_every_schema_key_is_described():
    schema = yaml.safe_load(SCHEMA.read_text())
    undocumented = [key for key, node in schema_keys(schema) if not node.get("description")]
    assert undocumented == []


def test_configuration_page_is_generated_from_the_schema():
    page = (REPO / "docs/configuration.md").read_text()
    assert page == configuration_reference(SCHEMA), "run `make docs` and commit docs/configuration.md"
    schema = yaml.safe_load(SCHEMA.read_text())
    for key, _ in schema_keys(schema):
        assert f"`{key}`" in page


def test_schema_keys_walk_nested_and_alias_maps(tmp_path):
    schema = {"properties": {
        "a": {"type": "object", "properties": {"b": {"type": "integer", "description": "B"}}},
        "m": {"type": "object", "additionalProperties": {
            "type": "object", "properties": {"arch": {"enum": ["x", "y"]}}}}}}
    assert [key for key, _ in schema_keys(schema)] == ["a", "a.b", "m", "m.<alias>.arch"]
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(schema))
    assert "| `a.b` | integer |  | B |" in configuration_reference(path)


def test_run_summary_names_the_machine_and_nests_report_pages(tmp_path):
    report = tmp_path / "table3.md"
    report.write_text("# Table 3\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n## Per relation\n\nx\n")
    untitled = tmp_path / "fact_check.md"
    untitled.write_text("| a |\n|---|\n| 1 |\n")
    info = {"date_utc": "2026-12-02 04:00", "cpu": "Some CPU", "cores": 2, "platform": "Linux",
            "python": "3.11.7", "packages": {"torch": "2.13.0", "numpy": None}}
    page = run_summary("Results of the test run", info, [report, untitled], [tmp_path / "roc.png"],
                       {"attribute_shard": 12.4})
    assert page.startswith("# Results of the test run\n")
    assert "Some CPU (2 cores)" in page and "torch 2.13.0" in page and "numpy" not in page
    assert "\n## Table 3\n" in page and "\n### Per relation\n" in page
    assert "\n## Fact checking (the paper's Table 3)\n\n| a |" in page
    assert "| attribute_shard | 12 |" in page
    assert "![roc](figures/roc.png)" in page


def test_invocation_seconds_reads_the_newest_snakemake_log(tmp_path):
    from datetime import datetime

    assert invocation_seconds(tmp_path) is None
    for name in ("2026-12-02T070000.000001.snakemake.log", "2026-12-02T080000.500000.snakemake.log",
                 "notes.snakemake.log"):
        (tmp_path / name).write_text("")
    now = datetime(2026, 12, 2, 8, 30, 0, 500000)
    assert invocation_seconds(tmp_path, now) == 1800.0
    info = {"date_utc": "2026-12-02 08:30", "cpu": "Some CPU", "cores": 2, "platform": "Linux",
            "python": "3.11.7", "packages": {}, "invocation_seconds": 1800.0}
    assert "invocation that finished this run, from its start to this summary: 30.0 min" in \
        run_summary("Results", info, [], [], {})


def test_job_seconds_sums_benchmark_files_per_rule(tmp_path):
    header = "s\th:m:s\tmax_rss\n"
    for name, seconds in [("a/x.tsv", 1.5), ("a/sub/y.tsv", 2.0), ("b/z.tsv", 4.0)]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + f"{seconds}\t0:00:01\t10\n")
    assert job_seconds(tmp_path) == {"a": 3.5, "b": 4.0}


def test_readme_commands_exist_in_the_makefile():
    readme = (REPO / "README.md").read_text()
    makefile = (REPO / "Makefile").read_text()
    for target in re.findall(r"^make ([\w-]+)", readme, re.M):
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"make {target}"
    assert len(readme.splitlines()) <= 150
    for link in re.findall(r"\]\(((?:docs/)[^)#]+)\)", readme):
        assert (REPO / link).exists(), link


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci/run").read_text()


def test_snakefile_declares_the_report():
    assert 'report: "workflow/report/workflow.rst"' in (REPO / "Snakefile").read_text()


def test_toy_stage_version_follows_the_library():
    from kneurons.toy import TOY_VERSION

    common = (REPO / "workflow/rules/common.smk").read_text()
    match = re.search(r'^\s+"toy": (\d+),', common, re.M)
    assert match and int(match.group(1)) == TOY_VERSION


def test_publish_renders_the_run_again_from_its_outputs(tmp_path):
    from kneurons.docs import publish_results
    from kneurons.io import write_json

    reports = tmp_path / "results" / "reports"
    (reports / "figures").mkdir(parents=True)
    (reports / "fact_check.md").write_text("| a |\n|---|\n| 1 |\n")
    (reports / "likn.md").write_text("# LIKN\n\nx\n")
    (reports / "figures" / "roc.png").write_bytes(b"\x89PNG")
    write_json({"name": "demo", "date_utc": "2026-12-02 05:00", "commit": "abc1234",
                "cpu": "Some CPU", "cores": 2, "platform": "Linux", "python": "3.11.7",
                "packages": {"torch": "2.13.0"}, "job_seconds": {"attribution": 3.0}},
               reports / "run.json")
    docs = tmp_path / "docs"
    (docs / "demo" / "figures").mkdir(parents=True)
    (docs / "demo" / "figures" / "stale.png").write_bytes(b"old")
    page = publish_results(tmp_path / "results", docs).read_text()
    assert page.startswith("# Results of the demo run\n")
    assert "commit abc1234" in page and "2026-12-02 05:00" in page  # the run's, not today's
    assert page.index("## Fact checking") < page.index("## LIKN")
    assert sorted(p.name for p in (docs / "demo" / "figures").iterdir()) == ["roc.png"]
    with pytest.raises(FileNotFoundError, match="run.json"):
        publish_results(tmp_path / "nothing", docs)


def test_the_machine_record_names_vector_extensions_and_threads():
    from kneurons.docs import machine_info, run_summary

    info = machine_info()
    assert isinstance(info["cpu_vector_extensions"], list) and info["torch_threads"] >= 1
    assert info["torch_cpu_capability"]  # e.g. AVX2, AVX512
    page = run_summary("Results", {**info, "cpu_vector_extensions": ["avx2", "fma"],
                                   "torch_cpu_capability": "AVX2", "torch_threads": 2},
                       [], [], {})
    assert "vector extensions avx2, fma; torch kernels AVX2, 2 torch threads" in page
