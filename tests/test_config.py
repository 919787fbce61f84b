"""Config checks: string coercion of nested --config values, strict integers, relation ids and
the other values that can be checked before any job runs (kneurons.config, common.smk)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from test_workflow import REPO, run_workflow, tiny_config

from kneurons.config import ConfigError, check_relations, check_types, coerce_strings

SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())


def test_numeric_strings_become_numbers_where_the_schema_says_so():
    config = {"seed": "7", "neurons": {"max_kn": "10", "kn_threshold": "0.25"},
              "factcheck": {"thresholds": ["0.5", "auto"]}, "toy": {"vocab_size": "null", "paraphrases": "false"},
              "mlama": {"languages": ["en"], "source": "123", "sha256": None},
              "models": {"m": {"toy": "true", "arch": "masked", "languages": ["en"], "revision": "42"}}}
    coerce_strings(config, SCHEMA)
    assert config["seed"] == 7 and isinstance(config["seed"], int)
    assert config["neurons"] == {"max_kn": 10, "kn_threshold": 0.25}
    assert config["factcheck"]["thresholds"] == [0.5, "auto"]
    assert config["toy"] == {"vocab_size": None, "paraphrases": False}
    assert config["mlama"]["source"] == "123"  # a string key stays a string
    assert config["models"]["m"]["toy"] is True
    assert config["models"]["m"]["revision"] == "42"


def test_strings_the_schema_accepts_stay_strings():
    config = {"factcheck": {"thresholds": ["auto"]}, "attribution": {"method": "ig", "steps": "many"}}
    coerce_strings(config, SCHEMA)
    assert config == {"factcheck": {"thresholds": ["auto"]},
                      "attribution": {"method": "ig", "steps": "many"}}  # "many": the schema says


def test_floats_for_integer_keys_and_non_finite_numbers_are_rejected():
    check_types({"attribution": {"steps": 20}, "neurons": {"kn_threshold": 1.0}}, SCHEMA)
    with pytest.raises(ConfigError, match=r"attribution\.steps must be an integer, got 20\.0"):
        check_types({"attribution": {"steps": 20.0}}, SCHEMA)
    with pytest.raises(ConfigError, match=r"toy\.vocab_size"):
        check_types({"toy": {"vocab_size": 64.0}}, SCHEMA)
    with pytest.raises(ConfigError, match=r"likn\.lambda2 must be a finite number"):
        check_types({"likn": {"lambda2": math.inf}}, SCHEMA)


def test_missing_relations_are_named_with_what_exists():
    check_relations(["P17"], {"en": ["P17", "P36"], "zh": ["P17"]})
    with pytest.raises(ConfigError, match=r"mlama\.relations has \['P36'\], not in the source's "
                                          r"zh/ \(it has: P17\)"):
        check_relations(["P17", "P36"], {"en": ["P17", "P36"], "zh": ["P17"]})


def dry_run(tmp_path: Path, config: dict, *args: str):
    return run_workflow(tmp_path, config, "-n", *args, timeout=300, check=False)


@pytest.mark.parametrize(("change", "needles"), [
    (lambda c: c.update(seed=-1), ["seed", "minimum"]),
    (lambda c: c["attribution"].update(steps=20.0), ["attribution.steps must be an integer"]),
    (lambda c: c["mlama"].update(relations=["P999"]), ["mlama.relations", "P999", "P36"]),
    (lambda c: c["mlama"].update(source="/nonexistent/mlama1.1"), ["mlama.source", "does not exist"]),
    (lambda c: c["toy"].update(hidden=30, heads=4), ["toy.hidden", "toy.heads"]),
    (lambda c: c["models"].update(x={"hf_id": "/nonexistent/model", "arch": "masked",
                                     "languages": ["en"]}), ["models.x.hf_id", "does not exist"]),
])
def test_values_that_cannot_work_stop_the_dry_run_naming_the_key(tmp_path, change, needles):
    config = tiny_config()
    change(config)
    result = dry_run(tmp_path, config)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    for needle in needles:
        assert needle in output, output[-3000:]
    assert "rule prepare_mlama" not in result.stdout


def test_nested_config_strings_are_coerced_before_validation(tmp_path):
    result = dry_run(tmp_path, tiny_config(), "--config", 'neurons={"max_kn": "10"}',
                     'factcheck={"thresholds": ["0.5", "auto"]}', "seed=7", "--printshellcmds")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    result = dry_run(tmp_path, tiny_config(), "--config", 'attribution={"steps": "3"}')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_coercion_follows_arrays_and_schema_branches():
    schema = {"type": "object", "properties": {
        "thresholds": {"type": "array", "items": {"oneOf": [{"type": "number"},
                                                            {"type": "string", "enum": ["auto"]}]}},
        "sizes": {"type": "object", "additionalProperties": {"type": "integer"}}}}
    config = {"thresholds": ["0.5", "auto", "1e-3", "nan"], "sizes": {"a": "3", "b": "x"}}
    coerce_strings(config, schema)
    assert config == {"thresholds": [0.5, "auto", 0.001, "nan"], "sizes": {"a": 3, "b": "x"}}


def test_a_schema_violation_is_one_paragraph_naming_the_key():
    from kneurons.config import schema_error

    base = yaml.safe_load((REPO / "config.yaml").read_text())
    assert schema_error(base, SCHEMA) is None
    msg = schema_error({**base, "bogus": 1}, SCHEMA)
    assert msg.startswith("config: unknown key 'bogus' in the top level; allowed there:")
    assert "attribution" in msg and "seed" in msg and "\n" not in msg
    msg = schema_error({**base, "attribution": {"stepz": 3}}, SCHEMA)
    assert "'stepz' in attribution" in msg and "steps" in msg
    msg = schema_error({**base, "attribution": {"steps": 0}}, SCHEMA)
    assert msg.startswith("config: attribution.steps: 0 is less than the minimum of 1")


def test_an_unknown_key_on_the_command_line_prints_a_paragraph_not_the_schema():
    import subprocess
    import sys

    result = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-n", "--cores",
                             "1", "--config", "bogus=1"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "unknown key 'bogus'" in out
    assert len(out.splitlines()) < 15  # was 1184 lines: the whole schema


def test_an_unsupported_architecture_is_refused_at_plan_time(tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "phi"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "phi"}')
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["mlama"]["source"] = str(REPO / config["mlama"]["source"])
    config["models"] = {"my-phi": {"hf_id": str(folder), "arch": "causal", "languages": ["en"]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-n", "--cores", "1",
                             "--configfile", str(tmp_path / "c.yaml")], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "models.my-phi" in out and "model_type 'phi' is not supported" in out
    assert "gemma3_text" in out and "rule prepare_mlama" not in out


def test_a_dry_run_prints_no_empty_shell_commands():
    import subprocess
    import sys

    result = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-n", "--cores",
                             "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Shell command: None" not in result.stdout + result.stderr  # 52 lines before


def test_other_libraries_stderr_goes_to_the_rules_log(tmp_path):
    import subprocess
    import sys

    script = (f"import sys; sys.path.insert(0, {str(REPO / 'scripts')!r})\n"
              "from kneurons.logs import configure\n"
              f"configure({str(tmp_path / 'job.log')!r})\n"
              "from tqdm import tqdm\n"
              "for _ in tqdm(range(3), desc='Loading weights'): pass\n"
              "print('a warning of some library', file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stderr == ""
    log = (tmp_path / "job.log").read_text()
    assert "Loading weights" in log and "a warning of some library" in log


KEYWORDS = {"$schema", "description", "type", "properties", "additionalProperties", "required",
            "default", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "pattern",
            "items", "minItems", "uniqueItems", "enum", "oneOf", "anyOf", "not", "const",
            "minProperties", "propertyNames"}


def test_every_schema_key_has_a_type_and_no_stray_keywords():
    """A comma in a YAML flow mapping's description splits it into a stray key (it cut three
    descriptions in docs/configuration.md short): every property has a type (or
    alternatives) and every mapping only JSON Schema keywords."""
    problems = []

    def walk(node, where):
        if isinstance(node, dict):
            stray = set(node) - KEYWORDS
            if stray and where.split(".")[-1] not in ("properties",):
                problems.append(f"{where}: {sorted(stray)}")
            for key, value in node.items():
                if key == "properties":
                    for name, sub in value.items():
                        if not ({"type", "oneOf", "anyOf", "const"} & set(sub)):
                            problems.append(f"{where}.{name}: no type")
                        walk(sub, f"{where}.{name}")
                elif key in ("additionalProperties", "items", "not", "propertyNames"):
                    walk(value, f"{where}.{key}")
                elif key in ("oneOf", "anyOf"):
                    for i, sub in enumerate(value):
                        walk(sub, f"{where}.{key}[{i}]")
    walk(SCHEMA, "schema")
    assert problems == []
