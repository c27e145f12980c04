from factft.logging import to_log
from factft.plots import make_figures

with to_log(snakemake.log[0]):
    make_figures(
        snakemake.params.sources,
        snakemake.wildcards.model,
        snakemake.wildcards.dataset,
        [snakemake.output.png, snakemake.output.pdf],
        snakemake.input.test,
        snakemake.params.scorer,
    )
