"""encode_query / encode_prompt for masked and causal LMs (en, zh, multi-token, [Y] first)."""

from __future__ import annotations

import pytest

from kneurons.queries import EncodedQuery, encode_prompt, encode_query

EN = "The capital of [X] is [Y] ."
ZH = "[X]的官方语言是[Y]。"


def toks(lm, ids):
    return lm.tokenizer.convert_ids_to_tokens(ids)


def test_masked_single_token(tiny_bert):
    q = encode_query(tiny_bert, EN, "Tanzania", "Dodoma")
    assert toks(tiny_bert, q.input_ids) == [
        "[CLS]", "the", "capital", "of", "tanzania", "is", "[MASK]", ".", "[SEP]"]
    assert toks(tiny_bert, q.target_ids) == ["dodoma"]
    assert q.target_positions == [6]
    assert q.query_positions == [1, 2, 3, 4, 5, 7]  # suffix "." included, no specials/mask


def test_masked_multi_token(tiny_bert):
    q = encode_query(tiny_bert, "[X] is located in [Y] .", "Tanzania", "Kilimanjaro")
    assert toks(tiny_bert, q.target_ids) == ["kili", "##man", "##jaro"]
    assert q.target_positions == [5, 6, 7]
    assert [q.input_ids[p] for p in q.target_positions] == [tiny_bert.tokenizer.mask_token_id] * 3
    assert q.query_positions == [1, 2, 3, 4, 8]


def test_masked_zh(tiny_bert):
    q = encode_query(tiny_bert, ZH, "坦桑尼亚", "斯瓦希里语")
    assert toks(tiny_bert, q.target_ids) == list("斯瓦希里语")
    assert toks(tiny_bert, q.input_ids[1:11]) == list("坦桑尼亚的官方语言是")
    assert q.target_positions == list(range(11, 16))
    assert q.query_positions == list(range(1, 11)) + [16]


def test_masked_object_first(tiny_bert):
    q = encode_query(tiny_bert, "[Y] is the capital of [X] .", "Tanzania", "Dodoma")
    assert q.target_positions == [1]
    assert toks(tiny_bert, q.input_ids)[:3] == ["[CLS]", "[MASK]", "is"]
    assert 1 not in q.query_positions and 0 not in q.query_positions


def test_masked_bpe_object_has_leading_space(tiny_roberta):
    tok = tiny_roberta.tokenizer
    q = encode_query(tiny_roberta, EN, "Tanzania", "Dodoma")
    assert tok.decode(q.target_ids) == " Dodoma"
    assert all(q.input_ids[p] == tok.mask_token_id for p in q.target_positions)
    # <mask> absorbs the space: the token before the masks is " is"
    assert tok.convert_ids_to_tokens(q.input_ids[q.target_positions[0] - 1]) == "Ġis"
    qf = encode_query(tiny_roberta, "[Y] is the capital of [X] .", "Tanzania", "Dodoma")
    assert tok.decode(qf.target_ids) == "Dodoma"  # sentence start: no space


def test_causal_teacher_forcing_and_leading_space(tiny_gpt2):
    tok = tiny_gpt2.tokenizer
    q = encode_query(tiny_gpt2, EN, "Tanzania", "Dodoma")
    prefix = tok("The capital of Tanzania is")["input_ids"]
    assert q.target_ids == tok(" Dodoma")["input_ids"]
    assert len(q.target_ids) > 1
    assert q.input_ids == prefix + q.target_ids[:-1]
    assert q.target_positions == [len(prefix) - 1 + t for t in range(len(q.target_ids))]
    for t in range(len(q.target_ids) - 1):  # teacher forcing: token t is fed after its slot
        assert q.input_ids[q.target_positions[t] + 1] == q.target_ids[t]
    assert q.query_positions == list(range(len(prefix)))


def test_causal_zh_has_no_space(tiny_gpt2):
    tok = tiny_gpt2.tokenizer
    q = encode_query(tiny_gpt2, ZH, "坦桑尼亚", "斯瓦希里语")
    assert tok.decode(q.target_ids) == "斯瓦希里语"
    assert tok.decode(q.input_ids[: len(q.query_positions)]) == "坦桑尼亚的官方语言是"


def test_causal_object_first_uses_start_token(tiny_gpt2):
    tok = tiny_gpt2.tokenizer
    q = encode_query(tiny_gpt2, "[Y] is the capital of [X] .", "Tanzania", "Dodoma")
    assert q.input_ids[0] == tok.eos_token_id  # bos == eos == <|endoftext|>
    assert q.target_positions[0] == 0 and q.query_positions == []
    assert tok.decode(q.target_ids) == "Dodoma"
    assert len(q.input_ids) == len(q.target_ids)  # text after [Y] ignored


def test_encode_prompt_equals_encode_query(tiny_bert, tiny_gpt2):
    for lm in (tiny_bert, tiny_gpt2):
        a = encode_prompt(lm, "The capital of Tanzania is [MASK] .", "Dodoma")
        b = encode_query(lm, EN, "Tanzania", "Dodoma")
        assert a == b
        c = encode_prompt(lm, "The capital of Tanzania is <obj> .", "Dodoma", marker="<obj>")
        assert c == b


def test_bad_inputs(tiny_bert):
    with pytest.raises(ValueError, match=r"\[Y\]"):
        encode_query(tiny_bert, "The capital of [X] .", "Tanzania", "Dodoma")
    with pytest.raises(ValueError, match="marker"):
        encode_prompt(tiny_bert, "The capital of Tanzania is .", "Dodoma")
    with pytest.raises(ValueError, match="empty"):
        encode_query(tiny_bert, EN, "Tanzania", "  ")
    with pytest.raises(ValueError, match="outside"):
        EncodedQuery([1, 2], [3], [5], [0])
