# Serves evaluate (with a finetune adapter), evaluate_base and cloze (without one).
from factft.generate import evaluate_model
from factft.logging import to_log
from factft.tables import read_table, write_table, write_tsv

with to_log(snakemake.log[0]):
    predictions, metrics = evaluate_model(
        snakemake.params.spec,
        read_table(snakemake.input.test),
        snakemake.params.evaluate,
        adapter=snakemake.input.get("adapter"),
        prompt_column=snakemake.params.prompt_column,
        threads=snakemake.threads,
    )
    write_table(predictions, snakemake.output.predictions)
    write_tsv(metrics, snakemake.output.metrics)
