import pandas as pd

from factft.logging import to_log
from factft.plots import save_figure
from factft.theory_plots import plot_attention, plot_salience, read_tables

with to_log(snakemake.log[0]):
    salience = pd.concat(read_tables(snakemake.input.salience), ignore_index=True)
    attention = pd.concat(read_tables(snakemake.input.attention), ignore_index=True)
    save_figure(plot_salience(salience), [snakemake.output.salience_png, snakemake.output.salience_pdf])
    save_figure(plot_attention(attention), [snakemake.output.attention_png, snakemake.output.attention_pdf])
