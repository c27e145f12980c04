from factft.logging import to_log
from factft.world import generate_world, write_world

with to_log(snakemake.log[0]):
    world = generate_world(**snakemake.params.world)
    write_world(world, snakemake.output.raw, snakemake.output.corpus)
