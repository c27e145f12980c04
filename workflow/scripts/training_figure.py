from factft.logging import to_log
from factft.plots import make_training_figure

with to_log(snakemake.log[0]):
    make_training_figure(
        snakemake.params.sources,
        snakemake.wildcards.model,
        snakemake.wildcards.dataset,
        [snakemake.output.png, snakemake.output.pdf],
    )
