# rules/evaluate.smk: filled by its stage
