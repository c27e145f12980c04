from factft.logging import to_log
from factft.models import download_model

with to_log(snakemake.log[0]):
    download_model(snakemake.wildcards.hub_model, snakemake.params.source, snakemake.output[0])
