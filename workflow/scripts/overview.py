from factft.logging import to_log
from factft.plots import make_overview

with to_log(snakemake.log[0]):
    make_overview(snakemake.params.sources, snakemake.input.summary, [snakemake.output.png, snakemake.output.pdf])
