"""On a GPU: the engine's numbers equal the CPU's, and the device lease works (marker ``gpu``).

Every registered architecture, built small from a config (random weights, no downloads), runs
on the CPU and on the device from the same weights: AMIG and IG scores agree within 1e-4 of
the largest score (fp32), the completeness check's probability gaps and errors agree, and so do
DKN suppression and the localization's erase/enhance scores. TF32 matmuls and bf16 autocast
stay within the tolerances stated below (docs/performance.md says which to use).

Skipped without CUDA. ``KNEURONS_TEST_DEVICE=cpu`` runs them with the CPU standing in for the
device: a check of the tests themselves (CI runs it), not of a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build
from kneurons import scoring
from kneurons.attribution import attribute, probability_gap
from kneurons.devices import tf32_matmuls as tf32
from kneurons.dkn import detect_query_dkn
from kneurons.models import ARCHITECTURES, wrap_model
from kneurons.neurons import top_neurons
from kneurons.queries import encode_query
from kneurons.records import completeness_error

DEVICE = os.environ.get("KNEURONS_TEST_DEVICE", "cuda")
REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                       reason="no CUDA device (KNEURONS_TEST_DEVICE=cpu runs these on the CPU)"),
]

# fp32 on the device against fp32 on the CPU: relative to the largest |score| of the query
FP32_TOL = 1e-4
# reduced precision against fp32 on the same device, relative to the largest |score|: TF32
# matmuls keep 10 mantissa bits, bf16 7. On an H200 (benchmarks/results/gpu-tests.log) the
# tiny random RoBERTa and XLM-R models reached 2.2e-2 with TF32, above the 2e-2 first stated
# here; the shapes of real models stay below 1e-2 (docs/performance.md, GPU section)
TF32_TOL = 5e-2
BF16_TOL = 1e-1

FACTS = [  # (template, subject, object): words of the tiny tokenizers; "dar es salaam" and
    # the BPE splits of capitalised names give multi-token objects
    ("The capital of [X] is [Y] .", "tanzania", "dodoma"),
    ("The capital of [X] is [Y] .", "france", "paris"),
    ("The official language of [X] is [Y] .", "tanzania", "swahili"),
    ("[X] is located in [Y] .", "kilimanjaro", "dar es salaam"),
    ("The capital of [X] is [Y] .", "Germany", "Berlin"),
]


def _queries(lm):
    out = []
    for template, subject, obj in FACTS:
        with contextlib.suppress(ValueError):  # a word the tokenizer cannot encode
            out.append(encode_query(lm, template, subject, obj))
    assert len(out) >= 3, "too few encodable facts"
    return out


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def pair(request):
    """(the model on the CPU, the same weights on the device, queries)."""
    cpu = build(request.param, seed=1)
    dev = wrap_model(copy.deepcopy(cpu.model), cpu.tokenizer, cpu.arch, DEVICE)
    assert dev.device.type == torch.device(DEVICE).type
    yield cpu, dev, _queries(cpu)
    del dev
    if DEVICE.startswith("cuda"):
        torch.cuda.empty_cache()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    scale = float(np.abs(b).max())
    return float(np.abs(a - b).max()) / scale if scale > 0 else float(np.abs(a).max())


@pytest.mark.parametrize("method", ["amig", "ig"])
def test_scores_equal_the_cpus(pair, method):
    cpu, dev, queries = pair
    with tf32(False):
        got = attribute(dev, queries, method=method, steps=8)
    want = attribute(cpu, queries, method=method, steps=8)
    for q, g, w in zip(queries, got, want):
        assert g.scores.dtype == np.float32 and g.scores.shape == w.scores.shape
        assert _rel(g.scores, w.scores) <= FP32_TOL, (cpu.spec.model_type, q.input_ids)
        np.testing.assert_allclose(g.token_probs, w.token_probs, rtol=1e-4, atol=1e-7)
        assert (g.rank, g.predicted) == (w.rank, w.predicted)


def test_completeness_check_equals_the_cpus(pair):
    cpu, dev, queries = pair
    for q in queries[:3]:
        with tf32(False):
            gap_dev = probability_gap(dev, q, method="amig")
            (res_dev,) = attribute(dev, [q], method="amig", steps=8)
        gap_cpu = probability_gap(cpu, q, method="amig")
        (res_cpu,) = attribute(cpu, [q], method="amig", steps=8)
        np.testing.assert_allclose(gap_dev, gap_cpu, rtol=1e-4, atol=1e-7)
        err_dev = completeness_error(res_dev.scores, gap_dev)
        err_cpu = completeness_error(res_cpu.scores, gap_cpu)
        assert abs(err_dev - err_cpu) <= 1e-4 * max(1.0, err_cpu), (err_dev, err_cpu)


def test_dkn_suppression_equals_the_cpus(pair):
    cpu, dev, queries = pair
    (res,) = attribute(cpu, [queries[0]], method="amig", steps=4)
    layers, neurons, _ = top_neurons(res.scores, 6)
    kn = [(int(a), int(b)) for a, b in zip(layers, neurons)]
    sets = [[]] + [[n] for n in kn] + [[a, b] for i, a in enumerate(kn) for b in kn[i + 1:]]
    with tf32(False):
        got = scoring.erased_token_probs(dev, queries[0], sets)
    want = scoring.erased_token_probs(cpu, queries[0], sets)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    # the detection itself: the same degenerate pairs (thresholds away from float noise)
    kw = dict(single_drop=0.2, pair_drop=0.25)
    with tf32(False):
        d_dev = detect_query_dkn(dev, queries[0], kn, **kw)
    d_cpu = detect_query_dkn(cpu, queries[0], kn, **kw)
    assert d_dev.pairs == d_cpu.pairs and d_dev.tested_pairs == d_cpu.tested_pairs


def test_localization_scores_equal_the_cpus(pair):
    cpu, dev, queries = pair
    (res,) = attribute(cpu, [queries[0]], method="amig", steps=4)
    layers, neurons, _ = top_neurons(res.scores, 4)
    kn = list(zip(layers.tolist(), neurons.tolist()))
    plan = [scoring.NONE, scoring.erase(kn), scoring.enhance(kn, 2.0)]
    rows = [q for q in queries for _ in plan]
    ivs = [iv for _ in queries for iv in plan]
    with tf32(False):
        got = scoring.score(dev, rows, ivs)
    want = scoring.score(cpu, rows, ivs)
    np.testing.assert_allclose(got.prob, want.prob, rtol=1e-4, atol=1e-7)
    assert (got.top1 == want.top1).all()


@pytest.mark.parametrize("precision", ["tf32", "bf16-autocast"])
def test_reduced_precision_stays_within_its_tolerance(pair, precision):
    _, dev, queries = pair
    with tf32(False):
        ref = attribute(dev, queries, method="amig", steps=8)
    with tf32(precision == "tf32"):
        got = attribute(dev, queries, method="amig", steps=8,
                        autocast=precision == "bf16-autocast")
    tol = TF32_TOL if precision == "tf32" else BF16_TOL
    for g, r in zip(got, ref):
        assert _rel(g.scores, r.scores) <= tol, (dev.spec.model_type, precision)


LEASE = """
import os, sys
sys.path.insert(0, {scripts!r})
from kneurons.devices import pick_device
device = pick_device()
import torch
x = torch.ones(1, device=device)
print(device, os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count(), x.device.type,
      flush=True)
