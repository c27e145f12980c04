from factft.attention_plots import make_attention_figures
from factft.logging import to_log

with to_log(snakemake.log[0]):
    make_attention_figures(
        snakemake.params.sources,
        snakemake.params.examples,
        snakemake.wildcards.model,
        snakemake.wildcards.dataset,
        [snakemake.output.by_layer, snakemake.output.by_layer_pdf],
        [snakemake.output.heatmap, snakemake.output.heatmap_pdf],
    )
