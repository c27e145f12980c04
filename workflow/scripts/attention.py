from factft.attention import analyse_attention
from factft.logging import to_log
from factft.tables import read_table, write_tsv

with to_log(snakemake.log[0]):
    by_layer, example = analyse_attention(
        snakemake.params.spec,
        read_table(snakemake.input.test),
        dict(
            snakemake.params.attention,
            **snakemake.params.running,
            max_drop_fraction=snakemake.params.max_drop_fraction,
        ),
        adapter=snakemake.input.adapter,
        threads=snakemake.threads,
    )
    write_tsv(by_layer, snakemake.output.layers)
    write_tsv(example, snakemake.output.example)
