"""Toy language models trained on the bundled mLAMA facts (the hub is not reachable).

The default run cannot download m-BERT or mGPT, so it trains a small BERT (masked) and a
small GPT-2 (causal) from scratch on the facts of every language given, from configs, with
a tokenizer whose vocabulary comes from the training text only. What a model is trained on:

* **template sentences**: the mLAMA template of each trained fact, filled with its subject
  and object in each language (``The capital of Tanzania is Dodoma .``,
  ``坦桑尼亚的大写字母为多多马。``);
* **paraphrases** (``ToyConfig.paraphrases``): a few hand-written templates per relation
  and language (:data:`PARAPHRASES`, for the 10 bundled relations; other relations use only
  their mLAMA template), so that the model stores the fact and not one surface string;
* **bilingual name pairs** (``ToyConfig.bilingual_pairs``): for each entity (subject or
  object, by Wikidata uri) whose en and zh labels differ, ``Tanzania的中文名是坦桑尼亚。``
  and ``The English name of 坦桑尼亚 is Tanzania .`` (:data:`PAIRING_TEMPLATES`). They tie
  the two names of an entity together, so facts can be shared across languages. They are
  made for every entity of the tables, held-out facts included: knowing a country's name in
  both languages does not tell its capital.

Every sentence has an **object**: the fact's object, or the second name of a pair. The
masked model replaces every object token by ``[MASK]`` (whole-object masking, one mask per
token, as the queries do) and is trained to fill them in; ``ToyConfig.mlm_probability``
adds ordinary random masking of the other tokens (0 by default). The causal model is
trained on next-token prediction of the object tokens only (``causal_loss="object"``, the
default): the queries only ever ask for the object, and predicting an arbitrary subject name
from the template prefix is noise that slows learning down. ``causal_loss="all"`` gives the
standard LM loss over every token.

Tokenizers (:func:`build_tokenizer`):

* masked: WordPiece, BERT-style (``[PAD] [UNK] [CLS] [SEP] [MASK]``, cased, no accent
  stripping, CJK characters split one per token, ``[CLS] ... [SEP]`` added), with a
  word-level vocabulary: every word of the training text is one token, characters are
  the fallback (:func:`_wordpiece_vocab`);
* causal: byte-level BPE with ``<|endoftext|>`` as bos, eos, unk and pad; Han characters and
  CJK/full-width punctuation are split off before BPE, so a Chinese character is one
  token (or its bytes) and BPE never merges across a character boundary.

Both tokenize a string the same way whether it is tokenized whole or cut at a word or CJK
character boundary. That is what makes the training sentences (tokenized whole, object
located by character offsets) agree token for token with the queries of
:func:`kneurons.queries.encode_query` (prefix, subject and object tokenized apart).

``ToyConfig.train_fraction < 1`` holds out a seeded subset of facts (by uuid, stratified by
relation, the same uuids in every language) that never appears in a template or
paraphrase sentence: a model that does not know everything. Accuracy is reported for the
trained and the held-out facts separately.

Runs are deterministic on the CPU given the seed and the number of torch threads. Bump
:data:`TOY_VERSION` whenever a change here changes the trained models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

import numpy as np
import pandas as pd
import torch
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from .models import wrap_model
from .queries import encode_query, pad_queries

TOY_VERSION = 3
"""Algorithm version of the toy models: bump it when a change alters what is trained."""

Arch = Literal["masked", "causal"]

log = logging.getLogger(__name__)

MASKED_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ENDOFTEXT = "<|endoftext|>"

TRAINING_RECORD = "toy_training.json"
"""File in the model folder with the config, metrics and held-out uuids of the run."""

# Han characters plus CJK symbols/punctuation (。) and full-width forms (（）), split off one
# by one before byte-level BPE.
_CJK_PATTERN = r"\p{Han}|[\u3000-\u303f\uff00-\uffef]"

PARAPHRASES: dict[str, dict[str, list[str]]] = {
    # Hand-written for the bundled relations; [X] always precedes [Y] so that a causal
    # model reads the subject before it has to produce the object. The zh ones use the
    # right words where the machine-translated mLAMA templates do not (P36 "大写字母",
    # P1376 "大写"): the mLAMA templates are kept as they are and trained too.
    "P17": {
        "en": ["[X] is in the country of [Y] .", "The country of [X] is [Y] .",
               "[X] belongs to the country [Y] ."],
        "zh": ["[X]所在的国家是[Y]。", "[X]属于[Y]。", "[X]在[Y]境内。"],
    },
    "P19": {
        "en": ["[X] is a native of [Y] .", "The birthplace of [X] is [Y] .",
               "[X] was born in the city of [Y] ."],
        "zh": ["[X]生于[Y]。", "[X]的出生地是[Y]。", "[X]在[Y]出生。"],
    },
    "P27": {
        "en": ["[X] is a citizen of [Y] .", "[X] holds citizenship of [Y] .",
               "The nationality of [X] is [Y] ."],
        "zh": ["[X]的国籍是[Y]。", "[X]拥有[Y]国籍。", "[X]是[Y]的公民。"],
    },
    "P30": {
        "en": ["[X] is on the continent of [Y] .", "The continent of [X] is [Y] .",
               "[X] is part of the continent [Y] ."],
        "zh": ["[X]所在的大洲是[Y]。", "[X]地处[Y]。", "[X]属于[Y]大陆。"],
    },
    "P36": {
        "en": ["The capital city of [X] is [Y] .", "[X] has its capital in [Y] .",
               "The seat of government of [X] is [Y] ."],
        "zh": ["[X]的首都是[Y]。", "[X]的首府是[Y]。", "[X]的首府位于[Y]。"],
    },
    "P37": {
        "en": ["[X] has the official language [Y] .", "In [X] , the official language is [Y] .",
               "The language used officially in [X] is [Y] ."],
        "zh": ["[X]的官方语言为[Y]。", "[X]的官方用语是[Y]。", "[X]以[Y]为官方语言。"],
    },
    "P103": {
        "en": ["The mother tongue of [X] is [Y] .", "[X] is a native speaker of [Y] .",
               "The first language of [X] was [Y] ."],
        "zh": ["[X]的母语为[Y]。", "[X]的第一语言是[Y]。", "[X]从小说[Y]。"],
    },
    "P140": {
        "en": ["The religion of [X] is [Y] .", "[X] follows [Y] .",
               "[X] is an adherent of [Y] ."],
        "zh": ["[X]的宗教是[Y]。", "[X]信仰[Y]。", "[X]是[Y]信徒。"],
    },
    "P364": {
        "en": ["[X] was originally made in [Y] .", "The language of [X] is [Y] .",
               "[X] was first released in [Y] ."],
        "zh": ["[X]的原语言是[Y]。", "[X]的语言是[Y]。", "[X]最初以[Y]制作。"],
    },
    "P1376": {
        "en": ["[X] is the capital city of [Y] .", "[X] serves as the capital of [Y] .",
               "[X] is the seat of government of [Y] ."],
        "zh": ["[X]是[Y]的首都。", "[X]是[Y]的首府。", "[X]为[Y]的首府。"],
    },
}
"""Paraphrase templates per relation and language (each has one [X] and one [Y])."""

PAIRING_TEMPLATES: dict[tuple[str, str], str] = {
    # (language of [X], language of [Y]) -> template; the name in [Y] is the object.
    ("en", "zh"): "[X]的中文名是[Y]。",
    ("zh", "en"): "The English name of [X] is [Y] .",
}
"""Bilingual name-pair templates. The object sits where it sits in a fact sentence of its
own language: a zh name right after a CJK character, an en name after a space."""


@dataclass(frozen=True)
class ToyConfig:
    """Science knobs of a toy model. Defaults are tuned for the bundled mLAMA sample.

    With them both archs learn all 500 + 500 bundled facts (top-1 100% in en and zh) in 30
    epochs of batches of 64: the time per training sentence is about the same at batch 32, 64
    or 128 on a CPU (the models are small, the cost is per sentence), so the epochs are what
    costs, and 30 of 64 reach what 40 of 32 did. BERT (post-LN) is the fragile one: with 100
    warm-up steps some seeds stalled (seed 1: 70% zh after 40 epochs of 32); 20 or 25 epochs,
    or lr 5e-3 at batch 64, left 1-8% of the zh facts unlearnt.
    """

    layers: int = 2              # transformer blocks
    hidden: int = 64             # model width
    ffn: int = 256               # FFN (intermediate) width: the candidate knowledge neurons
    heads: int = 4               # attention heads
    epochs: int = 30             # passes over the training sentences
    lr: float = 4e-3             # AdamW peak learning rate
    batch_size: int = 64         # sentences per step
    warmup_steps: int = 300      # linear warm-up, then linear decay to 0 at the last step
    weight_decay: float = 0.0    # AdamW weight decay
    paraphrases: bool = True     # train the PARAPHRASES templates too
    bilingual_pairs: bool = True  # train the en-zh name-pair sentences
    train_fraction: float = 1.0  # share of facts trained; the rest is held out
    vocab_size: int | None = None  # tokenizer vocabulary cap; None: every word whole
    max_length: int = 64         # position embeddings; a longer sentence is an error
    mlm_probability: float = 0.0  # masked only: random masking of non-object tokens
    causal_loss: str = "object"  # causal only: "object" tokens or "all" tokens

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.causal_loss not in ("object", "all"):
            raise ValueError(f"causal_loss must be 'object' or 'all', got {self.causal_loss!r}")
        if not 0.0 <= self.mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in [0, 1), got {self.mlm_probability}")
        for name in ("layers", "hidden", "ffn", "heads", "epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, values: dict | None) -> ToyConfig:
        """A config from plain values (e.g. Snakemake params); unknown keys are an error."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ToyConfig keys: {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainingSentence:
    """One training sentence; ``text[object_start:object_end]`` is its object."""

    text: str
    kind: str               # "template", "paraphrase" or "pairing"
    lang: str               # language of the sentence frame ("en", "zh")
    relation: str | None    # fact relation; None for a pairing sentence
    uuid: str | None        # fact uuid; None for a pairing sentence
    object_start: int       # character offsets of the object in text
    object_end: int

    @property
    def object(self) -> str:
        return self.text[self.object_start:self.object_end]


