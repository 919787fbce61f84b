"""Tests of kneurons.mlama: reading mLAMA 1.1 (folder or zip) into one fact table per language."""

from __future__ import annotations

import json
import re
import sys
import types
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from kneurons.facts import PARTS, corrupt_facts, corruption_report, discovery_count, split_facts
from kneurons.mlama import (DROP_REASONS, FACT_COLUMNS, MlamaDropError, MlamaFormatError,
                            check_dropped_relations, read_mlama, relation_differences,
                            verify_sha256)

REPO = Path(__file__).resolve().parent.parent
MINI = REPO / "resources" / "mlama-mini"
FULL = REPO.parent / "shared" / "data" / "mlama-en-zh" / "mlama1.1"
MINI_RELATIONS = sorted(["P17", "P19", "P27", "P30", "P36", "P37", "P103", "P140", "P364",
                         "P1376"])
CJK = re.compile(r"[\u4e00-\u9fff]")


# --- helpers -------------------------------------------------------------------------------

def fact(n: int, uuid: str | None = None, **overrides) -> dict:
    """The ``n``-th made-up T-REx style fact line (keys in the real T-REx order)."""
    line = {"sub_uri": f"Q{100 + n}", "obj_uri": f"Q{900 + n % 3}",
            "obj_label": f"Object {n % 3}", "sub_label": f"Subject {n}",
            "lineid": n, "uuid": uuid or f"uuid-{n}"}
    line.update(overrides)
    return line


def write_lang(root: Path, lang: str, templates: dict[str, str],
               files: dict[str, list | str | bytes]) -> Path:
    """Write ``root/mlama1.1/<lang>/``: templates and fact files (lists of dicts -> JSONL
    with a final newline; str/bytes written as is). Returns ``root``."""
    folder = root / "mlama1.1" / lang
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "templates.jsonl").write_text(
        "".join(json.dumps({"relation": r, "template": t}) + "\n" for r, t in templates.items()))
    for relation, content in files.items():
        path = folder / f"{relation}.jsonl"
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text("".join(json.dumps(line) + "\n" for line in content))
    return root


def check_report_accounting(report: dict) -> None:
    """facts_read = kept + dropped, and every fact file is in exactly one place."""
    dropped = report["dropped"]
    assert set(dropped) == set(DROP_REASONS)
    assert report["facts_read"] == report["facts_kept"] + sum(d["facts"] for d in dropped.values())
    placed = list(report["relations_kept"])
    for reason in ("not_requested", "empty_fact_file", "no_template", "bad_template"):
        placed += dropped[reason]["relations"]
    assert sorted(placed) == sorted(report["relations_found"])
    assert sum(v["facts"] for v in report["per_relation"].values()) == report["facts_kept"]
    json.dumps(report)  # JSON-able


def raw_facts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# --- the bundled sample --------------------------------------------------------------------

@pytest.mark.parametrize("lang", ["en", "zh"])
def test_read_sample(lang):
    facts, report = read_mlama(MINI, lang)
    assert list(facts.columns) == FACT_COLUMNS
    assert facts["lineid"].dtype == "int64"
    for col in FACT_COLUMNS:
        if col != "lineid":
            assert pd.api.types.is_string_dtype(facts[col]), col
            assert facts[col].map(type).eq(str).all(), col
    assert len(facts) == 500
    assert sorted(facts["relation"].unique()) == MINI_RELATIONS
    assert facts.groupby("relation").size().eq(50).all()
    assert facts["uuid"].is_unique
    assert list(facts.index) == list(range(500))
    assert facts.equals(facts.sort_values(["relation", "lineid"]).reset_index(drop=True))

    # every row equals its line in the file, read independently
    templates = {t["relation"]: t["template"]
                 for t in raw_facts(MINI / "mlama1.1" / lang / "templates.jsonl")}
    expected = [(d["uuid"], d["lineid"], rel, d["sub_uri"], d["obj_uri"], d["sub_label"],
                 d["obj_label"], templates[rel])
                for rel in MINI_RELATIONS
                for d in raw_facts(MINI / "mlama1.1" / lang / f"{rel}.jsonl")]
    expected.sort(key=lambda row: (row[2], row[1]))
    assert list(facts.itertuples(index=False, name=None)) == expected

    assert report["language"] == lang
    assert report["source_kind"] == "folder"
    assert report["facts_read"] == report["facts_kept"] == 500
    assert report["relations_kept"] == MINI_RELATIONS
    assert report["relations_requested"] is None
    # 49 templates, 10 with a fact file
    assert len(report["dropped"]["no_fact_file"]["relations"]) == 39
    assert {"P166", "P69", "date_of_birth", "place_of_birth"} <= set(
        report["dropped"]["no_fact_file"]["relations"])
    assert all(report["per_relation"][r]["facts"] == 50 for r in MINI_RELATIONS)
    assert report["per_relation"]["P1376"]["distinct_objects"] == 50
    assert report["per_relation"]["P30"]["distinct_objects"] == 5
    assert report["blank_lines"] == {} and report["extra_keys"] == {}
    check_report_accounting(report)


