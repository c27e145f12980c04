import errno
import fcntl
import json
import logging
import os
import re

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from factft.errors import FactftError
from factft import models, train
from factft.config import RUNNING_SETTINGS
from factft.generate import generate_texts
from factft.models import load_model
from factft.train import (
    collate,
    encode_examples,
    finetune,
    fingerprint,
    make_optimizer,
    out_of_memory,
    learning_rate,
    log_examples,
    epoch_batches,
    prepare_model,
    trainable_parameters,
    weights_dtype,
)

PROMPT = {"template": "Q: {question} A:", "answer": " {answer}"}
SUBJECTS = ["Ilmo Varsk", "Bera Tosk", "Kalo Mirr", "Suna Dee"]


@pytest.fixture
def facts():
    """16 open QA facts of varied length (so length grouping matters), in the tiny vocabulary."""
    rows = []
    for i, subject in enumerate(SUBJECTS):
        rows.append({"question": f"Where was {subject} born?", "answers": [["Lyon", "Paris", "Oslo", "Rome"][i]]})
        rows.append({"question": f"What does {subject} do?", "answers": [["doctor", "baker", "pilot", "doctor"][i]]})
        rows.append({"question": f"What does {subject} play?", "answers": ["the piano"]})
        rows.append({"question": f"Where was {subject} born, in Lyon or Milan?", "answers": ["Milan"]})
    return pd.DataFrame(rows)


def settings(**overrides):
    base = {
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"},
        "epochs": 3,
        "max_steps": None,
        "learning_rate": 3e-3,
        "weight_decay": 0.01,
        "warmup_ratio": 0.2,
        "batch_size": 3,
        "grad_accum": 2,
        "max_length": 32,
        "checkpoint_every": 2,
        "gradient_checkpointing": False,
        "seed": 0,
    }
    return {**base, **overrides}


def spec(tiny_model_dir):
    return {"name": "tiny", "path": str(tiny_model_dir), "gguf_file": None, "trust_remote_code": False}


def run(tiny_model_dir, facts, folder, **kwargs):
    """finetune() into folder/adapter with its checkpoints and train log beside it."""
    options = {k: kwargs.pop(k) for k in ("on_step",) if k in kwargs}
    summary = finetune(
        spec(tiny_model_dir),
        facts,
        folder / "adapter",
        settings(**kwargs),
        PROMPT,
        folder / "checkpoints",
        train_log=folder / "train_log.tsv",
        device="cpu",
        **options,
    )
    weights = "model.safetensors" if kwargs.get("method") == "full" else "adapter_model.safetensors"
    return summary, load_file(folder / "adapter" / weights)


def same_weights(a, b, atol=1e-6):
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


def test_loss_counts_only_answer_tokens(tiny_model_dir, facts):
    model, tokenizer = load_model(spec(tiny_model_dir), device="cpu")
    encoded = encode_examples(facts, tokenizer, PROMPT, max_length=32)
    batch = collate(encoded, [0, 2, 3], tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        loss = model(**batch).loss
        logits = model(input_ids=batch["input_ids"]).logits
    targets = batch["labels"][:, 1:]
    counted = targets != -100
    # Only the answer word and the eos after it, per example: prompt and padding are masked.
    assert counted.sum(dim=1).tolist() == [2, 3, 2]
    manual = torch.nn.functional.cross_entropy(logits[:, :-1][counted], targets[counted])
    assert torch.allclose(loss, manual, atol=1e-6)


def test_examples_cut_to_max_length_are_warned_about(tiny_model_dir, facts, caplog):
    """A prompt cut at its start (a chat model's system turn) trains on another prompt than
    evaluation asks: the finetune's log warns, and so the console (factft.logging). An example
    that exactly fits is not cut."""
    tokenizer = load_model(spec(tiny_model_dir), device="cpu")[1]
    longest = max(len(e["input_ids"]) for e in encode_examples(facts, tokenizer, PROMPT, max_length=64))
    with caplog.at_level("WARNING"):
        log_examples(encode_examples(facts, tokenizer, PROMPT, max_length=longest), tokenizer, longest)
    assert "longer than finetune.max_length" not in caplog.text
    with caplog.at_level("WARNING"):
        log_examples(encode_examples(facts, tokenizer, PROMPT, max_length=4), tokenizer, 4)
    assert f"{len(facts)} of {len(facts)} finetuning examples are longer than finetune.max_length 4" in caplog.text


def test_examples_the_tokenizer_reads_as_unknown_are_warned_about(tiny_model_dir, facts, caplog):
    """A model pretrained on another world's words (a copied folder escapes the config check)."""
    tokenizer = load_model(spec(tiny_model_dir), device="cpu")[1]
    with caplog.at_level("WARNING"):
        log_examples(encode_examples(facts, tokenizer, PROMPT, max_length=32), tokenizer, 32)
    assert "unknown to the tokenizer" not in caplog.text
    strange = facts.assign(question=["Wo wurde Qxzv Ppqr geboren ?"] * len(facts))
    with caplog.at_level("WARNING"):
        log_examples(encode_examples(strange, tokenizer, PROMPT, max_length=32), tokenizer, 32)
    assert "tokens are unknown to the tokenizer (<unk>): this model cannot read these questions" in caplog.text
    # GPT-2's family: the end-of-text token, after every answer, is its unk too.
    caplog.clear()
    tokenizer.unk_token = tokenizer.eos_token
    with caplog.at_level("WARNING"):
        log_examples(encode_examples(facts, tokenizer, PROMPT, max_length=32), tokenizer, 32)
    assert "unknown to the tokenizer" not in caplog.text


def test_lora_trains_a_small_part_and_full_trains_every_weight(tiny_model_dir):
    full = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), settings(method="full"))
    lora = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), settings(method="lora"))
    n_full = sum(p.numel() for p in trainable_parameters(full).values())
    n_lora = sum(p.numel() for p in trainable_parameters(lora).values())
    assert n_full == sum(p.numel() for p in full.parameters())
    assert 0 < n_lora < n_full / 2
    assert all("lora_" in name for name in trainable_parameters(lora))