# --------------------------------------------------------------------------- sentences


def fill_template(template: str, subject: str, obj: str) -> tuple[str, int, int]:
    """``template`` with [X] -> subject and [Y] -> obj; returns (text, object start, end)."""
    if template.count("[X]") != 1 or template.count("[Y]") != 1:
        raise ValueError(f"template needs exactly one [X] and one [Y]: {template!r}")
    before, after = template.split("[Y]")
    before = before.replace("[X]", subject)
    after = after.replace("[X]", subject)
    return before + obj + after, len(before), len(before) + len(obj)


def split_facts(tables: dict[str, pd.DataFrame], train_fraction: float,
                seed: int) -> tuple[set[str], set[str]]:
    """(trained uuids, held-out uuids): a seeded split by uuid, the same in every language.

    Stratified by relation: within each relation (uuids of all languages together, sorted),
    ``round(train_fraction * n)`` uuids are trained, at least one. ``train_fraction == 1``
    trains everything.
    """
    by_relation: dict[str, set[str]] = {}
    for table in tables.values():
        for relation, uuid in zip(table["relation"], table["uuid"]):
            by_relation.setdefault(relation, set()).add(uuid)
    if train_fraction >= 1.0:
        everything = set().union(*by_relation.values()) if by_relation else set()
        return everything, set()
    rng = np.random.default_rng([seed, 7])       # a stream of its own (not model init)
    trained: set[str] = set()
    held: set[str] = set()
    for relation in sorted(by_relation):
        uuids = sorted(by_relation[relation])
        keep = max(1, round(train_fraction * len(uuids)))
        order = rng.permutation(len(uuids))
        trained.update(uuids[i] for i in order[:keep])
        held.update(uuids[i] for i in order[keep:])
    return trained, held


