from factft.logging import to_log
from factft.theory_plots import write_sweep_tables

with to_log(snakemake.log[0]):
    write_sweep_tables(snakemake.input.accuracy, snakemake.output, snakemake.wildcards.sweep, snakemake.params.values)
