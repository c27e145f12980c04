import pandas as pd

from factft.logging import to_log
from factft.theory_plots import plot_gap, save

with to_log(snakemake.log[0]):
    gap = pd.read_csv(snakemake.input.gap, sep="\t")
    save(plot_gap(gap, snakemake.wildcards.sweep), [snakemake.output.png, snakemake.output.pdf])
