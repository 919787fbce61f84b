"""Read mLAMA 1.1 (Kassner et al., EACL 2021) into one fact table per language.

The archive layout (``mlama1.1/<lang>/templates.jsonl`` plus one ``<relation>.jsonl`` per
relation) and its quirks are described in ``resources/mlama-mini/README.md``. What this
reader does with each quirk, so that nothing is dropped silently:

* **Relations** are the ``*.jsonl`` files of the language folder other than
  ``templates.jsonl``, as in the mLAMA authors' reader (``norakassner/mlama``,
  ``dataset/reader.py``). Other files in the folder are listed in the report under
  ``ignored_files`` and not read.
* **Keys are read by name**, never by position: Google-RE files (``place_of_birth.jsonl``,
  ``place_of_death.jsonl``) order their keys differently from T-REx files. Keys other
  than the six required ones are ignored and listed in the report under ``extra_keys``.
* **Empty fact files** (0 bytes, e.g. zh Google-RE, or only blank lines) drop their
  relation with reason ``empty_fact_file``.
* **Templates without a fact file** (P166, P69, P54, P1923, P102, ``date_of_birth``) are
  reported under ``no_fact_file``; **fact files without a template** drop their relation
  (``no_template``); **templates without exactly one ``[X]`` and one ``[Y]``** drop their
  relation (``bad_template``): a prompt needs one subject slot and one object slot.
* **Requested relations absent from the language** (no fact file) are reported under
  ``requested_missing``; present relations not requested under ``not_requested``.
* **Blank lines**: the final newline of a file ends its last line and is not a blank line.
  Any other empty or whitespace-only line is skipped (it holds no fact) and its 1-based
  line number is listed in the report under ``blank_lines``. Real mLAMA en/zh has none.
* **Every fact file is parsed and validated**, including relations that are not requested
  or are dropped, so ``facts_read`` counts every fact of the language and
  ``facts_read == facts_kept + sum(d["facts"] for d in report["dropped"].values())``.
* A **malformed line** raises :class:`MlamaFormatError` naming file, 1-based line number
  and field: invalid UTF-8 or JSON, not an object, a missing key, a wrong type (labels,
  uris, uuid must be non-empty, non-blank strings; ``lineid`` a non-negative int, not a
  bool), a uuid seen twice in the language, or a ``lineid`` seen twice in a relation.
* **No drop is silent**: ``check_dropped_relations`` logs every relation that loses its facts
  (the reasons of ``WARNED_REASONS``, an upper-case ``.JSONL`` file, a relation whose facts
  share one object) as a WARNING naming file and reason, or raises with ``strict``;
  ``relation_differences`` warns when the languages end with different relation sets.
* **Values are kept exactly as written** (no whitespace stripping, no case folding).
  Labels are only changed on request: ``to_simplified=True`` converts labels and
  templates with OpenCC ``t2s`` (as the paper's code does for zh; the optional ``opencc``
  package is imported only then). The report counts how many values it changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from .io import file_sha256

log = logging.getLogger(__name__)

FACT_COLUMNS = ["uuid", "lineid", "relation", "sub_uri", "obj_uri", "sub_label", "obj_label",
                "template"]
"""Columns of a fact table: ``lineid`` int64, every other column str."""

FACT_KEYS = ("sub_uri", "obj_uri", "obj_label", "sub_label", "lineid", "uuid")
"""Keys every fact line must have (read by name; their order differs between files)."""

TEMPLATE_KEYS = ("relation", "template")
"""Keys every line of ``templates.jsonl`` must have."""

TEMPLATES_FILE = "templates.jsonl"

DROP_REASONS = {
    "not_requested": "fact file present but the relation was not requested",
    "empty_fact_file": "fact file has no facts (0 bytes or only blank lines)",
    "no_template": "fact file has no template in templates.jsonl",
    "bad_template": "template lacks exactly one [X] and one [Y]",
    "no_fact_file": "template present but no fact file (no facts to drop)",
    "requested_missing": "relation requested but the language has no fact file for it",
}
"""Why a relation is not in the fact table. A fact file's relation gets the first reason
that applies, in the order not_requested, empty_fact_file, no_template, bad_template."""


class MlamaFormatError(ValueError):
    """A line of an mLAMA file is malformed; the message names file, line and field."""

    def __init__(self, file: str, line: int, field: str, problem: str):
        self.file, self.line, self.field, self.problem = file, line, field, problem
        super().__init__(f"{file}, line {line}, field {field!r}: {problem}")


@dataclass(frozen=True)
class _LangFolder:
    """The files of one language folder: name -> zero-argument reader of its bytes."""

    display: str          # how the folder is named in messages
    kind: str             # "folder" or "zip"
    files: dict[str, Callable[[], bytes]]
    ignored: list[str]    # entries that are not *.jsonl files


def read_mlama(source: str | Path, lang: str, relations: list[str] | None = None, *,
               to_simplified: bool = False) -> tuple[pd.DataFrame, dict]:
    """Read the facts of one mLAMA language into a table, with a report of what was dropped.

    Args:
        source: a folder that is ``mlama1.1/`` or contains it, holding ``<lang>/``
            sub-folders; or an ``mlama1.1.zip`` file, whose members are read directly
            (with or without a top-level ``mlama1.1/`` folder; nothing is extracted).
        lang: language code, the name of the sub-folder (``"en"``, ``"zh"``).
        relations: relation ids to keep (e.g. ``["P17", "P19"]``); None keeps all.
        to_simplified: convert ``sub_label``, ``obj_label`` and ``template`` from
            Traditional to Simplified Chinese with OpenCC ``t2s`` (needs
            ``pip install opencc``). Meant for zh; other scripts pass through unchanged.

    Returns:
        ``(facts, report)``. ``facts`` has :data:`FACT_COLUMNS` (``lineid`` int64, the rest
        str), one row per kept fact, sorted by ``relation`` (plain string order) then
        ``lineid``, with a fresh RangeIndex. ``report`` is a JSON-able dict::

            language, source, source_kind ("folder" | "zip"), to_simplified,
            relations_requested (None or sorted list), relations_found (fact files),
            relations_kept, facts_read (facts parsed from every fact file),
            facts_kept, dropped: {reason: {"description", "relations", "facts",
            "facts_by_relation"}, "bad_template" also "templates"} for every reason in
            DROP_REASONS (always present, possibly empty),
            per_relation: {relation: {"facts", "template", "file", "distinct_subjects",
            "distinct_objects"}} for kept relations,
            blank_lines: {file: [line numbers]}, extra_keys: {file: [keys]},
            ignored_files: [names], simplified (only with to_simplified):
            {"sub_label", "obj_label", "template": number of distinct values changed}

    Raises:
        FileNotFoundError: no such source, language folder or templates.jsonl.
        MlamaFormatError: a malformed line (see the module docstring).
        ImportError: ``to_simplified=True`` and the ``opencc`` package is missing.
    """
    if isinstance(relations, str):
        raise TypeError(f"relations must be a list of relation ids, not the string {relations!r}")
    requested = None if relations is None else sorted(set(relations))
    convert = _t2s_converter() if to_simplified else None

    folder = _open_language(Path(source), lang)
    if TEMPLATES_FILE not in folder.files:
        raise FileNotFoundError(f"{folder.display}/{TEMPLATES_FILE} not found: not an mLAMA "
                                "language folder")
    templates = _read_templates(folder.files[TEMPLATES_FILE](),
                                f"{folder.display}/{TEMPLATES_FILE}")

    fact_files = {name[: -len(".jsonl")]: name for name in folder.files
                  if name != TEMPLATES_FILE}
    blank_lines: dict[str, list[int]] = {}
    extra_keys: dict[str, list[str]] = {}
    seen_uuids: dict[str, tuple[str, int]] = {}
    parsed: dict[str, list[dict]] = {}
    for relation in sorted(fact_files):
        display = f"{folder.display}/{fact_files[relation]}"
        rows, blanks, extras = _read_fact_file(folder.files[fact_files[relation]](), display,
                                               seen_uuids)
        parsed[relation] = rows
        if blanks:
            blank_lines[fact_files[relation]] = blanks
        if extras:
            extra_keys[fact_files[relation]] = extras

    dropped = {reason: {"description": text, "relations": [], "facts": 0,
                        "facts_by_relation": {}}
               for reason, text in DROP_REASONS.items()}
    dropped["bad_template"]["templates"] = {}

    def drop(reason: str, relation: str) -> None:
        n = len(parsed.get(relation, ()))
        entry = dropped[reason]
        entry["relations"].append(relation)
        entry["facts"] += n
        entry["facts_by_relation"][relation] = n

    kept: list[str] = []
    for relation in sorted(parsed):
        if requested is not None and relation not in requested:
            drop("not_requested", relation)
        elif not parsed[relation]:
            drop("empty_fact_file", relation)
        elif relation not in templates:
            drop("no_template", relation)
        elif not _template_ok(templates[relation]):
            drop("bad_template", relation)
            dropped["bad_template"]["templates"][relation] = templates[relation]
        else:
            kept.append(relation)
    for relation in sorted(set(templates) - set(parsed)):
        drop("no_fact_file", relation)
    for relation in requested or ():
        if relation not in parsed:
            drop("requested_missing", relation)

    records = [(row["uuid"], row["lineid"], relation, row["sub_uri"], row["obj_uri"],
                row["sub_label"], row["obj_label"], templates[relation])
               for relation in kept for row in parsed[relation]]
    facts = _to_frame(records)

    report: dict = {
        "language": lang,
        "source": str(source),
        "source_kind": folder.kind,
        "to_simplified": bool(to_simplified),
        "relations_requested": requested,
        "relations_found": sorted(parsed),
        "relations_kept": kept,
        "facts_read": sum(len(rows) for rows in parsed.values()),
        "facts_kept": len(facts),
        "dropped": dropped,
        "per_relation": {},
        "blank_lines": blank_lines,
        "extra_keys": extra_keys,
        "ignored_files": folder.ignored,
    }
    if convert is not None:
        report["simplified"] = {col: _convert_column(facts, col, convert)
                                for col in ("sub_label", "obj_label", "template")}
    for relation, group in facts.groupby("relation", sort=True):
        report["per_relation"][relation] = {
            "facts": len(group),
            "template": group["template"].iloc[0],
            "file": fact_files[relation],
            "distinct_subjects": int(group["sub_uri"].nunique()),
            "distinct_objects": int(group["obj_uri"].nunique()),
        }
    return facts, report


WARNED_REASONS = ("empty_fact_file", "no_template", "bad_template", "requested_missing")
"""Drop reasons that lose a relation's facts (or a requested relation): each is a warning, an
error with ``strict``. ``not_requested`` is what was asked for; ``no_fact_file`` (a template
without facts) is in every mLAMA language and loses nothing."""


class MlamaDropError(ValueError):
    """``strict`` reading and a relation was dropped; the message names files and reasons."""


def dropped_relations(report: dict) -> list[str]:
    """One message per relation of a ``read_mlama`` report that has (or was asked for) facts
    but is not in the fact table, or whose facts corrupt_facts will drop: the reasons of
    ``WARNED_REASONS``, fact files ignored for their upper-case ``.JSONL`` suffix, and relations
    whose facts all share one object (no wrong object can be drawn for them)."""
    lang = report["language"]
    messages = []
    for reason in WARNED_REASONS:
        entry = report["dropped"][reason]
        for relation in entry["relations"]:
            detail = entry["description"]
            if reason == "bad_template":
                detail += f": {entry['templates'][relation]!r}"
            messages.append(f"{lang}/{relation}.jsonl: relation {relation} dropped "
                            f"({reason}, {entry['facts_by_relation'][relation]} facts): {detail}")
    for name in report["ignored_files"]:
        if name.lower().endswith(".jsonl"):
            messages.append(f"{lang}/{name}: not read, a fact file's name must end in lower-case "
                            f".jsonl (relation {name[:-len('.jsonl')]} dropped)")
    for relation, stats in report["per_relation"].items():
        if stats["distinct_objects"] == 1:
            messages.append(f"{lang}/{stats['file']}: all {stats['facts']} facts of relation "
                            f"{relation} have one object, so none gets a wrong object and "
                            "corrupt_facts drops the relation")
    return messages


def check_dropped_relations(report: dict, *, strict: bool = False) -> list[str]:
    """Log every ``dropped_relations`` message as a WARNING; raise MlamaDropError with all of
    them when ``strict``. Returns the messages."""
    messages = dropped_relations(report)
    for message in messages:
        log.warning("%s", message)
    if strict and messages:
        raise MlamaDropError("mlama.strict is set and relations were dropped:\n"
                             + "\n".join(messages))
    return messages


def relation_differences(relations: dict[str, list[str]]) -> list[str]:
    """Messages (logged as WARNINGs) for relations that some languages have and others lack,
    given ``{lang: relation ids of its fact table}``."""
    every = set().union(*map(set, relations.values())) if relations else set()
    messages = []
    for relation in sorted(every):
        lacking = sorted(lang for lang, rels in relations.items() if relation not in rels)
        if lacking:
            having = sorted(set(relations) - set(lacking))
            messages.append(f"relation {relation} is in {', '.join(having)} but not in "
                            f"{', '.join(lacking)}: the languages have different relation sets")
    for message in messages:
        log.warning("%s", message)
    return messages


def relations_in(source: str | Path, lang: str) -> list[str]:
    """The relation ids of a language of a local source (its fact files), without reading them."""
    folder = _open_language(Path(source), lang)
    return sorted(name[: -len(".jsonl")] for name in folder.files if name != TEMPLATES_FILE)


def verify_sha256(path: str | Path, expected_hex: str) -> None:
    """Raise ValueError naming ``path`` and both digests unless its SHA-256 is ``expected_hex``.

    ``expected_hex`` is compared case-insensitively after stripping surrounding whitespace;
    anything but 64 hex digits is itself a ValueError.
    """
    expected = expected_hex.strip().lower()
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise ValueError(f"expected SHA-256 for {path} is not 64 hex digits: {expected_hex!r}")
    actual = file_sha256(path)
    if actual != expected:
        raise ValueError(f"SHA-256 mismatch for {path}: expected {expected}, got {actual}")


# --- internals -----------------------------------------------------------------------------

def _open_language(source: Path, lang: str) -> _LangFolder:
    """Locate ``<lang>/`` in a folder or zip source and list its files."""
    if not source.exists():
        raise FileNotFoundError(f"mLAMA source {source} does not exist")
    if source.is_file():
        if not zipfile.is_zipfile(source):
            raise ValueError(f"mLAMA source {source} is a file but not a zip archive")
        return _open_zip_language(source, lang)
    root = source / "mlama1.1" if (source / "mlama1.1").is_dir() else source
    lang_dir = root / lang
    if not lang_dir.is_dir():
        available = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(f"no language folder {lang!r} in {root} "
                                f"(found: {', '.join(available) or 'none'})")
    files, ignored = {}, []
    for entry in sorted(lang_dir.iterdir()):
        if entry.is_file() and entry.name.endswith(".jsonl"):
            files[entry.name] = entry.read_bytes
        else:
            ignored.append(entry.name)
    return _LangFolder(str(lang_dir), "folder", files, ignored)


def _open_zip_language(source: Path, lang: str) -> _LangFolder:
    with zipfile.ZipFile(source) as zf:
        names = zf.namelist()
    prefix = "mlama1.1/" if any(n.startswith("mlama1.1/") for n in names) else ""
    lang_prefix = f"{prefix}{lang}/"
    members = [n for n in names if n.startswith(lang_prefix) and n != lang_prefix]
    if not members:
        available = sorted({n[len(prefix):].split("/")[0] for n in names
                            if n.startswith(prefix) and "/" in n[len(prefix):]})
        raise FileNotFoundError(f"no language folder {lang_prefix!r} in {source} "
                                f"(found: {', '.join(available) or 'none'})")

    def reader(member: str) -> Callable[[], bytes]:
        def read() -> bytes:
            with zipfile.ZipFile(source) as zf:
                return zf.read(member)
        return read

    files, ignored = {}, []
    for member in sorted(members):
        name = member[len(lang_prefix):]
        if "/" not in name and name.endswith(".jsonl"):
            files[name] = reader(member)
        elif name.rstrip("/") and name.split("/")[0] not in ignored:
            ignored.append(name.split("/")[0])
    return _LangFolder(f"{source}:{lang_prefix.rstrip('/')}", "zip", files, ignored)


def _lines(data: bytes, display: str):
    """Return ``[(line_number, text)]`` of the non-blank lines and the blank line numbers.

    A final newline ends the last line; it does not start a blank one.
    """
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    blanks: list[int] = []
    out: list[tuple[int, str]] = []
    for number, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise MlamaFormatError(display, number, "<line>", f"not valid UTF-8 ({err})") from None
        if not text.strip():
            blanks.append(number)
        else:
            out.append((number, text))
    return out, blanks


def _parse_object(text: str, display: str, number: int) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise MlamaFormatError(display, number, "<json>", f"invalid JSON ({err.msg} at column "
                               f"{err.colno})") from None
    if not isinstance(obj, dict):
        raise MlamaFormatError(display, number, "<json>",
                               f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _require_string(obj: dict, key: str, display: str, number: int) -> str:
    if key not in obj:
        raise MlamaFormatError(display, number, key, "missing key")
    value = obj[key]
    if not isinstance(value, str):
        raise MlamaFormatError(display, number, key,
                               f"expected a string, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise MlamaFormatError(display, number, key, f"empty value {value!r}")
    return value


def _read_templates(data: bytes, display: str) -> dict[str, str]:
    templates: dict[str, str] = {}
    lines, _ = _lines(data, display)
    first_line: dict[str, int] = {}
    for number, text in lines:
        obj = _parse_object(text, display, number)
        relation = _require_string(obj, "relation", display, number)
        template = _require_string(obj, "template", display, number)
        if relation in templates:
            raise MlamaFormatError(display, number, "relation", f"duplicate relation "
                                   f"{relation!r} (first on line {first_line[relation]})")
        templates[relation] = template
        first_line[relation] = number
    return templates


def _read_fact_file(data: bytes, display: str, seen_uuids: dict[str, tuple[str, int]]):
    """Parse one fact file. ``seen_uuids`` (uuid -> (file, line)) spans the whole language."""
    lines, blanks = _lines(data, display)
    rows: list[dict] = []
    extras: set[str] = set()
    seen_lineids: dict[int, int] = {}
    for number, text in lines:
        obj = _parse_object(text, display, number)
        row = {key: _require_string(obj, key, display, number)
               for key in FACT_KEYS if key != "lineid"}
        if "lineid" not in obj:
            raise MlamaFormatError(display, number, "lineid", "missing key")
        lineid = obj["lineid"]
        if not isinstance(lineid, int) or isinstance(lineid, bool):
            raise MlamaFormatError(display, number, "lineid",
                                   f"expected an int, got {type(lineid).__name__} {lineid!r}")
        if lineid < 0:
            raise MlamaFormatError(display, number, "lineid", f"negative lineid {lineid}")
        if lineid in seen_lineids:
            raise MlamaFormatError(display, number, "lineid", f"duplicate lineid {lineid} "
                                   f"(first on line {seen_lineids[lineid]})")
        seen_lineids[lineid] = number
        uuid = row["uuid"]
        if uuid in seen_uuids:
            first_file, first_line = seen_uuids[uuid]
            raise MlamaFormatError(display, number, "uuid", f"duplicate uuid {uuid!r} in this "
                                   f"language (first in {first_file}, line {first_line})")
        seen_uuids[uuid] = (display, number)
        row["lineid"] = lineid
        extras.update(set(obj) - set(FACT_KEYS))
        rows.append(row)
    return rows, blanks, sorted(extras)


def _template_ok(template: str) -> bool:
    return template.count("[X]") == 1 and template.count("[Y]") == 1


def _to_frame(records: list[tuple]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(records, columns=FACT_COLUMNS)
    frame["lineid"] = frame["lineid"].astype("int64")
    for col in FACT_COLUMNS:
        if col != "lineid":
            frame[col] = frame[col].astype("str")
    return frame.sort_values(["relation", "lineid"], kind="stable").reset_index(drop=True)


def _t2s_converter() -> Callable[[str], str]:
    """Return OpenCC's Traditional->Simplified ``convert``; import opencc only now."""
    try:
        import opencc
    except ImportError as err:
        raise ImportError("read_mlama(..., to_simplified=True) needs the OpenCC Python "
                          "package for Traditional->Simplified Chinese conversion: "
                          "pip install opencc") from err
    try:
        converter = opencc.OpenCC("t2s")
    except Exception:  # some builds want the config file name
        converter = opencc.OpenCC("t2s.json")
    return converter.convert