def training_sentences(tables: dict[str, pd.DataFrame], cfg: ToyConfig, seed: int,
                       trained_uuids: set[str] | None = None) -> list[TrainingSentence]:
    """The training sentences of a toy model, in a fixed order.

    Args:
        tables: language -> fact table (:data:`kneurons.mlama.FACT_COLUMNS`).
        cfg: uses ``paraphrases``, ``bilingual_pairs`` and ``train_fraction``.
        seed: seeds the held-out split (:func:`split_facts`) when ``trained_uuids`` is None.
        trained_uuids: the facts to train (default: the split made from ``cfg``).
    """
    if trained_uuids is None:
        trained_uuids, _ = split_facts(tables, cfg.train_fraction, seed)
    out: list[TrainingSentence] = []
    for lang in sorted(tables):
        table = tables[lang]
        for row in table.itertuples(index=False):
            if row.uuid not in trained_uuids:
                continue
            templates = [("template", row.template)]
            if cfg.paraphrases:
                templates += [("paraphrase", t)
                              for t in PARAPHRASES.get(row.relation, {}).get(lang, [])]
            for kind, template in templates:
                text, start, end = fill_template(template, row.sub_label, row.obj_label)
                out.append(TrainingSentence(text, kind, lang, row.relation, row.uuid,
                                            start, end))
    if cfg.bilingual_pairs:
        names = _entity_names(tables)
        for (lang_x, lang_y), template in sorted(PAIRING_TEMPLATES.items()):
            for uri in sorted(names):
                labels = names[uri]
                if lang_x not in labels or lang_y not in labels:
                    continue
                if labels[lang_x] == labels[lang_y]:
                    continue                    # same string in both: nothing to pair
                text, start, end = fill_template(template, labels[lang_x], labels[lang_y])
                # the frame is in the object's language (see PAIRING_TEMPLATES)
                out.append(TrainingSentence(text, "pairing", lang_y, None, None, start, end))
    return out


