# Helpers shared by the rules: config lookups, wildcard constraints, target lists.
# Rules never dig into nested config; they call these.
import os
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

from factft.config import (
    CHAT_KEYS,
    EVALUATE_RUNNING,
    RUNNING_SETTINGS,
    evaluate_job_settings,
    finetune_job_settings,
    finetune_settings,
    missing_local_paths,
    model_reads,
    model_resources,
    prompt_settings,
    ranking_models,
    runs_on,
)
from factft.popularity import DOWNLOAD_READS, SCORERS
from factft.sweeps import BASE as SIM_BASE
from factft.sweeps import point_settings, point_value, run_of, sweep_points
from factft.split import CAPS
from factft.subsets import is_sized

# A warning, not an error: targets that never read the path still run. Only in the run started
# by hand: a SLURM job parses this file again on a compute node, which need not see a dataset
# file on the login node (only `download`, a localrule, reads it).
if workflow.is_main_process:
    for missing in missing_local_paths(config):
        logger.warning(
            f"config: {missing}; results made from it are kept as they are, and a job that must read it"
            " stops the plan (Missing input files)"
        )

# Every job inherits this: its log is a file, where the hub libraries' progress bars would be
# \r-joined lines (finetune logs its own progress lines). Set either to 0 to see them.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

DATASETS = config["datasets"]
MODELS = config["models"]
SUBSETS = config["subsets"]
# Sized subsets (top25, ...) sweep the amount of finetuning data; the paper's four
# (split.fraction of the pool, and whole) are the ones the popularity and attention
# figures compare.
SIZED_SUBSETS = [s for s in SUBSETS if is_sized(s)]
PAPER_SUBSETS = [s for s in SUBSETS if not is_sized(s)]
SEEDS = config["seeds"]


def alternatives(names):
    """A wildcard regex matching exactly `names` (and nothing when empty)."""
    return "|".join(sorted(names)) or "(?!x)x"


def datasets_with(kind):
    return [name for name, d in DATASETS.items() if kind in d["source"]]


def models_with(kind):
    return [name for name, m in MODELS.items() if kind in m["source"]]


# ---- rankings: whose popularity orders a dataset's facts -------------------------
# A model-free scorer ranks a dataset once, in results/{dataset}/. The model_confidence
# scorer ranks it by a model's confidence, and the model is part of the path,
# results/{dataset}/by-{model}/: the model popularity.model names, or without one each
# finetuned model itself (a run's FT-Top then holds the facts its own model knows best).
# The data rules' {ranked} wildcard is either form.
BY = "by-"


def scorer_of(dataset):
    """The dataset's popularity Scorer (factft.popularity.SCORERS)."""
    return SCORERS[DATASETS[dataset]["popularity"]["scorer"]]


def scoring_model(dataset, model):
    """The model whose confidence ranks `dataset` for runs of `model`; None if no model does."""
    if not scorer_of(dataset).needs_model:
        return None
    return DATASETS[dataset]["popularity"].get("model") or model


def ranked(dataset, model):
    """`dataset`'s results folder under results/, as ranked for runs of `model`."""
    scorer = scoring_model(dataset, model)
    return dataset if scorer is None else f"{dataset}/{BY}{scorer}"


def rankings():
    """Every {ranked}: a dataset, or dataset/by-<model> for each model that ranks it."""
    folders = {d for d in DATASETS if not ranking_models(config, d)}
    return folders | {
        f"{d}/{BY}{m}" for d in DATASETS for m in ranking_models(config, d)
    }


def ranking_of(wildcards):
    """(dataset, scoring model or None) of a data job: its {ranked}, or its {dataset}."""
    dataset, *by = (getattr(wildcards, "ranked", None) or wildcards.dataset).split("/")
    return dataset, by[0].removeprefix(BY) if by else None


def split_table(dataset, model, table):
    """The path of split table `table` (test, whole, a subset) of `dataset`, as ranked for
    runs of `model`."""
    return f"results/{ranked(dataset, model)}/splits/{table}.parquet"


def split_file(name=None):
    """Input function: the run's split table `name` (`test`, `whole`; by default the run's
    own subset), as ranked for its model."""

    def path(wildcards):
        return split_table(wildcards.dataset, wildcards.model, name or wildcards.subset)

    return path


