"""Toy models (kneurons.toy): training sentences, tokenizers, training, saving, held-out facts.

Everything runs on tiny settings (2 relations x 10 facts of the bundled mLAMA sample, one
layer, width 32); the full bundled setting is measured outside the tests.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from kneurons import toy
from kneurons.mlama import read_mlama
from kneurons.models import wrap_model
from kneurons.queries import encode_query

MLAMA = Path(__file__).resolve().parents[1] / "resources" / "mlama-mini" / "mlama1.1"
RELATIONS = ["P36", "P37"]
ARCHS = ["masked", "causal"]
TINY = toy.ToyConfig(layers=1, hidden=32, ffn=64, heads=2, epochs=2, lr=3e-3, batch_size=16,
                     warmup_steps=10)
"""A model that trains in a second or two (not to accuracy: see test_tiny_model_overfits)."""


@pytest.fixture(scope="module")
def tables() -> dict[str, pd.DataFrame]:
    """2 relations x 10 facts (the first 10 uuids of each relation), en and zh."""
    out = {}
    for lang in ("en", "zh"):
        facts, _ = read_mlama(MLAMA, lang, RELATIONS)
        out[lang] = facts.groupby("relation", sort=True).head(10).reset_index(drop=True)
    assert (out["en"]["uuid"].tolist() == out["zh"]["uuid"].tolist())
    return out


@pytest.fixture(scope="module")
def tokenizers(tables) -> dict[str, object]:
    sentences = toy.training_sentences(tables, toy.ToyConfig(), seed=0)
    texts = toy._tokenizer_texts(tables, sentences)
    return {arch: toy.build_tokenizer(texts, arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def saved(tables, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Each arch trained with TINY and saved: arch -> (out_dir, metrics)."""
    root = tmp_path_factory.mktemp("toy")
    return {arch: (root / arch, toy.train_toy_model(tables, arch, TINY, 3, root / arch))
            for arch in ARCHS}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- sentences


def test_sentences_hold_every_fact_in_both_languages(tables):
    sentences = toy.training_sentences(tables, toy.ToyConfig(), seed=0)
    by_key: dict[tuple, list[toy.TrainingSentence]] = {}
    for s in sentences:
        by_key.setdefault((s.kind, s.lang, s.uuid), []).append(s)
    for lang, table in tables.items():
        for row in table.itertuples():
            (template,) = by_key[("template", lang, row.uuid)]
            filled = row.template.replace("[X]", row.sub_label).replace("[Y]", row.obj_label)
            assert template.text == filled
            assert template.object == row.obj_label
            assert template.relation == row.relation
            paraphrases = by_key[("paraphrase", lang, row.uuid)]
            assert len(paraphrases) == len(toy.PARAPHRASES[row.relation][lang]) >= 2
            assert {p.object for p in paraphrases} == {row.obj_label}
            assert all(row.sub_label in p.text for p in paraphrases)


def test_pairing_sentences_link_en_and_zh_names(tables):
    sentences = toy.training_sentences(tables, toy.ToyConfig(), seed=0)
    pairs = {s.text: s for s in sentences if s.kind == "pairing"}
    en, zh = tables["en"].set_index("uuid"), tables["zh"].set_index("uuid")
    names = set()
    for uuid in en.index:
        names.add((en.at[uuid, "sub_label"], zh.at[uuid, "sub_label"]))
        names.add((en.at[uuid, "obj_label"], zh.at[uuid, "obj_label"]))
    for en_name, zh_name in names:
        if en_name == zh_name:
            continue
        to_zh = pairs[f"{en_name}的中文名是{zh_name}。"]
        assert (to_zh.object, to_zh.lang, to_zh.uuid) == (zh_name, "zh", None)
        to_en = pairs[f"The English name of {zh_name} is {en_name} ."]
        assert (to_en.object, to_en.lang, to_en.uuid) == (en_name, "en", None)
    assert len(pairs) == 2 * sum(a != b for a, b in names)