def _entity_names(tables: dict[str, pd.DataFrame]) -> dict[str, dict[str, str]]:
    """uri -> {lang: label} over subjects and objects (first label seen wins)."""
    names: dict[str, dict[str, str]] = {}
    for lang in sorted(tables):
        table = tables[lang]
        for uri_col, label_col in (("sub_uri", "sub_label"), ("obj_uri", "obj_label")):
            for uri, label in zip(table[uri_col], table[label_col]):
                names.setdefault(uri, {}).setdefault(lang, label)
    return names


# --------------------------------------------------------------------------- tokenizers


def build_tokenizer(texts: Iterable[str], arch: Arch, *, vocab_size: int | None = None,
                    max_length: int = 64) -> PreTrainedTokenizerFast:
    """A tokenizer whose vocabulary comes from ``texts`` only (see the module docstring).

    ``vocab_size`` caps the vocabulary; None: every word of ``texts`` is one token
    (masked: :func:`_wordpiece_vocab`; causal: BPE merges until no pair is left).
    """
    texts = list(texts)
    cap = vocab_size if vocab_size is not None else 1_000_000
    if arch == "masked":
        normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=False, lowercase=False)
        vocab = _wordpiece_vocab(texts, normalizer, pre_tokenizers.BertPreTokenizer(),
                                 vocab_size)
        tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]",
                                         continuing_subword_prefix="##",
                                         max_input_chars_per_word=100))
        tok.add_special_tokens(MASKED_SPECIAL_TOKENS)
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_length,
            padding_side="right")
    if arch == "causal":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CJK_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=cap, min_frequency=1,
                                      special_tokens=[ENDOFTEXT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token=ENDOFTEXT, bos_token=ENDOFTEXT,
            eos_token=ENDOFTEXT, pad_token=ENDOFTEXT, model_max_length=max_length,
            padding_side="right")
    raise ValueError(f"arch must be 'masked' or 'causal', got {arch!r}")


def _wordpiece_vocab(texts: list[str], normalizer, pre_tokenizer,
                     vocab_size: int | None) -> dict[str, int]:
    """A word-level WordPiece vocabulary, built deterministically.

    Ids: the special tokens, every character, every character of a longer word as a
    ``##`` continuation (both sorted), then the words of ``texts`` by falling frequency
    (ties in string order); ``vocab_size`` keeps the most frequent words. Words in the
    vocabulary are one token; any other word of known characters is split greedily
    (longest known piece first, then characters).
    ``tokenizers``' WordPieceTrainer is not used because it numbers tokens differently
    from run to run (even single-threaded), which would make the models irreproducible.
    """
    counts: dict[str, int] = {}
    for text in texts:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            counts[word] = counts.get(word, 0) + 1
    chars = sorted({c for word in counts for c in word})
    # continuations of every character seen in a longer word (never a CJK character:
    # the normalizer makes each of those a word of its own)
    inner = sorted({c for word in counts if len(word) > 1 for c in word})
    base = MASKED_SPECIAL_TOKENS + chars + ["##" + c for c in inner]
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    if vocab_size is not None:
        if vocab_size < len(base):
            raise ValueError(f"vocab_size {vocab_size} is below the {len(base)} special "
                             "tokens and characters of the training text")
        words = words[:vocab_size - len(base)]
    return {token: i for i, token in enumerate(base + words)}


