"""The whole DAG on one GPU against the same DAG on the CPU (issue #24, part 2).

The default config cut small (three relations, a few facts each, tiny toy models, few
integration steps, one shard, toy-gpt in English only) runs twice from the same data and toy models: first with no GPU
visible (every job on the CPU; ``reference``), then with ``--resources gpu=1`` (the GPU jobs
lease the device; ``device``). The check passes when every GPU job's log says it ran on CUDA
and Table 3 (``results/reports/fact_check.csv``) is equal up to float rounding; the DKN sets,
the LIKN tables, the localization table and the convergence table are compared too.
``device`` writes ``OUT/dag.json`` (the verdicts, the differences, both runs' times) and
``OUT/dag-logs.tar.gz`` (both runs' Snakemake output, job logs and reports).

    python benchmarks/gpu_dag.py reference WORK [--cores N]
    python benchmarks/gpu_dag.py device WORK OUT
    python benchmarks/gpu_dag.py all WORK OUT         (both, one after the other)

The reference needs no GPU, so benchmarks/gpu_check.sh runs it beside the GPU tests. Needs
snakemake in the Python that runs it (``make setup``). On a machine without CUDA the device
run also runs on the CPU, and the check fails on its device lines (tests/test_benchmarks.py
checks the script so).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
# the GPU jobs: rules with `resources: gpu=1` and the log folders of their jobs
GPU_LOGS = {"attribute_shard": "logs/attribution", "detect_dkn": "logs/neurons/*/*/dkn",
            "edit_likn": "logs/neurons/*/edit_likn.log", "localize_neurons": "logs/localization"}
# outputs recomputed in the second run (everything downstream of the toy models)
DOWNSTREAM = ("results/attribution", "results/neurons", "results/factcheck",
              "results/localization", "results/reports")
TABLE3_RTOL, TABLE3_ATOL = 1e-4, 1e-7


def small_config(relations=("P17", "P36", "P37"), facts: int = 12) -> dict:
    """config.yaml cut small: the same stages and models, minutes on a CPU."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["name"] = "gpu-check"
    config["mlama"].update(source=str(ROOT / config["mlama"]["source"]),
                           relations=list(relations), max_facts_per_relation=facts)
    # toy-gpt in English only: fewer GPU jobs (each costs ~15 s of process start, imports and
    # CUDA set-up on the H200 machine, run one at a time), LIKN on toy-bert
    config["models"]["toy-gpt"]["languages"] = ["en"]
    config["toy"] = {**config["toy"], "layers": 2, "hidden": 32, "ffn": 64, "heads": 2,
                     "epochs": 12}
    config["attribution"].update(steps=6, shards=1)
    config["likn"].update(edit_sample=4, locality_facts=2)
    config["localization"].update(sample=4, related_facts=2, unrelated_facts=2)
    return config


def snakemake(workdir: Path, cores: int, gpus: int, env: dict, log: Path) -> dict:
    tic = time.monotonic()
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"),
           "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"),
           "--cores", str(cores), "--resources", f"gpu={gpus}", "--scheduler", "greedy"]
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    return {"returncode": proc.returncode, "seconds": round(time.monotonic() - tic, 1),
            "command": " ".join(cmd[1:])}


def gpu_job_devices(workdir: Path) -> dict[str, list[str]]:
    """For each GPU job's log: the device line it logged (kneurons.devices.pick_device)."""
    out: dict[str, list[str]] = {}
    for rule, pattern in GPU_LOGS.items():
        paths = ([p for p in workdir.glob(pattern)] if pattern.endswith(".log")
                 else [p for d in workdir.glob(pattern) for p in d.rglob("*.log")])
        for path in sorted(paths):
            lines = [ln for ln in path.read_text(errors="replace").splitlines()
                     if "device: " in ln]
            out.setdefault(rule, []).append(
                f"{path.relative_to(workdir)}: {lines[0].split('device: ', 1)[1] if lines else 'NO DEVICE LINE'}")
    return out


def compare_tables(a: Path, b: Path, keys: list[str] | None = None) -> dict:
    """Numeric columns: the largest absolute and relative difference; the rest must match."""
    if not (a.exists() and b.exists()):
        return {"compared": False, "missing": [str(p) for p in (a, b) if not p.exists()]}
    x, y = pd.read_csv(a), pd.read_csv(b)
    if list(x.columns) != list(y.columns) or len(x) != len(y):
        return {"compared": True, "equal": False, "why": "shape or columns differ",
                "shape": [list(x.shape), list(y.shape)]}
    if keys:
        x, y = x.sort_values(keys).reset_index(drop=True), y.sort_values(keys).reset_index(drop=True)
    numeric = [c for c in x.columns if pd.api.types.is_numeric_dtype(x[c])
               and pd.api.types.is_numeric_dtype(y[c]) and not pd.api.types.is_bool_dtype(x[c])]
    other = [c for c in x.columns if c not in numeric]
    same_other = all(x[c].astype(str).equals(y[c].astype(str)) for c in other)
    diffs, close = {}, True
    for c in numeric:
        u, v = x[c].to_numpy(float), y[c].to_numpy(float)
        both_nan = np.isnan(u) & np.isnan(v)
        d = np.where(both_nan, 0.0, np.abs(u - v))
        d = np.where(np.isnan(d), np.inf, d)
        diffs[c] = float(d.max()) if len(d) else 0.0
        close &= bool(np.all(both_nan | np.isclose(u, v, rtol=TABLE3_RTOL, atol=TABLE3_ATOL)))
    return {"compared": True, "equal": bool(same_other and close), "non_numeric_equal": same_other,
            "rows": len(x), "max_abs_diff": diffs,
            "differing_non_numeric": [c for c in other
                                      if not x[c].astype(str).equals(y[c].astype(str))]}