def test_sample_zh_is_decoded_and_aligned_with_en():
    en, _ = read_mlama(MINI, "en")
    zh, report = read_mlama(MINI, "zh")
    assert zh["sub_label"].map(lambda s: bool(CJK.search(s))).mean() > 0.9
    assert zh["obj_label"].map(lambda s: bool(CJK.search(s))).all()
    assert report["per_relation"]["P36"]["template"] == "[X]的大写字母为[Y]。"
    assert report["per_relation"]["P36"]["file"] == "P36.jsonl"
    # the fixture has the same facts in both languages
    cols = ["uuid", "lineid", "relation", "sub_uri", "obj_uri"]
    pd.testing.assert_frame_equal(en[cols], zh[cols])
    athens = zh[zh["uuid"] == "d2e7322d-6af5-40eb-8c6f-3bf3bfeacf6e"].iloc[0]
    assert (athens["sub_label"], athens["obj_label"]) == ("雅典縣", "阿森斯 (俄亥俄州)")


def test_source_may_be_the_mlama_folder_itself():
    a, ra = read_mlama(MINI, "en")
    b, rb = read_mlama(MINI / "mlama1.1", "en")
    pd.testing.assert_frame_equal(a, b)
    assert ra["facts_kept"] == rb["facts_kept"] == 500


@pytest.mark.parametrize("prefix", ["mlama1.1/", ""])
def test_zip_source_equals_folder_source(tmp_path, prefix):
    archive = tmp_path / "mlama1.1.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((MINI / "mlama1.1").rglob("*")):
            rel = path.relative_to(MINI / "mlama1.1").as_posix()
            if path.is_dir():
                zf.writestr(prefix + rel + "/", b"")
            else:
                zf.write(path, prefix + rel)
    for lang in ["en", "zh"]:
        from_folder, report_folder = read_mlama(MINI, lang, ["P17", "P36"])
        from_zip, report_zip = read_mlama(archive, lang, ["P17", "P36"])
        pd.testing.assert_frame_equal(from_zip, from_folder)
        assert len(from_zip) == 100
        assert report_zip["source_kind"] == "zip"
        assert report_zip["source"] == str(archive)
        for key in ("source", "source_kind"):
            report_zip.pop(key), report_folder.pop(key)
        assert report_zip == report_folder
    assert not (tmp_path / "mlama1.1").exists()  # nothing extracted
    with pytest.raises(FileNotFoundError, match="'xx'|xx/"):
        read_mlama(archive, "xx")


