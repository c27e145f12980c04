from factft.logging import to_log
from factft.popularity import ScoringContext, add_popularity
from factft.tables import read_table, write_table

with to_log(snakemake.log[0]):
    params = snakemake.params
    context = ScoringContext(
        dataset=params.popularity["dataset"],
        model=params.model,
        pageviews=snakemake.input.get("pageviews"),
        batch_size=params.batch_size,
        **(params.question or {}),  # fmt and prompt, where a model's confidence scores
    )
    raw = read_table(snakemake.input.raw)
    facts = add_popularity(raw, params.popularity, context, params.max_drop_fraction)
    write_table(facts, snakemake.output.facts)
