"""Conda is not on the CI machine: check instead that envs/*.yaml pin what pyproject.toml pins."""

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def pins(requirements):
    found = {}
    for line in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line.strip())
        assert match, f"not pinned with ==: {line!r}"
        found[match[1].lower().replace("_", "-")] = match[2]
    return found


def project_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return pins(requirements)


@pytest.mark.parametrize("env", sorted((ROOT / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_conda_env_pins_agree_with_pyproject(env):
    spec = yaml.safe_load(env.read_text())
    pip = next(item["pip"] for item in spec["dependencies"] if isinstance(item, dict))
    expected = project_pins()
    for name, version in pins(pip).items():
        assert name in expected, f"{env.name}: {name} is not a dependency in pyproject.toml"
        assert version == expected[name], f"{env.name}: {name}=={version}, pyproject.toml pins {expected[name]}"


def test_every_rule_uses_an_existing_env():
    for rules in (ROOT / "rules").glob("*.smk"):
        for env in re.findall(r'"\.\./(envs/[^"]+)"', rules.read_text()):
            assert (ROOT / env).exists(), f"{rules.name} names {env}, which does not exist"