def test_relation_filter_reports_missing_and_not_requested():
    facts, report = read_mlama(MINI, "en", ["P36", "P17", "P999", "P166", "P17"])
    assert sorted(facts["relation"].unique()) == ["P17", "P36"]
    assert len(facts) == 100
    assert report["relations_requested"] == ["P166", "P17", "P36", "P999"]
    assert report["relations_kept"] == ["P17", "P36"]
    assert report["facts_read"] == 500  # every file is still read and validated
    assert report["facts_kept"] == 100
    not_requested = report["dropped"]["not_requested"]
    assert sorted(not_requested["relations"]) == sorted(set(MINI_RELATIONS) - {"P17", "P36"})
    assert not_requested["facts"] == 400
    assert report["dropped"]["requested_missing"]["relations"] == ["P166", "P999"]
    assert "P166" in report["dropped"]["no_fact_file"]["relations"]
    check_report_accounting(report)
    empty, report_empty = read_mlama(MINI, "en", [])
    assert len(empty) == 0 and list(empty.columns) == FACT_COLUMNS
    assert report_empty["dropped"]["not_requested"]["facts"] == 500
    with pytest.raises(TypeError, match="list of relation ids"):
        read_mlama(MINI, "en", "P17")


def test_sample_checksums_verify():
    lines = (MINI / "SHA256SUMS").read_text().splitlines()
    assert len(lines) == 22
    for line in lines:
        digest, name = line.split(maxsplit=1)
        verify_sha256(MINI / name, digest)
        verify_sha256(MINI / name, digest.upper() + "\n")


def test_verify_sha256_mismatch_names_file_and_both_digests(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"abc")
    good = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    verify_sha256(path, good)
    bad = "0" * 64
    with pytest.raises(ValueError) as err:
        verify_sha256(path, bad)
    assert "data.jsonl" in str(err.value)
    assert good in str(err.value) and bad in str(err.value)
    with pytest.raises(ValueError, match="64 hex digits"):
        verify_sha256(path, "abc")


# --- quirks of the real archive ------------------------------------------------------------

GOOGLE_RE_LINES = (
    '{"sub_label": "Khatchig Mouradian", "obj_label": "Lebanon", "sub_uri": "/m/047fprg", '
    '"obj_uri": "/m/04hqz", "lineid": 0, "uuid": "9c68053f-0e3a-4db1-ab37-4e12d89b26d8"}\n'
    '{"sub_label": "Jacob H. Studer", "obj_label": "Columbus", "sub_uri": "/m/05s_n20", '
    '"obj_uri": "/m/01smm", "lineid": 1, "uuid": "745040a0-6ebd-4542-bb73-1aa5b34e3042"}\n'
)


def test_google_re_keys_are_read_by_name(tmp_path):
    write_lang(tmp_path, "en", {"place_of_birth": "[X] was born in [Y] ."},
               {"place_of_birth": GOOGLE_RE_LINES})
    facts, report = read_mlama(tmp_path, "en")
    assert facts.loc[0, ["sub_label", "obj_label", "sub_uri", "obj_uri"]].tolist() == [
        "Khatchig Mouradian", "Lebanon", "/m/047fprg", "/m/04hqz"]
    assert facts.loc[1, "uuid"] == "745040a0-6ebd-4542-bb73-1aa5b34e3042"
    assert facts["lineid"].tolist() == [0, 1]
    assert report["relations_kept"] == ["place_of_birth"]
    assert report["per_relation"]["place_of_birth"]["template"] == "[X] was born in [Y] ."


def test_empty_fact_files_drop_their_relation(tmp_path):
    write_lang(tmp_path, "zh", {"P17": "[X]位于[Y]中。", "place_of_birth": "[X]出生于[Y]。",
                                "place_of_death": "[X]死于[Y]。"},
               {"P17": [fact(0), fact(1)], "place_of_birth": b"", "place_of_death": "\n\n"})
    facts, report = read_mlama(tmp_path, "zh")
    assert len(facts) == 2 and set(facts["relation"]) == {"P17"}
    empty = report["dropped"]["empty_fact_file"]
    assert empty["relations"] == ["place_of_birth", "place_of_death"]
    assert empty["facts"] == 0
    assert report["blank_lines"] == {"place_of_death.jsonl": [1, 2]}
    assert report["relations_found"] == ["P17", "place_of_birth", "place_of_death"]
    check_report_accounting(report)