# --------------------------------------------------------------------------- models


def build_model(arch: Arch, cfg: ToyConfig, tokenizer: PreTrainedTokenizerFast,
                seed: int) -> torch.nn.Module:
    """An untrained BertForMaskedLM / GPT2LMHeadModel, no dropout, initialised from ``seed``.

    The global torch RNG is left as it was.
    """
    vocab = len(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "masked":
            config = BertConfig(
                vocab_size=vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.heads, intermediate_size=cfg.ffn,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                max_position_embeddings=cfg.max_length, type_vocab_size=2,
                pad_token_id=tokenizer.pad_token_id)
            model = BertForMaskedLM(config)
        elif arch == "causal":
            eos = tokenizer.eos_token_id
            config = GPT2Config(
                vocab_size=vocab, n_positions=cfg.max_length, n_embd=cfg.hidden,
                n_layer=cfg.layers, n_head=cfg.heads, n_inner=cfg.ffn, resid_pdrop=0.0,
                embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos,
                pad_token_id=eos)
            model = GPT2LMHeadModel(config)
        else:
            raise ValueError(f"arch must be 'masked' or 'causal', got {arch!r}")
    return model


# --------------------------------------------------------------------------- training


@dataclass
class _Example:
    ids: list[int]          # token ids of the sentence (with [CLS]/[SEP] for masked)
    objects: list[int]      # positions of the object tokens in ids


def _encode_sentences(sentences: list[TrainingSentence], tokenizer, arch: Arch,
                      max_length: int) -> list[_Example]:
    enc = tokenizer([s.text for s in sentences], add_special_tokens=(arch == "masked"),
                    return_offsets_mapping=True)
    special = set(tokenizer.all_special_ids) if arch == "masked" else set()
    examples = []
    for s, ids, offsets in zip(sentences, enc["input_ids"], enc["offset_mapping"]):
        objects = [i for i, ((a, b), t) in enumerate(zip(offsets, ids))
                   if t not in special and a < s.object_end and b > s.object_start]
        if not objects:
            raise ValueError(f"object {s.object!r} has no tokens in {s.text!r}")
        if objects != list(range(objects[0], objects[-1] + 1)):
            raise ValueError(f"object {s.object!r} is not contiguous in {s.text!r}")
        if len(ids) > max_length:
            raise ValueError(f"{len(ids)} tokens > max_length {max_length}: {s.text!r}")
        examples.append(_Example(list(ids), objects))
    return examples


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def _batch_loss(model, arch: Arch, cfg: ToyConfig, batch: list[_Example], pad_id: int,
                mask_id: int | None, generator: torch.Generator) -> torch.Tensor:
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)       # [B, T]
    attn = torch.zeros((len(batch), width), dtype=torch.long)             # [B, T]
    target = torch.zeros((len(batch), width), dtype=torch.bool)           # [B, T] scored
    for b, e in enumerate(batch):
        ids[b, :len(e.ids)] = torch.tensor(e.ids)
        attn[b, :len(e.ids)] = 1
        target[b, e.objects] = True
    labels = ids.clone()
    if arch == "masked":
        if cfg.mlm_probability > 0:
            inner = attn.bool().clone()
            inner[:, 0] = False                                          # [CLS]
            inner[torch.arange(len(batch)), attn.sum(1) - 1] = False      # [SEP]
            extra = (torch.rand(ids.shape, generator=generator) < cfg.mlm_probability) & inner
            target |= extra
        inputs = ids.masked_fill(target, mask_id)
        hidden = model.bert(input_ids=inputs, attention_mask=attn).last_hidden_state  # [B,T,H]
        logits = model.cls(hidden[target])                                # [N, V]
        return torch.nn.functional.cross_entropy(logits, labels[target])
    hidden = model.transformer(input_ids=ids, attention_mask=attn).last_hidden_state  # [B,T,H]
    if cfg.causal_loss == "all":
        target = attn.bool().clone()
    target[:, 0] = False                                  # nothing predicts the first token
    source = torch.roll(target, shifts=-1, dims=1)        # position t-1 predicts token t
    logits = model.lm_head(hidden[source])                # [N, V]
    return torch.nn.functional.cross_entropy(logits, labels[target])


