from factft.logging import to_log
from factft.pageviews import fact_articles, pageview_table
from factft.tables import read_table, write_table

with to_log(snakemake.log[0]):
    popularity = snakemake.params.popularity
    views = pageview_table(
        fact_articles(read_table(snakemake.input.raw), popularity, snakemake.wildcards.dataset),
        snakemake.params.cache,
        project=popularity["project"],
        start=popularity["start"],
        end=popularity["end"],
        follow_redirects=popularity["follow_redirects"],
        requests_per_second=snakemake.params.requests_per_second,
        contact=snakemake.params.contact,
    )
    write_table(views, snakemake.output.views)
