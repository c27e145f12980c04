import pandas as pd

from factft.logging import to_log
from factft.plots import save_figure
from factft.theory_plots import plot_gap

with to_log(snakemake.log[0]):
    gap = pd.read_csv(snakemake.input.gap, sep="\t")
    save_figure(plot_gap(gap, snakemake.wildcards.sweep), [snakemake.output.png, snakemake.output.pdf])
