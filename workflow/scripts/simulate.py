import torch

from factft.logging import to_log
from factft.tables import write_table
from factft.theory import simulate

with to_log(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    tables = simulate(snakemake.params.settings, int(snakemake.wildcards.seed), snakemake.wildcards.sweep)
    for name, table in tables.items():
        write_table(table, snakemake.output[name])
