# rules/figures.smk: filled by its stage
