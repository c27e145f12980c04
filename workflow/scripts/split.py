from factft.logging import to_log
from factft.split import split_part
from factft.tables import read_table, write_table

with to_log(snakemake.log[0]):
    facts = read_table(snakemake.input.facts)
    table = split_part(facts, snakemake.wildcards.part, **snakemake.params.split)
    write_table(table, snakemake.output[0])
