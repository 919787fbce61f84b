"""Turn an mLAMA fact (template, subject, object) into model inputs.

Conventions (both kinds):

* ``[X]`` is replaced by the subject; the text before ``[Y]`` is the *prefix*, after it the
  *suffix*.
* The object is tokenized as it appears in the sentence: with a leading space when the prefix
  ends with whitespace (English ``"... is [Y] ."`` -> ``" Dodoma"``, which matters for
  byte-level BPE), without one otherwise (Chinese ``"[X]的官方语言是[Y]。"``, or ``[Y]`` first).
  The object's ids are those that the tokenizer gives the whole ``prefix + object`` text after
  the prefix's own ids; when the tokenizer merges across that boundary (e.g. byte-level BPE on
  CJK text without spaces) the object is tokenized on its own instead.
* Masked LMs: ``[Y]`` becomes as many mask tokens as the object has tokens; the suffix is part
  of the query. Each object token is predicted at its own mask position.
* Causal LMs: the query is the prefix only; the text after ``[Y]`` is ignored (a left-to-right
  model cannot see it before predicting the object). The object's tokens are scored one by
  one with teacher forcing: the input is ``prefix + object[:-1]`` and object token ``t`` is
  predicted at the position just before it. An empty prefix (``[Y]`` first) gets the
  tokenizer's bos token (eos when there is none) as a start token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .models import LanguageModel


@dataclass
class EncodedQuery:
    """One fact as token ids (positions are 0-based indices into ``input_ids``)."""

    input_ids: list[int]          # full model input incl. special tokens
    target_ids: list[int]         # the object's tokens
    target_positions: list[int]   # per object token: position whose output predicts it
    query_positions: list[int]    # prompt tokens (no specials, no mask/object tokens)

    def __post_init__(self) -> None:
        if not self.target_ids:
            raise ValueError("empty object: it has no tokens")
        if len(self.target_ids) != len(self.target_positions):
            raise ValueError("target_ids and target_positions differ in length")
        n = len(self.input_ids)
        for p in (*self.target_positions, *self.query_positions):
            if not 0 <= p < n:
                raise ValueError(f"position {p} outside the input of length {n}")


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"]) if text else []


def _object_ids(tok, prefix: str, obj: str) -> list[int]:
    """Ids of ``obj`` as it follows ``prefix`` (see module docstring)."""
    pre = _ids(tok, prefix)
    full = _ids(tok, prefix + obj)
    if full[: len(pre)] == pre and len(full) > len(pre):
        return full[len(pre):]
    return _ids(tok, obj)


def _split(template: str, subject: str) -> tuple[str, str, bool]:
    """Return (prefix without trailing space, suffix, whether a space precedes the object)."""
    if template.count("[Y]") != 1:
        raise ValueError(f"template must contain [Y] exactly once: {template!r}")
    text = template.replace("[X]", subject)
    prefix, suffix = text.split("[Y]")
    core = prefix.rstrip()
    space = len(core) < len(prefix)
    return core, suffix, space


def _encode_split(lm: LanguageModel, prefix: str, suffix: str, space: bool,
                  target: str) -> EncodedQuery:
    tok = lm.tokenizer
    obj = (" " if space and prefix else "") + target.strip()
    if not target.strip():
        raise ValueError("empty target")
    target_ids = _object_ids(tok, prefix, obj)
    if not target_ids:
        raise ValueError(f"target {target!r} has no tokens")
    if lm.arch == "masked":
        mask = tok.mask_token
        if mask is None:
            raise ValueError("the tokenizer has no mask token")
        text = prefix + (" " if space and prefix else "") + mask * len(target_ids) + suffix
        enc = tok(text, add_special_tokens=True, return_special_tokens_mask=True)
        ids = list(enc["input_ids"])
        special = list(enc["special_tokens_mask"])
        first = ids.index(tok.mask_token_id) if tok.mask_token_id in ids else -1
        if first > 0 and not special[first - 1] and not tok.decode([ids[first - 1]]).strip():
            # a mask token without lstrip leaves the space as its own token (byte-level BPE
            # "Ġ"); the object's tokens already carry it, so drop it
            del ids[first - 1], special[first - 1]
        mask_pos = [i for i, t in enumerate(ids) if t == tok.mask_token_id]
        if len(mask_pos) != len(target_ids) or (
                mask_pos and mask_pos[-1] - mask_pos[0] != len(mask_pos) - 1):
            raise ValueError(
                f"could not place {len(target_ids)} contiguous mask tokens in {text!r}")
        query = [i for i, (t, s) in enumerate(zip(ids, special))
                 if not s and t != tok.mask_token_id]
        return EncodedQuery(ids, target_ids, mask_pos, query)
    # causal
    if prefix:
        enc = tok(prefix, add_special_tokens=True, return_special_tokens_mask=True)
        ids = list(enc["input_ids"])
        special = list(enc["special_tokens_mask"])
    else:
        ids, special = [], []
    if not ids:
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise ValueError("object comes first but the tokenizer has no bos/eos start token")
        ids, special = [int(start)], [1]
    query = [i for i, s in enumerate(special) if not s]
    n = len(ids)
    input_ids = ids + target_ids[:-1]
    positions = [n - 1 + t for t in range(len(target_ids))]
    return EncodedQuery(input_ids, target_ids, positions, query)


def encode_query(lm: LanguageModel, template: str, subject: str, target: str) -> EncodedQuery:
    """Encode an mLAMA fact: ``template`` with ``[X]`` (subject) and ``[Y]`` (object)."""
    prefix, suffix, space = _split(template, subject)
    return _encode_split(lm, prefix, suffix, space, target)


def encode_prompt(lm: LanguageModel, prompt: str, target: str,
                  marker: str = "[MASK]") -> EncodedQuery:
    """Encode a free prompt whose object slot is ``marker`` (for both LM kinds)."""
    if prompt.count(marker) != 1:
        raise ValueError(f"prompt must contain the marker {marker!r} exactly once: {prompt!r}")
    prefix, suffix = prompt.split(marker)
    core = prefix.rstrip()
    return _encode_split(lm, core, suffix, len(core) < len(prefix), target)


def pad_queries(lm: LanguageModel, queries: Sequence[EncodedQuery]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask [n_queries, longest] on ``lm.device``, right-padded so
    that the absolute positions of real tokens do not change."""
    tok = lm.tokenizer
    pad_id = next((int(t) for t in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id)
                   if t is not None), 0)
    width = max(len(q.input_ids) for q in queries)
    ids = torch.full((len(queries), width), pad_id, dtype=torch.long)  # [G, S]
    mask = torch.zeros((len(queries), width), dtype=torch.long)  # [G, S]
    for i, q in enumerate(queries):
        ids[i, : len(q.input_ids)] = torch.as_tensor(q.input_ids)
        mask[i, : len(q.input_ids)] = 1
    return ids.to(lm.device), mask.to(lm.device)
