# Fetching hub models (login node) and QA finetuning (LoRA, QLoRA or full; resumable).


localrules:
    download_model,
    download_models,


# Every hub model, in one command on a machine with internet (e.g. a cluster's login node).
rule download_models:
    input:
        expand("resources/models/{hub_model}", hub_model=models_with("hf")),


rule download_model:
    output:
        directory("resources/models/{hub_model}"),
    log:
        "logs/download_model/{hub_model}.log",
    benchmark:
        "benchmarks/download_model/{hub_model}.tsv"
    conda:
        "../envs/torch.yaml"
    params:
        source=hub_model_spec,
        cache_dir=running(cache_dir()),
    script:
        "../workflow/scripts/download_model.py"


# Checkpoints go to RUN/checkpoints, deliberately undeclared: Snakemake deletes declared
# outputs of a failed or requeued job, and the checkpoints must survive to be resumed.
# RUN/checkpoints.lock, held while the job runs, stops a second copy of it (factft.train).
rule finetune:
    input:
        model=base_model,
        examples=split_file(),
    output:
        adapter=directory(f"{RUN}/adapter"),
        train_log=f"{RUN}/train_log.tsv",
    log:
        "logs/finetune/{model}/{dataset}/{subset}/seed{seed}.log",
    benchmark:
        "benchmarks/finetune/{model}/{dataset}/{subset}/seed{seed}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 4
    resources:
        gpu=model_gpus,
        mem_mb=finetune_mem_mb,
        runtime=finetune_runtime,
    params:
        spec=finetune_model_spec,
        settings=finetune_params,
        running=running(finetune_running),
        prompt=prompt_params,
        checkpoints=f"{RUN}/checkpoints",
    script:
        "../workflow/scripts/finetune.py"
