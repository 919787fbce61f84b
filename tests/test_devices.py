"""GPU leases: one job per device at a time, freed when a job dies, none under SLURM."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kneurons import devices

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture()
def four_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("KNEURONS_GPU_COUNT", "4")
    monkeypatch.setenv("KNEURONS_GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    return tmp_path / "locks"


HOLDER = """
import sys, time
sys.path.insert(0, {scripts!r})
from kneurons.devices import lease_gpu
print(lease_gpu(["0", "1"]), flush=True)
time.sleep(60)
"""


def test_a_lease_is_exclusive_and_freed_when_the_holder_is_killed(four_gpus):
    env = {**os.environ}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(scripts=str(REPO / "scripts"))],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "0"
        assert devices.lease_gpu(["0", "1"], wait_s=0) == "1"  # 0 is held by the other process
        with pytest.raises(TimeoutError):
            devices.lease_gpu(["0"], wait_s=0.2, poll_s=0.05)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert devices.lease_gpu(["0"], wait_s=5, poll_s=0.05) == "0"  # the kernel freed it
    finally:
        holder.kill()
        for handle in devices._HELD:
            handle.close()
        devices._HELD.clear()


def test_no_lease_under_slurm_and_cpu_without_gpus(monkeypatch, tmp_path):
    monkeypatch.setenv("KNEURONS_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("KNEURONS_GPU_COUNT", "4")
    assert devices.pick_device() == "cpu"
    assert list(tmp_path.iterdir()) == []  # no lock taken
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("KNEURONS_GPU_COUNT", "0")
    assert devices.pick_device() == "cpu"
    assert devices.pick_device("cuda:1") == "cuda:1"
    monkeypatch.delenv("KNEURONS_GPU_COUNT")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert devices.visible_devices() == ["3", "5"]


@pytest.mark.slow
def test_eight_concurrent_gpu_jobs_never_share_a_device(four_gpus, tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [str(BIN / "snakemake"), "-s", str(REPO / "tests/data/gpu_lease/Snakefile"),
         "--directory", str(workdir), "--cores", "8", "--resources", "gpu=4",
         "--config", f"scripts={REPO / 'scripts'}", "n_jobs=10", "hold_s=2"],
        capture_output=True, text=True, timeout=600, env={**os.environ})
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = [json.loads(p.read_text()) for p in sorted((workdir / "leases").glob("*.json"))]
    assert len(jobs) == 10
    assert {job["gpu"] for job in jobs} <= {"0", "1", "2", "3"}
    for a, b in itertools.combinations(jobs, 2):
        if a["gpu"] == b["gpu"]:
            assert a["end"] <= b["start"] or b["end"] <= a["start"], (a, b)
    # the check is not vacuous: jobs did run at the same time, on different devices
    overlapping = [(a, b) for a, b in itertools.combinations(jobs, 2)
                   if a["start"] < b["end"] and b["start"] < a["end"]]
    assert overlapping and len({job["gpu"] for job in jobs}) >= 2
