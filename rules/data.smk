# rules/data.smk: filled by its stage
