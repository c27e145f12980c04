import pandas as pd

from factft.logging import to_log
from factft.plots import save_figure
from factft.theory_plots import plot_subsets

with to_log(snakemake.log[0]):
    accuracy = pd.read_csv(snakemake.input.accuracy, sep="\t")
    save_figure(plot_subsets(accuracy), [snakemake.output.png, snakemake.output.pdf])
