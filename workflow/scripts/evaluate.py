# Serves evaluate (with a finetune adapter), evaluate_base, evaluate_fewshot (with
# demonstrations) and cloze.
from factft.generate import evaluate_model
from factft.logging import to_log
from factft.tables import read_table, write_table

with to_log(snakemake.log[0]):
    demos = snakemake.input.get("demos")
    answers = evaluate_model(
        snakemake.params.spec,
        read_table(snakemake.input.test),
        dict(snakemake.params.evaluate, **snakemake.params.running),
        adapter=snakemake.input.get("adapter"),
        prompt_column=snakemake.params.prompt_column,
        threads=snakemake.threads,
        shots=snakemake.params.get("shots", 0),
        demos=read_table(demos) if demos else None,
    )
    write_table(answers, snakemake.output.answers)
