"""Tiny models and tokenizers built in code (no downloads), shared by the library tests.

Fixtures are session scoped and seeded; the models are random but initialised with a large
``initializer_range`` so their output distributions are peaked (non-trivial gradients).
"""

from __future__ import annotations

import pytest
import torch

from kneurons.models import LanguageModel, wrap_model

# tiny models gain nothing from threads, and several test processes may share the CPU cores
# (busy-waiting OpenMP threads then slow everything down by orders of magnitude)
torch.set_num_threads(1)

WORDS = (
    "the capital of tanzania is dodoma . france paris germany berlin city language official "
    "spoken in was born kenya nairobi located river mountain a an and dar es salaam "
    "kili ##man ##jaro ##s swahili english"
).split()
CJK = list(dict.fromkeys("坦桑尼亚的官方语言是斯瓦希里首都多马巴黎法国。"))
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

BPE_SENTENCES = [
    "The capital of Tanzania is Dodoma .",
    "The capital of France is Paris .",
    "The capital of Germany is Berlin .",
    "Kilimanjaro is located in Tanzania .",
    "The official language of Tanzania is Swahili .",
    "坦桑尼亚的官方语言是斯瓦希里语。",
    "坦桑尼亚的首都是多多马。",
]


def make_bert_tokenizer():
    from transformers import BertTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIALS + WORDS + CJK))}
    return BertTokenizerFast(vocab=vocab)


def make_bpe_tokenizer(vocab_size: int = 320):
    """Byte-level BPE trained on a few sentences, with ``<|endoftext|>`` as bos/eos/unk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(BPE_SENTENCES * 4, trainer)
    return GPT2TokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>",
                             eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def make_bpe_masked_tokenizer(vocab_size: int = 320):
    """RoBERTa-style byte-level BPE with <s> </s> <pad> <mask>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(BPE_SENTENCES * 4, trainer)
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                                   cls_token="<s>", sep_token="</s>")


def build(kind: str, seed: int = 0, device: str = "cpu", **overrides) -> LanguageModel:
    """A tiny randomly initialised LM of the given model_type (every entry of
    ``kneurons.models.ARCHITECTURES``), wrapped, on ``device``."""
    from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel,
                              GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM,
                              RobertaConfig, RobertaForMaskedLM)

    torch.manual_seed(seed)
    if kind == "bert":
        tok = make_bert_tokenizer()
        cfg = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3,
                   num_attention_heads=4, intermediate_size=48, max_position_embeddings=64,
                   initializer_range=0.2, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)
        cfg.update(overrides)
        model, arch = BertForMaskedLM(BertConfig(**cfg)), "masked"
    elif kind in ("roberta", "xlm-roberta"):
        from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

        tok = make_bpe_masked_tokenizer()
        cfg = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=40, max_position_embeddings=72,
                   pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                   eos_token_id=tok.eos_token_id, initializer_range=0.2)
        cfg.update(overrides)
        config_cls, model_cls = ((RobertaConfig, RobertaForMaskedLM) if kind == "roberta"
                                 else (XLMRobertaConfig, XLMRobertaForMaskedLM))
        model, arch = model_cls(config_cls(**cfg)), "masked"
    elif kind == "gpt2":
        tok = make_bpe_tokenizer()
        cfg = dict(vocab_size=len(tok), n_embd=32, n_layer=3, n_head=4, n_inner=48,
                   n_positions=64, initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0,
                   attn_pdrop=0.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        cfg.update(overrides)
        model, arch = GPT2LMHeadModel(GPT2Config(**cfg)), "causal"
    elif kind in ("llama", "mistral", "qwen2"):
        from transformers import (MistralConfig, MistralForCausalLM, Qwen2Config,
                                  Qwen2ForCausalLM)

        classes = {"llama": (LlamaConfig, LlamaForCausalLM),
                   "mistral": (MistralConfig, MistralForCausalLM),
                   "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
        config_cls, model_cls = classes[kind]
        tok = make_bpe_tokenizer()
        cfg = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
                   max_position_embeddings=64, initializer_range=0.2,
                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        cfg.update(overrides)
        model, arch = model_cls(config_cls(**cfg)), "causal"
    elif kind == "gpt_neox":
        tok = make_bpe_tokenizer()
        cfg = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=40, max_position_embeddings=64,
                   initializer_range=0.2, bos_token_id=tok.bos_token_id,
                   eos_token_id=tok.eos_token_id)
        cfg.update(overrides)
        model, arch = GPTNeoXForCausalLM(GPTNeoXConfig(**cfg)), "causal"
    elif kind == "gemma3_text":
        # GeGLU FFN, post-FFN RMSNorm, sliding and global attention layers, tied embeddings
        # scaled by sqrt(hidden), and a final logit softcap (off in Gemma 3's default config,
        # set here so that the registry's head must apply it); sliding window 4 < the query
        # lengths: the full-block path (``sliding_window=64``: the one-position path)
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        tok = make_bpe_tokenizer()
        cfg = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   intermediate_size=40, max_position_embeddings=64, initializer_range=0.2,
                   sliding_window=4,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                   final_logit_softcapping=3.0, query_pre_attn_scalar=8,
                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.eos_token_id)
        cfg.update(overrides)
        model, arch = Gemma3ForCausalLM(Gemma3TextConfig(**cfg)), "causal"
    elif kind == "gemma2":
        # falls out of the Gemma 3 registry entry (same layout, softcapped logits)
        from transformers import Gemma2Config, Gemma2ForCausalLM

        tok = make_bpe_tokenizer()
        cfg = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   intermediate_size=40, max_position_embeddings=64, initializer_range=0.2,
                   query_pre_attn_scalar=8, final_logit_softcapping=2.0,
                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.eos_token_id)
        cfg.update(overrides)
        model, arch = Gemma2ForCausalLM(Gemma2Config(**cfg)), "causal"
    else:
        raise ValueError(kind)
    return wrap_model(model, tok, arch, device)


@pytest.fixture(scope="session")
def tiny_bert() -> LanguageModel:
    return build("bert")


@pytest.fixture(scope="session")
def tiny_gpt2() -> LanguageModel:
    return build("gpt2")


@pytest.fixture(scope="session")
def tiny_roberta() -> LanguageModel:
    return build("roberta")


@pytest.fixture(scope="session")
def tiny_llama() -> LanguageModel:
    return build("llama")


@pytest.fixture(scope="session")
def tiny_neox() -> LanguageModel:
    return build("gpt_neox")
