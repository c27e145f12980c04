"""Conda is not on the CI machine: check instead that envs/*.yaml pin what pyproject.toml pins,
and that each rule's env holds what its script imports (with the packages those pull in)."""

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "workflow" / "scripts"


def pins(requirements):
    found = {}
    for line in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line.strip())
        assert match, f"not pinned with ==: {line!r}"
        found[match[1].lower().replace("_", "-")] = match[2]
    return found


def env_pins(env: Path) -> dict:
    spec = yaml.safe_load(env.read_text())
    return pins(next(item["pip"] for item in spec["dependencies"] if isinstance(item, dict)))


def project_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return pins(requirements)


@pytest.mark.parametrize("env", sorted((ROOT / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_conda_env_pins_agree_with_pyproject(env):
    expected = project_pins()
    for name, version in env_pins(env).items():
        assert name in expected, f"{env.name}: {name} is not a dependency in pyproject.toml"
        assert version == expected[name], f"{env.name}: {name}=={version}, pyproject.toml pins {expected[name]}"


def test_every_rule_uses_an_existing_env():
    for rules in (ROOT / "rules").glob("*.smk"):
        for env in re.findall(r'"\.\./(envs/[^"]+)"', rules.read_text()):
            assert (ROOT / env).exists(), f"{rules.name} names {env}, which does not exist"


def rules_with_env_and_script():
    for rules in sorted((ROOT / "rules").glob("*.smk")):
        for block in re.split(r"^rule ", rules.read_text(), flags=re.M)[1:]:
            env = re.search(r'conda:\s*"\.\./(envs/[^"]+)"', block)
            script = re.search(r'script:\s*"\.\./([^"]+)"', block)
            if env and script:
                yield pytest.param(ROOT / env[1], ROOT / script[1], id=block.split(":")[0])


def imported_on_load(path: Path, seen: set) -> set[str]:
    """Third-party top-level modules that importing `path` imports, following factft's own
    modules. Imports inside functions are left out: the library defers heavy ones (torch in a
    figure job's module) to the functions that need them, which only some rules call."""
    if path in seen:
        return set()
    seen.add(path)
    found = set()
    body = [s for s in ast.parse(path.read_text()).body if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in (node for statement in body for node in ast.walk(statement)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            module = SCRIPTS / name.replace(".", "/")
            if name.split(".")[0] == "factft":
                for file in (module.with_suffix(".py"), module / "__init__.py"):
                    if file.exists():
                        found |= imported_on_load(file, seen)
            elif name.split(".")[0] not in sys.stdlib_module_names:
                found.add(name.split(".")[0])
    return found


def with_requirements(names) -> set[str]:
    """The distributions `names` install, as installed here: each with its requirements."""
    todo, done = list(names), set()
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in done:
            continue
        done.add(name)
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return done


@pytest.mark.parametrize(("env", "script"), list(rules_with_env_and_script()))
def test_a_rules_env_holds_what_its_script_imports(env, script):
    installed = with_requirements(env_pins(env))
    distributions = metadata.packages_distributions()
    for module in sorted(imported_on_load(script, set())):
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        assert names & installed, f"{script.name} imports {module}, which {env.name} does not install"