def test_templates_and_fact_files_without_partner(tmp_path):
    write_lang(tmp_path, "en",
               {"P17": "[X] is located in [Y] .", "date_of_birth": "[X] (born [Y]).",
                "P69": "[X] was educated at the University of [Y] ."},
               {"P17": [fact(0), fact(1)], "P999": [fact(5), fact(6), fact(7)]})
    facts, report = read_mlama(tmp_path, "en")
    assert report["relations_kept"] == ["P17"]
    assert report["dropped"]["no_fact_file"]["relations"] == ["P69", "date_of_birth"]
    assert report["dropped"]["no_fact_file"]["facts"] == 0
    assert report["dropped"]["no_template"]["relations"] == ["P999"]
    assert report["dropped"]["no_template"]["facts"] == 3
    assert report["facts_read"] == 5 and report["facts_kept"] == 2
    check_report_accounting(report)


@pytest.mark.parametrize("template", ["[X] is located in .", "is located in [Y] .",
                                      "[X] and [X] are in [Y] .", "[X] is in [Y] or [Y] ."])
def test_template_without_one_x_and_one_y_drops_relation(tmp_path, template):
    write_lang(tmp_path, "en", {"P17": "[X] is located in [Y] .", "P30": template},
               {"P17": [fact(0)], "P30": [fact(1), fact(2)]})
    facts, report = read_mlama(tmp_path, "en")
    assert set(facts["relation"]) == {"P17"}
    bad = report["dropped"]["bad_template"]
    assert bad["relations"] == ["P30"] and bad["facts"] == 2
    assert bad["templates"] == {"P30": template}
    check_report_accounting(report)


def test_p1923_template_with_y_before_x_is_kept(tmp_path):
    write_lang(tmp_path, "en", {"P1923": "[Y] participated in [X] ."},
               {"P1923": [fact(0)]})
    facts, _ = read_mlama(tmp_path, "en")
    assert facts["template"].tolist() == ["[Y] participated in [X] ."]


def test_output_is_sorted_by_relation_then_lineid(tmp_path):
    write_lang(tmp_path, "en", {"P19": "[X] was born in [Y] .", "P17": "[X] is in [Y] ."},
               {"P19": [fact(12), fact(3), fact(7)], "P17": [fact(5), fact(1)]})
    facts, _ = read_mlama(tmp_path, "en")
    assert list(zip(facts["relation"], facts["lineid"])) == [
        ("P17", 1), ("P17", 5), ("P19", 3), ("P19", 7), ("P19", 12)]
    assert facts["uuid"].tolist() == ["uuid-1", "uuid-5", "uuid-3", "uuid-7", "uuid-12"]


def test_blank_lines_are_skipped_and_reported(tmp_path):
    lines = [json.dumps(fact(i)) for i in range(3)]
    content = lines[0] + "\n\n" + lines[1] + "\n   \n" + lines[2]  # no final newline
    write_lang(tmp_path, "en", {"P17": "[X] is in [Y] ."}, {"P17": content, "P19": "\n"})
    facts, report = read_mlama(tmp_path, "en")
    assert facts["lineid"].tolist() == [0, 1, 2]
    assert report["blank_lines"] == {"P17.jsonl": [2, 4], "P19.jsonl": [1]}
    # a final newline is not a blank line
    write_lang(tmp_path, "en", {"P17": "[X] is in [Y] ."}, {"P17": content + "\n", "P19": b""})
    assert read_mlama(tmp_path, "en")[1]["blank_lines"] == {"P17.jsonl": [2, 4]}


def test_extra_keys_and_other_files_are_reported(tmp_path):
    write_lang(tmp_path, "en", {"P17": "[X] is in [Y] ."},
               {"P17": [fact(0, note="x"), fact(1)]})
    (tmp_path / "mlama1.1" / "en" / "README.txt").write_text("hi")
    facts, report = read_mlama(tmp_path, "en")
    assert len(facts) == 2 and "note" not in facts.columns
    assert report["extra_keys"] == {"P17.jsonl": ["note"]}
    assert report["ignored_files"] == ["README.txt"]


def test_values_are_not_stripped(tmp_path):
    write_lang(tmp_path, "en", {"P17": "[X] is in [Y] ."},
               {"P17": [fact(0, sub_label=" Padded ", obj_label="Obj\u00a0")]})
    facts, _ = read_mlama(tmp_path, "en")
    assert facts.loc[0, "sub_label"] == " Padded "
    assert facts.loc[0, "obj_label"] == "Obj\u00a0"


