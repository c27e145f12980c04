# rules/finetune.smk: filled by its stage