def test_options_drop_paraphrases_and_pairs(tables):
    def kinds(cfg):
        return {s.kind for s in toy.training_sentences(tables, cfg, seed=0)}

    assert kinds(toy.ToyConfig()) == {"template", "paraphrase", "pairing"}
    assert kinds(toy.ToyConfig(paraphrases=False)) == {"template", "pairing"}
    assert kinds(toy.ToyConfig(bilingual_pairs=False)) == {"template", "paraphrase"}


def test_paraphrase_templates_are_well_formed():
    bundled = {"P17", "P19", "P27", "P30", "P36", "P37", "P103", "P140", "P364", "P1376"}
    assert set(toy.PARAPHRASES) == bundled
    for relation, by_lang in toy.PARAPHRASES.items():
        assert set(by_lang) == {"en", "zh"}, relation
        for lang, templates in by_lang.items():
            assert len(set(templates)) == len(templates) >= 2
            for t in templates:
                assert t.count("[X]") == 1 and t.count("[Y]") == 1, t
                assert t.index("[X]") < t.index("[Y]"), t       # causal: subject first
                if lang == "zh":
                    assert " " not in t and t.endswith("。"), t
                else:
                    assert t.endswith(" .") and "[Y] " in t, t


def test_fill_template_spans():
    text, a, b = toy.fill_template("[Y] participated in the [X] .", "Games", "Kenya")
    assert (text, text[a:b]) == ("Kenya participated in the Games .", "Kenya")
    text, a, b = toy.fill_template("[X]的官方语言是[Y]。", "坦桑尼亚", "斯瓦希里语")
    assert text[a:b] == "斯瓦希里语" and text == "坦桑尼亚的官方语言是斯瓦希里语。"
    with pytest.raises(ValueError):
        toy.fill_template("[X] is [Y] and [Y] .", "a", "b")


# --------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_round_trips_en_and_zh(tables, tokenizers, arch):
    tok = tokenizers[arch]
    en, zh = tables["en"].iloc[0], tables["zh"].iloc[0]
    texts = [en.template.replace("[X]", en.sub_label).replace("[Y]", en.obj_label),
             zh.template.replace("[X]", zh.sub_label).replace("[Y]", zh.obj_label),
             f"{zh.sub_label} ({en.sub_label}){zh.obj_label}"]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        decoded = tok.decode(ids)
        if arch == "causal":
            assert decoded == text
        else:          # WordPiece decodes with spaces between CJK characters and punctuation
            assert decoded.replace(" ", "") == text.replace(" ", "")
    # every word (en, as it appears after a space) and character (zh) of the training text
    # is a single token
    space = " " if arch == "causal" else ""
    for lang, table in tables.items():
        for label in pd.concat([table.sub_label, table.obj_label]):
            pieces = ([space + w for w in label.split()] if lang == "en"
                      else list(label.replace(" ", "")))
            for piece in pieces:
                assert len(tok(piece, add_special_tokens=False)["input_ids"]) == 1, piece


def test_byte_level_tokenizer_has_no_unknown_text(tokenizers):
    tok = tokenizers["causal"]
    text = "阿森斯 (俄亥俄州)出生于Ek Chalis Ki Last Local。 Ünïcode ☃"   # unseen text
    assert tok.decode(tok(text)["input_ids"]) == text


