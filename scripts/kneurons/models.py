"""Model adapters: one registry entry per architecture, addressed by HF ``config.model_type``.

A *knowledge neuron* is one intermediate neuron of a transformer block's feed-forward network
(FFN): one coordinate of the activation that enters the FFN's output projection (after the
nonlinearity, and after the gate product for gated FFNs). The registry tells the rest of the
library, per architecture, where that activation lives and how to finish a forward pass from
the hidden states of one block on (the fast attribution path).

Every hook on these modules goes through :mod:`kneurons.hooks` (scoped, removed in ``finally``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

Arch = Literal["masked", "causal"]
ARCH_KINDS: tuple[str, ...] = ("masked", "causal")


@dataclass(frozen=True)
class ArchSpec:
    """How to reach the FFN neurons of one architecture.

    ``ffn_site(block)`` is the FFN *output projection* (``BertOutput.dense``, GPT-2 ``mlp.c_proj``,
    Llama ``mlp.down_proj``...): the knowledge-neuron activation is its **input**
    ([batch, seq, d_ff]), read and replaced with a forward *pre*-hook. Using the projection's
    input rather than the activation module's output makes gated FFNs (SwiGLU: act(gate) * up,
    no module outputs the product) work the same way as plain ones.

    ``ffn_in(block)`` is the FFN *input projection* whose **output** is the pre-activation
    (``site="pre"``); ``None`` where that is ill-defined (gated FFNs).

    ``head(model, hidden)`` maps last-block hidden states [n, hidden] to logits [n, vocab]
    (final norm + LM head). It enables the fast path (run blocks l..L-1 from cached inputs,
    logits only at the target positions); ``None`` means the generic fallback (full model with
    a hook) is used.

    ``kv(block, hidden)`` (masked LMs) maps a block's input [n, S, hidden] to its attention's
    keys and values [n, heads, S, head_dim], and ``cache_arg`` names the block argument that
    takes a KV cache: with both, the attribution runs the patched and the last block on the
    object position alone (causal LMs get their keys/values from the model's own cache).

    ``value_rows``: the output projection's weight holds a neuron's *value slot* (what neuron
    i writes into the residual stream, [hidden]) in row i: transformers' ``Conv1D`` (GPT-2)
    with weight [d_ff, hidden]. Otherwise (``nn.Linear``, weight [hidden, d_ff]) in column i.
    """

    model_type: str
    blocks: Callable[[nn.Module], Sequence[nn.Module]]
    ffn_site: Callable[[nn.Module], nn.Module]
    kinds: frozenset[str]
    ffn_in: Callable[[nn.Module], nn.Module] | None = None
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    kv: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    cache_arg: str | None = None
    value_rows: bool = False

    def value_slot(self, proj: nn.Module, neuron: int) -> torch.Tensor:
        """The view [hidden] of the output projection ``proj``'s weight that ``neuron``
        writes."""
        return proj.weight[neuron, :] if self.value_rows else proj.weight[:, neuron]

    def n_neurons(self, proj: nn.Module) -> int:
        """d_ff, the number of neurons (value slots) of the output projection ``proj``."""
        return int(proj.weight.shape[0 if self.value_rows else 1])


def _bert_kv(block: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    att = block.attention.self  # BertSelfAttention (also RoBERTa, XLM-R)
    shape = (*h.shape[:-1], -1, att.attention_head_size)
    return (att.key(h).view(shape).transpose(1, 2),
            att.value(h).view(shape).transpose(1, 2))  # [n, heads, S, head_dim]


def _bert_like(model_type: str, base: str, head_attr: str) -> ArchSpec:
    return ArchSpec(
        model_type=model_type,
        blocks=lambda m: getattr(m, base).encoder.layer,
        ffn_site=lambda b: b.output.dense,
        ffn_in=lambda b: b.intermediate.dense,
        head=lambda m, h: getattr(m, head_attr)(h),
        kv=_bert_kv,
        cache_arg="past_key_values",
        kinds=frozenset({"masked"}),
    )


def _softcapped_head(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Final norm, LM head, and Gemma 2/3's ``final_logit_softcapping`` (cap * tanh(z / cap))
    where the config sets it, as their ``forward`` does. (Gemma's embedding scaling by
    sqrt(hidden) happens in the embedding module, below every block, so the head needs none.)"""
    logits = m.lm_head(m.model.norm(h))  # [n, vocab]
    cap = getattr(m.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _llama_like(model_type: str, softcap: bool = False) -> ArchSpec:
    return ArchSpec(
        model_type=model_type,
        blocks=lambda m: m.model.layers,
        ffn_site=lambda b: b.mlp.down_proj,
        ffn_in=None,  # gated FFN: act(gate_proj(x)) * up_proj(x) has no single pre-activation
        head=_softcapped_head if softcap else (lambda m, h: m.lm_head(m.model.norm(h))),
        kinds=frozenset({"causal"}),
    )


def _neox_out(m: nn.Module) -> nn.Module:
    # transformers < 5 names the unembedding ``embed_out``, 5.x ``lm_head``
    out = getattr(m, "lm_head", None)
    return out if out is not None else m.embed_out


ARCHITECTURES: dict[str, ArchSpec] = {
    "bert": _bert_like("bert", "bert", "cls"),
    "roberta": _bert_like("roberta", "roberta", "lm_head"),
    "xlm-roberta": _bert_like("xlm-roberta", "roberta", "lm_head"),
    "gpt2": ArchSpec(
        model_type="gpt2",
        blocks=lambda m: m.transformer.h,
        ffn_site=lambda b: b.mlp.c_proj,
        ffn_in=lambda b: b.mlp.c_fc,
        head=lambda m, h: m.lm_head(m.transformer.ln_f(h)),
        kinds=frozenset({"causal"}),
        value_rows=True,  # Conv1D: weight [d_ff, hidden]
    ),
    "gpt_neox": ArchSpec(
        model_type="gpt_neox",
        blocks=lambda m: m.gpt_neox.layers,
        ffn_site=lambda b: b.mlp.dense_4h_to_h,
        ffn_in=lambda b: b.mlp.dense_h_to_4h,
        head=lambda m, h: _neox_out(m)(m.gpt_neox.final_layer_norm(h)),
        kinds=frozenset({"causal"}),
    ),
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    # Gemma 2/3 (text): GeGLU FFN whose output passes post_feedforward_layernorm (an RMSNorm)
    # before the residual, so the zero-baseline path of ``ig`` is degenerate there (see
    # kneurons.attribution.probability_gap and the shards' completeness_error)
    "gemma2": _llama_like("gemma2", softcap=True),
    "gemma3_text": _llama_like("gemma3_text", softcap=True),
}


class UnsupportedArchitecture(ValueError):
    """The model's ``config.model_type`` has no registry entry, or the LM kind does not fit."""


def get_spec(model_type: str) -> ArchSpec:
    """Registry lookup with an error that lists the supported architectures."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r}; supported model_type values: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        ) from None


@dataclass
class LanguageModel:
    """A model in eval mode with its tokenizer and registry entry.

    ``n_layers`` is the number of transformer blocks, ``d_ff`` the FFN intermediate width
    (neurons per layer).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    arch: Arch
    spec: ArchSpec
    device: torch.device
    n_layers: int = field(default=0)
    d_ff: int = field(default=0)

    def blocks(self) -> Sequence[nn.Module]:
        return self.spec.blocks(self.model)

    def ffn_site(self, layer: int) -> nn.Module:
        return self.spec.ffn_site(self.blocks()[layer])

    def value_slot(self, layer: int, neuron: int) -> torch.Tensor:
        """The view [hidden] of the FFN output-projection weight that ``neuron`` of ``layer``
        writes (the layout is the architecture's: :attr:`ArchSpec.value_rows`)."""
        return self.spec.value_slot(self.ffn_site(layer), neuron)

    @property
    def replacement_id(self) -> int:
        """Token that replaces one query token for an AMIG baseline: mask (masked LMs),
        end-of-text (causal LMs)."""
        tok = self.tokenizer
        tid = tok.mask_token_id if self.arch == "masked" else tok.eos_token_id
        if tid is None:
            what = "mask" if self.arch == "masked" else "eos"
            raise ValueError(f"the tokenizer has no {what} token, needed for AMIG baselines")
        return int(tid)


def wrap_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, arch: str,
               device: str | torch.device = "cpu") -> LanguageModel:
    """Wrap a model already in memory (toy models, tests): checks, moves to ``device``, eval."""
    if arch not in ARCH_KINDS:
        raise ValueError(f"arch must be one of {ARCH_KINDS}, got {arch!r}")
    model_type = model.config.model_type
    spec = get_spec(model_type)
    if arch not in spec.kinds:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is supported as {'/'.join(sorted(spec.kinds))} LM only, "
            f"not as {arch!r}"
        )
    dev = torch.device(device)
    model = model.to(dev).eval()
    blocks = spec.blocks(model)
    return LanguageModel(model=model, tokenizer=tokenizer, arch=arch, spec=spec, device=dev,
                         n_layers=len(blocks), d_ff=spec.n_neurons(spec.ffn_site(blocks[0])))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def load_model(source: str, arch: str, *, revision: str | None = None,
               trust_remote_code: bool = False, device: str = "cpu",
               dtype: torch.dtype | None = None) -> LanguageModel:
    """Load a hub id or local folder as a masked (``AutoModelForMaskedLM``) or causal
    (``AutoModelForCausalLM``) LM.

    safetensors weights are preferred (``.bin`` is used only when no safetensors exist);
    ``HF_HUB_OFFLINE=1`` restricts loading to local files/cache. The architecture is checked
    against the registry before any weights are loaded.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    if arch not in ARCH_KINDS:
        raise ValueError(f"arch must be one of {ARCH_KINDS}, got {arch!r}")
    path = Path(source).expanduser()
    looks_local = path.is_absolute() or str(source).startswith((".", "~")) or str(source).count("/") > 1
    if looks_local and not path.exists():  # a hub id is "name" or "org/name"
        raise FileNotFoundError(f"model path {source} does not exist")
    common = dict(revision=revision, trust_remote_code=trust_remote_code)
    if _offline():
        common["local_files_only"] = True
    config = AutoConfig.from_pretrained(source, **common)
    spec = get_spec(config.model_type)
    if arch not in spec.kinds:
        raise UnsupportedArchitecture(
            f"{source}: model_type {config.model_type!r} is a {'/'.join(sorted(spec.kinds))} LM, "
            f"but arch={arch!r} was requested"
        )
    auto = AutoModelForMaskedLM if arch == "masked" else AutoModelForCausalLM
    kwargs = dict(common)
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = auto.from_pretrained(source, use_safetensors=True, **kwargs)
    except (OSError, EnvironmentError):
        model = auto.from_pretrained(source, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    return wrap_model(model, tokenizer, arch, device=device)


def source_model_type(source: str, revision: str | None = None) -> str | None:
    """A model's ``config.model_type`` from its files alone, without loading it: a local
    folder's config.json, or a hub id's config.json in the local cache (no download); None
    when it is not available locally (the job that loads the model checks it then)."""
    import json

    path = Path(source).expanduser()
    config = path / "config.json" if path.is_dir() else None
    if config is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(source), "config.json", revision=revision)
        except Exception:  # noqa: BLE001 (not a valid hub id)
            cached = None
        config = Path(cached) if isinstance(cached, str) else None
    if config is None or not config.is_file():
        return None
    return json.loads(config.read_text()).get("model_type")


def check_model_type(model_type: str, arch: str, what: str) -> ArchSpec:
    """The registry entry of ``model_type``, which must fit ``arch``; the errors name ``what``
    (e.g. ``models.my-phi``), the model's type and the supported ones."""
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise UnsupportedArchitecture(
            f"{what}: model_type {model_type!r} is not supported; supported model_type values: "
            f"{', '.join(sorted(ARCHITECTURES))} (docs/real-models.md: adding an architecture)")
    if arch not in spec.kinds:
        raise UnsupportedArchitecture(
            f"{what}: model_type {model_type!r} is a {'/'.join(sorted(spec.kinds))} LM, but "
            f"its arch is {arch!r}")
    return spec


def load_job_model(model: Mapping[str, Any]) -> LanguageModel:
    """Load a rule's ``params.model`` (``source``, ``arch``, ``revision``,
    ``trust_remote_code``) on the device this job leases (:func:`kneurons.devices.pick_device`)."""
    from .devices import pick_device

    return load_model(model["source"], model["arch"], revision=model["revision"],
                      trust_remote_code=model["trust_remote_code"], device=pick_device())