def compare_dkn(cpu: Path, gpu: Path) -> dict:
    out = {}
    for path in sorted(cpu.glob("results/neurons/*/*/dkn_by_relation.json")):
        rel = path.relative_to(cpu)
        other = gpu / rel
        out[str(rel)] = other.exists() and json.loads(path.read_text()) == json.loads(other.read_text())
    return out


def reference(work: Path, cores: int, facts: int) -> dict:
    """The small DAG with no GPU visible, GPU-class jobs in parallel on the cores."""
    shutil.rmtree(work, ignore_errors=True)
    cpu = work / "cpu"
    cpu.mkdir(parents=True)
    (cpu / "config.yaml").write_text(yaml.safe_dump(small_config(facts=facts), allow_unicode=True))
    run = snakemake(cpu, cores, cores, {**_env(work), "CUDA_VISIBLE_DEVICES": ""},
                    work / "snakemake-cpu.log")
    (work / "reference.json").write_text(json.dumps(run) + "\n")
    return run


def _env(work: Path) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("SLURM_JOB_ID", None)
    env["KNEURONS_GPU_LOCK_DIR"] = str(work / "locks")
    return env


def device(work: Path, out: Path, cores: int) -> dict:
    """The same data and toy models as the reference; every GPU job on the device, one at a
    time; then the comparison."""
    cpu, gpu = work / "cpu", work / "gpu"
    shutil.rmtree(gpu, ignore_errors=True)
    gpu.mkdir()
    shutil.copy2(cpu / "config.yaml", gpu / "config.yaml")
    for keep in ("results/data", "results/models", ".snakemake/metadata", "logs/data",
                 "logs/models"):
        if (cpu / keep).exists():
            shutil.copytree(cpu / keep, gpu / keep, copy_function=shutil.copy2)
    report: dict = {"config": yaml.safe_load((cpu / "config.yaml").read_text()),
                    "runs": {"cpu": json.loads((work / "reference.json").read_text())}}
    report["runs"]["gpu"] = snakemake(gpu, cores, 1, _env(work), work / "snakemake-gpu.log")
    devices = gpu_job_devices(gpu)
    on_device = [line for lines in devices.values() for line in lines]
    report["gpu_jobs"] = devices
    report["gpu_jobs_on_cuda"] = bool(on_device) and all(": cuda" in ln for ln in on_device)
    report["cpu_jobs"] = gpu_job_devices(cpu)
    reports_cpu, reports_gpu = cpu / "results" / "reports", gpu / "results" / "reports"
    report["table3"] = compare_tables(reports_cpu / "fact_check.csv",
                                      reports_gpu / "fact_check.csv",
                                      ["language", "model", "population", "method", "setting"])
    report["dkn_sets_equal"] = compare_dkn(cpu, gpu)
    for name in ("likn.csv", "likn_edit.csv", "localization.csv", "completeness.csv"):
        report[name] = compare_tables(reports_cpu / name, reports_gpu / name)
    report["passed"] = bool(report["runs"]["cpu"]["returncode"] == 0
                            and report["runs"]["gpu"]["returncode"] == 0
                            and report["gpu_jobs_on_cuda"] and report["table3"].get("equal"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "dag.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    with tarfile.open(out / "dag-logs.tar.gz", "w:gz") as tar:
        for name in ("snakemake-cpu.log", "snakemake-gpu.log"):
            if (work / name).exists():
                tar.add(work / name, arcname=name)
        for run in (cpu, gpu):
            for sub in ("logs", "results/reports"):
                if (run / sub).exists():
                    tar.add(run / sub, arcname=f"{run.name}/{sub}")
    print(json.dumps({k: report[k] for k in ("passed", "gpu_jobs_on_cuda", "table3", "runs")},
                     indent=1, default=str))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=["reference", "device", "all"])
    p.add_argument("work", type=Path, help="working folder of both runs")
    p.add_argument("out", type=Path, nargs="?", help="device, all: where dag.json goes")
    p.add_argument("--cores", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--facts", type=int, default=12, help="facts per relation")
    args = p.parse_args(argv)
    work = args.work.resolve()
    if args.step in ("device", "all") and args.out is None:
        p.error(f"{args.step} needs OUT")
    if args.step in ("reference", "all"):
        run = reference(work, args.cores, args.facts)
        if args.step == "reference":
            print(json.dumps(run))
            return run["returncode"]
    report = device(work, args.out.resolve(), args.cores)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
