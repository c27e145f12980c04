"""Checks of the config that a JSON schema cannot express, and merged per-model settings.

The schema (workflow/schemas/config.schema.yaml) checks shapes, types and ranges and fills
defaults; these checks tie keys together (a scorer's model must be configured, ...). Both run
when the workflow starts, before any job.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import jsonschema
import yaml

from factft import subsets
from factft.errors import FactftError

SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "config.schema.yaml"

SCORER_NEEDS = {"column": "column", "model_confidence": "model"}


def check_config(config: dict) -> None:
    """Raise FactftError naming the key when config entries do not fit together."""
    datasets, models = config["datasets"], config["models"]
    subsets.check(config["subsets"], config["split"]["fraction"])
    synthetic = {name for name, d in datasets.items() if "synthetic" in d["source"]}
    for name, dataset in datasets.items():
        where = f"datasets.{name}"
        popularity = dataset.get("popularity")
        if popularity is None:
            raise FactftError(f"{where}.popularity: missing; say how to rank facts, e.g. {{scorer: column, column: s_pop}}")
        scorer = popularity["scorer"]
        needed = SCORER_NEEDS.get(scorer)
        if needed and needed not in popularity:
            raise FactftError(f"{where}.popularity.{needed}: required by scorer '{scorer}'")
        if scorer == "model_confidence" and popularity["model"] not in models:
            raise FactftError(
                f"{where}.popularity.model: '{popularity['model']}' is not a configured model; "
                f"models are: {sorted(models)}"
            )
        if scorer == "pretraining_count" and name not in synthetic:
            raise FactftError(
                f"{where}.popularity.scorer: pretraining_count needs a synthetic source "
                "(exact mention counts exist only for generated worlds)"
            )
        if dataset["format"] == "multiple_choice" and "synthetic" in dataset["source"]:
            raise FactftError(f"{where}.format: synthetic worlds are open QA")
    for name, model in models.items():
        pretrain = model["source"].get("pretrain")
        if pretrain and pretrain["dataset"] not in synthetic:
            raise FactftError(
                f"models.{name}.source.pretrain.dataset: '{pretrain['dataset']}' is not a synthetic "
                f"dataset; synthetic datasets are: {sorted(synthetic)}"
            )
        if pretrain and pretrain["hidden_size"] % pretrain["heads"]:
            raise FactftError(f"models.{name}.source.pretrain: hidden_size must be a multiple of heads")
        finetune_settings(config, name)


def finetune_settings(config: dict, model: str) -> dict:
    """The top-level finetune block with `models.<model>.finetune` merged over it, validated."""
    merged = copy.deepcopy(config["finetune"])
    for key, value in config["models"][model].get("finetune", {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    try:
        _finetune_validator().validate(merged)
    except jsonschema.ValidationError as error:
        key = ".".join(str(p) for p in error.absolute_path)
        raise FactftError(f"models.{model}.finetune.{key}: {error.message}") from None
    return merged


@functools.cache
def _finetune_validator() -> jsonschema.Draft202012Validator:
    # Built once: planning the paper grid calls finetune_settings for every job.
    schema = yaml.safe_load(SCHEMA.read_text())["properties"]["finetune"]
    return jsonschema.Draft202012Validator(schema)


def load_config(path: str | Path) -> dict:
    """Load and validate a config file the way the Snakefile does (for tests and scripts)."""
    from snakemake.utils import validate

    config = yaml.safe_load(Path(path).read_text())
    validate(config, str(SCHEMA))
    check_config(config)
    return config
