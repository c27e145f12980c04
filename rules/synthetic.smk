# rules/synthetic.smk: filled by its stage
