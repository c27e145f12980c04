# The paper's one-layer theory model (factft.theory): one `simulate` job per
# (sweep, point, seed), then tables per sweep and the figures. Helpers are in common.smk.
import re


wildcard_constraints:
    sweep=alternatives(simulation_sweeps()),
    point=alternatives(
        {re.escape(p) for points in simulation_sweeps().values() for p in points}
    ),


# Seconds of pandas and plotting: on a cluster, not worth a queued job.
localrules:
    simulation_tables,
    simulation_subsets_figure,
    simulation_gap_figure,
    simulation_mechanism_figures,


rule simulate:
    output:
        accuracy=f"{SIM_RUN}/accuracy.parquet",
        salience=f"{SIM_RUN}/salience.parquet",
        attention=f"{SIM_RUN}/attention.parquet",
    log:
        "logs/simulate/{sweep}/{point}/seed{seed}.log",
    benchmark:
        "benchmarks/simulate/{sweep}/{point}/seed{seed}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=lambda wildcards, attempt: 30 * attempt,
    params:
        settings=simulation_settings,
    script:
        "../workflow/scripts/simulate.py"


rule simulation_tables:
    input:
        accuracy=simulation_accuracy,
    output:
        accuracy="results/simulation/{sweep}/accuracy.tsv",
        gap="results/simulation/{sweep}/gap.tsv",
        gap_summary=report(
            "results/simulation/{sweep}/gap_summary.tsv",
            caption="../report/simulation_gap_summary.rst",
            category="Simulation",
            labels={"table": "gap summary", "sweep": "{sweep}"},
        ),
    log:
        "logs/simulation_tables/{sweep}.log",
    benchmark:
        "benchmarks/simulation_tables/{sweep}.tsv"
    conda:
        "../envs/figures.yaml"
    params:
        values=simulation_values,
    script:
        "../workflow/scripts/simulation_tables.py"


rule simulation_subsets_figure:
    input:
        accuracy=f"results/simulation/{SIM_BASE}/accuracy.tsv",
    output:
        png=report(
            f"{SIM_FIGURES}/subsets.png",
            caption="../report/simulation_subsets.rst",
            category="Simulation",
            labels={"figure": "2a: accuracy per subset"},
        ),
        pdf=f"{SIM_FIGURES}/subsets.pdf",
    log:
        "logs/simulation_subsets_figure/subsets.log",
    benchmark:
        "benchmarks/simulation_subsets_figure/subsets.tsv"
    conda:
        "../envs/figures.yaml"
    script:
        "../workflow/scripts/simulation_subsets_figure.py"


rule simulation_gap_figure:
    input:
        gap="results/simulation/{sweep}/gap.tsv",
    output:
        png=report(
            f"{SIM_FIGURES}/gap_vs_{{sweep}}.png",
            caption="../report/simulation_gap.rst",
            category="Simulation",
            labels={"figure": "gap against {sweep}"},
        ),
        pdf=f"{SIM_FIGURES}/gap_vs_{{sweep}}.pdf",
    log:
        "logs/simulation_gap_figure/{sweep}.log",
    benchmark:
        "benchmarks/simulation_gap_figure/{sweep}.tsv"
    conda:
        "../envs/figures.yaml"
    script:
        "../workflow/scripts/simulation_gap_figure.py"


rule simulation_mechanism_figures:
    input:
        salience=simulation_base_runs("salience"),
        attention=simulation_base_runs("attention"),
    output:
        salience_png=report(
            f"{SIM_FIGURES}/salience_vs_mentions.png",
            caption="../report/simulation_salience.rst",
            category="Simulation",
            labels={"figure": "mechanism: salience"},
        ),
        salience_pdf=f"{SIM_FIGURES}/salience_vs_mentions.pdf",
        attention_png=report(
            f"{SIM_FIGURES}/attention_through_finetuning.png",
            caption="../report/simulation_attention.rst",
            category="Simulation",
            labels={"figure": "mechanism: attention"},
        ),
        attention_pdf=f"{SIM_FIGURES}/attention_through_finetuning.pdf",
    log:
        "logs/simulation_mechanism_figures/mechanism.log",
    benchmark:
        "benchmarks/simulation_mechanism_figures/mechanism.tsv"
    conda:
        "../envs/figures.yaml"
    script:
        "../workflow/scripts/simulation_mechanism_figures.py"