wildcard_constraints:
    dataset=alternatives(DATASETS),
    fetched=alternatives(set(DATASETS) - set(datasets_with("synthetic"))),
    world=alternatives(datasets_with("synthetic")),
    model=alternatives(MODELS),
    hub_model=alternatives(models_with("hf")),
    tiny_model=alternatives(models_with("pretrain")),
    subset=alternatives(SUBSETS),
    part=alternatives(CAPS),
    # top, bottom and random whether `subsets` lists them or not (any split table can be
    # asked for), and the config's sized subsets.
    cut=alternatives({"top", "bottom", "random", *SIZED_SUBSETS}),
    seed=r"\d+",
    ranked=alternatives(rankings()),
    # What an evaluation rule's path has between results/ and answers.parquet.
    evaluation=rf"(?:{alternatives(MODELS)})/(?:{alternatives(DATASETS)})/"
    rf"(?:base|fewshot|cloze|(?:{alternatives(SUBSETS)})/seed\d+)",


# ---- settings that change how a job runs, not what it writes ----------------------


def running(setting):
    """A params entry for a setting that changes no output (where the cache lives, how a
    finetune runs, how fast page views are fetched, how many invalid rows fail a job):
    changing it must rerun no finished job. Snakemake leaves params that a function derives
    from the job's `resources` out of its params-change check, so the setting goes through
    such a function. `setting` is a value, or a function of the wildcards."""

    def how_the_job_runs(wildcards, resources):
        return setting(wildcards) if callable(setting) else setting

    return how_the_job_runs


# ---- datasets -------------------------------------------------------------------


def raw_table(dataset):
    return f"resources/datasets/{dataset}/raw.parquet"


def dataset_spec(wildcards):
    """What `download` reads of the dataset's entry: its source, format and columns, and the
    column its popularity scorer reads. Not its split, finetune or other scoring settings:
    a change there reruns the jobs that use them, not the download and all after it."""
    name = getattr(wildcards, "fetched", None) or wildcards.dataset
    entry = DATASETS[name]
    read = ("source", "format", "columns", "keep_columns")
    popularity = {k: v for k, v in entry["popularity"].items() if k in DOWNLOAD_READS}
    return dict(
        {k: entry[k] for k in read if k in entry}, popularity=popularity, name=name
    )


def world_params(wildcards):
    return DATASETS[wildcards.world]["source"]["synthetic"]


def popularity_params(wildcards):
    """What the dataset's scorer reads of its popularity block (its Scorer's settings in
    factft.popularity), with the model that scores where a model's confidence ranks it.
    """
    dataset, scoring = ranking_of(wildcards)
    popularity = DATASETS[dataset]["popularity"]
    keys = scorer_of(dataset).settings
    settings = {k: popularity[k] for k in keys if k in popularity and k != "model"}
    if scoring is not None:
        settings["model"] = scoring
    return dict(settings, scorer=popularity["scorer"], dataset=dataset)


def requests_per_second(wildcards):
    return DATASETS[wildcards.dataset]["popularity"]["requests_per_second"]


def popularity_inputs(wildcards):
    """The raw table, plus the scoring model or the fetched page views where the scorer needs them."""
    dataset, scorer = ranking_of(wildcards)
    inputs = {"raw": raw_table(dataset)}
    if scorer is not None:
        inputs["model"] = model_inputs(scorer)
    if scorer_of(dataset).needs_pageviews:
        inputs["pageviews"] = pageviews_file(dataset)
    return inputs


def pageview_cache():
    return f"{config['cache_dir']}/pageviews"


def pageview_contact():
    """Who runs the workflow (email or URL), for the page-view requests' User-Agent."""
    return config["contact"]


def pageviews_file(dataset):
    return f"resources/datasets/{dataset}/pageviews.parquet"


def cache_dir():
    return config["cache_dir"]


def max_drop_fraction():
    return config["split"]["max_drop_fraction"]


def source_file(wildcards):
    """A local source file is an input, so editing it reruns `download`."""
    source = DATASETS[wildcards.fetched]["source"]
    return [source["path"]] if "path" in source else []