def train_toy_model(tables: dict[str, pd.DataFrame], arch: Arch, cfg: ToyConfig, seed: int,
                    out_dir: str | os.PathLike, *, progress: TextIO | bool | None = None,
                    log: logging.Logger | None = None) -> dict:
    """Train a toy model on the facts of ``tables`` and save it to ``out_dir``.

    ``out_dir`` gets the model (safetensors) and tokenizer via ``save_pretrained``, loadable
    offline with ``AutoModelForMaskedLM`` / ``AutoModelForCausalLM`` and ``AutoTokenizer``,
    plus :data:`TRAINING_RECORD` (the returned metrics). It is written to a temporary
    folder next to it and renamed at the end: a failure leaves nothing (an existing
    ``out_dir`` is replaced only on success).

    Args:
        tables: language -> fact table (:data:`kneurons.mlama.FACT_COLUMNS`), the same facts
            (uuids) in every language.
        arch: ``"masked"`` (BERT) or ``"causal"`` (GPT-2).
        cfg: science knobs.
        seed: seeds the held-out split, the initialisation and the data order.
        out_dir: model folder to create.
        progress: a text stream for a tqdm bar over epochs (True: stderr; None: no bar).
        log: logger for per-epoch messages (default: this module's).

    Returns:
        The metrics of :func:`fit_toy_model`.
    """
    model, tokenizer, metrics = fit_toy_model(tables, arch, cfg, seed, progress=progress,
                                              log=log)
    _save_atomically(model, tokenizer, metrics, Path(out_dir))
    return metrics


def fit_toy_model(tables: dict[str, pd.DataFrame], arch: Arch, cfg: ToyConfig, seed: int, *,
                  progress: TextIO | bool | None = None, log: logging.Logger | None = None
                  ) -> tuple[torch.nn.Module, PreTrainedTokenizerFast, dict]:
    """Train a toy model in memory (see :func:`train_toy_model`, which also saves it).

    Returns:
        ``(model, tokenizer, metrics)``; the model is in eval mode. ``metrics`` is a
        JSON-able dict: ``arch, seed, toy_version, config, params, vocab_size, epochs,
        steps, n_sentences, n_sentences_by_kind, n_train_facts, n_heldout_facts``,
        ``final_loss`` (mean loss of the last epoch), ``loss_by_epoch``,
        ``accuracy`` {lang: top-1 on the trained facts' template queries},
        ``heldout_accuracy`` {lang: ...} (only when facts are held out),
        ``heldout_uuids`` (sorted), ``train_seconds`` (wall time to the end of training)
        and ``seconds`` (including the evaluation).
    """
    logger = log or logging.getLogger(__name__)
    start = time.perf_counter()
    if arch not in ("masked", "causal"):
        raise ValueError(f"arch must be 'masked' or 'causal', got {arch!r}")
    trained, held = split_facts(tables, cfg.train_fraction, seed)
    sentences = training_sentences(tables, cfg, seed, trained_uuids=trained)
    tokenizer = build_tokenizer(_tokenizer_texts(tables, sentences), arch,
                                vocab_size=cfg.vocab_size, max_length=cfg.max_length)
    model = build_model(arch, cfg, tokenizer, seed)
    examples = _encode_sentences(sentences, tokenizer, arch, cfg.max_length)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("toy %s: %d sentences, %d trained facts, %d held out, vocab %d, %d params",
                arch, len(sentences), len(trained), len(held), len(tokenizer), n_params)

    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  _lr_lambda(cfg.warmup_steps, total))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.epochs, desc=f"train {arch}", unit="epoch",
                   file=None if progress is True else progress)
    losses: list[float] = []
    model.train()
    with _flush_denormal():
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(examples), generator=generator).tolist()
            epoch_loss = 0.0
            for i in range(0, len(order), cfg.batch_size):
                batch = [examples[j] for j in order[i:i + cfg.batch_size]]
                loss = _batch_loss(model, arch, cfg, batch, tokenizer.pad_token_id,
                                   tokenizer.mask_token_id, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                epoch_loss += loss.item() * len(batch)
            losses.append(epoch_loss / len(examples))
            logger.info("toy %s epoch %d/%d: loss %.4f", arch, epoch + 1, cfg.epochs, losses[-1])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if bar is not None:
            bar.close()
    train_seconds = time.perf_counter() - start
    model.eval()

    accuracy = {lang: fact_accuracy(model, tokenizer, arch, table[table.uuid.isin(trained)])
                for lang, table in sorted(tables.items())}
    metrics: dict = {
        "arch": arch, "seed": seed, "toy_version": TOY_VERSION, "config": cfg.to_dict(),
        "params": n_params, "vocab_size": len(tokenizer), "epochs": cfg.epochs,
        "steps": total, "n_sentences": len(sentences),
        "n_sentences_by_kind": _count_kinds(sentences),
        "n_train_facts": len(trained), "n_heldout_facts": len(held),
        "final_loss": losses[-1] if losses else None, "loss_by_epoch": losses,
        "accuracy": accuracy, "train_seconds": train_seconds,
    }
    if held:
        metrics["heldout_accuracy"] = {
            lang: fact_accuracy(model, tokenizer, arch, table[table.uuid.isin(held)])
            for lang, table in sorted(tables.items())}
    metrics["heldout_uuids"] = sorted(held)
    metrics["seconds"] = time.perf_counter() - start
    logger.info("toy %s: accuracy %s in %.1f s", arch, accuracy, metrics["seconds"])
    return model, tokenizer, metrics


@contextlib.contextmanager
def _flush_denormal():
    """Flush denormal floats to zero while training (turned off again afterwards).

    Late in training AdamW's state and some gradients of these tiny models become denormal,
    and CPU arithmetic on denormals is very slow: measured 5 to 30 times slower runs. Flushing
    changes results only below 1e-38 and is deterministic.
    """
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)


