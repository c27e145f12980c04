from factft.logging import to_log
from factft.metrics import metrics_table
from factft.tables import read_table, write_tsv

with to_log(snakemake.log[0]):
    predictions = read_table(snakemake.input.predictions)
    write_tsv(metrics_table(predictions, snakemake.params.percentiles), snakemake.output[0])