def test_unknown_target_module_names_the_config_key(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    bad = settings(lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query_key_value"]})
    layers = "'down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj'"
    message = rf"finetune.lora.target_modules \['query_key_value'\]: .* this model's linear layers are \[{layers}\]"
    usual = r"peft's usual ones for llama: \['q_proj', 'v_proj'\], or all-linear"
    with pytest.raises(FactftError, match=rf"{message} \({usual}\); .* under models.<name>.finetune.lora"):
        prepare_model(model, bad)
    assert train.lora_config(bad["lora"], model).exclude_modules is None  # a text-only model's adapter as before


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_lora_of_a_multimodal_model_adapts_its_text_decoder_alone(targets):
    # Gemma 3's vision tower has q_proj, v_proj, ... too: adapters there would never train.
    from transformers import Gemma3Config

    config = Gemma3Config(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=6),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert any(name.endswith("q_proj") for name, _ in model.model.vision_tower.named_modules())
    # What a wrong target's error lists: the text decoder's layers, not the vision tower's fc1, out_proj.
    layers = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert train.linear_layer_names(model) == layers
    lora = settings(lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": targets})
    adapted = set(trainable_parameters(prepare_model(model, lora)))
    text = {name for name in adapted if ".language_model." in name}
    assert text and text == adapted
    if targets != "all-linear":
        assert {name.split(".")[-4] for name in adapted} == set(targets)
    wrong = settings(lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["fc1"]})  # a vision layer
    message = r"\['fc1'\]: no layer of the model's text decoder has these names; .* linear layers are \['down_proj'"
    with pytest.raises(FactftError, match=message):
        prepare_model(AutoModelForCausalLM.from_config(config), wrong)


def test_qlora_trains_adapters_over_a_4bit_base_and_evaluates_exactly_the_trained_model(
    tiny_model_dir, facts, tmp_path
):
    from bitsandbytes.nn import Linear4bit

    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    summary, _ = run(tiny_model_dir, facts, tmp_path, method="qlora", max_steps=4, learning_rate=3e-2, lora=lora)
    assert summary["method"] == "qlora" and summary["versions"]["bitsandbytes"]
    trained, _ = load_model(spec(tiny_model_dir), tmp_path / "adapter", quantize="nf4", device="cpu")
    layer = trained.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, Linear4bit)  # what the adapter was trained over
    # Train mode (no dropout here): bitsandbytes computes as in training; its CPU inference
    # path repacks the weights with bf16 scales.
    trained.train()

    # Evaluation rebuilds that NF4-rounded base and merges the adapter into it: plain linear
    # layers, the trained model's outputs. Merging into the original weights would not be.
    merged, tokenizer = load_model(spec(tiny_model_dir), tmp_path / "adapter", device="cpu")
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    naive = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    from peft import PeftModel

    naive = PeftModel.from_pretrained(naive, str(tmp_path / "adapter")).merge_and_unload()
    batch = tokenizer(["Q: Where was Bera Tosk born? A:", "Q: What does Suna Dee do? A:"], return_tensors="pt")
    with torch.no_grad():
        expected, found, off = (m(**batch).logits for m in (trained, merged, naive))
    assert torch.allclose(found, expected, atol=1e-5)
    assert (off - expected).abs().max() > 100 * (found - expected).abs().max()


def test_a_model_held_in_4_bits_evaluates_its_qlora_adapter_over_the_4bit_base(tiny_model_dir, facts, tmp_path):
    """models.<name>.quantize: a model too large for its GPU in 16 bits is evaluated as trained,
    its adapter beside the 4-bit layers, never dequantized (which would need the 16-bit memory)."""
    from bitsandbytes.nn import Linear4bit
    from peft import PeftModel
    from transformers import AutoConfig

    # bitsandbytes' CPU inference path repacks 4-bit weights in blocks of 64 inputs: the tiny
    # model's 32 are too few, so this one is twice as wide (a real model's thousands are fine),
    # its weights scaled up so that greedy answers differ (as peaked_model_dir's).
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.update({"hidden_size": 64, "intermediate_size": 128, "head_dim": 16})
    wide = tmp_path / "wide"
    torch.manual_seed(0)
    with torch.no_grad():
        model = AutoModelForCausalLM.from_config(config)
        for parameter in model.parameters():
            parameter.mul_(8.0 if parameter.dim() > 1 else 1.0)
    model.save_pretrained(wide)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(wide)

    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    run(wide, facts, tmp_path, method="qlora", max_steps=4, learning_rate=3e-2, lora=lora)
    held = dict(spec(wide), quantize="nf4")
    base, _ = load_model(held, device="cpu")
    assert isinstance(base.model.layers[0].mlp.down_proj, Linear4bit)
    model, tokenizer = load_model(held, tmp_path / "adapter", device="cpu")
    assert isinstance(model, PeftModel) and not model.training  # unmerged: a 4-bit base cannot absorb it
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, Linear4bit)

    # The trained model, rebuilt in 16 bits (the default), and the adapter over the original
    # weights instead: the 4-bit evaluation agrees with the first up to 4-bit arithmetic
    # (bitsandbytes' CPU inference path keeps bf16 scales), not with the second.
    rebuilt, _ = load_model(spec(wide), tmp_path / "adapter", device="cpu")
    naive = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(wide), str(tmp_path / "adapter"))
    prompts = ["Q: Where was Bera Tosk born? A:", "Q: What does Suna Dee do? A:"]
    with torch.no_grad():
        found, expected, off = (m(**tokenizer(prompts, return_tensors="pt")).logits for m in (model, rebuilt, naive))
    assert (found - expected).abs().max() < (off - expected).abs().max() / 10
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens=3, batch_size=2)
    assert texts == generate_texts(rebuilt, tokenizer, prompts, max_new_tokens=3, batch_size=2)