def scoring_question(wildcards):
    """The prompt and format a model's confidence is asked in (for multiple choice, with the
    choice score evaluation picks by); None for the scorers that run no model, so that a
    prompt edit does not rerun their popularity (and split) jobs."""
    dataset, scorer = ranking_of(wildcards)
    if scorer is None:
        return None
    fmt = DATASETS[dataset]["format"]
    question = {"prompt": prompt_params(wildcards), "fmt": fmt}
    # At "sum", what the scorer did before it read the setting: left out, so that finished
    # popularity jobs (and all after them) are not planned again.
    if fmt == "multiple_choice" and config["evaluate"]["choice_score"] != "sum":
        question["choice_score"] = config["evaluate"]["choice_score"]
    return question


def popularity_model(wildcards):
    """The scoring model's model_spec for model_confidence, else None."""
    scorer = ranking_of(wildcards)[1]
    return None if scorer is None else model_spec(scorer)


def popularity_gpus(wildcards):
    scorer = ranking_of(wildcards)[1]
    return 0 if scorer is None else model_resources(config, scorer)["gpu"]


def popularity_mem_mb(wildcards, attempt):
    """Host memory: the scoring model's where one scores the facts, at least a CPU job's."""
    scorer = ranking_of(wildcards)[1]
    mem_mb = (
        4000 if scorer is None else max(4000, model_resources(config, scorer)["mem_mb"])
    )
    return mem_mb * attempt


def popularity_runtime(wildcards, attempt):
    """Minutes; a model scores each fact once, as an evaluation (MMLU's 14k: minutes on one GPU)."""
    scorer = ranking_of(wildcards)[1]
    minutes = (
        60
        if scorer is None
        else max(60, model_resources(config, scorer)["evaluate_runtime"])
    )
    return minutes * attempt


def download_targets():
    """What needs the internet for the datasets: raw tables of fetched ones, page views."""
    fetched = set(DATASETS) - set(datasets_with("synthetic"))
    targets = [raw_table(name) for name in sorted(fetched)]
    for name in sorted(DATASETS):
        if scorer_of(name).needs_pageviews:
            targets.append(pageviews_file(name))
    return targets


def data_targets():
    """Every split table the grid's runs read. Snakemake plans a run again when a job before it
    is planned, before seeing what that job writes; built first, as a target of their own, the
    tables that come out the same leave their runs alone (small files are compared by content).
    """
    tables = {"test", "whole", *SUBSETS}
    return sorted(
        {split_table(d, m, table) for m, d in experiments() for table in tables}
    )


def split_params(wildcards):
    """What the subject split's table {part} needs: the subject share and seed, and that
    table's cap (the dataset's own, datasets.<name>.split, over the split block's); the
    other table's cap would rerun it, and every finetune on the pool, for nothing."""
    dataset = ranking_of(wildcards)[0]
    settings = dict(config["split"], **DATASETS[dataset].get("split", {}))
    keys = ("test_fraction", "seed", CAPS[wildcards.part])
    return dict({key: settings[key] for key in keys}, dataset=dataset)


def subset_params(wildcards):
    """What cutting subset {cut} from the pool needs. split.fraction only for top, bottom
    and random: a sized subset's name gives its share, and a param that changes reruns the
    job and every finetune on its output."""
    keys = ("stratify", "seed", *(() if is_sized(wildcards.cut) else ("fraction",)))
    return dict(
        {key: config["split"][key] for key in keys}, dataset=ranking_of(wildcards)[0]
    )


def split_fraction():
    return config["split"]["fraction"]


# ---- models ---------------------------------------------------------------------


def model_dir(model):
    """Where a model's weights are: a local folder as given, else the cache we fill."""
    source = MODELS[model]["source"]
    return source["path"] if "path" in source else f"resources/models/{model}"


# The files of a local model folder that loading it reads: weights, configs, tokenizer, chat
# template, remote code.
MODEL_FILE_SUFFIXES = (
    ".safetensors",
    ".json",
    ".model",
    ".jinja",
    ".txt",
    ".tiktoken",
    ".py",
)


