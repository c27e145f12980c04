from factft.logging import to_log
from factft.sources import load_facts
from factft.tables import write_table

with to_log(snakemake.log[0]):
    params = snakemake.params
    facts = load_facts(params.dataset, params.cache_dir, params.max_drop_fraction)
    write_table(facts, snakemake.output.raw)
