# Helpers shared by the rules: config lookups, wildcard constraints, target lists.
# Rules never dig into nested config; they call these.
from snakemake.exceptions import WorkflowError

from factft.config import check_config, finetune_settings
from factft.errors import FactftError

try:
    check_config(config)
except FactftError as error:
    raise WorkflowError(f"config: {error}") from None

DATASETS = config["datasets"]
MODELS = config["models"]
SUBSETS = config["subsets"]
SEEDS = config["seeds"]


def alternatives(names):
    """A wildcard regex matching exactly `names` (and nothing when empty)."""
    return "|".join(sorted(names)) or "(?!x)x"


def datasets_with(kind):
    return [name for name, d in DATASETS.items() if kind in d["source"]]


def models_with(kind):
    return [name for name, m in MODELS.items() if kind in m["source"]]


wildcard_constraints:
    dataset=alternatives(DATASETS),
    fetched=alternatives(set(DATASETS) - set(datasets_with("synthetic"))),
    world=alternatives(datasets_with("synthetic")),
    model=alternatives(MODELS),
    hub_model=alternatives(models_with("hf")),
    tiny_model=alternatives(models_with("pretrain")),
    subset=alternatives(SUBSETS),
    seed=r"\d+",


# ---- datasets -------------------------------------------------------------------


def raw_table(dataset):
    return f"resources/datasets/{dataset}/raw.parquet"


def dataset_spec(wildcards):
    """The dataset's config entry (source, format, columns, ...), for `download`."""
    name = getattr(wildcards, "fetched", None) or wildcards.dataset
    return dict(DATASETS[name], name=name)


def world_params(wildcards):
    return DATASETS[wildcards.world]["source"]["synthetic"]


def popularity_params(wildcards):
    return dict(DATASETS[wildcards.dataset]["popularity"], dataset=wildcards.dataset)


def popularity_inputs(wildcards):
    """The raw table, plus the scoring model where the scorer needs one."""
    inputs = {"raw": raw_table(wildcards.dataset)}
    popularity = DATASETS[wildcards.dataset]["popularity"]
    if popularity["scorer"] == "model_confidence":
        inputs["model"] = model_dir(popularity["model"])
    return inputs


def pageview_cache():
    return f"{config['cache_dir']}/pageviews"


def split_params(wildcards):
    return dict(config["split"], dataset=wildcards.dataset)


SPLITS = ("top", "bottom", "random", "whole", "test")


def split_outputs(prefix):
    return {name: f"{prefix}/{name}.parquet" for name in SPLITS}


# ---- models ---------------------------------------------------------------------


def model_dir(model):
    """Where a model's weights are: a local folder as given, else the cache we fill."""
    source = MODELS[model]["source"]
    return source["path"] if "path" in source else f"resources/models/{model}"


def model_spec(model):
    """What loading a model needs: folder, GGUF file, remote-code opt-in."""
    source = MODELS[model]["source"]
    return {
        "name": model,
        "path": model_dir(model),
        "gguf_file": source.get("gguf_file"),
        "trust_remote_code": MODELS[model]["trust_remote_code"],
    }


def base_model(wildcards):
    return model_dir(wildcards.model)


def base_model_spec(wildcards):
    return model_spec(wildcards.model)


def hub_model_spec(wildcards):
    return dict(MODELS[wildcards.hub_model]["source"], cache_dir=config["cache_dir"])


def pretrain_params(wildcards):
    return MODELS[wildcards.tiny_model]["source"]["pretrain"]


def pretrain_corpus(wildcards):
    world = pretrain_params(wildcards)["dataset"]
    return f"resources/datasets/{world}/corpus.txt"


def finetune_params(wildcards):
    return dict(finetune_settings(config, wildcards.model), seed=int(wildcards.seed))


def finetune_gpus(wildcards):
    return 1 if finetune_settings(config, wildcards.model)["method"] == "qlora" else 0


# ---- evaluation and targets -----------------------------------------------------

RUN = "results/{model}/{dataset}/{subset}/seed{seed}"
BASE = "results/{model}/{dataset}/base"


def evaluate_params(wildcards):
    dataset = DATASETS[wildcards.dataset]
    return dict(config["evaluate"], format=dataset["format"], prompt=config["prompt"])


def experiments():
    """Every (model, dataset) pair of the grid."""
    return [(m, d) for m in MODELS for d in DATASETS]


def run_metrics(model, dataset):
    return expand(
        RUN + "/metrics.tsv", model=model, dataset=dataset, subset=SUBSETS, seed=SEEDS
    )


def all_targets():
    targets = ["results/tables/summary.tsv"]
    for model, dataset in experiments():
        targets += run_metrics(model, dataset)
        targets.append(BASE.format(model=model, dataset=dataset) + "/metrics.tsv")
        targets.append(f"results/figures/{model}/{dataset}/accuracy_vs_popularity.png")
    targets += simulation_targets()
    return targets