def model_inputs(model):
    """A model as a job's input: a local folder's model files, so that weights rewritten in
    place rerun its jobs (the folder's own time does not change then); else the folder that
    download_model or pretrain fills."""
    source = MODELS[model]["source"]
    if "path" not in source:
        return model_dir(model)
    folder = Path(source["path"])
    if source.get("gguf_file"):
        return str(folder / source["gguf_file"])
    if not folder.is_dir():
        return str(folder)  # missing: warned at start, like a missing dataset file
    return sorted(
        str(f)
        for f in folder.iterdir()
        if f.is_file() and f.suffix in MODEL_FILE_SUFFIXES
    )


def model_spec(model):
    """What loading a model needs: folder, GGUF file, remote-code opt-in; `chat`,
    its system prompt, template variables, `quantize`, and `device: cpu` for a model whose
    `resources` give it no GPU, only when set (so that they rerun no job)."""
    source = MODELS[model]["source"]
    spec = {
        "name": model,
        "path": model_dir(model),
        "gguf_file": source.get("gguf_file"),
        "trust_remote_code": MODELS[model]["trust_remote_code"],
    }
    if MODELS[model]["chat"]:
        spec["chat"] = True
    for key in (*CHAT_KEYS, "quantize"):
        if MODELS[model].get(key):
            spec[key] = MODELS[model][key]
    # Where a GPU is visible its jobs would use it, yet hold none (`--resources gpu=1`), so
    # beside a 7B job's. The demo's model (no GPU either) keeps the default: what it ran on.
    if MODELS[model].get("resources", {}).get("gpu") == 0:
        spec["device"] = "cpu"
    return spec


def base_model(wildcards):
    model, dataset = wildcards.model, wildcards.dataset
    if not model_reads(config, model, dataset):
        world = MODELS[model]["source"]["pretrain"]["dataset"]
        raise WorkflowError(
            f"model '{model}' is pretrained on dataset '{world}''s world and knows no other "
            f"words: its tokenizer would read '{dataset}''s questions as <unk>"
        )
    if not runs_on(config, model, dataset):
        raise WorkflowError(
            f"model '{model}' runs on the datasets models.{model}.datasets lists ({', '.join(MODELS[model]['datasets'])}), "
            f"not on '{dataset}': add it there"
        )
    return model_inputs(model)


def base_model_spec(wildcards):
    return model_spec(wildcards.model)


def finetune_model_spec(wildcards):
    """model_spec without `quantize`: a finetune's 4-bit base comes from its method (qlora,
    which quantize requires), so setting quantize later reruns no finetune."""
    spec = model_spec(wildcards.model)
    spec.pop("quantize", None)
    return spec


def hub_model_spec(wildcards):
    return MODELS[wildcards.hub_model]["source"]


def pretrain_params(wildcards):
    return MODELS[wildcards.tiny_model]["source"]["pretrain"]


def corpus_file(world):
    return f"resources/datasets/{world}/corpus.txt"


def pretrain_corpus(wildcards):
    return corpus_file(pretrain_params(wildcards)["dataset"])


def pretrain_facts(wildcards):
    """The world's facts: its questions join the tokenizer's vocabulary."""
    return raw_table(pretrain_params(wildcards)["dataset"])


def finetune_params(wildcards):
    """What decides a finetune's result; how it runs goes through `running`."""
    return finetune_job_settings(
        config, wildcards.model, wildcards.dataset, wildcards.seed
    )


def finetune_running(wildcards):
    """How a finetune runs (RUNNING_SETTINGS): a change reruns no finished job."""
    settings = finetune_settings(config, wildcards.model, wildcards.dataset)
    return {key: settings[key] for key in RUNNING_SETTINGS}


def tiny_model(model):
    return "pretrain" in MODELS[model]["source"]


def model_gpus(wildcards):
    """One GPU for a job that runs a hub model or a local folder, none for the demo's tiny
    model or one whose resources say gpu 0 (factft.config.model_resources). Without the SLURM
    profile this still matters: `--resources gpu=1` runs them one at a time."""
    return model_resources(config, wildcards.model)["gpu"]


def model_mem_mb(wildcards, attempt):
    """Host memory of a job that loads the model (finetune, evaluate, attention)."""
    return model_resources(config, wildcards.model)["mem_mb"] * attempt


def finetune_mem_mb(wildcards, attempt):
    """model_mem_mb, twice over for a full finetune: its fp32 weights are built in host
    memory before they move to the GPU (27 GB for a 7B), and each checkpoint copies them
    back there; 32 GB would stop it at its first attempt."""
    method = finetune_settings(config, wildcards.model, wildcards.dataset)["method"]
    return model_mem_mb(wildcards, attempt) * (2 if method == "full" else 1)


