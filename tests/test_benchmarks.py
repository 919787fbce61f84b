"""The attribution benchmark script runs in every mode (on tiny models; timings are not
asserted) and its number-for-number comparison with the knowledge-neurons library holds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

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