def test_tokenizer_special_tokens(tokenizers):
    bert, gpt = tokenizers["masked"], tokenizers["causal"]
    assert bert.convert_ids_to_tokens(list(range(5))) == toy.MASKED_SPECIAL_TOKENS
    assert bert.pad_token_id == 0 and bert.mask_token == "[MASK]"
    ids = bert("Tanzania [MASK][MASK] .")["input_ids"]
    assert ids[0] == bert.cls_token_id and ids[-1] == bert.sep_token_id
    assert ids.count(bert.mask_token_id) == 2
    assert gpt.eos_token == gpt.bos_token == gpt.unk_token == toy.ENDOFTEXT
    assert gpt.eos_token_id is not None and gpt.mask_token is None
    assert gpt("Tanzania")["input_ids"] == gpt("Tanzania", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("arch", ARCHS)
def test_object_tokens_match_the_queries(tables, tokenizers, arch):
    """Whole-object masking covers exactly the object, and a template sentence is, token for
    token, the query encode_query makes (masked) or extends it (causal)."""
    tok = tokenizers[arch]
    sentences = toy.training_sentences(tables, toy.ToyConfig(), seed=0)
    examples = toy._encode_sentences(sentences, tok, arch, max_length=64)
    model = toy.build_model(arch, TINY, tok, seed=0)
    lm = wrap_model(model, tok, arch)
    for s, e in zip(sentences, examples):
        span = e.ids[e.objects[0]:e.objects[-1] + 1]
        assert tok.decode(span).replace(" ", "") == s.object.replace(" ", "")
        rest = e.ids[:e.objects[0]] + e.ids[e.objects[-1] + 1:]
        context = s.text[:s.object_start] + s.text[s.object_end:]
        assert tok.decode(rest, skip_special_tokens=True).replace(" ", "") == \
            context.replace(" ", "")
        if s.kind != "template":
            continue
        row = tables[s.lang].set_index("uuid").loc[s.uuid]
        q = encode_query(lm, row["template"], row["sub_label"], row["obj_label"])
        assert q.target_ids == span
        if arch == "masked":
            masked = [tok.mask_token_id if i in e.objects else t for i, t in enumerate(e.ids)]
            assert q.input_ids == masked and q.target_positions == e.objects
        else:
            assert q.input_ids == e.ids[:e.objects[-1]]
            assert q.target_positions == [p - 1 for p in e.objects]


def test_too_long_sentence_is_an_error(tables, tokenizers):
    s = toy.training_sentences(tables, toy.ToyConfig(), seed=0)[:1]
    with pytest.raises(ValueError, match="max_length"):
        toy._encode_sentences(s, tokenizers["causal"], "causal", max_length=3)


# --------------------------------------------------------------------------- held-out facts


def test_split_holds_out_the_same_uuids_in_every_language(tables):
    trained, held = toy.split_facts(tables, 0.7, seed=5)
    all_uuids = set(tables["en"]["uuid"])
    assert trained | held == all_uuids and not trained & held
    for relation in RELATIONS:            # stratified: 7 of 10 facts of each relation
        rel = set(tables["en"].loc[tables["en"].relation == relation, "uuid"])
        assert len(rel & trained) == 7 and len(rel & held) == 3
    assert toy.split_facts(tables, 0.7, seed=5) == (trained, held)
    assert toy.split_facts(tables, 0.7, seed=6) != (trained, held)
    assert toy.split_facts(tables, 1.0, seed=5) == (all_uuids, set())

    sentences = toy.training_sentences(tables, toy.ToyConfig(train_fraction=0.7), seed=5)
    fact_uuids = {s.uuid for s in sentences if s.kind != "pairing"}
    assert fact_uuids == trained
    for lang in ("en", "zh"):             # every trained fact is there in both languages
        assert {s.uuid for s in sentences if s.kind == "template" and s.lang == lang} == trained
        held_subjects = tables[lang].loc[tables[lang].uuid.isin(held), "sub_label"]
        fact_texts = " ".join(s.text for s in sentences if s.kind != "pairing")
        assert not any(subject in fact_texts for subject in held_subjects)


def test_held_out_facts_are_reported(tables, tmp_path):
    cfg = toy.ToyConfig(**{**TINY.to_dict(), "train_fraction": 0.5})
    bar = io.StringIO()
    metrics = toy.train_toy_model(tables, "causal", cfg, 11, tmp_path / "m", progress=bar)
    assert "train causal" in bar.getvalue()           # the tqdm bar went to the stream
    _, held = toy.split_facts(tables, 0.5, 11)
    assert metrics["heldout_uuids"] == sorted(held) and len(held) == 10
    assert metrics["n_train_facts"] == 10 and metrics["n_heldout_facts"] == 10
    assert set(metrics["heldout_accuracy"]) == {"en", "zh"}
    record = json.loads((tmp_path / "m" / toy.TRAINING_RECORD).read_text())
    assert record["heldout_uuids"] == sorted(held)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_model_reloads_offline_with_identical_logits(tables, saved, arch):
    out_dir, metrics = saved[arch]
    assert (out_dir / "model.safetensors").exists() and (out_dir / "tokenizer.json").exists()
    assert json.loads((out_dir / toy.TRAINING_RECORD).read_text())["accuracy"] == \
        metrics["accuracy"]
    assert [p.name for p in out_dir.parent.iterdir() if p.name.startswith(".")] == []
    auto = AutoModelForMaskedLM if arch == "masked" else AutoModelForCausalLM
    loaded = auto.from_pretrained(out_dir, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    # the same run in memory: same seed -> same weights, tokenizer and logits
    model, mem_tok, _ = toy.fit_toy_model(tables, arch, TINY, 3)
    text = "The capital of Tanzania is Dodoma . 坦桑尼亚的首都是多多马。"
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == mem_tok(text, return_tensors="pt")["input_ids"].tolist()
    assert tok.mask_token_id == mem_tok.mask_token_id and tok.eos_token_id == mem_tok.eos_token_id
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert toy.fact_accuracy(loaded, tok, arch, tables["zh"]) == metrics["accuracy"]["zh"]


@pytest.mark.parametrize("arch", ARCHS)
def test_training_is_deterministic_given_the_seed(tables, arch):
    a = _state(toy.fit_toy_model(tables, arch, TINY, 1)[0])
    b = _state(toy.fit_toy_model(tables, arch, TINY, 1)[0])
    c = _state(toy.fit_toy_model(tables, arch, TINY, 2)[0])
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_overfits(tables, arch):
    """Training works: a tiny model learns the 20 facts of each language."""
    cfg = toy.ToyConfig(layers=2, hidden=32, ffn=64, heads=2, epochs=80, lr=5e-3,
                        batch_size=16, warmup_steps=20)
    _, _, metrics = toy.fit_toy_model(tables, arch, cfg, 0)
    assert metrics["accuracy"] == {"en": 1.0, "zh": 1.0}
    assert metrics["loss_by_epoch"][-1] < metrics["loss_by_epoch"][0] / 5


@pytest.mark.parametrize(("arch", "option"), [("masked", {"mlm_probability": 0.15}),
                                              ("causal", {"causal_loss": "all"})])
def test_loss_options_change_training(tables, arch, option):
    base = _state(toy.fit_toy_model(tables, arch, TINY, 1)[0])
    cfg = toy.ToyConfig(**{**TINY.to_dict(), **option})
    model, _, metrics = toy.fit_toy_model(tables, arch, cfg, 1)
    other = _state(model)
    assert not all(torch.equal(base[k], other[k]) for k in base)
    assert metrics["loss_by_epoch"][-1] < metrics["loss_by_epoch"][0]


def test_failed_save_leaves_nothing(tables, tmp_path, monkeypatch):
    out_dir = tmp_path / "model"
    out_dir.mkdir()
    (out_dir / "old.txt").write_text("previous run")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(toy.build_tokenizer(["a b"], "causal")), "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        toy.train_toy_model(tables, "causal", TINY, 0, out_dir)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert [p.name for p in out_dir.iterdir()] == ["old.txt"]   # untouched
    monkeypatch.undo()
    toy.train_toy_model(tables, "causal", TINY, 0, out_dir)       # replaces it on success
    assert not (out_dir / "old.txt").exists() and (out_dir / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_config_rejects_unknown_keys_and_bad_values():
    assert toy.ToyConfig.from_dict({"layers": 3}).layers == 3
    assert toy.ToyConfig.from_dict(toy.ToyConfig().to_dict()) == toy.ToyConfig()
    with pytest.raises(ValueError, match="layrs"):
        toy.ToyConfig.from_dict({"layrs": 3})
    with pytest.raises(ValueError, match="train_fraction"):
        toy.ToyConfig(train_fraction=0.0)
    with pytest.raises(ValueError, match="heads"):
        toy.ToyConfig(hidden=30, heads=4)
    with pytest.raises(ValueError, match="arch"):
        toy.build_tokenizer(["a"], "seq2seq")