def finetune_runtime(wildcards, attempt):
    """Minutes; a --retries attempt after a timeout resumes from its checkpoint with more."""
    return model_resources(config, wildcards.model)["finetune_runtime"] * attempt


def prompt_params(wildcards):
    """The prompt of the job's dataset (a tiny model's: its pretraining world's)."""
    if hasattr(wildcards, "tiny_model"):
        return prompt_settings(config, pretrain_params(wildcards)["dataset"])
    return prompt_settings(config, ranking_of(wildcards)[0])


# ---- evaluation and targets -----------------------------------------------------

RUN = "results/{model}/{dataset}/{subset}/seed{seed}"
BASE = "results/{model}/{dataset}/base"
FEWSHOT = "results/{model}/{dataset}/fewshot"
CLOZE = "results/{model}/{dataset}/cloze"


def evaluate_params(wildcards):
    return dict(
        evaluate_job_settings(config, wildcards.dataset),
        prompt=prompt_params(wildcards),
    )


def evaluate_running():
    """How evaluations (and attention) run (EVALUATE_RUNNING): a change reruns no finished job."""
    return {key: config["evaluate"][key] for key in EVALUATE_RUNNING}


def evaluate_batch_size():
    """Rows per forward pass where a model scores facts (model_confidence), as evaluations run."""
    return config["evaluate"]["batch_size"]


def evaluated(wildcards):
    """The model and dataset of an evaluation's path ({model}/{dataset}/...)."""
    model, dataset, *_ = Path(wildcards.evaluation).parts
    return model, dataset


def evaluation_test(wildcards):
    """The test split an evaluation answered."""
    model, dataset = evaluated(wildcards)
    return split_table(dataset, model, "test")


def evaluation_format(wildcards):
    """How the evaluation's dataset is asked, and so scored (open, multiple_choice)."""
    model, dataset = evaluated(wildcards)
    return DATASETS[dataset]["format"]


def metrics_percentiles():
    return config["evaluate"]["percentiles"]


def fewshot_shots():
    return config["evaluate"]["fewshot"]


def fewshot_metrics(model, dataset):
    """The base model's k-shot metrics (evaluate.fewshot = k); a list, empty when k is 0."""
    if not fewshot_shots():
        return []
    return [f"{FEWSHOT.format(model=model, dataset=dataset)}/metrics.tsv"]


def evaluate_runtime(wildcards, attempt):
    """Minutes; generation over a few thousand test questions, batched on one GPU."""
    return model_resources(config, wildcards.model)["evaluate_runtime"] * attempt


def cloze_metrics(model, dataset):
    """The pretrained model's statement-completion metrics: only for the synthetic world it
    was pretrained on (statements exist only there). A list, empty when there is none.
    """
    if not (tiny_model(model) and model_reads(config, model, dataset)):
        return []
    return [f"{CLOZE.format(model=model, dataset=dataset)}/metrics.tsv"]


def experiments():
    """Every (model, dataset) pair of the grid: each model with each dataset it runs on
    (a model pretrained here: its own world; else all, or models.<model>.datasets)."""
    return [(m, d) for m in MODELS for d in DATASETS if runs_on(config, m, d)]


if workflow.is_main_process:
    for unread in sorted(set(DATASETS) - {dataset for _, dataset in experiments()}):
        logger.warning(
            f"dataset '{unread}': no model runs on it (a model pretrained here knows only its own "
            "world's words; models.<model>.datasets limits a model to those it lists), so `all` "
            "finetunes and evaluates nothing on it: add a hub model or a local model folder"
        )


def run_metrics(model, dataset):
    return expand(
        f"{RUN}/metrics.tsv", model=model, dataset=dataset, subset=SUBSETS, seed=SEEDS
    )


# ---- figures and summary --------------------------------------------------------

FIGURE = "results/figures/{model}/{dataset}/accuracy_vs_popularity"
SIZE_FIGURE = "results/figures/{model}/{dataset}/accuracy_vs_subset_size"
TRAINING_FIGURE = "results/figures/{model}/{dataset}/training_loss"
OVERVIEW = "results/figures/overview"