def test_qlora_of_a_model_bitsandbytes_cannot_quantize_fails_before_training(tiny_model_dir, facts, tmp_path):
    # Falcon's linear layers are FalconLinear, which bitsandbytes leaves in full precision.
    from transformers import FalconConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = FalconConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "falcon")
    tokenizer.save_pretrained(tmp_path / "falcon")
    message = (
        "model 'tiny': bitsandbytes quantized none of FalconForCausalLM's layers to 4 bits, so it would run, "
        "and QLoRA train, in full precision; use finetune.method lora for this model"
    )
    with pytest.raises(FactftError) as error:
        run(tmp_path / "falcon", facts, tmp_path, method="qlora", max_steps=1)
    assert str(error.value) == message
    assert not (tmp_path / "adapter").exists()
    with pytest.raises(FactftError) as error:  # asked for by models.<name>.quantize, in any job
        load_model(dict(spec(tmp_path / "falcon"), quantize="nf4"), device="cpu")
    assert str(error.value).endswith("; remove models.tiny.quantize and use finetune.method lora for this model")


def test_qlora_of_a_model_that_cannot_run_in_4_bits_fails_before_training(tiny_model_dir, facts, tmp_path):
    # Mamba's layers quantize, but its forward multiplies by dt_proj's (packed 4-bit) weight itself.
    from transformers import MambaConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = MambaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, state_size=4,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mamba")
    tokenizer.save_pretrained(tmp_path / "mamba")
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["in_proj", "x_proj"]}
    message = r"model 'tiny': MambaForCausalLM with bitsandbytes' 4-bit layers fails a two-token forward \(.+\); use"
    with pytest.raises(FactftError, match=message):
        run(tmp_path / "mamba", facts, tmp_path, method="qlora", packing=False, lora=lora, max_steps=1)
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "train_log.tsv").exists()


