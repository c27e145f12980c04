"""Checks of the config that a JSON schema cannot express, merged prompt and finetune settings,
and the settings each finetune and evaluation job gets (its Snakemake params).

The schema (workflow/schemas/config.schema.yaml) checks shapes, types and ranges and fills
defaults; these checks tie keys together (a scorer's model must be configured, ...). Both run
when the workflow starts, before any job.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import jsonschema
import yaml

from factft import subsets
from factft.errors import FactftError
from factft.model_folder import check_model_folder
from factft.pageviews import check_range
from factft.popularity import SCORERS
from factft.prompts import FIELDS
from factft.sources import file_kind, kept_columns
from factft.sweeps import check_simulation

SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "config.schema.yaml"
# A model's keys that only its chat template reads (models.<name>.chat).
CHAT_KEYS = ("system_prompt", "chat_template_kwargs")

# PyYAML reads YAML 1.1, where a float needs a dot and a signed exponent: 1e-4 is text.
NUMBER_AS_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


# JSON Schema's integer takes 16.0; a batch size or step count of 16.0 fails in the job.
StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
    ),
)


def check_numbers(config: dict) -> None:
    """Raise FactftError for a number written in a form YAML reads as text (1e-4) where the
    schema wants a number, or with a decimal point (16.0) where it wants a whole number, naming
    the key and what to write. Runs before the schema, whose own message ("'1e-4' is not of
    type 'number'") does not say why, and which takes 16.0 for an integer."""
    for error in _with_context(StrictValidator(_schema()).iter_errors(config)):
        message = _misspelt_number(error)
        if message:
            raise FactftError(f"{'.'.join(str(p) for p in error.absolute_path)}: {message}")


def _misspelt_number(error: jsonschema.ValidationError) -> str | None:
    """What to write instead, where a schema error is a number that YAML read as text, or a
    whole number written as a float."""
    wanted = error.validator_value if error.validator == "type" else []
    wanted = set(wanted if isinstance(wanted, list) else [wanted])
    value = error.instance
    if wanted & {"number", "integer"} and isinstance(value, str) and NUMBER_AS_TEXT.fullmatch(value.strip()):
        return f"'{value}' is text to YAML, not a number; write {yaml_number(value)}"
    if "integer" in wanted and isinstance(value, float) and value.is_integer():
        return f"{value} is a decimal number to YAML and this key takes a whole one; write {int(value)}"
    return None


def _with_context(errors):
    """Schema errors and, depth first, those of the alternatives of each anyOf/oneOf."""
    for error in errors:
        yield error
        yield from _with_context(error.context or ())


def yaml_number(text: str) -> str:
    """`text` (1e-4, 3e3) spelled as YAML 1.1 reads a number: 1.0e-4, 3000."""
    value = float(text)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    mantissa, _, exponent = text.strip().lower().partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    if exponent[0] not in "+-":
        exponent = "+" + exponent
    return f"{mantissa}e{exponent}"


def model_reads(config: dict, model: str, dataset: str) -> bool:
    """Whether `model` can be asked `dataset`'s questions: a model pretrained here knows only the
    words of the world it was pretrained on (any other is <unk> to its tokenizer)."""
    pretrain = config["models"][model]["source"].get("pretrain")
    return pretrain is None or pretrain["dataset"] == dataset


# A model's jobs' resources, per attempt, by its kind; models.<name>.resources overrides them.
# A model pretrained here is CPU-sized. Any other is taken for a 7B on one GPU: its checkpoint
# passes through host memory on its way there (~2x its bf16 size).
MODEL_RESOURCES = {
    "pretrained here": {"gpu": 0, "mem_mb": 2000, "finetune_runtime": 30, "evaluate_runtime": 15},
    "other": {"gpu": 1, "mem_mb": 32000, "finetune_runtime": 480, "evaluate_runtime": 120},
}


def model_resources(config: dict, model: str) -> dict:
    """gpu, mem_mb (host memory of a job that loads the model) and the minutes of a finetune
    and of an evaluation, for `model`'s jobs."""
    kind = "pretrained here" if "pretrain" in config["models"][model]["source"] else "other"
    return {**MODEL_RESOURCES[kind], **config["models"][model].get("resources", {})}


def runs_on(config: dict, model: str, dataset: str) -> bool:
    """Whether the grid finetunes and evaluates `model` on `dataset`: one it can read, and one
    of `models.<model>.datasets` where that lists some."""
    listed = config["models"][model].get("datasets")
    return model_reads(config, model, dataset) and (listed is None or dataset in listed)


def ranking_models(config: dict, dataset: str) -> list[str]:
    """The models whose confidence ranks `dataset`'s facts, each into a folder of its own
    (by-<model>): its popularity.model, else each model that runs on it; none where its scorer
    needs no model."""
    popularity = config["datasets"][dataset]["popularity"]
    if not SCORERS[popularity["scorer"]].needs_model:
        return []
    if "model" in popularity:
        return [popularity["model"]]
    return [model for model in config["models"] if runs_on(config, model, dataset)]


def check_config(config: dict) -> None:
    """Raise FactftError naming the key when config entries do not fit together."""
    datasets, models = config["datasets"], config["models"]
    subsets.check(config["subsets"], config["split"]["fraction"])
    synthetic = {name for name, d in datasets.items() if "synthetic" in d["source"]}
    for name, dataset in datasets.items():
        where = f"datasets.{name}"
        popularity = dataset["popularity"]
        scorer_name = popularity["scorer"]
        scorer = SCORERS[scorer_name]
        for needed in scorer.required:
            if needed not in popularity:
                raise FactftError(f"{where}.popularity.{needed}: required by scorer '{scorer_name}'")
        # Keys the schema fills in for every scorer are everywhere; another that the scorer does not
        # read is a slip (a page-view `column` meant as title_column) that would pass unnoticed.
        unread = sorted(set(popularity) - {"scorer", *scorer.settings, *_popularity_defaults()})
        if unread:
            raise FactftError(
                f"{where}.popularity.{unread[0]}: scorer '{scorer_name}' does not read it (it reads: "
                f"{', '.join(scorer.settings) or 'no other key'})"
            )
        if scorer.needs_model and "model" in popularity and popularity["model"] not in models:
            raise FactftError(
                f"{where}.popularity.model: '{popularity['model']}' is not a configured model; "
                f"models are: {sorted(models)}"
            )
        if scorer.needs_model and "model" in popularity and not model_reads(config, popularity["model"], name):
            raise FactftError(
                f"{where}.popularity.model: '{popularity['model']}' is pretrained on another world and "
                f"cannot read this dataset's questions; name a hub model"
            )
        if scorer_name == "pageviews":
            check_range(popularity["start"], popularity["end"], f"{where}.popularity")
        if scorer.synthetic_only and name not in synthetic:
            raise FactftError(
                f"{where}.popularity.scorer: {scorer_name} needs a synthetic source "
                "(it reads what only a generated world records, such as exact mention counts)"
            )
        if dataset["format"] == "multiple_choice" and "synthetic" in dataset["source"]:
            raise FactftError(f"{where}.format: synthetic worlds are open QA")
        check_columns(where, dataset)
        prompt_settings(config, name)
        kept_columns(dict(dataset, name=name))
        source = dataset["source"]
        if "path" in source or "url" in source:
            file_kind(name, source)
        elif "reader" in source:
            raise FactftError(f"{where}.source.reader: reads a path's or a url's file; remove it")
    for name, model in models.items():
        pretrain = model["source"].get("pretrain")
        if pretrain and pretrain["dataset"] not in synthetic:
            raise FactftError(
                f"models.{name}.source.pretrain.dataset: '{pretrain['dataset']}' is not a synthetic "
                f"dataset; synthetic datasets are: {sorted(synthetic)}"
            )
        if pretrain and pretrain["hidden_size"] % pretrain["heads"]:
            raise FactftError(f"models.{name}.source.pretrain: hidden_size must be a multiple of heads")
        if pretrain and model.get("chat"):
            raise FactftError(f"models.{name}.chat: a model pretrained here has no chat template; set it false")
        for key in CHAT_KEYS:
            if model.get(key) and not model.get("chat"):
                raise FactftError(f"models.{name}.{key}: the chat template is used only with models.{name}.chat: true")
        for dataset in model.get("datasets", []):
            if dataset not in datasets:
                raise FactftError(
                    f"models.{name}.datasets: '{dataset}' is not a configured dataset; datasets are: {sorted(datasets)}"
                )
            if not model_reads(config, name, dataset):
                raise FactftError(
                    f"models.{name}.datasets: '{dataset}' is not the world the model is pretrained on "
                    f"('{pretrain['dataset']}'), so it cannot read its questions"
                )
        for dataset in (d for d in datasets if runs_on(config, name, d)):  # the pairs that run
            method = finetune_settings(config, name, dataset)["method"]
            if model.get("quantize") and method != "qlora":
                # lora would train over the 4-bit base all the same; full cannot train 4-bit weights.
                raise FactftError(
                    f"models.{name}.quantize: the model is held in 4 bits, so its finetunes are QLoRA, but "
                    f"finetune.method is '{method}' for dataset '{dataset}'; set models.{name}.finetune.method: qlora"
                )
            if method == "qlora" and "gguf_file" in model["source"]:
                raise FactftError(
                    f"models.{name}.source.gguf_file: transformers does not quantize a model read from GGUF, so "
                    f"finetune.method qlora (dataset '{dataset}') cannot load it; use method lora, or a "
                    "safetensors copy of the model (source.path)"
                )


def check_columns(where: str, dataset: dict) -> None:
    """A column mapped for the other format would be read by nothing: a slip (a multiple-choice
    dataset left `format: open`) that must not pass unnoticed."""
    columns, multiple_choice = dataset["columns"], dataset["format"] == "multiple_choice"
    unread = ["answers"] if multiple_choice and columns.get("answers", "answers") != "answers" else []
    unread += [] if multiple_choice else [key for key in ("choices", "answer_index") if key in columns]
    if unread:
        fmt = dataset["format"]
        reads = "choices and answer_index" if multiple_choice else "answers"
        raise FactftError(
            f"{where}.columns.{unread[0]}: format {fmt} does not read it (its answers come from {reads}); "
            f"remove it, or set {where}.format to the dataset's format"
        )


def missing_local_paths(config: dict) -> list[str]:
    """One message per local dataset file or model folder (or GGUF file) that is missing, naming
    its key. The workflow warns with them as it starts: with results already made from such a
    path, Snakemake would plan nothing (a missing input of a job it need not run) and keep them."""
    missing = []
    for name, dataset in config["datasets"].items():
        path = dataset["source"].get("path")
        if path is not None and not Path(path).is_file():
            missing.append(f"datasets.{name}.source.path: no file {path} (in {Path.cwd()})")
    for name, model in config["models"].items():
        message = _missing_model_path(name, model["source"])
        if message:
            missing.append(message)
    return missing


def _missing_model_path(name: str, source: dict) -> str | None:
    """What of a local model's folder (or its GGUF file) is not there; None for a hub model."""
    path, gguf = source.get("path"), source.get("gguf_file")
    if path is not None and not Path(path).is_dir():
        return f"models.{name}.source.path: no folder {path} (in {Path.cwd()})"
    if path is not None and gguf and not (Path(path) / gguf).is_file():
        return f"models.{name}.source.gguf_file: no file {gguf} in {path}"
    return None


def check_local_models(config: dict) -> None:
    """A local model folder (`source.path`) that is there must hold what a job loads: found
    now, not when its first model job fails after the data jobs ran (one that is not there is
    warned about: missing_local_paths)."""
    for name, model in config["models"].items():
        source = model["source"]
        if "path" in source and _missing_model_path(name, source) is None:
            spec = dict(name=name, path=source["path"], gguf_file=source.get("gguf_file"), chat=model.get("chat"))
            check_model_folder(spec)


# Maps the user names and orders (the order of figures and tables); every other block is
# settings, whose order means nothing.
NAMED_MAPS = {("datasets",), ("models",), ("simulation", "sweeps")}


def sort_settings(config: dict) -> None:
    """Sort every settings block's keys, in place. Snakemake compares a job's params by their
    repr, so without this a config that lists keys in another order, or writes out a default
    (the validator appends defaults after the keys given), would rerun every finished job."""

    def sorted_block(value, path: tuple):
        if isinstance(value, dict):
            keys = value if path in NAMED_MAPS else sorted(value)
            return {key: sorted_block(value[key], (*path, key)) for key in keys}
        if isinstance(value, list):
            return [sorted_block(item, path) for item in value]
        return value

    for key in config:
        config[key] = sorted_block(config[key], (key,))


def prompt_settings(config: dict, dataset: str) -> dict:
    """The top-level prompt block with `datasets.<dataset>.prompt` over it, key by key,
    checked against the dataset's format: {choices} and {letter} exist for multiple choice
    only, and a letter names an option only if the prompt shows the lettered options."""
    own = config["datasets"][dataset].get("prompt", {})
    merged = {key: own.get(key, value) for key, value in sorted(config["prompt"].items())}

    def where(key):
        return f"datasets.{dataset}.prompt.{key}" if key in own else f"prompt.{key}"

    for key, known in FIELDS.items():
        # A typo such as {choice} would reach the model as it is.
        unknown = sorted(set(re.findall(r"\{(\w+)\}", merged[key])) - set(known))
        if unknown:
            raise FactftError(
                f"{where(key)}: {{{unknown[0]}}} is not a field of a prompt {key}; its fields are "
                f"{', '.join('{' + field + '}' for field in sorted(known))}"
            )
    template, answer = merged["template"], merged["answer"]
    if template[-1:] in (" ", "\t"):
        # Tokenizers join a space to the word after it (' Paris' is one token): a prompt that
        # ends in one asks the model for a word without its space, unlike all it has read.
        raise FactftError(
            f"{where('template')} ends in whitespace ({template!r}); put the space at the start of "
            f"{where('answer')} instead (e.g. ' {{answer}}'), as the default prompt does"
        )
    if config["datasets"][dataset]["format"] == "open":
        for key, field in (("template", "{choices}"), ("answer", "{letter}")):
            if field in merged[key]:
                raise FactftError(
                    f"{where(key)}: {field} is for multiple-choice datasets and '{dataset}' is open QA; "
                    "give multiple-choice datasets their own prompt (datasets.<name>.prompt)"
                )
    elif "{letter}" in answer and "{choices}" not in template:
        raise FactftError(
            f"{where('answer')}: {{letter}} names an option, but {where('template')} does not show the "
            f"options of dataset '{dataset}'; add {{choices}} to it"
        )
    return merged


def finetune_settings(config: dict, model: str, dataset: str | None = None) -> dict:
    """The top-level finetune block with `datasets.<dataset>.finetune` and
    `models.<model>.finetune` merged over it (a nested block such as `lora` key by key),
    validated. A key the two overrides set to different values is an error: neither wins
    silently."""
    by_model = config["models"][model].get("finetune", {})
    by_dataset = config["datasets"][dataset].get("finetune", {}) if dataset is not None else {}
    model_leaves, dataset_leaves = _leaves(by_model), _leaves(by_dataset)
    clashes = sorted(k for k in model_leaves.keys() & dataset_leaves.keys() if model_leaves[k] != dataset_leaves[k])
    if clashes:
        raise FactftError(
            f"finetune.{clashes[0]}: set differently in models.{model}.finetune and datasets.{dataset}.finetune; "
            "set it in one of them (neither overrides the other)"
        )
    overrides = {f"datasets.{dataset}.finetune": by_dataset, f"models.{model}.finetune": by_model}
    merged = copy.deepcopy(config["finetune"])
    for block in overrides.values():
        for key, value in block.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    try:
        _finetune_validator().validate(merged)
    except jsonschema.ValidationError as error:
        message = _misspelt_number(error) or error.message
        raise FactftError(f"{_override_at_fault(overrides, error)}: {message}") from None
    return merged


# Finetune settings added after finished runs may exist, with the value that behaves as
# before they existed: left out of a job's params at that value, since Snakemake reruns a
# job whose params change (the library reads them with .get and that default).
LATER_SETTINGS = {"compile": False, "optimizer": "adamw", "max_grad_norm": None}
# What answering needs. evaluate.fewshot, attention_questions and percentiles stay out: they
# concern other rules (percentiles the metrics rule's), and a job whose params change is rerun.
EVALUATE_KEYS = ("max_new_tokens",)
# How an evaluation runs, not what it answers (the same answers, up to float rounding where a
# batch is padded otherwise): like RUNNING_SETTINGS, outside its params, so that a smaller
# batch for a GPU that ran out of memory reruns no finished evaluation.
EVALUATE_RUNNING = ("batch_size", "static_cache")


# How a finetune runs, not what it learns: how often it saves progress, and whether it
# recomputes activations instead of keeping them (the same losses: docs/benchmarks.md). These
# reach the job outside its params, so that turning checkpointing on for a finetune that ran out
# of GPU memory reruns no finished one, and stay out of its checkpoints' fingerprint.
RUNNING_SETTINGS = ("checkpoint_every", "gradient_checkpointing")


def finetune_job_settings(config: dict, model: str, dataset: str, seed: int | str) -> dict:
    """What decides one finetune's result: its merged settings but RUNNING_SETTINGS, and its
    seed."""
    settings = finetune_settings(config, model, dataset)
    for key in RUNNING_SETTINGS:
        del settings[key]
    for key, before in LATER_SETTINGS.items():
        if settings[key] == before:
            del settings[key]
    return dict(settings, seed=int(seed))


def evaluate_job_settings(config: dict, dataset: str) -> dict:
    """The evaluate block's keys an evaluation of `dataset` uses (choice_score only for a
    multiple-choice dataset), and the dataset's format."""
    fmt = config["datasets"][dataset]["format"]
    keys = [*EVALUATE_KEYS, *(["choice_score"] if fmt == "multiple_choice" else [])]
    return dict({key: config["evaluate"][key] for key in keys}, format=fmt)


def _override_at_fault(overrides: dict[str, dict], error: jsonschema.ValidationError) -> str:
    """The key a merged block's schema error is about, named where it was set."""
    path = [str(p) for p in error.absolute_path]
    key = ".".join(path)
    if not path:  # a key the schema does not know (no path): the block that has it
        known = set(_finetune_validator().schema["properties"])
        return next((name for name, block in overrides.items() if set(block) - known), "finetune")
    where = next((name for name, block in overrides.items() if key in _leaves(block) or path[0] in block), "finetune")
    return f"{where}.{key}"


def _leaves(block: dict) -> dict:
    """An override's values by key, a nested block's as `lora.r`."""
    leaves = {}
    for key, value in block.items():
        if isinstance(value, dict):
            leaves.update({f"{key}.{inner}": item for inner, item in value.items()})
        else:
            leaves[key] = value
    return leaves


@functools.cache
def _finetune_validator() -> jsonschema.Draft202012Validator:
    # Built once: planning the paper grid calls finetune_settings for every job.
    return StrictValidator(_schema()["properties"]["finetune"])


@functools.cache
def _schema() -> dict:
    return yaml.safe_load(SCHEMA.read_text())


def _popularity_defaults() -> set[str]:
    """The popularity keys the schema gives a default."""
    dataset = _schema()["properties"]["datasets"]["additionalProperties"]
    return {key for key, rule in dataset["properties"]["popularity"]["properties"].items() if "default" in rule}


def command_line_config(config_args: list[str] | None) -> list[dict]:
    """The lists and maps among `--config key=value` arguments, each as {key: value}, in the
    order given, read as the config file's YAML is.

    Snakemake reads their items as strings (YAML's BaseLoader: `seeds=[0]` gives `["0"]`,
    `split={pool_size: 2000}` gives `"2000"`), which the schema then refuses. Scalars are left
    to Snakemake, which already reads numbers and booleans; a malformed list stays its string.
    """
    typed = []
    for arg in config_args or ():
        key, _, value = arg.partition("=")
        if value.lstrip().startswith(("[", "{")):
            try:
                typed.append({key: yaml.safe_load(value)})
            except yaml.YAMLError:
                pass  # Snakemake kept it as a string; the schema names the key
    return typed


# Blocks whose keys follow one choice: which source, which scorer. Merged key by key, a block
# given with --config would keep the config file's other choice ({hf: ..., url: ...}).
SWITCHED_BLOCKS = {"datasets": ("source", "popularity"), "models": ("source",)}


def apply_command_line(config: dict, config_args: list[str] | None) -> None:
    """Apply `--config` over the config file (rules of README "The paper's grid"), one
    argument after another, as Snakemake does (a key given twice merges twice).

    Maps merge key by key, as Snakemake's own --config does, except that a `source` block, or a
    `popularity` block that names a scorer, replaces the block before it.
    """
    from snakemake.utils import update_config

    for typed in command_line_config(config_args):
        update_config(config, typed)
        for group, keys in SWITCHED_BLOCKS.items():
            given = typed.get(group)
            for name, entry in (given.items() if isinstance(given, dict) else ()):
                for key in keys if isinstance(entry, dict) else ():
                    block = entry.get(key)
                    if isinstance(block, dict) and (key == "source" or "scorer" in block):
                        config[group][name][key] = copy.deepcopy(block)


def prepare_config(config: dict) -> None:
    """Check a config and make it the workflow's, in place (the Snakefile, load_config): numbers
    as numbers, the schema with its defaults filled in, the checks the schema cannot express
    (the workflow's and the simulation's), then every settings block sorted."""
    check_numbers(config)
    validate_config(config)
    check_config(config)
    check_local_models(config)
    check_simulation(config["simulation"])
    sort_settings(config)


def validate_config(config: dict) -> None:
    """Check the config against the schema and fill in its defaults (Snakemake's validate),
    raising FactftError with one line naming the key: Snakemake's own error goes on to print
    the whole schema and config (1,500 lines for a misspelt key)."""
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    given = copy.deepcopy(config)  # validate fills in defaults as it goes
    try:
        validate(config, str(SCHEMA))
    except WorkflowError:
        # Its error reaches us only as that text: found again, to name the key.
        error = jsonschema.exceptions.best_match(StrictValidator(_schema()).iter_errors(given))
        if error is None:
            raise
        raise FactftError(schema_message(error)) from None


def schema_message(error: jsonschema.ValidationError) -> str:
    """A schema error as "key.path: what is wrong" (of a oneOf's alternatives, the likeliest:
    jsonschema's best_match), the value cut short."""
    key = ".".join(str(p) for p in error.absolute_path)
    message = error.message if len(error.message) <= 300 else error.message[:300] + " ..."
    return f"{key}: {message}" if key else message


def load_config(path: str | Path) -> dict:
    """A config file, prepared as the Snakefile prepares it (for tests and scripts)."""
    config = yaml.safe_load(Path(path).read_text())
    prepare_config(config)
    return config
