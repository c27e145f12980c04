import pandas as pd

from factft.logging import to_log
from factft.theory_plots import plot_subsets, save

with to_log(snakemake.log[0]):
    accuracy = pd.read_csv(snakemake.input.accuracy, sep="\t")
    save(plot_subsets(accuracy), [snakemake.output.png, snakemake.output.pdf])