def _tokenizer_texts(tables: dict[str, pd.DataFrame],
                     sentences: list[TrainingSentence]) -> list[str]:
    """Training sentences plus the held-out facts' labels, so that every query of the
    tables tokenizes into known tokens (a held-out fact is unknown, not untokenizable)."""
    texts = [s.text for s in sentences]
    for table in tables.values():
        texts += [t.replace("[X]", " ").replace("[Y]", " ") for t in table.template.unique()]
        texts += list(table.sub_label.unique()) + list(table.obj_label.unique())
    return texts


def _count_kinds(sentences: list[TrainingSentence]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in sentences:
        counts[s.kind] = counts.get(s.kind, 0) + 1
    return counts


def _save_atomically(model, tokenizer, metrics: dict, out_dir: Path) -> None:
    """save_pretrained into a temp folder next to ``out_dir``, then rename it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / TRAINING_RECORD).write_text(
            json.dumps(metrics, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
            encoding="utf-8")
        _default_modes(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old",
                                        dir=out_dir.parent))
            os.replace(out_dir, old / "model")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _default_modes(folder: Path) -> None:
    """Give ``folder`` and its files the modes a plain mkdir/open would (mkdtemp and some
    writers use 0700/0600, which would hide the model from other users of a shared
    results folder)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def fact_accuracy(model, tokenizer, arch: Arch, facts: pd.DataFrame,
                  batch_size: int = 256) -> float | None:
    """Top-1 accuracy on the template queries of ``facts`` (None when there are none)."""
    correct = fact_correct(model, tokenizer, arch, facts, batch_size=batch_size)
    return float(np.mean(correct)) if len(correct) else None


@torch.no_grad()
def fact_correct(model, tokenizer, arch: Arch, facts: pd.DataFrame,
                 batch_size: int = 256) -> list[bool]:
    """For each row of ``facts``: is the model's top-1 answer to its template query right.

    Exactly as the attribution engine asks and judges (``Attribution.predicted``): the query
    is :func:`kneurons.queries.encode_query` of (template, sub_label, obj_label) and the
    answer is right when the argmax at every target position is the target token. Batches
    are right-padded, so the absolute positions of real tokens do not change.
    """
    was_training = model.training
    lm = wrap_model(model, tokenizer, arch)          # eval mode, on the CPU
    queries = [encode_query(lm, row.template, row.sub_label, row.obj_label)
               for row in facts.itertuples(index=False)]
    out: list[bool] = []
    for i in range(0, len(queries), batch_size):
        chunk = queries[i:i + batch_size]
        ids, attn = pad_queries(lm, chunk)                               # [B, T] each
        pred = model(input_ids=ids, attention_mask=attn).logits.argmax(-1)  # [B, T]
        for b, q in enumerate(chunk):
            out.append(bool((pred[b, q.target_positions] == torch.tensor(q.target_ids)).all()))
    model.train(was_training)
    return out