"""


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="the lease needs real GPUs")
def test_the_lease_picks_a_free_device_and_narrows_cuda_visible_devices(tmp_path):
    from kneurons import devices

    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "KNEURONS_GPU_COUNT")}
    env["KNEURONS_GPU_LOCK_DIR"] = str(tmp_path)
    script = LEASE.format(scripts=str(REPO / "scripts"))
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    device, visible, count, where = first.stdout.split()
    assert (device, visible, count, where) == ("cuda", "0", "1", "cuda")
    # GPU 0 held by this process: a job leases the next device, or waits when there is none
    n_gpus = torch.cuda.device_count()
    os.environ["KNEURONS_GPU_LOCK_DIR"] = str(tmp_path)
    try:
        assert devices.lease_gpu(["0"], wait_s=0) == "0"
        if n_gpus > 1:
            second = subprocess.run([sys.executable, "-c", script], env=env,
                                    capture_output=True, text=True, timeout=120)
            assert second.stdout.split()[:2] == ["cuda", "1"], second.stderr
        else:
            with pytest.raises(TimeoutError):
                devices.lease_gpu(devices.visible_devices(), wait_s=0.2, poll_s=0.05)
    finally:
        del os.environ["KNEURONS_GPU_LOCK_DIR"]
        for handle in devices._HELD:
            handle.close()
        devices._HELD.clear()