def test_batches_cover_each_example_once_seeded_and_grouped_by_length_only_when_asked():
    lengths = [5, 30, 6, 29, 7, 28, 8, 27, 9, 26, 10, 25]
    for grouped in (False, True):
        batches = epoch_batches(lengths, batch_size=2, seed=0, epoch=0, group_by_length=grouped)
        assert sorted(i for b in batches for i in b) == list(range(12))
        assert batches == epoch_batches(lengths, batch_size=2, seed=0, epoch=0, group_by_length=grouped)
        assert batches != epoch_batches(lengths, batch_size=2, seed=0, epoch=1, group_by_length=grouped)

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    grouped = epoch_batches(lengths, batch_size=2, seed=0, epoch=0, group_by_length=True)
    assert padded(grouped) <= sum(lengths) + 6  # sorted neighbours differ by at most one token
    # By default a batch is a slice of a seeded permutation, whatever the lengths (a prompt's
    # length is mostly its relation's template: sorting by it would sort by relation).
    assert padded(epoch_batches(lengths, batch_size=2, seed=0, epoch=0)) > padded(grouped)


def test_learning_rate_warms_up_then_decays_linearly_to_zero():
    rates = [learning_rate(step, 10, {"learning_rate": 1.0, "warmup_ratio": 0.2}) for step in range(10)]
    assert rates[:3] == [0.5, 1.0, 1.0]
    assert rates[2:] == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_finetune_writes_adapter_trained_json_and_train_log_and_removes_checkpoints(
    tiny_model_dir, facts, tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr("factft.train.PROGRESS_EVERY_S", float("inf"))  # progress lines at the ends only
    with caplog.at_level(logging.INFO, logger="factft.train"):
        summary, _ = run(tiny_model_dir, facts, tmp_path)
    trained = json.loads((tmp_path / "adapter" / "trained.json").read_text())
    assert trained == summary
    # 16 examples in batches of 3 -> 6 micro-batches per epoch, 2 per step, 3 epochs.
    assert (summary["examples"], summary["steps"], summary["epochs"]) == (16, 9, 3.0)
    assert summary["method"] == "lora" and summary["seed"] == 0 and summary["versions"]["peft"]
    log = pd.read_csv(tmp_path / "train_log.tsv", sep="\t")
    assert list(log.columns) == ["step", "epoch", "loss", "lr", "tokens", "tokens_per_s"]
    assert log["step"].tolist() == list(range(1, 10))
    assert log["loss"].iloc[-1] == pytest.approx(summary["final_loss"], rel=1e-5)
    assert log["tokens"].sum() == summary["tokens"]
    assert log["loss"].iloc[-3:].mean() < log["loss"].iloc[:3].mean()
    assert not (tmp_path / "checkpoints").exists()
    # The job's speed in its log: real tokens over the steps' own time (not loading or saving).
    (done,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("finetuned 9 steps")]
    logged = re.search(r"([0-9]+) real tokens/s over the steps ->", done)  # on CPU no GPU memory to report
    steps_seconds = (log["tokens"] / log["tokens_per_s"]).sum()
    assert float(logged.group(1)) == pytest.approx(summary["tokens"] / steps_seconds, abs=1)
    # Progress as whole lines (a batch job's log has no use for \r bars): the first step and the last.
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(" loss ")[0] for line in progress] == ["step 1/9", "step 9/9"]
    last = re.fullmatch(r"step 9/9 loss (\S+) lr \S+ ([0-9]+) tokens/s, 0 s left", progress[-1])
    assert float(last.group(1)) == pytest.approx(summary["final_loss"], rel=1e-3)
    assert float(last.group(2)) == pytest.approx(log["tokens"][1:].sum() / steps_seconds_after_first(log), abs=1)


