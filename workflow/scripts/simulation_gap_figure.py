from factft.logging import to_log
from factft.plots import save_figure
from factft.tables import read_tsv
from factft.theory_plots import plot_gap

with to_log(snakemake.log[0]):
    gap = read_tsv(snakemake.input.gap)
    save_figure(plot_gap(gap, snakemake.wildcards.sweep), [snakemake.output.png, snakemake.output.pdf])
