from factft.logging import to_log
from factft.models import download_model

with to_log(snakemake.log[0]):
    params = snakemake.params
    download_model(snakemake.wildcards.hub_model, dict(params.source, cache_dir=params.cache_dir), snakemake.output[0])
