from factft.logging import to_log
from factft.pretrain import pretrain
from factft.tables import read_table
from factft.world import read_corpus

with to_log(snakemake.log[0]):
    pretrain(
        read_corpus(snakemake.input.corpus),
        read_table(snakemake.input.facts),
        snakemake.params.prompt,
        snakemake.output[0],
        threads=snakemake.threads,
        **snakemake.params.pretrain,
    )
