# config/demo.yaml's first half: a generated world and a tiny Llama pretrained on it.


rule synthetic_world:
    output:
        raw=raw_table("{world}"),
        corpus=corpus_file("{world}"),
    log:
        "logs/synthetic_world/{world}.log",
    benchmark:
        "benchmarks/synthetic_world/{world}.tsv"
    conda:
        "../envs/torch.yaml"
    params:
        world=world_params,
    script:
        "../workflow/scripts/synthetic_world.py"


rule pretrain:
    input:
        corpus=pretrain_corpus,
        facts=pretrain_facts,
    output:
        directory("resources/models/{tiny_model}"),
    log:
        "logs/pretrain/{tiny_model}.log",
    benchmark:
        "benchmarks/pretrain/{tiny_model}.tsv"
    conda:
        "../envs/torch.yaml"
    # A model this small gains little from a second thread, and on a shared machine
    # OpenMP's spinning threads made two several times slower than one.
    threads: 1
    resources:
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
        runtime=lambda wildcards, attempt: 60 * attempt,
    params:
        pretrain=pretrain_params,
        prompt=prompt_params,
    script:
        "../workflow/scripts/pretrain.py"