def _convert_column(facts: pd.DataFrame, col: str, convert: Callable[[str], str]) -> int:
    """Convert ``facts[col]`` in place, each distinct value once; return how many changed."""
    mapping = {value: convert(value) for value in facts[col].unique()}
    for before, after in mapping.items():
        if not after.strip():
            raise ValueError(f"OpenCC t2s turned {col} {before!r} into an empty string")
    facts[col] = facts[col].map(mapping).astype("str")
    return sum(before != after for before, after in mapping.items())



def cap_facts_per_relation(facts: pd.DataFrame, max_per_relation: int | None,
                           seed: int) -> pd.DataFrame:
    """At most ``max_per_relation`` facts of each relation (None: all), a seeded choice.

    A fact is kept by the rank of ``sha256(seed:uuid)`` within its relation, so every
    language keeps the same facts (a uuid names one fact in every language of mLAMA) and a
    larger cap keeps a superset. Row order stays that of ``facts``.
    """
    if max_per_relation is None:
        return facts
    if max_per_relation < 1:
        raise ValueError(f"max_per_relation must be >= 1 or None, got {max_per_relation}")
    key = facts["uuid"].map(lambda u: hashlib.sha256(f"{seed}:{u}".encode()).hexdigest())
    rank = key.groupby(facts["relation"]).rank(method="first")
    return facts[rank <= max_per_relation].reset_index(drop=True)


def prepare_mlama(source: str | Path, lang: str, relations: list[str] | str | None = None, *,
                  max_facts_per_relation: int | None = None, cap_seed: int | None = None,
                  to_simplified: bool = False, strict: bool = False
                  ) -> tuple[pd.DataFrame, dict]:
    """One language of mLAMA as the workflow's facts table and its report: read
    (:func:`read_mlama`; ``relations`` ``"all"`` or None: every relation), capped per relation
    when ``max_facts_per_relation`` is set (:func:`cap_facts_per_relation` with ``cap_seed``,
    recorded in the report), then the dropped relations checked
    (:func:`check_dropped_relations`, raising when ``strict``)."""
    relations = None if relations in (None, "all") else list(relations)
    table, report = read_mlama(source, lang, relations, to_simplified=to_simplified)
    if max_facts_per_relation is not None:
        table = cap_facts_per_relation(table, max_facts_per_relation, cap_seed)
        report["max_facts_per_relation"] = max_facts_per_relation
        report["facts_kept"] = len(table)
    log.info("%s: kept %d facts in %d relations", lang, len(table), table["relation"].nunique())
    check_dropped_relations(report, strict=strict)
    return table, report