def test_max_grad_norm_clips_each_steps_gradients_and_logs_their_norm_before(
    tiny_model_dir, facts, tmp_path, monkeypatch
):
    norms = []  # the gradients' total norm as each optimizer step sees them
    make_optimizer = train.make_optimizer

    def recording(model, settings, device):
        optimizer = make_optimizer(model, settings, device)
        step = optimizer.step

        def recorded(*args, **kwargs):
            grads = [p.grad.flatten() for group in optimizer.param_groups for p in group["params"]]
            norms.append(float(torch.linalg.vector_norm(torch.cat(grads))))
            return step(*args, **kwargs)

        optimizer.step = recorded
        return optimizer

    monkeypatch.setattr(train, "make_optimizer", recording)
    run(tiny_model_dir, facts, tmp_path / "free", max_steps=3)
    free, norms[:] = list(norms), []
    clip = 0.5 * min(free)
    run(tiny_model_dir, facts, tmp_path / "clipped", max_steps=3, max_grad_norm=clip)
    assert norms == pytest.approx([clip] * 3, rel=1e-4)
    log = pd.read_csv(tmp_path / "clipped" / "train_log.tsv", sep="\t")
    # Step 1 starts from the same weights on the same batch: the same gradients, before clipping.
    assert log["grad_norm"].iloc[0] == pytest.approx(free[0], rel=1e-5)
    assert (log["grad_norm"] > clip).all()
    assert "grad_norm" not in pd.read_csv(tmp_path / "free" / "train_log.tsv", sep="\t")


def test_a_run_trains_each_example_once_an_epoch_where_grad_accum_does_not_divide_its_batches(
    tiny_model_dir, facts, tmp_path
):
    # 16 examples in batches of 3: 6 micro-batches an epoch, steps of 4 and then of the 2 left.
    summary, _ = run(tiny_model_dir, facts, tmp_path, epochs=1, grad_accum=4)
    assert (summary["steps"], summary["epochs"]) == (2, 1.0)
    model, tokenizer = load_model(spec(tiny_model_dir), device="cpu")
    encoded = encode_examples(facts, tokenizer, PROMPT, max_length=32)
    log = pd.read_csv(tmp_path / "train_log.tsv", sep="\t")
    assert log["tokens"].sum() == sum(len(e["input_ids"]) for e in encoded)  # each example once
    assert log["epoch"].tolist() == pytest.approx([4 / 6, 1.0], abs=1e-6)


def steps_seconds_after_first(log: pd.DataFrame) -> float:
    return (log["tokens"] / log["tokens_per_s"])[1:].sum()


def test_same_seed_gives_the_same_adapter_and_another_seed_another(tiny_model_dir, facts, tmp_path):
    _, first = run(tiny_model_dir, facts, tmp_path / "a", max_steps=3)
    _, again = run(tiny_model_dir, facts, tmp_path / "b", max_steps=3)
    _, other = run(tiny_model_dir, facts, tmp_path / "c", max_steps=3, seed=1)
    assert same_weights(first, again, atol=0)
    assert not same_weights(first, other, atol=1e-4)


@pytest.mark.parametrize(
    "method, optimizer", [("lora", "adamw"), ("qlora", "adamw"), ("full", "adamw8bit")]
)  # fmt: skip
def test_interrupted_run_resumes_to_the_same_adapter_and_loss(
    tiny_model_dir, facts, tmp_path, caplog, monkeypatch, method, optimizer
):
    monkeypatch.setattr(train, "MIN_8BIT_SIZE", 64)  # 8-bit moments for the tiny model's weights too
    whole, expected = run(tiny_model_dir, facts, tmp_path / "whole", method=method, optimizer=optimizer)

    def crash_at_step_5(step, loss):
        if step == 5:
            raise KeyboardInterrupt("job killed")

    with pytest.raises(KeyboardInterrupt):
        run(
            tiny_model_dir, facts, tmp_path / "resumed", on_step=crash_at_step_5, method=method, optimizer=optimizer
        )
    assert not (tmp_path / "resumed" / "adapter").exists()
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step-00000004"]
    with caplog.at_level(logging.INFO, logger="factft"):
        resumed, weights = run(tiny_model_dir, facts, tmp_path / "resumed", method=method, optimizer=optimizer)
    assert "resuming from" in caplog.text and "step 4 of 9" in caplog.text
    assert "step 5/9 loss " in caplog.text  # the resumed run's first progress line
    assert same_weights(weights, expected, atol=1e-6)
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], abs=1e-6)
    assert pd.read_csv(tmp_path / "resumed" / "train_log.tsv", sep="\t")["step"].tolist() == list(range(1, 10))


def test_incomplete_or_mismatching_checkpoints_are_skipped(tiny_model_dir, facts, tmp_path, caplog):
    def crash_at_step_3(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dir, facts, tmp_path, on_step=crash_at_step_3)
    (tmp_path / "checkpoints" / "step-00000008").mkdir()  # a copy cut short: no state.json
    with caplog.at_level(logging.INFO, logger="factft"):
        summary, _ = run(tiny_model_dir, facts, tmp_path, learning_rate=1e-3)
    assert "skipping incomplete checkpoint" in caplog.text
    assert "trained with other settings or data" in caplog.text
    assert "resuming" not in caplog.text
    assert summary["steps"] == 9


