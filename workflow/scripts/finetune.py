import torch

from factft.logging import to_log
from factft.tables import read_table
from factft.train import finetune

with to_log(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    finetune(
        snakemake.params.spec,
        read_table(snakemake.input.examples),
        snakemake.output.adapter,
        dict(snakemake.params.settings, **snakemake.params.running),
        snakemake.params.prompt,
        snakemake.params.checkpoints,
        train_log=snakemake.output.train_log,
        meta={"dataset": snakemake.wildcards.dataset, "subset": snakemake.wildcards.subset},
    )
