"""Architecture registry, wrap_model and load_model (tiny models, no downloads)."""

from __future__ import annotations

import pytest
import torch

from conftest import build, make_bert_tokenizer
from kneurons.models import ARCHITECTURES, UnsupportedArchitecture, get_spec, load_model, wrap_model


def test_registry_covers_required_architectures():
    for name in ("bert", "gpt2", "roberta", "xlm-roberta", "llama", "gpt_neox", "gemma2",
                 "gemma3_text"):
        assert ARCHITECTURES[name].model_type == name


def test_unknown_architecture_lists_supported():
    with pytest.raises(UnsupportedArchitecture) as err:
        get_spec("t5")
    msg = str(err.value)
    assert "'t5'" in msg
    for name in ("bert", "gpt2", "llama"):
        assert name in msg


def test_wrap_model_rejects_unregistered_model_type():
    from transformers import ElectraConfig, ElectraForMaskedLM

    model = ElectraForMaskedLM(ElectraConfig(vocab_size=20, embedding_size=8, hidden_size=8,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=8))
    with pytest.raises(UnsupportedArchitecture, match="electra.*supported.*bert"):
        wrap_model(model, make_bert_tokenizer(), "masked")


def test_wrap_model_rejects_wrong_kind(tiny_gpt2):
    with pytest.raises(UnsupportedArchitecture, match="causal"):
        wrap_model(tiny_gpt2.model, tiny_gpt2.tokenizer, "masked")
    with pytest.raises(ValueError, match="arch must be"):
        wrap_model(tiny_gpt2.model, tiny_gpt2.tokenizer, "seq2seq")


@pytest.mark.parametrize("kind,n_layers,d_ff,arch", [
    ("bert", 3, 48, "masked"), ("roberta", 2, 40, "masked"), ("gpt2", 3, 48, "causal"),
    ("llama", 2, 40, "causal"), ("gpt_neox", 2, 40, "causal"),
])
def test_wrapped_shapes(kind, n_layers, d_ff, arch):
    lm = build(kind)
    assert (lm.n_layers, lm.d_ff, lm.arch) == (n_layers, d_ff, arch)
    assert not lm.model.training
    assert lm.device == torch.device("cpu")
    # the site's input really is d_ff wide
    seen = {}
    h = lm.ffn_site(0).register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    try:
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([[3, 4, 5, 6]]))
    finally:
        h.remove()
    assert seen["x"].shape == (1, 4, d_ff)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_load_model_from_local_folder(kind, tmp_path, monkeypatch):
    lm = build(kind)
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model(str(tmp_path), lm.arch)
    assert (loaded.n_layers, loaded.d_ff) == (lm.n_layers, lm.d_ff)
    assert loaded.spec.model_type == kind and not loaded.model.training
    ids = torch.tensor([lm.tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(input_ids=ids).logits, lm.model(input_ids=ids).logits,
                              atol=1e-5)
    assert loaded.tokenizer("The capital")["input_ids"] == lm.tokenizer("The capital")["input_ids"]
    other = "causal" if lm.arch == "masked" else "masked"
    with pytest.raises(UnsupportedArchitecture, match=f"arch='{other}'"):
        load_model(str(tmp_path), other)


def test_load_model_falls_back_to_bin_weights(tmp_path):
    import os

    lm = build("bert")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    torch.save(lm.model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = load_model(str(tmp_path), "masked", dtype=torch.float64)
    w = loaded.model.bert.encoder.layer[2].output.dense.weight
    assert w.dtype == torch.float64
    assert torch.allclose(w.float(), lm.model.bert.encoder.layer[2].output.dense.weight)


@pytest.mark.parametrize("source", ["/no/such/model", "results/models/toy/model", "./model"])
def test_a_missing_local_model_path_is_named(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"model path {source} does not exist"):
        load_model(source, "masked")


def test_gemma_entries_are_causal_with_the_softcapped_head():
    for name in ("gemma2", "gemma3_text"):
        spec = ARCHITECTURES[name]
        assert spec.kinds == frozenset({"causal"}) and spec.head is not None
    assert ARCHITECTURES["gemma3_text"].head is not ARCHITECTURES["llama"].head


@pytest.mark.parametrize("name", ["tiny_bert", "tiny_gpt2", "tiny_roberta", "tiny_llama",
                                  "tiny_neox"])
def test_the_registry_knows_each_architectures_value_slot_layout(name, request):
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    lm = request.getfixturevalue(name)
    proj = lm.ffn_site(0)
    assert lm.spec.value_rows == isinstance(proj, Conv1D)
    assert isinstance(proj, Conv1D if lm.spec.value_rows else nn.Linear)
    want = proj.weight[3, :] if isinstance(proj, Conv1D) else proj.weight[:, 3]  # [hidden]
    assert lm.value_slot(0, 3).data_ptr() == want.data_ptr()  # a view, not a copy
    assert torch.equal(lm.value_slot(0, 3), want)
    assert lm.d_ff == (proj.weight.shape[0] if isinstance(proj, Conv1D) else proj.in_features)


def test_a_jobs_model_params_load_the_model(tmp_path, monkeypatch):
    from kneurons.models import load_job_model

    lm = build("gpt2")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no device to lease: the CPU
    params = {"source": str(tmp_path), "arch": "causal", "revision": None,
              "trust_remote_code": False, "toy": True}  # as common.smk's model_params
    loaded = load_job_model(params)
    assert loaded.spec.model_type == "gpt2" and loaded.device.type == "cpu"
    assert (loaded.n_layers, loaded.d_ff) == (lm.n_layers, lm.d_ff)


def test_a_sources_model_type_is_read_without_loading(tmp_path):
    from kneurons.models import UnsupportedArchitecture, check_model_type, source_model_type

    folder = tmp_path / "phi"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "phi"}')
    assert source_model_type(str(folder)) == "phi"
    assert source_model_type(str(tmp_path / "empty")) is None  # nothing local: checked later
    assert source_model_type("no-such-org/no-such-model-kneurons") is None  # not in the cache
    import pytest

    with pytest.raises(UnsupportedArchitecture, match=r"models.my-phi: model_type 'phi' is "
                                                      r"not supported; supported .*gpt2"):
        check_model_type("phi", "causal", "models.my-phi")
    with pytest.raises(UnsupportedArchitecture, match="is a causal LM, but its arch is 'masked'"):
        check_model_type("gpt2", "masked", "models.g")
    assert check_model_type("bert", "masked", "x").model_type == "bert"