def test_running_out_of_gpu_memory_names_the_settings_that_fit_and_keeps_the_checkpoints(
    tiny_model_dir, facts, tmp_path
):
    def out_of_memory_at_step_3(step, loss):  # a real one needs a GPU; this fails as one does
        if step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(FactftError) as error:
        run(tiny_model_dir, facts, tmp_path, on_step=out_of_memory_at_step_3)
    assert str(error.value) == (
        "model 'tiny': out of GPU memory while finetuning, in micro-batches of finetune.batch_size 3 "
        "examples of up to finetune.max_length 32 tokens; under finetune (models.tiny.finetune for this "
        "model alone): lower batch_size and raise grad_accum as much (the same batch_size x grad_accum "
        "per step), or set gradient_checkpointing: true, or use method qlora, or lower max_length"
    )
    assert isinstance(error.value.__cause__, torch.OutOfMemoryError)
    assert not (tmp_path / "adapter").exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]
    # Only what is not already set is suggested.
    fitted = settings(method="qlora", batch_size=1, gradient_checkpointing=True)
    assert out_of_memory("tiny", fitted, "cpu").endswith("for this model alone): lower max_length")


def test_a_diverging_finetune_stops_at_its_first_nan_loss_and_saves_nothing(tiny_model_dir, facts, tmp_path):
    with pytest.raises(FactftError) as error:
        run(tiny_model_dir, facts, tmp_path, learning_rate=1e6)
    assert re.fullmatch(
        r"finetune of model 'tiny': the loss is nan at step \d of 9, and nothing is saved; "
        r"training diverged: lower finetune.learning_rate \(1e\+06\)",
        str(error.value),
    )
    assert not (tmp_path / "adapter").exists()


def test_a_model_that_overflows_fp16_stops_its_finetune_on_a_gpu_without_bf16(
    fp16_overflow_model_dir, facts, tmp_path, monkeypatch
):
    run(fp16_overflow_model_dir, facts, tmp_path / "fp32", max_steps=2)  # in fp32 (or bf16) it trains
    for module in (models, train):
        monkeypatch.setattr(module, "compute_dtype", lambda device: torch.float16)  # a V100's or T4's
    with pytest.raises(FactftError) as error:
        run(fp16_overflow_model_dir, facts, tmp_path / "fp16")
    assert str(error.value).startswith(
        "finetune of model 'tiny': the loss is nan at step 1 of 9, and nothing is saved; this GPU has no "
        "bf16 and computes in fp16, whose range (to 65504) a model's activations can overflow: run it on a "
        "GPU with bf16"
    )


def test_fp16_training_checkpoints_its_loss_scale_and_resumes_with_it(
    tiny_model_dir, facts, tmp_path, monkeypatch, caplog
):
    def crash_at(at):
        def crash(step, loss):
            if step == at:
                raise KeyboardInterrupt

        return crash

    def precision(dtype):
        for module in (models, train):
            monkeypatch.setattr(module, "compute_dtype", lambda device: dtype)

    def state(step):
        return tmp_path / "checkpoints" / f"step-{step:08d}" / "state.json"

    precision(torch.float16)  # a V100's or T4's
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dir, facts, tmp_path, on_step=crash_at(3))
    saved = json.loads(state(2).read_text())
    assert saved["precision"] == "float16"
    assert saved["scaler"]["scale"] == 2.0**16 and saved["scaler"]["_growth_tracker"] == 2
    # As if overflows had halved it (set here by hand): the resumed run goes on with the saved scale.
    saved["scaler"]["scale"] = 2.0**10
    state(2).write_text(json.dumps(saved))
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dir, facts, tmp_path, on_step=crash_at(5))
    assert json.loads(state(4).read_text())["scaler"] == dict(saved["scaler"], _growth_tracker=4)
    # Requeued onto a GPU with bf16, it goes on there, and says so.
    precision(torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="factft"):
        summary, _ = run(tiny_model_dir, facts, tmp_path)
    assert "this run computed in float16 to step 4; it goes on in bfloat16" in caplog.text
    assert summary["precision"] == "bfloat16" and summary["steps"] == 9