def metrics_sources(model, dataset, subsets=SUBSETS):
    """Every metrics table of one (model, dataset) (of `subsets` among the finetuned runs),
    labelled (subset, seed) for factft.summary; a finetuned run's source names its
    predictions too.
    """
    where = dict(model=model, dataset=dataset)
    sources = []
    for subset in subsets:
        for seed in SEEDS:
            run = RUN.format(**where, subset=subset, seed=seed)
            sources.append(
                dict(
                    where,
                    subset=subset,
                    seed=seed,
                    path=f"{run}/metrics.tsv",
                    predictions=f"{run}/predictions.parquet",
                )
            )
    base = f"{BASE.format(**where)}/metrics.tsv"
    sources.append(dict(where, subset="base", seed=None, path=base))
    for path in fewshot_metrics(model, dataset):
        sources.append(dict(where, subset="fewshot", seed=None, path=path))
    for path in cloze_metrics(model, dataset):
        sources.append(dict(where, subset="cloze", seed=None, path=path))
    return sources


def figure_sources(wildcards):
    """The popularity figure draws the paper's four subsets: it need not wait for sized runs."""
    return metrics_sources(wildcards.model, wildcards.dataset, PAPER_SUBSETS)


def popularity_scorer(wildcards):
    return DATASETS[wildcards.dataset]["popularity"]["scorer"]


def figure_inputs(wildcards):
    return [source["path"] for source in figure_sources(wildcards)]


def size_figure_sources(wildcards):
    return metrics_sources(wildcards.model, wildcards.dataset)


def size_figure_inputs(wildcards):
    return [source["path"] for source in size_figure_sources(wildcards)]


def training_sources(wildcards):
    """The train log of every run of the paper's four subsets, labelled (subset, seed)."""
    where = dict(model=wildcards.model, dataset=wildcards.dataset)
    return [
        dict(
            subset=subset,
            seed=seed,
            path=f"{RUN.format(**where, subset=subset, seed=seed)}/train_log.tsv",
        )
        for subset in PAPER_SUBSETS
        for seed in SEEDS
    ]


def training_inputs(wildcards):
    return [source["path"] for source in training_sources(wildcards)]


def summary_sources():
    return [
        s for model, dataset in experiments() for s in metrics_sources(model, dataset)
    ]


def summary_tests():
    """Each dataset's test split: the gold answers' relation-guess rate, the reference (the
    test facts are the same however they are ranked: the first model's ranking)."""
    first = {}
    for model, dataset in experiments():
        first.setdefault(dataset, model)
    return {
        dataset: split_table(dataset, model, "test") for dataset, model in first.items()
    }


def grid_metrics():
    """Every metrics table of the grid: runs, base and cloze references."""
    return [source["path"] for source in summary_sources()]


def summary_inputs():
    return dict(
        metrics=grid_metrics(),
        predictions=[s["predictions"] for s in summary_sources() if "predictions" in s],
        tests=list(summary_tests().values()),
    )


# ---- attention analysis (the paper's attention analysis: rules attention, attention_figures) ----

ATTENTION_FIGURE = "results/figures/{model}/{dataset}/attention"
# The heatmap shows one question under FT-Top and FT-Bottom, those of them the config runs
# (neither: its first two subsets).
HEATMAP_SUBSETS = [s for s in ("top", "bottom") if s in SUBSETS] or PAPER_SUBSETS[:2]


def attention_params(wildcards):
    return dict(
        questions=config["evaluate"]["attention_questions"],
        prompt=prompt_params(wildcards),
    )


def attention_sources(wildcards):
    """Every per-layer attention table of one (model, dataset), labelled (subset, seed)."""
    where = dict(model=wildcards.model, dataset=wildcards.dataset)
    sources = []
    for subset in PAPER_SUBSETS:
        for seed in SEEDS:
            run = RUN.format(**where, subset=subset, seed=seed)
            sources.append(dict(subset=subset, seed=seed, path=f"{run}/attention.tsv"))
    return sources


def attention_inputs(wildcards):
    return [source["path"] for source in attention_sources(wildcards)]


