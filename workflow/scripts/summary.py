from factft.logging import to_log
from factft.summary import make_summary

with to_log(snakemake.log[0]):
    make_summary(
        snakemake.params.sources,
        snakemake.params.tests,
        snakemake.output.summary,
        snakemake.output.by_percentile,
        snakemake.output.by_relation,
    )
