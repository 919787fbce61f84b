"""Workflow configuration checks the JSON Schema cannot make, driven by the schema itself.

* ``coerce_strings``: Snakemake parses a nested ``--config key={...}`` value with YAML's base
  loader, so every value in it arrives as a string (``factcheck={"threshold": 0.5}`` gives
  ``"0.5"``). Where the schema says a key is a number, an integer, a boolean or null and does
  not accept that string as it is, the string is converted (recursively) before validation.
* ``check_types``: JSON Schema counts ``20.0`` as an integer; a Python float where the schema
  wants an integer is rejected here (after validation), as is a NaN or infinite number.
* ``check_relations``: requested relation ids that a language of a local source lacks.

Every error names the key (``attribution.steps``). This module never imports snakemake.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A config value that cannot work, with the key it is under."""


def _alternatives(schema: Mapping) -> list[Mapping]:
    """The schema and its oneOf/anyOf branches, flattened."""
    out = [schema]
    for key in ("oneOf", "anyOf"):
        for branch in schema.get(key, ()):
            out.extend(_alternatives(branch))
    return out


def _types(schema: Mapping) -> set[str]:
    types: set[str] = set()
    for alt in _alternatives(schema):
        kind = alt.get("type")
        types.update([kind] if isinstance(kind, str) else kind or ())
    return types


def _accepts_string(schema: Mapping, value: str) -> bool:
    for alt in _alternatives(schema):
        kind = alt.get("type")
        if kind == "string" or (isinstance(kind, list) and "string" in kind):
            if "enum" not in alt or value in alt["enum"]:
                return True
    return False


def _parse_scalar(text: str, types: set[str]) -> Any:
    """``text`` as a value of one of ``types``, or ``text`` itself when it is none of them."""
    stripped = text.strip()
    if types & {"integer", "number"}:
        try:
            return int(stripped)
        except ValueError:
            pass
    if "number" in types:
        try:
            value = float(stripped)
        except ValueError:
            pass
        else:
            if math.isfinite(value):
                return value
    if "boolean" in types and stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    if "null" in types and stripped.lower() in ("null", "~", ""):
        return None
    return text


def _subschema(schema: Mapping, key: str) -> Mapping | None:
    for alt in _alternatives(schema):
        if key in alt.get("properties", {}):
            return alt["properties"][key]
    for alt in _alternatives(schema):
        extra = alt.get("additionalProperties")
        if isinstance(extra, Mapping):
            return extra
    return None


def _item_schema(schema: Mapping) -> Mapping | None:
    for alt in _alternatives(schema):
        if isinstance(alt.get("items"), Mapping):
            return alt["items"]
    return None


def coerce_strings(value: Any, schema: Mapping) -> Any:
    """``value`` with strings converted where ``schema`` wants a number, integer, boolean or
    null (see the module docstring); dicts and lists are converted in place and returned."""
    if isinstance(value, dict):
        for key in list(value):
            sub = _subschema(schema, key)
            if sub is not None:
                value[key] = coerce_strings(value[key], sub)
        return value
    if isinstance(value, list):
        sub = _item_schema(schema)
        if sub is not None:
            value[:] = [coerce_strings(item, sub) for item in value]
        return value
    if isinstance(value, str) and not _accepts_string(schema, value):
        return _parse_scalar(value, _types(schema))
    return value


def check_types(value: Any, schema: Mapping, key: str = "") -> None:
    """Raise ConfigError naming the key of a float where ``schema`` wants an integer only
    (``steps: 20.0``) or of a number that is NaN or infinite."""
    name = key or "config"
    if isinstance(value, dict):
        for sub_key, sub_value in value.items():
            sub = _subschema(schema, sub_key)
            if sub is not None:
                check_types(sub_value, sub, f"{key}.{sub_key}" if key else str(sub_key))
    elif isinstance(value, list):
        sub = _item_schema(schema)
        for index, item in enumerate(value):
            if sub is not None:
                check_types(item, sub, f"{name}[{index}]")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"config: {name} must be a finite number, got {value!r}")
        types = _types(schema)
        if "integer" in types and "number" not in types:
            raise ConfigError(f"config: {name} must be an integer, got {value!r} (write it "
                              "without a decimal point)")


def check_relations(requested: list[str], found: Mapping[str, list[str]]) -> None:
    """Raise ConfigError unless every ``requested`` relation is in every language of
    ``found`` ({language: relation ids of the source})."""
    for lang, relations in found.items():
        missing = sorted(set(requested) - set(relations))
        if missing:
            raise ConfigError(
                f"config: mlama.relations has {missing}, not in the source's {lang}/ "
                f"(it has: {', '.join(sorted(relations)) or 'none'})")


def check_models(models: Mapping[str, Mapping]) -> None:
    """Refuse, when the plan is made, a model whose architecture the registry does not support
    (or whose GGUF file is truncated): a local folder's or cached hub model's config.json, a
    GGUF file's header. Toy models, hub models not in the local cache and GGUF files a package
    assembles from chunks are checked by the job that loads or imports them."""
    from .models import check_model_type, source_model_type

    for alias, spec in models.items():
        if spec.get("toy"):
            continue
        what = f"models.{alias}"
        if spec.get("gguf"):
            from .gguf import gguf_header, plan_gguf

            path = plan_gguf(spec["gguf"], f"{what}.gguf")
            if path is not None:
                model_type = gguf_header(path)["model_type"]
                check_model_type(model_type, spec["arch"], f"{what} ({path})")
            continue
        model_type = source_model_type(spec["hf_id"], spec.get("revision"))
        if model_type is not None:
            check_model_type(model_type, spec["arch"], f"{what} ({spec['hf_id']})")


def schema_error(config: Any, schema: Mapping) -> str | None:
    """One paragraph on the config's most relevant schema violation, naming the key, what is
    wrong and, for an unknown key, the keys allowed there (instead of the whole schema that
    Snakemake's validation prints); None when the config is valid."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    error = best_match(Draft202012Validator(schema).iter_errors(config))
    if error is None:
        return None
    key = ".".join(str(part) for part in error.absolute_path) or "(top level)"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed)) if isinstance(
            error.instance, Mapping) else []
        where = "the top level" if key == "(top level)" else key
        return (f"config: unknown key{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(repr(u) for u in unknown)} in {where}; allowed there: "
                f"{', '.join(allowed) if allowed else '(any name)'} "
                "(docs/configuration.md lists every key)")
    return f"config: {key}: {error.message} (docs/configuration.md lists every key)"