def attention_examples(wildcards):
    """The heatmap's tables at the first seed: {subset: path}."""
    where = dict(model=wildcards.model, dataset=wildcards.dataset, seed=SEEDS[0])
    return {
        s: f"{RUN.format(**where, subset=s)}/attention_example.tsv"
        for s in HEATMAP_SUBSETS
    }


def attention_example_inputs(wildcards):
    return list(attention_examples(wildcards).values())


def attention_targets(model, dataset):
    """The attention figures, for open QA only: a multiple-choice dataset's `subject` is a topic
    that its questions do not contain. None for a grid of sized subsets only."""
    if DATASETS[dataset]["format"] != "open" or not PAPER_SUBSETS:
        return []
    return [
        f"{ATTENTION_FIGURE.format(model=model, dataset=dataset)}_{kind}.png"
        for kind in ("by_layer", "heatmap")
    ]


# ---- simulation (the one-layer theory model, rules/simulation.smk) ----------------

SIMULATION = config["simulation"]
SIM_RUN = "results/simulation/{sweep}/{point}/seed{seed}"
SIM_FIGURES = "results/figures/simulation"


def simulation_sweeps():
    """{sweep: [point, ...]}, the base point first; empty when no sweeps are configured."""
    return sweep_points(SIMULATION)


def simulation_settings(wildcards):
    return point_settings(SIMULATION, wildcards.sweep, wildcards.point)


def sweep_runs(sweep):
    """(point, seed) of every run of a sweep, in the order its tables are read."""
    return [
        (point, seed)
        for point in simulation_sweeps()[sweep]
        for seed in SIMULATION["seeds"]
    ]


def simulation_runs(sweep, table):
    """One table (accuracy, salience, attention) of every point and seed of a sweep; a
    point at the base settings reads the base run's."""
    paths = []
    for point, seed in sweep_runs(sweep):
        run_sweep, run_point = run_of(SIMULATION, sweep, point)
        paths.append(
            f"{SIM_RUN}/{table}.parquet".format(
                sweep=run_sweep, point=run_point, seed=seed
            )
        )
    return paths


def simulation_accuracy(wildcards):
    return simulation_runs(wildcards.sweep, "accuracy")


def simulation_values(wildcards):
    """The swept value of each of simulation_accuracy's tables, in its order."""
    sweep = wildcards.sweep
    return [point_value(SIMULATION, sweep, point) for point, _ in sweep_runs(sweep)]


def simulation_base_runs(table):
    """The base point's table of every seed (mechanism plots); none without sweeps."""
    return simulation_runs(SIM_BASE, table) if simulation_sweeps() else []


def simulation_targets():
    """Every simulation figure and table; none when the config has no sweeps."""
    sweeps = [sweep for sweep in simulation_sweeps() if sweep != SIM_BASE]
    if not sweeps:
        return []
    names = ["subsets", "salience_vs_mentions", "attention_through_finetuning"]
    names += [f"gap_vs_{sweep}" for sweep in sweeps]
    figures = expand(f"{SIM_FIGURES}/{{name}}.{{ext}}", name=names, ext=["png", "pdf"])
    tables = expand(
        "results/simulation/{sweep}/gap_summary.tsv", sweep=[SIM_BASE, *sweeps]
    )
    return figures + tables


def all_targets():
    targets = ["results/tables/summary.tsv"]
    if PAPER_SUBSETS:  # the overview's bars are the paper's subsets
        targets += [f"{OVERVIEW}.png", f"{OVERVIEW}.pdf"]
    for model, dataset in experiments():
        targets += run_metrics(model, dataset)
        targets.append(f"{BASE.format(model=model, dataset=dataset)}/metrics.tsv")
        targets += fewshot_metrics(model, dataset)
        targets += cloze_metrics(model, dataset)
        targets += expand(
            FIGURE + ".{ext}", model=model, dataset=dataset, ext=["png", "pdf"]
        )
        if SIZED_SUBSETS:
            targets += expand(
                SIZE_FIGURE + ".{ext}", model=model, dataset=dataset, ext=["png", "pdf"]
            )
        if PAPER_SUBSETS:
            targets += expand(
                TRAINING_FIGURE + ".{ext}",
                model=model,
                dataset=dataset,
                ext=["png", "pdf"],
            )
        targets += attention_targets(model, dataset)
    targets += simulation_targets()
    return targets