def test_missing_language_or_templates(tmp_path):
    with pytest.raises(FileNotFoundError, match="'xx'.*found: en, zh"):
        read_mlama(MINI, "xx")
    write_lang(tmp_path, "en", {}, {"P17": [fact(0)]})
    (tmp_path / "mlama1.1" / "en" / "templates.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="templates.jsonl"):
        read_mlama(tmp_path, "en")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_mlama(tmp_path / "nowhere", "en")


# --- malformed lines -----------------------------------------------------------------------

def good_lines() -> list[str]:
    return [json.dumps(fact(i)) for i in range(4)]


BAD_LINES = {
    # name: (replacement of line 3, expected field, expected words)
    "invalid_json": ('{"sub_uri": "Q1", "obj_uri": ', "<json>", "invalid JSON"),
    "not_an_object": ('["Q1", "Q2"]', "<json>", "JSON object"),
    "missing_uuid": (json.dumps({k: v for k, v in fact(2).items() if k != "uuid"}), "uuid",
                     "missing key"),
    "missing_lineid": (json.dumps({k: v for k, v in fact(2).items() if k != "lineid"}),
                       "lineid", "missing key"),
    "list_label": (json.dumps(fact(2, obj_label=["Paris", "Paris, France"])), "obj_label",
                   "expected a string"),
    "int_uri": (json.dumps(fact(2, sub_uri=42)), "sub_uri", "expected a string"),
    "null_label": (json.dumps(fact(2, sub_label=None)), "sub_label", "expected a string"),
    "empty_label": (json.dumps(fact(2, sub_label="")), "sub_label", "empty"),
    "blank_label": (json.dumps(fact(2, obj_label="  ")), "obj_label", "empty"),
    "string_lineid": (json.dumps(fact(2, lineid="2")), "lineid", "expected an int"),
    "float_lineid": (json.dumps(fact(2, lineid=2.0)), "lineid", "expected an int"),
    "bool_lineid": (json.dumps(fact(2, lineid=True)), "lineid", "expected an int"),
    "negative_lineid": (json.dumps(fact(2, lineid=-2)), "lineid", "negative"),
    "duplicate_lineid": (json.dumps(fact(0, uuid="uuid-other")), "lineid",
                         "duplicate lineid 0 (first on line 1)"),
    "duplicate_uuid_in_file": (json.dumps(fact(2, uuid="uuid-1")), "uuid",
                               "duplicate uuid 'uuid-1'"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_malformed_line_names_file_line_and_field(tmp_path, case):
    replacement, field, words = BAD_LINES[case]
    lines = good_lines()
    lines[2] = replacement
    write_lang(tmp_path, "en", {"P17": "[X] is in [Y] ."}, {"P17": "\n".join(lines) + "\n"})
    with pytest.raises(MlamaFormatError) as err:
        read_mlama(tmp_path, "en")
    message = str(err.value)
    assert "P17.jsonl" in message
    assert "line 3," in message
    assert f"field {field!r}" in message
    assert words in message
    assert (Path(err.value.file).name, err.value.line, err.value.field) == ("P17.jsonl", 3,
                                                                           field)
    assert isinstance(err.value, ValueError)


def test_duplicate_uuid_across_relation_files(tmp_path):
    write_lang(tmp_path, "en", {"P17": "[X] is in [Y] .", "P19": "[X] was born in [Y] ."},
               {"P17": [fact(0), fact(1)], "P19": [fact(7), fact(8), fact(9, uuid="uuid-1")]})
    with pytest.raises(MlamaFormatError) as err:
        read_mlama(tmp_path, "en", ["P19"])  # checked even where not requested
    message = str(err.value)
    assert "P19.jsonl, line 3, field 'uuid'" in message
    assert "P17.jsonl, line 2" in message  # where it was first seen


def test_invalid_utf8_names_the_line(tmp_path):
    data = (json.dumps(fact(0)) + "\n").encode() + b'{"sub_label": "\xff"}\n'
    write_lang(tmp_path, "en", {"P17": "[X] is in [Y] ."}, {"P17": data})
    with pytest.raises(MlamaFormatError, match=r"P17\.jsonl, line 2, field '<line>'.*UTF-8"):
        read_mlama(tmp_path, "en")


@pytest.mark.parametrize("line, field", [
    ('{"relation": "P17"}', "template"),
    ('{"relation": "P17", "template": ["[X] in [Y]"]}', "template"),
    ('{"relation": "P30", "template": "[X] on [Y] ."}', "relation"),  # duplicate relation
    ('{"relation": "P30", "template": "[X]', "<json>"),
])
def test_malformed_template_line(tmp_path, line, field):
    write_lang(tmp_path, "en", {}, {"P17": [fact(0)]})
    path = tmp_path / "mlama1.1" / "en" / "templates.jsonl"
    path.write_text('{"relation": "P30", "template": "[X] is on [Y] ."}\n' + line + "\n")
    with pytest.raises(MlamaFormatError) as err:
        read_mlama(tmp_path, "en")
    assert f"templates.jsonl, line 2, field {field!r}" in str(err.value)


def test_bad_line_in_zip_names_member(tmp_path):
    archive = tmp_path / "mlama1.1.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("mlama1.1/en/templates.jsonl", '{"relation": "P17", "template": "[X] [Y]"}\n')
        zf.writestr("mlama1.1/en/P17.jsonl", json.dumps(fact(0)) + "\nnot json\n")
    with pytest.raises(MlamaFormatError, match=r"mlama1\.1/en/P17\.jsonl, line 2, field '<json>'"):
        read_mlama(archive, "en")


# --- Traditional -> Simplified -------------------------------------------------------------

def test_to_simplified_without_opencc_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "opencc", None)  # makes `import opencc` fail
    with pytest.raises(ImportError, match="pip install opencc"):
        read_mlama(MINI, "zh", to_simplified=True)
    facts, _ = read_mlama(MINI, "zh")  # the default needs no opencc
    assert len(facts) == 500


def test_to_simplified_converts_labels_and_templates_with_the_converter(monkeypatch):
    table = str.maketrans({"縣": "县", "國": "国", "為": "为"})
    fake = types.ModuleType("opencc")

    class OpenCC:
        def __init__(self, config):
            assert config in ("t2s", "t2s.json")

        def convert(self, text):
            return text.translate(table)

    fake.OpenCC = OpenCC
    monkeypatch.setitem(sys.modules, "opencc", fake)
    before, _ = read_mlama(MINI, "zh")
    after, report = read_mlama(MINI, "zh", to_simplified=True)
    athens = after["uuid"] == "d2e7322d-6af5-40eb-8c6f-3bf3bfeacf6e"
    assert after.loc[athens, "sub_label"].item() == "雅典县"
    assert report["to_simplified"] is True
    for col in ("sub_label", "obj_label", "template"):
        changed = before[col] != after[col]
        assert (after.loc[changed, col] == before.loc[changed, col].str.translate(table)).all()
        assert report["simplified"][col] == before.loc[changed, col].nunique()
    assert report["simplified"]["sub_label"] >= 1
    pd.testing.assert_frame_equal(before.drop(columns=["sub_label", "obj_label", "template"]),
                                  after.drop(columns=["sub_label", "obj_label", "template"]))


def test_to_simplified_with_real_opencc():
    pytest.importorskip("opencc", reason="optional dependency opencc is not installed")
    facts, report = read_mlama(MINI, "zh", ["P36"], to_simplified=True)
    athens = facts[facts["uuid"] == "d2e7322d-6af5-40eb-8c6f-3bf3bfeacf6e"].iloc[0]
    assert athens["sub_label"] == "雅典县"
    assert athens["obj_label"] == "阿森斯 (俄亥俄州)"
    assert report["simplified"]["sub_label"] >= 1
    en, _ = read_mlama(MINI, "en", ["P36"], to_simplified=True)
    pd.testing.assert_frame_equal(en, read_mlama(MINI, "en", ["P36"])[0])


# --- the complete en + zh data -------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not FULL.is_dir(), reason=f"full mLAMA en/zh not found at {FULL}")
def test_full_en_zh_ingestion_corruption_and_split():
    tables, reports = {}, {}
    for lang in ["en", "zh"]:
        tables[lang], reports[lang] = read_mlama(FULL, lang)
        check_report_accounting(reports[lang])
    en, zh = reports["en"], reports["zh"]
    assert en["facts_read"] == 37_498 and zh["facts_read"] == 21_449
    assert en["facts_kept"] == 37_498 and zh["facts_kept"] == 21_449
    assert len(en["relations_kept"]) == 43 and len(zh["relations_kept"]) == 41
    assert zh["dropped"]["empty_fact_file"]["relations"] == ["place_of_birth", "place_of_death"]
    assert "place_of_birth" in en["relations_kept"]
    for report in (en, zh):
        assert report["dropped"]["no_fact_file"]["relations"] == [
            "P102", "P166", "P1923", "P54", "P69", "date_of_birth"]
        assert report["blank_lines"] == {}
    # every zh fact is an en fact with the same uuid, lineid, subject and object
    keys = ["uuid", "lineid", "relation", "sub_uri", "obj_uri"]
    merged = tables["zh"][keys].merge(tables["en"][keys], how="left", indicator=True)
    assert (merged["_merge"] == "both").all()

    corrupted = corrupt_facts(tables, seed=0)
    summary = corruption_report(tables, corrupted)
    assert summary["facts_in"] == 37_498 + 21_449
    assert summary["facts_out"] + summary["dropped_no_wrong_object"] == summary["facts_in"]
    for lang, table in corrupted.items():
        assert (table["wrong_obj_uri"] != table["obj_uri"]).all()
        assert (table["wrong_obj_label"] != table["obj_label"]).all()
    both = corrupted["en"].merge(corrupted["zh"], on="uuid", suffixes=("_en", "_zh"))
    assert len(both) == len(corrupted["zh"])
    assert (both["wrong_obj_uri_en"] == both["wrong_obj_uri_zh"]).all()

    splits = split_facts(corrupted, 0.8, seed=0)
    for lang in ["en", "zh"]:
        parts = [set(splits[lang][part]["uuid"]) for part in PARTS]
        assert not parts[0] & parts[1]
        assert parts[0] | parts[1] == set(corrupted[lang]["uuid"])
    n = corrupted["en"].groupby("relation").size()  # en holds every uuid
    n_disc = splits["en"]["discovery"].groupby("relation").size()
    assert all(n_disc[rel] == discovery_count(n[rel], 0.8) for rel in n.index)
    disc_en = set(splits["en"]["discovery"]["uuid"])
    assert set(splits["zh"]["discovery"]["uuid"]) <= disc_en
    assert not set(splits["zh"]["evaluation"]["uuid"]) & disc_en


# --- no drop is silent ---------------------------------------------------------------------

def test_every_dropped_relation_is_a_warning_naming_file_and_reason(tmp_path, caplog):
    write_lang(tmp_path, "en",
               {"P17": "[X] is in [Y] .", "P19": "[X] was born in .", "P20": "[X] died in [Y] .",
                "P30": "[X] is on [Y] .", "P31": "[X] is a [Y] ."},
               {"P17": [fact(0), fact(1)], "P19": [fact(2)], "P20": b"", "P36": [fact(3)],
                "P30": [fact(n, obj_uri="Q1", obj_label="Asia") for n in (4, 5, 6)]})
    (tmp_path / "mlama1.1" / "en" / "P31.JSONL").write_text(json.dumps(fact(7)) + "\n")
    facts, report = read_mlama(tmp_path, "en", ["P17", "P19", "P20", "P30", "P31", "P36", "P99"])
    caplog.set_level("WARNING")
    messages = check_dropped_relations(report)
    assert len(messages) == 7 and len(caplog.records) == 7  # P31: requested, and misnamed
    assert all(record.levelname == "WARNING" for record in caplog.records)
    text = "\n".join(messages)
    for needle in ["en/P19.jsonl: relation P19 dropped (bad_template, 1 facts)", "'[X] was born in .'",
                   "en/P20.jsonl: relation P20 dropped (empty_fact_file",
                   "en/P36.jsonl: relation P36 dropped (no_template, 1 facts)",
                   "en/P99.jsonl: relation P99 dropped (requested_missing",
                   "en/P31.JSONL: not read", "en/P30.jsonl: all 3 facts of relation P30 have one object"]:
        assert needle in text
    assert "P17" not in text  # kept, with two objects
    with pytest.raises(MlamaDropError, match=r"mlama.strict(.|\n)*en/P20.jsonl(.|\n)*empty_fact_file"):
        check_dropped_relations(report, strict=True)


def test_the_bundled_sample_drops_nothing(caplog):
    for lang in ("en", "zh"):
        _, report = read_mlama(MINI, lang)
        assert check_dropped_relations(report, strict=True) == []


def test_languages_with_different_relation_sets_are_a_warning(caplog):
    caplog.set_level("WARNING")
    assert relation_differences({"en": ["P17", "P19"], "zh": ["P17", "P19"]}) == []
    messages = relation_differences({"en": ["P17", "P19"], "zh": ["P17"], "fr": ["P17", "P20"]})
    assert messages == [
        "relation P19 is in en but not in fr, zh: the languages have different relation sets",
        "relation P20 is in fr but not in en, zh: the languages have different relation sets"]
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]


def test_cap_facts_per_relation_is_seeded_uuid_consistent_and_nested():
    import pandas as pd

    from kneurons.mlama import cap_facts_per_relation

    facts = pd.DataFrame({"uuid": [f"u{i}" for i in range(30)],
                          "relation": ["P17"] * 20 + ["P36"] * 10, "lineid": range(30)})
    small = cap_facts_per_relation(facts, 4, seed=1)
    assert small.groupby("relation").size().to_dict() == {"P17": 4, "P36": 4}
    assert list(small["lineid"]) == sorted(small["lineid"])  # row order kept
    # another language: the same uuids in another order keep the same facts
    other = facts.sample(frac=1.0, random_state=0)
    assert set(cap_facts_per_relation(other, 4, seed=1)["uuid"]) == set(small["uuid"])
    large = cap_facts_per_relation(facts, 8, seed=1)
    assert set(small["uuid"]) < set(large["uuid"])  # a larger cap keeps a superset
    assert set(cap_facts_per_relation(facts, 4, seed=2)["uuid"]) != set(small["uuid"])
    assert cap_facts_per_relation(facts, None, seed=1) is facts
    assert len(cap_facts_per_relation(facts, 50, seed=1)) == 30
    with pytest.raises(ValueError):
        cap_facts_per_relation(facts, 0, seed=1)


def test_prepare_mlama_reads_caps_reports_and_checks_drops(tmp_path):
    from kneurons.mlama import cap_facts_per_relation, prepare_mlama

    table, report = prepare_mlama(MINI, "en", "all", strict=True)
    plain, plain_report = read_mlama(MINI, "en")
    pd.testing.assert_frame_equal(table, plain)
    assert report == plain_report and "max_facts_per_relation" not in report
    capped, capped_report = prepare_mlama(MINI, "en", ["P17", "P36"], max_facts_per_relation=2,
                                          cap_seed=5)
    want = cap_facts_per_relation(read_mlama(MINI, "en", ["P17", "P36"])[0], 2, 5)
    pd.testing.assert_frame_equal(capped, want)
    assert capped_report["max_facts_per_relation"] == 2 and capped_report["facts_kept"] == 4
    write_lang(tmp_path, "en", {"P17": "[X] is in [Y] ."}, {"P17": [fact(0), fact(1)],
                                                             "P20": b""})
    prepare_mlama(tmp_path, "en", ["P17", "P20"])  # a warning only
    with pytest.raises(MlamaDropError, match="P20"):
        prepare_mlama(tmp_path, "en", ["P17", "P20"], strict=True)
