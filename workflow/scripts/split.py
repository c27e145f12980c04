from factft.logging import to_log
from factft.split import split_facts
from factft.tables import read_table, write_table

with to_log(snakemake.log[0]):
    facts = read_table(snakemake.input.facts)
    for name, table in split_facts(facts, **snakemake.params.split).items():
        write_table(table, snakemake.output[name])
