"""Every rule has a conda env; each env parses, pins its packages, and agrees with the
versions the project's own install uses (requirements.txt)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RULE = re.compile(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", re.M | re.S)


def rules() -> dict[str, str]:
    found = {}
    for path in [REPO / "Snakefile", *sorted((REPO / "workflow/rules").glob("*.smk"))]:
        for name, body in RULE.findall(path.read_text()):
            found[name] = body
    return found


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_every_rule_but_all_has_log_and_conda():
    found = rules()
    assert {"prepare_mlama", "attribute_shard", "detect_dkn", "fact_check"} <= set(found)
    for name, body in found.items():
        if name == "all":
            continue
        assert "log:" in body, f"rule {name} has no log:"
        match = re.search(r'conda:\n\s+"([^"]+)"', body)
        assert match, f"rule {name} has no conda:"
        assert (REPO / "workflow/rules" / match.group(1)).resolve().is_file(), name


@pytest.mark.parametrize("env", sorted((REPO / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_env_files_pin_versions_consistent_with_requirements(env):
    spec = yaml.safe_load(env.read_text())
    assert spec["channels"] and spec["dependencies"]
    pins = requirement_pins()
    pins["torch"] = "2.13.0"  # installed by the Makefile, not listed in requirements.txt
    conda_names = {"pytorch": "torch", "matplotlib-base": "matplotlib"}
    for dep in spec["dependencies"]:
        entries = dep["pip"] if isinstance(dep, dict) else [dep]
        for entry in entries:
            match = re.match(r"^([A-Za-z0-9_.-]+)\s*(==|=)\s*([^\s=]+)$", entry)
            assert match, f"{env.name}: {entry!r} is not pinned"
            name = conda_names.get(match.group(1).lower(), match.group(1).lower())
            if name in pins:
                assert match.group(3) == pins[name], f"{env.name}: {name} {match.group(3)} != {pins[name]}"
