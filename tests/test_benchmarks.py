"""The attribution benchmark script runs in every mode (on tiny models; timings are not
asserted) and its number-for-number comparison with the knowledge-neurons library holds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_attribution",
                                                  ROOT / "benchmarks" / "attribution.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    yield mod
    torch.set_num_threads(threads)


def run(bench, tmp_path: Path, *args: str) -> dict:
    out = bench.main([*args, "--size", "tiny", "--out", str(tmp_path / "out.json")])
    return json.loads(out.read_text())


def test_reference_mode_agrees_with_the_library(bench, tmp_path):
    pytest.importorskip("knowledge_neurons", reason="run `make bench-deps`")
    res = run(bench, tmp_path, "reference", "--queries", "2")
    assert res["mode"] == "reference" and res["machine"]["torch_threads"] == 1
    for kind in ("bert", "gpt2"):
        r = res["results"][kind]
        assert r["n_queries"] == 2 and r["ours_s_per_query"] > 0 and r["speedup"] > 0
        # the same numbers: same model, queries, neuron site, baseline and nodes
        assert r["min_pearson_r"] >= 0.99999
        assert r["max_abs_diff_rel"] <= 1e-4
    assert res["results"]["gpt2"]["site"] == "pre"


def test_amig_mode(bench, tmp_path):
    res = run(bench, tmp_path, "amig", "--queries", "2", "--models", "bert", "--gl-steps", "3")
    r = res["results"]["bert"]
    assert r["amig_riemann_20_s_per_query"] > 0 and r["amig_gauss-legendre_3_s_per_query"] > 0
    assert min(r["baselines_per_query"]) >= 1
    assert len(r["times"]["ig_riemann_20"]) == 2


def test_quadrature_mode(bench, tmp_path):
    res = run(bench, tmp_path, "quadrature", "--queries", "3")
    for r in res["results"].values():
        for key in ("ig_riemann", "ig_gauss-legendre", "amig_riemann", "amig_gauss-legendre"):
            errs = r[key]
            assert errs["32"] < errs["1"]  # the rule converges
        assert "amig_gauss_legendre_steps_matching_riemann_20" in r


def test_gpu_mode_runs_on_the_cpu(bench, tmp_path):
    res = run(bench, tmp_path, "gpu", "--device", "cpu", "--queries", "2",
              "--gpu-batch-sizes", "16", "64")
    assert sorted(res["results"]) == sorted(bench.GPU_MODELS)
    for kind, r in res["results"].items():
        assert r["device"] == "cpu" and len(r["runs"]) == 2
        assert all(run["queries_per_s"] > 0 for run in r["runs"])
        # batch size changes no number
        assert r["runs"][1]["vs_fp32_pearson_r"] > 0.999999, kind
    assert res["results"]["gemma3"]["model"]["model_type"] == "gemma3_text"
    assert res["results"]["smollm2"]["model"]["model_type"] == "llama"


def test_gpu_sizes_are_the_real_models_shapes(bench):
    from transformers import Gemma3TextConfig, LlamaConfig

    gemma = Gemma3TextConfig(**bench.SIZES["base"]["gemma3"])
    assert (gemma.num_hidden_layers, gemma.hidden_size, gemma.intermediate_size,
            gemma.vocab_size) == (18, 640, 2048, 262144)
    smol = LlamaConfig(**bench.SIZES["base"]["smollm2"])
    assert (smol.num_hidden_layers, smol.hidden_size, smol.intermediate_size,
            smol.vocab_size, smol.tie_word_embeddings) == (30, 576, 1536, 49152, True)


def test_reference_mode_agrees_with_captum_for_llama_and_gemma3(bench, tmp_path):
    res = run(bench, tmp_path, "reference", "--queries", "2", "--models", "gemma3", "smollm2")
    for kind in ("gemma3", "smollm2"):
        r = res["results"][kind]
        assert r["reference"] == "captum" and r["n_queries"] == 2 and r["speedup"] > 0
        # the same numbers: same activation, zero baseline, midpoint nodes
        assert r["min_pearson_r"] >= 0.9999
        assert r["max_abs_diff_rel"] <= 1e-3


def test_profile_mode_splits_a_query(bench, tmp_path):
    res = run(bench, tmp_path, "profile", "--gpu-models", "gemma3", "bert", "--steps", "4")
    for r in res["results"].values():
        (run_,) = r["runs"].values()
        share = run_["share"]
        assert set(share) == {"capture", "baselines", "blocks_forward", "output_layer",
                              "blocks_backward", "overhead"}
        assert share["output_layer"] > 0 and share["blocks_forward"] > 0
        assert sum(share.values()) == pytest.approx(1.0, abs=0.02)


def test_performance_page_is_generated_from_the_results():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    page = (ROOT / "docs" / "performance.md").read_text()
    assert page == mod.render(ROOT / "benchmarks" / "results"), \
        "run `make docs` and commit docs/performance.md"


def test_performance_page_renders_every_mode(tmp_path, bench):
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for args in (["reference", "--queries", "1", "--models", "gemma3"],
                 ["amig", "--queries", "1", "--models", "bert", "--gl-steps", "2"],
                 ["quadrature", "--queries", "2"],
                 ["profile", "--gpu-models", "gpt2", "--steps", "2"]):
        name = f"{args[0]}-cpu.json"
        bench.main([*args, "--size", "tiny", "--out", str(tmp_path / name)])
    page = mod.render(tmp_path)
    for heading in ("## Against a reference", "## AMIG against IG", "## Quadrature on the toy",
                    "## GPU", "## Against the targets"):
        assert heading in page
    assert "captum" in page and "No GPU result is on record" in page


@pytest.fixture(scope="module")
def gpu_dag():
    spec = importlib.util.spec_from_file_location("gpu_dag", ROOT / "benchmarks" / "gpu_dag.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_dag_check_compares_tables_to_float_rounding(gpu_dag, tmp_path):
    import pandas as pd

    table = pd.DataFrame({"model": ["a", "b"], "f1": [0.5, 0.75], "threshold": [1e-3, np.nan]})
    table.to_csv(tmp_path / "x.csv", index=False)
    table.assign(f1=[0.5 + 1e-9, 0.75]).to_csv(tmp_path / "rounded.csv", index=False)
    table.assign(f1=[0.5, 0.8]).to_csv(tmp_path / "other.csv", index=False)
    table.assign(model=["a", "c"]).to_csv(tmp_path / "renamed.csv", index=False)
    same = gpu_dag.compare_tables(tmp_path / "x.csv", tmp_path / "rounded.csv")
    assert same["equal"] and same["max_abs_diff"]["f1"] == pytest.approx(1e-9)
    assert same["max_abs_diff"]["threshold"] == 0.0  # NaN in both: equal
    assert not gpu_dag.compare_tables(tmp_path / "x.csv", tmp_path / "other.csv")["equal"]
    renamed = gpu_dag.compare_tables(tmp_path / "x.csv", tmp_path / "renamed.csv")
    assert not renamed["equal"] and renamed["differing_non_numeric"] == ["model"]
    assert not gpu_dag.compare_tables(tmp_path / "x.csv", tmp_path / "none.csv")["compared"]


def test_gpu_dag_check_reads_each_gpu_jobs_device(gpu_dag, tmp_path):
    logs = tmp_path / "logs"
    (logs / "attribution" / "m" / "en" / "discovery").mkdir(parents=True)
    (logs / "neurons" / "m").mkdir(parents=True)
    (logs / "attribution" / "m" / "en" / "discovery" / "shard-0.log").write_text(
        "INFO kneurons.devices: device: cuda (leased GPU 0 of ['0'])\n")
    (logs / "neurons" / "m" / "edit_likn.log").write_text("nothing about devices\n")
    found = gpu_dag.gpu_job_devices(tmp_path)
    assert found["attribute_shard"] == [
        "logs/attribution/m/en/discovery/shard-0.log: cuda (leased GPU 0 of ['0'])"]
    assert found["edit_likn"] == ["logs/neurons/m/edit_likn.log: NO DEVICE LINE"]


def test_gpu_dag_check_config_plans_the_whole_dag(gpu_dag, tmp_path):
    import subprocess
    import sys

    import yaml

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(gpu_dag.small_config()))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-s", str(ROOT / "Snakefile"), "--directory",
         str(tmp_path), "--configfile", str(tmp_path / "config.yaml"), "--cores", "1"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for rule in gpu_dag.GPU_LOGS:  # every GPU rule is in the check
        assert rule in result.stdout


def test_the_cost_in_the_operations_page_is_rendered_from_the_results(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_cost", ROOT / "benchmarks" / "cost.py")
    cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cost)
    page = (ROOT / "docs" / "operations.md").read_text()
    block = page[page.index(cost.BEGIN):page.index(cost.END) + len(cost.END)]
    assert block == cost.render(ROOT / "benchmarks" / "results"), \
        "run `make docs` and commit docs/operations.md"
    # the model: every term is a measured figure times a count
    shape = {"best_fp32": {"queries_per_s": 10.0}, "completeness_check_s_per_query": 0.1,
             "dkn_s_per_query": 0.05, "model": {"n_layers": 2, "d_ff": 4}}
    got = cost.model_cost(shape, {"discovery": 3600, "calibration": 600, "evaluation": 1000},
                          "en")
    assert got["discovery_h"] == pytest.approx(3600 * 0.2 / 3600)
    assert got["dkn_h"] == pytest.approx(3000 * 0.05 / 3600)
    assert got["checked_full_h"] == pytest.approx(2600 * 0.2 / 3600)
    assert got["checked_h"] == pytest.approx(got["checked_full_h"] * cost.LAYER_SHARE)
    assert got["disk_full_gb"] == pytest.approx(3200 * 2 * 4 * 4 / 1e9)
    assert "No GPU measurement" in cost.render(tmp_path)
