# Evaluation on the held-out test facts: finetuned runs, the zero-shot base model, and the
# pretrained model's statement completions (cloze) on synthetic worlds. Each writes its
# model's answers; the score rule scores them (a scoring fix reruns no model), the metrics
# rule makes accuracy by popularity from the scores.


localrules:
    score,
    metrics,


rule evaluate:
    input:
        model=base_model,
        adapter=f"{RUN}/adapter",
        test=split_file("test"),
    output:
        answers=f"{RUN}/answers.parquet",
    log:
        "logs/evaluate/{model}/{dataset}/{subset}/seed{seed}.log",
    benchmark:
        "benchmarks/evaluate/{model}/{dataset}/{subset}/seed{seed}.tsv"
    conda:
        "../envs/torch.yaml"
    # Generation runs on the GPU; on CPU, a tiny model's small matrices run fastest on one
    # thread (measured: 2 threads were slower on a shared 2-core machine).
    threads: 1
    resources:
        gpu=model_gpus,
        mem_mb=model_mem_mb,
        runtime=evaluate_runtime,
    params:
        spec=base_model_spec,
        evaluate=evaluate_params,
        running=running(evaluate_running()),
        prompt_column="question",
    script:
        "../workflow/scripts/evaluate.py"


# The zero-shot line of the figures: the base model, asked with the same prompt template.
use rule evaluate as evaluate_base with:
    input:
        model=base_model,
        test=split_file("test"),
    output:
        answers=f"{BASE}/answers.parquet",
    log:
        "logs/evaluate_base/{model}/{dataset}.log",
    benchmark:
        "benchmarks/evaluate_base/{model}/{dataset}.tsv"


# The in-context reference (evaluate.fewshot = k > 0): the base model answering after k
# solved questions from the finetuning pool, which shares no subject with the test set.
use rule evaluate as evaluate_fewshot with:
    input:
        model=base_model,
        test=split_file("test"),
        demos=split_file("whole"),
    output:
        answers=f"{FEWSHOT}/answers.parquet",
    log:
        "logs/evaluate_fewshot/{model}/{dataset}.log",
    benchmark:
        "benchmarks/evaluate_fewshot/{model}/{dataset}.tsv"
    params:
        spec=base_model_spec,
        evaluate=evaluate_params,
        running=running(evaluate_running()),
        prompt_column="question",
        shots=fewshot_shots(),


# What the pretrained model stores: its greedy completion of each test fact's statement
# ("Ilmo Varsk was born in"), scored like a QA answer. Set against QA accuracy, it shows
# knowledge that is stored but not extracted.
use rule evaluate as cloze with:
    input:
        model=base_model,
        test=split_file("test"),
    output:
        answers=f"{CLOZE}/answers.parquet",
    log:
        "logs/cloze/{model}/{dataset}.log",
    benchmark:
        "benchmarks/cloze/{model}/{dataset}.tsv"
    params:
        spec=base_model_spec,
        evaluate=evaluate_params,
        running=running(evaluate_running()),
        prompt_column="statement",


# Where a finetuned model looks when it answers (the paper's attention analysis): the last prompt
# position's attention on the subject's and the relation's tokens, per layer. The model is
# switched to eager attention for this rule only (SDPA returns no weights).
rule attention:
    input:
        model=base_model,
        adapter=f"{RUN}/adapter",
        test=split_file("test"),
    output:
        layers=f"{RUN}/attention.tsv",
        example=f"{RUN}/attention_example.tsv",
    log:
        "logs/attention/{model}/{dataset}/{subset}/seed{seed}.log",
    benchmark:
        "benchmarks/attention/{model}/{dataset}/{subset}/seed{seed}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        gpu=model_gpus,
        mem_mb=model_mem_mb,
        runtime=evaluate_runtime,
    params:
        spec=base_model_spec,
        attention=attention_params,
        running=running(evaluate_running()),
        max_drop_fraction=running(max_drop_fraction()),
    script:
        "../workflow/scripts/attention.py"


# Any evaluation's answers, scored against the gold answers of the test split it answered
# (factft.metrics: PopQA's open-QA match, or the picked choice), with each fact's popularity.
rule score:
    input:
        answers="results/{evaluation}/answers.parquet",
        test=evaluation_test,
    output:
        predictions="results/{evaluation}/predictions.parquet",
    log:
        "logs/score/{evaluation}.log",
    benchmark:
        "benchmarks/score/{evaluation}.tsv"
    conda:
        "../envs/data.yaml"
    params:
        format=evaluation_format,
    script:
        "../workflow/scripts/score.py"


# Accuracy overall, on the top x% most popular facts (evaluate.percentiles) and per decile,
# from any evaluation's predictions: a job of its own, so that new percentiles rerun nothing else.
rule metrics:
    input:
        predictions="results/{evaluation}/predictions.parquet",
    output:
        "results/{evaluation}/metrics.tsv",
    log:
        "logs/metrics/{evaluation}.log",
    benchmark:
        "benchmarks/metrics/{evaluation}.tsv"
    conda:
        "../envs/data.yaml"
    params:
        percentiles=metrics_percentiles(),
    script:
        "../workflow/scripts/metrics.py"
