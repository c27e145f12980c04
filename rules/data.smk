# The data stage: fetch a dataset into the raw facts table, score its popularity, split it.
# Whatever needs the internet (download, pageviews) is a localrule: on a cluster it runs on
# the login node and fills the shared cache; compute nodes only read it. So are split and
# subset: a table each, seconds of pandas, not worth a wait in the queue.


localrules:
    data,
    download,
    download_datasets,
    pageviews,
    split,
    subset,


# Every fetched dataset and its page views, in one command on a machine with internet.
rule download_datasets:
    input:
        download_targets(),


# The split tables alone: after a data edit, this first, then `all` (README, "The paper's grid").
rule data:
    input:
        data_targets(),


rule download:
    input:
        source_file,
    output:
        raw=raw_table("{fetched}"),
    log:
        "logs/download/{fetched}.log",
    benchmark:
        "benchmarks/download/{fetched}.tsv"
    conda:
        "../envs/data.yaml"
    params:
        dataset=dataset_spec,
        cache_dir=running(cache_dir()),
        max_drop_fraction=running(max_drop_fraction()),
    script:
        "../workflow/scripts/download.py"


rule pageviews:
    input:
        raw=raw_table("{dataset}"),
    output:
        views=pageviews_file("{dataset}"),
    log:
        "logs/pageviews/{dataset}.log",
    benchmark:
        "benchmarks/pageviews/{dataset}.tsv"
    conda:
        "../envs/data.yaml"
    params:
        popularity=popularity_params,
        requests_per_second=running(requests_per_second),
        contact=running(pageview_contact()),
        cache=running(pageview_cache()),
    script:
        "../workflow/scripts/pageviews.py"


# torch env: the model_confidence scorer runs the scoring model. {ranked} is the dataset, or
# dataset/by-model when a model's confidence ranks it (rules/common.smk, rankings).
rule popularity:
    input:
        unpack(popularity_inputs),
    output:
        facts="results/{ranked}/facts.parquet",
    log:
        "logs/popularity/{ranked}.log",
    benchmark:
        "benchmarks/popularity/{ranked}.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        gpu=popularity_gpus,
        mem_mb=popularity_mem_mb,
        runtime=popularity_runtime,
    params:
        popularity=popularity_params,
        model=popularity_model,
        question=scoring_question,
        max_drop_fraction=running(max_drop_fraction()),
        batch_size=running(evaluate_batch_size()),
    script:
        "../workflow/scripts/popularity.py"


# The subject split: the test set and the finetuning pool (whole), a job each, so that a
# test-set cap reruns no finetune.
rule split:
    input:
        facts="results/{ranked}/facts.parquet",
    output:
        "results/{ranked}/splits/{part}.parquet",
    log:
        "logs/split/{ranked}/{part}.log",
    benchmark:
        "benchmarks/split/{ranked}/{part}.tsv"
    conda:
        "../envs/data.yaml"
    params:
        split=split_params,
    script:
        "../workflow/scripts/split.py"


# Each finetuning subset (top, bottom, random, top25, ...) is cut from the pool by a job of
# its own: split.fraction reruns top, bottom and random only, and adding a sized subset to
# the config leaves every file, and every run finetuned on it, as it is.
rule subset:
    input:
        whole="results/{ranked}/splits/whole.parquet",
    output:
        "results/{ranked}/splits/{cut}.parquet",
    log:
        "logs/subset/{ranked}/{cut}.log",
    benchmark:
        "benchmarks/subset/{ranked}/{cut}.tsv"
    conda:
        "../envs/data.yaml"
    params:
        split=subset_params,
    script:
        "../workflow/scripts/subset.py"
