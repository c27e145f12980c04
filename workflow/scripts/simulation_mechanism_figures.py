import pandas as pd

from factft.logging import to_log
from factft.theory_plots import plot_attention, plot_salience, read_tables, save

with to_log(snakemake.log[0]):
    salience = pd.concat(read_tables(snakemake.input.salience), ignore_index=True)
    attention = pd.concat(read_tables(snakemake.input.attention), ignore_index=True)
    save(plot_salience(salience), [snakemake.output.salience_png, snakemake.output.salience_pdf])
    save(plot_attention(attention), [snakemake.output.attention_png, snakemake.output.attention_pdf])
