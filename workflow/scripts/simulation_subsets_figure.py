from factft.logging import to_log
from factft.plots import save_figure
from factft.tables import read_tsv
from factft.theory_plots import plot_subsets

with to_log(snakemake.log[0]):
    accuracy = read_tsv(snakemake.input.accuracy)
    save_figure(plot_subsets(accuracy), [snakemake.output.png, snakemake.output.pdf])
