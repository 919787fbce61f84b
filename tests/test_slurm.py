"""The default workflow through the SLURM profile on a real single-node SLURM cluster.

The cluster (Debian's slurm-wlm and munge, daemons started directly, 4 GPUs declared through
fake device files) is installed and started by tests/slurm/single-node-cluster.sh; it needs
root and apt. Its daemons are stopped by PID at the end, also when the test fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLUSTER = REPO / "tests" / "slurm" / "single-node-cluster.sh"

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture()
def slurm_cluster(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("starting a SLURM cluster needs root")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("slurm-wlm is not installed and apt-get is not available to install it")
    env = {**os.environ, "BASE": str(tmp_path / "slurm")}
    started = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True,
                             text=True, timeout=600)
    try:
        if started.returncode != 0:
            pytest.skip(f"could not start a SLURM cluster: {started.stdout[-800:]}{started.stderr[-800:]}")
        yield tmp_path / "slurm"
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop"], env=env, timeout=120)


def test_default_workflow_runs_through_sbatch(slurm_cluster, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["mlama"]["source"] = str(REPO / config["mlama"]["source"])
    config["mlama"]["relations"] = ["P36", "P37"]
    config["toy"] = {"layers": 1, "hidden": 32, "ffn": 64, "heads": 2, "epochs": 8}
    config["attribution"].update(steps=3, shards=1)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    # snakemake ignored SIGTERM when the plugin waited on a broken cluster: KILL on timeout
    run = subprocess.Popen(
        ["timeout", "-s", "KILL", "1500", str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"),
         "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"),
         "--workflow-profile", str(REPO / "profiles" / "slurm"),
         "--set-resources", "attribute_shard:mem_mb=1500", "attribute_checked:mem_mb=1500",
         "detect_dkn:mem_mb=1500", "edit_likn:mem_mb=1500"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # how many GPU jobs SLURM holds at once (pending or running): with a global gpu=1 cap
    # (profiles/default next to a --profile) Snakemake submitted them one at a time
    most = 0
    while run.poll() is None:
        queue = subprocess.run(["squeue", "-h", "-o", "%k"], capture_output=True, text=True)
        most = max(most, sum(line.startswith("rule_attribute_shard")
                             for line in queue.stdout.splitlines()))
        time.sleep(0.5)
    stdout, stderr = run.communicate()
    assert run.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert most >= 2, f"at most {most} attribution job(s) in SLURM's queue at once"
    assert (workdir / "results" / "reports" / "fact_check.md").exists()
    jobs = (slurm_cluster / "log" / "jobcomp.txt").read_text().splitlines()
    # train_toy_model 2 + attribute_shard 4 + attribute_checked 8 + detect_dkn 4 + edit_likn 2
    # + localize_neurons 4 went through sbatch; light rules ran locally
    assert len(jobs) == 24 and all("JobState=COMPLETED" in job for job in jobs)
    logs = list((workdir / "logs" / "attribution").rglob("*.log"))
    assert logs and all("assigned by SLURM, CUDA_VISIBLE_DEVICES=" in log.read_text() for log in logs)
