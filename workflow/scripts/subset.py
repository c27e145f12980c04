from factft.logging import to_log
from factft.split import pool_subset
from factft.tables import read_table, write_table

with to_log(snakemake.log[0]):
    whole = read_table(snakemake.input.whole)
    subset = pool_subset(whole, snakemake.wildcards.cut, **snakemake.params.split)
    write_table(subset, snakemake.output[0])
