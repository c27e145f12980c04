"""Snakemake conventions hold for both shipped configs: formatted, lint-clean, log and benchmark on every rule,
report captions that render."""

import itertools
import re
import subprocess
import sys
import types
from pathlib import Path

import jinja2
import pytest

from factft.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RULE_FILES = [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk"))]


def test_snakefiles_are_snakefmt_formatted():
    run = subprocess.run(
        [sys.executable, "-m", "snakefmt", "--check", *map(str, RULE_FILES)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("config", [None, "config/demo.yaml"])
def test_snakemake_lint_finds_nothing(config):
    extra = ["--configfile", config] if config else []
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint", *extra], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0 and "Congratulations" in run.stdout + run.stderr, run.stdout + run.stderr


def rules_with_bodies():
    for path in RULE_FILES:
        text = path.read_text()
        for match in re.finditer(r"^(?:rule|use rule) (\w+).*?(?=^(?:rule|use rule|localrules|def |\Z))", text, re.S | re.M):
            # Target rules (all, download_datasets, ...) only list inputs: no job, no log.
            if "output:" in match[0] or match[0].startswith("use rule"):
                yield path.name, match[1], match[0]


@pytest.mark.parametrize("where,rule,body", list(rules_with_bodies()), ids=lambda v: v if isinstance(v, str) and len(v) < 40 else "")
def test_every_job_rule_has_log_and_benchmark(where, rule, body):
    if body.startswith("use rule"):
        assert "log:" in body and "benchmark:" in body, f"{where}: {rule} inherits its parent's log path"
    else:
        for key in ("log:", "benchmark:", "conda:"):
            assert key in body, f"{where}: rule {rule} has no {key}"


@pytest.mark.parametrize("name", ["config.yaml", "demo.yaml"])
def test_every_report_caption_renders_for_every_figure_of_the_shipped_configs(name):
    # A caption that fails to render fails `--report` at the very end of a grid.
    config = load_config(ROOT / "config" / name)
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined)
    sweeps = ["base", *config["simulation"]["sweeps"]]
    for caption in sorted((ROOT / "report").glob("*.rst")):
        template = environment.from_string(caption.read_text())
        for model, dataset, sweep in itertools.product(config["models"], config["datasets"], sweeps):
            wildcards = types.SimpleNamespace(model=model, dataset=dataset, sweep=sweep)
            text = template.render(snakemake=types.SimpleNamespace(config=config, wildcards=wildcards))
            assert text.strip() and "{{" not in text and "{%" not in text, caption.name


def test_every_job_rule_logs_to_a_path_of_its_own():
    # Two rules on one log path would overwrite each other's logs.
    logs = {}
    for where, rule, body in rules_with_bodies():
        (path,) = re.findall(r"^    log:\n\s+([^\s,]+),?$", body, re.M)  # one each
        logs.setdefault(path, []).append(f"{where}: {rule}")
    assert {path: rules for path, rules in logs.items() if len(rules) > 1} == {}


def test_every_report_caption_is_the_caption_of_one_output():
    # A caption named twice is the wrong one for one of its outputs (and another goes unused).
    named = [re.findall(r'caption="\.\./report/([\w.]+)"', path.read_text()) for path in RULE_FILES]
    named = sorted(itertools.chain.from_iterable(named))
    assert named == sorted(path.name for path in (ROOT / "report").glob("*.rst"))