def test_full_finetune_output_loads_as_the_model(tiny_model_dir, facts, tmp_path):
    full = settings(method="full", max_steps=2, gradient_checkpointing=True)
    summary = finetune(spec(tiny_model_dir), facts, tmp_path / "full", full, PROMPT, tmp_path / "ck")
    model, tokenizer = load_model(spec(tiny_model_dir), tmp_path / "full", device="cpu")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert summary["trainable_params"] == sum(p.numel() for p in base.parameters())
    # Every weight trained, not only an adapter's or the head's (embedding rows of unused tokens stay).
    trained = dict(model.named_parameters())
    for name, weight in base.named_parameters():
        assert "embed_tokens" in name or not torch.equal(trained[name], weight), name
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()


@pytest.mark.parametrize(
    ("method", "device", "dtype"),
    [
        ("full", "cuda", torch.float32),  # fp32 master weights: bf16 ones would drop small AdamW updates
        ("lora", "cuda", torch.bfloat16),  # frozen base in bf16; peft makes the adapters fp32
        ("qlora", "cuda", torch.bfloat16),
        ("full", "cpu", torch.float32),
        ("lora", "cpu", torch.float32),
    ],
)
def test_full_finetunes_keep_fp32_master_weights(method, device, dtype):
    assert weights_dtype(method, device) == dtype


@pytest.mark.parametrize("precision", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_a_gpus_half_precision_trains_like_fp32_and_evaluates_in_it(
    tiny_model_dir, facts, tmp_path, monkeypatch, method, precision
):
    # CI has no GPU: this runs the dtypes a GPU gets (compute_dtype: bf16, or fp16 on a GPU
    # without bf16, there with loss scaling) on the CPU.
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    # Steps enough to answer: after 8 at 3e-2, bf16 QLoRA answered eos alone on a CPU with AVX-512 bf16.
    rate = 1e-3 if method == "full" else 1e-2
    options = {"method": method, "max_steps": 24, "learning_rate": rate, "lora": lora, "packing": True}
    run(tiny_model_dir, facts, tmp_path / "fp32", **options)
    for module in (models, train):
        monkeypatch.setattr(module, "compute_dtype", lambda device: precision)
    summary, saved = run(tiny_model_dir, facts, tmp_path / "half", **options)

    fp32, half = (pd.read_csv(tmp_path / run_ / "train_log.tsv", sep="\t")["loss"] for run_ in ("fp32", "half"))
    assert fp32.iloc[-1] < fp32.iloc[0] - 0.2  # it learns, and half precision follows
    assert (fp32 - half).abs().max() < 0.05
    assert summary["precision"] == str(precision).removeprefix("torch.")
    # A full finetune trains fp32 master weights and saves them in half precision; adapters stay fp32.
    assert {w.dtype for w in saved.values()} == {precision if method == "full" else torch.float32}
    model, tokenizer = load_model(spec(tiny_model_dir), tmp_path / "half" / "adapter", device="cpu")
    # Half-precision weights; an adapter stays unmerged beside them (fp32), as in training (merges_exactly).
    assert {p.dtype for name, p in model.named_parameters() if "lora_" not in name} == {precision}
    assert hasattr(model, "peft_config") == (method != "full")
    prompts = [PROMPT["template"].format(question=q) for q in facts["question"]]
    dynamic, static = (
        generate_texts(model, tokenizer, prompts, max_new_tokens=4, batch_size=5, static_cache=cache)
        for cache in (False, True)
    )
    assert dynamic == static and any(dynamic)


def test_adamw8bit_keeps_a_quarter_of_adamws_moment_bytes_and_steps_alike():
    def toy_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 128))

    def flat(model):
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    def five_steps(optimizer_name):
        model = toy_model()
        optimizer = make_optimizer(model, settings(optimizer=optimizer_name, weight_decay=0.0), "cpu")
        inputs = torch.randn(64, 128)
        for _ in range(5):
            model(inputs).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        tensors = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
        return sum(t.nbytes for t in tensors if t.dim() > 0), flat(model)

    plain_bytes, plain = five_steps("adamw")
    small_bytes, small = five_steps("adamw8bit")
    matrices, biases = 2 * 128 * 128, 2 * 128
    assert plain_bytes == 8 * (matrices + biases)  # two fp32 moments per weight
    # Two 8-bit moments per matrix weight, plus their block scales and quantization maps;
    # the biases (under MIN_8BIT_SIZE) keep fp32 moments.
    assert 2 * matrices < small_bytes < 2.2 * matrices + 8 * biases
    start = flat(toy_model())
    assert torch.nn.functional.cosine_similarity(plain - start, small - start, dim=0) > 0.99


