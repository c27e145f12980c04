from factft.logging import to_log
from factft.metrics import score_answers
from factft.tables import read_table, write_table

with to_log(snakemake.log[0]):
    predictions = score_answers(
        read_table(snakemake.input.test),
        read_table(snakemake.input.answers),
        snakemake.params.format,
        where=snakemake.input.answers,
    )
    write_table(predictions, snakemake.output.predictions)
