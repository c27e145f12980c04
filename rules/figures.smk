# Figures per (model, dataset) and the summary tables over the whole grid; the figures
# carry captions for `snakemake --report results/report.html`.


# Seconds of plotting: on a cluster, not worth a queued job.
localrules:
    figures,
    size_figure,
    training_figure,
    summary,
    overview,


rule figures:
    input:
        metrics=figure_inputs,
        test=split_file("test"),
    output:
        png=report(
            f"{FIGURE}.png",
            caption="../report/accuracy_vs_popularity.rst",
            category="Accuracy vs popularity",
            subcategory="{model}",
            labels={"model": "{model}", "dataset": "{dataset}"},
        ),
        pdf=f"{FIGURE}.pdf",
    log:
        "logs/figures/{model}/{dataset}.log",
    benchmark:
        "benchmarks/figures/{model}/{dataset}.tsv"
    conda:
        "../envs/figures.yaml"
    params:
        sources=figure_sources,
        scorer=popularity_scorer,
    script:
        "../workflow/scripts/figures.py"


# Only with sized subsets in the config (top25, ...): accuracy against the amount of data.
rule size_figure:
    input:
        metrics=size_figure_inputs,
    output:
        png=report(
            f"{SIZE_FIGURE}.png",
            caption="../report/accuracy_vs_subset_size.rst",
            category="Accuracy vs subset size",
            subcategory="{model}",
            labels={"model": "{model}", "dataset": "{dataset}"},
        ),
        pdf=f"{SIZE_FIGURE}.pdf",
    log:
        "logs/size_figure/{model}/{dataset}.log",
    benchmark:
        "benchmarks/size_figure/{model}/{dataset}.tsv"
    conda:
        "../envs/figures.yaml"
    params:
        sources=size_figure_sources,
        fraction=split_fraction(),
    script:
        "../workflow/scripts/size_figure.py"


# Finetuning loss per subset: is a subset of little-known facts fitted as well?
rule training_figure:
    input:
        logs=training_inputs,
    output:
        png=report(
            f"{TRAINING_FIGURE}.png",
            caption="../report/training_loss.rst",
            category="Finetuning loss",
            subcategory="{model}",
            labels={"model": "{model}", "dataset": "{dataset}"},
        ),
        pdf=f"{TRAINING_FIGURE}.pdf",
    log:
        "logs/training_figure/{model}/{dataset}.log",
    benchmark:
        "benchmarks/training_figure/{model}/{dataset}.tsv"
    conda:
        "../envs/figures.yaml"
    params:
        sources=training_sources,
    script:
        "../workflow/scripts/training_figure.py"


rule summary:
    input:
        **summary_inputs(),
    output:
        summary=report(
            "results/tables/summary.tsv",
            caption="../report/summary.rst",
            category="Summary",
        ),
        by_percentile=report(
            "results/tables/accuracy_by_percentile.tsv",
            caption="../report/accuracy_by_percentile.rst",
            category="Summary",
        ),
        by_relation=report(
            "results/tables/accuracy_by_relation.tsv",
            caption="../report/accuracy_by_relation.rst",
            category="Summary",
        ),
    log:
        "logs/summary/summary.log",
    benchmark:
        "benchmarks/summary/summary.tsv"
    conda:
        "../envs/figures.yaml"
    params:
        sources=summary_sources(),
        tests=summary_tests(),
    script:
        "../workflow/scripts/summary.py"


# The whole grid at a glance: the paper's results table as a figure.
rule overview:
    input:
        metrics=grid_metrics(),
        summary=rules.summary.output.summary,
    output:
        png=report(
            f"{OVERVIEW}.png",
            caption="../report/overview.rst",
            category="Summary",
        ),
        pdf=f"{OVERVIEW}.pdf",
    log:
        "logs/overview/overview.log",
    benchmark:
        "benchmarks/overview/overview.tsv"
    conda:
        "../envs/figures.yaml"
    params:
        sources=summary_sources(),
    script:
        "../workflow/scripts/overview.py"


localrules:
    attention_figures,


# The paper's attention analysis: attention on the subject per layer, one question's heatmap.
rule attention_figures:
    input:
        layers=attention_inputs,
        examples=attention_example_inputs,
    output:
        by_layer=report(
            f"{ATTENTION_FIGURE}_by_layer.png",
            caption="../report/attention_by_layer.rst",
            category="Attention",
            subcategory="{model}",
            labels={"model": "{model}", "dataset": "{dataset}", "figure": "by layer"},
        ),
        by_layer_pdf=f"{ATTENTION_FIGURE}_by_layer.pdf",
        heatmap=report(
            f"{ATTENTION_FIGURE}_heatmap.png",
            caption="../report/attention_heatmap.rst",
            category="Attention",
            subcategory="{model}",
            labels={"model": "{model}", "dataset": "{dataset}", "figure": "heatmap"},
        ),
        heatmap_pdf=f"{ATTENTION_FIGURE}_heatmap.pdf",
    log:
        "logs/attention_figures/{model}/{dataset}.log",
    benchmark:
        "benchmarks/attention_figures/{model}/{dataset}.tsv"
    conda:
        "../envs/figures.yaml"
    params:
        sources=attention_sources,
        examples=attention_examples,
    script:
        "../workflow/scripts/attention_figures.py"