@pytest.mark.parametrize(
    "broken, error",
    [("trainable.safetensors", "SafetensorError"), ("optimizer.pt", "EOFError"), ("state.json", "JSONDecodeError")],
)
def test_an_unreadable_checkpoint_is_named_and_kept(tiny_model_dir, facts, tmp_path, broken, error):
    def crash_at_step_3(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dir, facts, tmp_path, on_step=crash_at_step_3)
    checkpoint = tmp_path / "checkpoints" / "step-00000002"
    (checkpoint / broken).write_bytes(b"")  # what a node crash can leave of a file written just before it
    with pytest.raises(FactftError, match=rf"checkpoint {checkpoint} cannot be read \({error}: .*delete that folder"):
        run(tiny_model_dir, facts, tmp_path)
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted(
        ["state.json", "trainable.safetensors", "optimizer.pt", "rng.safetensors"]
    )


def test_a_second_copy_of_a_running_finetune_stops_before_touching_its_checkpoints(tiny_model_dir, facts, tmp_path):
    """Two jobs of one run: e.g. one resubmitted while the first, orphaned by a killed
    Snakemake, still runs. flock locks of two open() calls conflict in one process too."""
    _, expected = run(tiny_model_dir, facts, tmp_path / "alone")
    folder, refused = tmp_path / "run", []

    def second_copy_at_step_3(step, loss):
        if step != 3:
            return
        writing = folder / "checkpoints" / ".step-00000004.abc123.tmp"  # as if mid-checkpoint
        writing.mkdir()
        with pytest.raises(FactftError) as error:
            run(tiny_model_dir, facts, folder)
        refused.append(str(error.value))
        assert writing.is_dir() and (folder / "checkpoints" / "step-00000002" / "state.json").is_file()
        writing.rmdir()

    _, weights = run(tiny_model_dir, facts, folder, on_step=second_copy_at_step_3)
    (message,) = refused
    assert re.fullmatch(
        rf"another finetune of this run is running \(host \S+, pid {os.getpid()}, SLURM job \S+, since [0-9: -]+; "
        rf"it holds {folder}/checkpoints\.lock\): cancel it \(scancel, kill\) or let it finish; .*",
        message,
    ), message
    assert same_weights(weights, expected, atol=0)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter", "train_log.tsv"]  # the lock file too is gone


def test_where_the_file_system_has_no_locks_a_finetune_warns_and_runs(tiny_model_dir, facts, tmp_path, caplog,
                                                                     monkeypatch):  # fmt: skip
    """An NFS mount without a lock manager, or Lustre without `flock`, answers flock with ENOLCK."""

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    _, expected = run(tiny_model_dir, facts, tmp_path / "locked", max_steps=3)
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="factft"):
        _, weights = run(tiny_model_dir, facts, tmp_path / "unlocked", max_steps=3)
    warning = r"cannot lock \S+checkpoints\.lock \(\[Errno \d+\] No locks available\): a second copy"
    assert re.search(warning, caplog.text), caplog.text
    assert same_weights(weights, expected, atol=0)
    assert sorted(p.name for p in (tmp_path / "unlocked").iterdir()) == ["adapter", "train_log.tsv"]


def test_existing_output_is_never_overwritten(tiny_model_dir, facts, tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "keep.txt").write_text("mine")
    with pytest.raises(FactftError, match="already exists"):
        run(tiny_model_dir, facts, tmp_path)
    assert (tmp_path / "adapter" / "keep.txt").read_text() == "mine"


def test_remade_base_weights_change_the_checkpoint_fingerprint(tiny_model_dir, tmp_path):
    remade = tmp_path / "remade"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight.add_(1e-3)
    model.save_pretrained(remade)
    encoded = [{"input_ids": [1, 2], "labels": [-100, 2]}]
    original = fingerprint(settings(), spec(tiny_model_dir), encoded)
    assert original == fingerprint(settings(), spec(tiny_model_dir), encoded)
    assert original != fingerprint(settings(), spec(remade), encoded)
    assert original == fingerprint(settings(checkpoint_every=7), spec(tiny_model_dir), encoded)
    # A requeued job that turns checkpointing on to fit its GPU resumes its checkpoints, and
    # what reaches a job outside its params is what its fingerprint leaves out.
    assert train.RUNNING_SETTINGS == RUNNING_SETTINGS
    assert original == fingerprint(settings(gradient_checkpointing=True), spec(tiny_model_dir), encoded)
    assert original != fingerprint(settings(learning_rate=1e-3), spec(tiny_model_dir), encoded)
