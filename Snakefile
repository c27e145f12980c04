# factft: QA finetuning on well-known vs little-known facts (Ghosal et al., ICML 2024).
# Each stage lives in rules/<stage>.smk; config lookups go through rules/common.smk.
from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from factft.config import apply_command_line, prepare_config
from factft.errors import FactftError

min_version("9.0")


# A --configfile replaces the paper grid rather than merging into it (the demo must not
# inherit the 7B models and hub datasets); --config alone overrides keys of the paper grid.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# Snakemake reads the items of a --config list or map as strings (seeds=[0] gives ["0"]) and
# would merge a new source or scorer block into the file's: they are read as the config file's
# YAML is, and such a block replaces the file's.
apply_command_line(config, workflow.config_settings.config_args)
# Checked against workflow/schemas/config.schema.yaml (defaults filled in), then beyond it.
try:
    prepare_config(config)
except FactftError as error:
    raise WorkflowError(f"config: {error}") from None


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/synthetic.smk"
include: "rules/finetune.smk"
include: "rules/evaluate.smk"
include: "rules/figures.smk"
include: "rules/simulation.smk"


rule all:
    default_target: True
    input:
        all_targets(),
