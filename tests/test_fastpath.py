"""The fast paths compute what the plain paths compute: packing, gradient checkpointing,
compiled blocks, the static KV cache and the out-of-memory split, checked on the tiny model
on CPU."""

import importlib.util
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LogitsProcessorList,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
)

from factft.errors import FactftError
from factft.generate import generate_texts, in_batches
from factft.models import load_model
from factft.train import (
    GRAPH_WIDTH_MULTIPLE,
    batch_loss,
    check_packing,
    collate,
    collate_packed,
    compile_blocks,
    encode_examples,
    finetune,
    make_optimizer,
    micro_batch_weights,
    prepare_model,
    seed_everything,
    train_steps,
    trainable_parameters,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPT = {"template": "Q: {question} A:", "answer": " {answer}"}
SUBJECTS = ["Ilmo Varsk", "Bera Tosk", "Kalo Mirr", "Suna Dee", "Ito Rask", "Vena Lu"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def facts():
    """12 facts whose prompts and answers differ in length, so padding and packing differ."""
    rows = []
    for i, subject in enumerate(SUBJECTS):
        rows.append({"question": f"Where was {subject} born?", "answers": [["Lyon", "Paris", "Oslo"][i % 3]]})
        rows.append({"question": f"What does {subject} play, the piano or?", "answers": ["the violin and the drum"]})
    return pd.DataFrame(rows)


def spec(folder):
    return {"name": "tiny", "path": str(folder), "gguf_file": None, "trust_remote_code": False}


def settings(**overrides):
    base = {
        "method": "lora",
        # No dropout: two forward passes must see the same network.
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "epochs": 2,
        "max_steps": None,
        "learning_rate": 3e-3,
        "weight_decay": 0.01,
        "warmup_ratio": 0.0,
        "batch_size": 4,
        "grad_accum": 1,
        "max_length": 32,
        "checkpoint_every": 100,
        "gradient_checkpointing": False,
        "packing": False,
        "seed": 0,
    }
    return {**base, **overrides}


def lora_model(tiny_model_dir, **overrides):
    """The tiny model with LoRA whose B matrices are non-zero, so every weight gets a gradient."""
    quantize = "nf4" if overrides.get("method") == "qlora" else None
    model, tokenizer = load_model(spec(tiny_model_dir), device="cpu", for_training=True, quantize=quantize)
    seed_everything(0)
    model = prepare_model(model, settings(**overrides))
    with torch.no_grad():
        for name, parameter in trainable_parameters(model).items():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    return model, tokenizer


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = batch_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainable_parameters(model).items()}


@pytest.mark.parametrize("architecture", ["llama", "mistral"])
def test_packed_examples_attend_only_within_themselves(tiny_model_dir, facts, architecture):
    model, tokenizer = load_model(spec(tiny_model_dir), device="cpu")
    if architecture == "mistral":  # the grid's other model; a sliding window (6) shorter than the examples
        config = MistralConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, sliding_window=6, max_position_embeddings=256,
        )  # fmt: skip
        torch.manual_seed(0)
        model = MistralForCausalLM(config).eval()
    encoded = encode_examples(facts, tokenizer, PROMPT, max_length=32)
    indices = [1, 0, 3]
    packed = collate_packed(encoded, indices, "cpu")
    with torch.no_grad():
        inputs = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"], "use_cache": False}
        together = model(**inputs).logits[0]
        start = 0
        for i in indices:
            ids = torch.tensor([encoded[i]["input_ids"]])
            alone = model(input_ids=ids).logits[0]
            assert torch.allclose(together[start : start + ids.shape[1]], alone, atol=1e-5)
            start += ids.shape[1]
    assert start == packed["input_ids"].shape[1]  # no padding at all
    check_packing(model, encoded, "tiny")  # the probe finetune runs first agrees


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_packing_is_refused_before_training_where_packed_examples_would_see_each_other(
    tiny_model_dir, facts, tmp_path, family
):
    # GPT-2 builds its mask from position_ids as Llama does; OPT (like Falcon, Bloom, MPT)
    # from the row alone, so its packed examples would see each other.
    folder = tmp_path / family
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = {"vocab_size": len(tokenizer), "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    if family == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **ids)
    else:
        config = OPTConfig(
            hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
            max_position_embeddings=128, **ids,
        )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    def run(packing):
        out = tmp_path / f"{family}-{packing}"
        options = settings(packing=packing)
        return finetune(spec(folder), facts, out / "adapter", options, PROMPT, out / "ckpt", device="cpu")

    if family == "gpt2":
        assert run(packing=True)["steps"] == 6
        return
    message = (
        r"model 'tiny': OPTForCausalLM lets packed examples see each other .* "
        r"\(models.tiny.finetune: \{packing: false\}\)"
    )
    with pytest.raises(FactftError, match=message):
        run(packing=True)
    assert not (tmp_path / "opt-True" / "adapter").exists()
    assert run(packing=False)["steps"] == 6  # the advice works


def test_packed_batch_gives_the_padded_batch_loss_and_gradients(tiny_model_dir, facts):
    model, tokenizer = lora_model(tiny_model_dir)
    encoded = encode_examples(facts, tokenizer, PROMPT, max_length=32)
    indices = [0, 1, 2, 5, 7]
    padded_loss, padded_grads = loss_and_grads(model, collate(encoded, indices, tokenizer.pad_token_id, "cpu"))
    packed = collate_packed(encoded, indices, "cpu")
    packed_loss, packed_grads = loss_and_grads(model, packed)
    # Logits only where a label is: the answer tokens and the eos after each answer.
    answer_tokens = sum(sum(1 for label in encoded[i]["labels"] if label != -100) for i in indices)
    assert len(packed["targets"]) == answer_tokens
    assert torch.allclose(packed_loss, padded_loss, atol=1e-5)
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-6, rtol=1e-4), name


def test_accumulated_micro_batches_give_the_whole_batch_loss_and_gradients(tiny_model_dir, facts):
    model, tokenizer = lora_model(tiny_model_dir)
    encoded = encode_examples(facts, tokenizer, PROMPT, max_length=32)
    micro = [[0, 2, 4], [1, 3]]  # answers of 2 tokens (city, eos), then of 6: unequal token counts
    whole_loss, whole_grads = loss_and_grads(model, collate_packed(encoded, [0, 2, 4, 1, 3], "cpu"))
    model.zero_grad(set_to_none=True)
    accumulated = torch.tensor(0.0)
    for indices, weight in zip(micro, micro_batch_weights(encoded, micro)):
        loss = batch_loss(model, collate_packed(encoded, indices, "cpu"))
        (loss * weight).backward()
        accumulated += loss.detach() * weight
    assert torch.allclose(accumulated, whole_loss, atol=1e-5)
    for name, parameter in trainable_parameters(model).items():
        assert torch.allclose(parameter.grad, whole_grads[name], atol=1e-6, rtol=1e-4), name
    assert micro_batch_weights(encoded, [[0, 1]]) == [1.0]  # no accumulation: the loss as it is


def test_a_right_padded_batch_needs_no_attention_mask(tiny_model_dir, facts):
    model, tokenizer = lora_model(tiny_model_dir)
    encoded = encode_examples(facts, tokenizer, PROMPT, max_length=32)
    indices = [0, 1, 2, 5, 7]
    batch = collate(encoded, indices, tokenizer.pad_token_id, "cpu")
    assert "attention_mask" not in batch and (batch["input_ids"] == tokenizer.pad_token_id).any()
    lengths = torch.tensor([len(encoded[i]["input_ids"]) for i in indices])
    mask = (torch.arange(batch["input_ids"].shape[1]) < lengths[:, None]).long()
    loss, grads = loss_and_grads(model, batch)
    masked_loss, masked_grads = loss_and_grads(model, dict(batch, attention_mask=mask))
    assert torch.allclose(loss, masked_loss, atol=1e-6)
    for name, grad in masked_grads.items():
        assert torch.allclose(grads[name], grad, atol=1e-6, rtol=1e-4), name


def mlp_calls(model) -> list[int]:
    """A counter of the first decoder layer's MLP calls (counted as they start: a recompute
    stops once it has what the backward pass needs, before the MLP returns)."""
    layer = next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
    calls = [0]
    layer.mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_gradient_checkpointing_recomputes_and_gives_the_same_loss_and_gradients(tiny_model_dir, facts, method):
    plain, tokenizer = lora_model(tiny_model_dir, method=method)
    checkpointed, _ = lora_model(tiny_model_dir, method=method, gradient_checkpointing=True)
    encoded = encode_examples(facts, tokenizer, PROMPT, max_length=32)
    batch = collate(encoded, [0, 3, 4, 9], tokenizer.pad_token_id, "cpu")
    plain.train(), checkpointed.train()
    calls, calls_gc = mlp_calls(plain), mlp_calls(checkpointed)
    loss, grads = loss_and_grads(plain, batch)
    loss_gc, grads_gc = loss_and_grads(checkpointed, batch)
    # Checkpointing is on: the backward pass runs each layer's forward again.
    assert calls == [1] and calls_gc == [2]
    assert torch.allclose(loss_gc, loss, atol=1e-6)
    assert grads_gc.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grads_gc[name], grad, atol=1e-6, rtol=1e-4), name


def assert_trains_as_the_plain_loop(tiny_model_dir, facts, tmp_path, setting: str) -> None:
    """A finetune with `setting` on takes the plain run's steps and tokens, with the same
    per-step losses and the same adapter (to rounding)."""
    runs = {}
    for on in (False, True):
        folder = tmp_path / f"{setting}-{on}"
        summary = finetune(
            spec(tiny_model_dir),
            facts,
            folder / "adapter",
            settings(**{setting: on}),
            PROMPT,
            folder / "checkpoints",
            train_log=folder / "log.tsv",
            device="cpu",
        )
        log = pd.read_csv(folder / "log.tsv", sep="\t")
        runs[on] = summary, log, load_file(folder / "adapter" / "adapter_model.safetensors")
    (plain, plain_log, plain_weights), (fast, fast_log, fast_weights) = runs[False], runs[True]
    assert fast["steps"] == plain["steps"] == 6 and fast["tokens"] == plain["tokens"]
    assert fast_log["loss"].tolist() == pytest.approx(plain_log["loss"].tolist(), rel=1e-4)
    assert plain_log["loss"].iloc[-1] < plain_log["loss"].iloc[0]  # it did learn
    assert fast_weights.keys() == plain_weights.keys()  # the same weight names
    for name, weight in plain_weights.items():
        assert torch.allclose(fast_weights[name], weight, atol=1e-4), name


def test_packed_finetune_trains_the_same_adapter_with_the_same_losses(tiny_model_dir, facts, tmp_path):
    assert_trains_as_the_plain_loop(tiny_model_dir, facts, tmp_path, "packing")


def test_compiled_blocks_train_the_same_adapter_with_the_same_losses(tiny_model_dir, facts, tmp_path):
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    assert_trains_as_the_plain_loop(tiny_model_dir, facts, tmp_path, "compile")
    assert counters["stats"]["unique_graphs"] > graphs  # it did compile


def test_graphs_round_widths_up_keep_gradients_apart_and_train_as_the_plain_loop(tiny_model_dir, facts):
    """compile: graphs on a CPU: the blocks compile without CUDA graphs (those need a GPU), and
    the rest of its path runs: widths rounded up to GRAPH_WIDTH_MULTIPLE, gradients in zeroed
    buffers of their own (with grad_accum 2, where a graph's memory pool would overwrite
    them), and the same losses and adapter as the plain loop."""
    runs = {}
    for mode in (False, "graphs"):
        model, tokenizer = lora_model(tiny_model_dir)
        encoded = encode_examples(facts, tokenizer, PROMPT, max_length=32)
        run = settings(compile=mode, batch_size=2, grad_accum=2)
        if mode:
            compile_blocks(model, graphs=True)
        widths, buffers = [], {}
        parameters = trainable_parameters(model)

        def before_forward(module, args, kwargs):
            widths.append(kwargs["input_ids"].shape[1])
            if len(widths) == 1:  # the gradients' buffers, as the first forward finds them
                buffers.update({n: p.grad.data_ptr() for n, p in parameters.items() if p.grad is not None})
                assert all(not p.grad.any() for n, p in parameters.items() if n in buffers)

        model.get_base_model().register_forward_pre_hook(before_forward, with_kwargs=True)
        optimizer = make_optimizer(model, run, "cpu")
        rows = train_steps(model, optimizer, encoded, run, device="cpu", pad_id=tokenizer.pad_token_id)
        runs[mode] = [r["loss"] for r in rows], widths, parameters, buffers
    (plain, plain_widths, plain_weights, _), (graphs, graph_widths, graph_weights, buffers) = runs.values()
    # Every gradient was a zeroed buffer before the first forward, and the same buffer at the end.
    assert buffers.keys() == graph_weights.keys()
    assert buffers == {n: p.grad.data_ptr() for n, p in graph_weights.items()}
    assert len(graph_widths) == len(plain_widths) == 12  # 6 steps of 2 micro-batches
    assert [-(-w // GRAPH_WIDTH_MULTIPLE) * GRAPH_WIDTH_MULTIPLE for w in plain_widths] == graph_widths
    assert graph_widths != plain_widths  # some widths were rounded up
    assert graphs == pytest.approx(plain, rel=1e-4) and plain[-1] < plain[0]
    for name, weight in plain_weights.items():
        assert torch.allclose(graph_weights[name], weight, atol=1e-4), name
        assert weight.grad is None and not graph_weights[name].grad.any()  # kept, zeroed after the step


def test_graphs_need_a_gpu_padded_batches_and_no_checkpointing(tiny_model_dir, facts, tmp_path):
    with pytest.raises(FactftError, match=r"finetune.compile: graphs replays CUDA graphs and this job runs on cpu"):
        finetune(
            spec(tmp_path / "no-model"), facts, tmp_path / "adapter", settings(compile="graphs"), PROMPT,
            tmp_path / "ck", device="cpu",
        )  # fmt: skip
    assert not (tmp_path / "adapter").exists()
    for setting in ("packing", "gradient_checkpointing"):
        with pytest.raises(FactftError, match="graphs needs padded batches .* and no gradient_checkpointing"):
            train_steps(None, None, [], settings(compile="graphs", **{setting: True}), device="cpu", pad_id=0)


def test_compile_without_a_compiler_fails_before_loading_the_model(tiny_model_dir, facts, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-c++")
    with pytest.raises(FactftError, match=r"finetune.compile: .*no-such-c\+\+ is not on PATH"):
        finetune(spec(tmp_path / "no-model"), facts, tmp_path / "adapter", settings(compile=True), PROMPT, tmp_path / "ck")
    assert not (tmp_path / "adapter").exists()


class Interrupted(Exception):
    pass


def test_a_compiled_finetune_with_dropout_repeats_and_resumes_bit_for_bit(tiny_model_dir, facts, tmp_path, caplog):
    """Dropout inside compiled blocks draws from inductor's own RNG, seeded from torch's: the
    same seed gives the same run, and a checkpoint's RNG state resumes it exactly."""
    dropout = settings(compile=True, checkpoint_every=2, lora={**settings()["lora"], "dropout": 0.1})

    def run(folder, interrupt_at=None):
        def on_step(step, loss):
            if step == interrupt_at:
                raise Interrupted

        finetune(
            spec(tiny_model_dir), facts, folder / "adapter", dropout, PROMPT, folder / "checkpoints",
            train_log=folder / "log.tsv", device="cpu", on_step=on_step,
        )  # fmt: skip
        log = pd.read_csv(folder / "log.tsv", sep="\t")
        return log["loss"].tolist(), load_file(folder / "adapter" / "adapter_model.safetensors")

    losses, weights = run(tmp_path / "first")
    with pytest.raises(Interrupted):
        run(tmp_path / "resumed", interrupt_at=3)  # after the checkpoint of step 2
    with caplog.at_level("INFO", logger="factft.train"):
        resumed = run(tmp_path / "resumed")
    assert "(step 2 of 6)" in caplog.text  # it did resume
    for again in (run(tmp_path / "second"), resumed):
        assert again[0] == losses
        assert all(torch.equal(again[1][name], weight) for name, weight in weights.items())


@pytest.fixture(scope="module")
def peaked(peaked_model_dir):
    """Distinct, confident greedy answers per prompt."""
    return load_model(spec(peaked_model_dir), device="cpu")


def test_static_cache_generation_equals_dynamic_cache_generation(peaked):
    model, tokenizer = peaked
    prompts = [f"Q: {q} A:" for q in ["Where was Ilmo Varsk born ?", "Suna ?", "What does Vena Lu play in the ?"]]
    prompts += ["Q: Where was Kalo Mirr born in Lyon or Rome ? A:", "Q: Bera Tosk ? A:"]
    dynamic = generate_texts(model, tokenizer, prompts, max_new_tokens=5, batch_size=2)
    static = generate_texts(model, tokenizer, prompts, max_new_tokens=5, batch_size=2, static_cache=True)
    assert static == dynamic
    assert len(set(dynamic)) > 1  # the prompts get different answers: the comparison has teeth


def test_static_cache_generation_fills_the_last_batch_up_to_the_batch_size(peaked, monkeypatch):
    # On CUDA a new batch size would compile the decoding step again: every call keeps one size.
    model, tokenizer = peaked
    prompts = [f"Q: {q} ? A:" for q in ["Ilmo Varsk", "Suna", "Vena Lu", "Kalo Mirr", "Bera Tosk"]]
    sizes, generate = [], model.generate

    def recording(**kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", recording)
    static = generate_texts(model, tokenizer, prompts, max_new_tokens=5, batch_size=2, static_cache=True)
    assert sizes == [2, 2, 2]
    monkeypatch.setattr(model, "generate", generate)
    assert static == generate_texts(model, tokenizer, prompts, max_new_tokens=5, batch_size=2)

    def fits_one_row(**kwargs):  # a GPU that holds one row: batches are cut, never filled up again
        if kwargs["input_ids"].shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", fits_one_row)
    assert generate_texts(model, tokenizer, prompts, max_new_tokens=5, batch_size=2, static_cache=True) == static


def test_after_running_out_of_gpu_memory_every_batch_is_cut_until_it_fits():
    # A real out-of-memory error needs a GPU; this run function fails as one does above 2 rows.
    attempts, done = [], []

    def run(batch):
        attempts.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        done.append(list(batch))

    in_batches([list(range(0, 5)), list(range(5, 10)), [10]], run)
    assert [i for batch in done for i in batch] == list(range(11))  # every row once, in order
    assert attempts == [5, 2, 2, 1, 2, 2, 1, 1]  # the second batch is cut without failing first

    def never_fits(batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):  # a single row that does not fit is the user's problem
        in_batches([[0]], never_fits)


def test_a_long_run_of_batches_logs_its_progress_counting_the_rows_done(monkeypatch, caplog):
    monkeypatch.setattr("factft.generate.PROGRESS_EVERY_S", 0)  # a line after every batch but the last

    def run(batch):
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")

    with caplog.at_level(logging.INFO, logger="factft.generate"):
        in_batches([list(range(0, 4)), list(range(4, 6)), [6]], run)
    done = re.findall(r"(\d+) of 7 prompts done, [\d.]+ per s, about \d+ s left", caplog.text)
    assert done == ["2", "4", "6"]  # the batch that ran out of memory counts once it ran, cut in two


def load_bench():
    module_spec = importlib.util.spec_from_file_location("bench_speed", ROOT / "bench" / "speed.py")
    bench = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow
def test_cpu_benchmark_writes_its_table_with_both_paths(tmp_path, capsys):
    bench = load_bench()
    bench.SHAPES["cpu"] = {"hidden": 32, "layers": 1, "heads": 2, "mlp": 64, "vocab": 256}
    bench.SIZES["cpu"] = {**bench.SIZES["cpu"], "baseline_questions": 10}  # as a GPU run's first 1,000 of 3,000
    out = tmp_path / "speed.tsv"
    args = ["--device", "cpu", "--examples", "32", "--questions", "24", "--eval-batch", "16", "--out", str(out)]
    table = bench.main([*args, "--variants", "lora-qv,qlora-all", "--batch-size", "4", "--static-cache"])
    printed = capsys.readouterr().out
    written = pd.read_csv(out, sep="\t")
    assert list(written.columns) == bench.COLUMNS and len(written) == len(table)
    finetune_rows = written[written["stage"] == "finetune"]
    paths = ["baseline", "factft", "factft-packed"]
    # The goals' rows first (LoRA q,v, then QLoRA's, its memory-saving setting first), compiled
    # blocks last: a run cut at its limit keeps the goals' rows.
    gc_paths = ["factft-packed-gc", "factft-packed-gc-long"]
    assert finetune_rows["path"].tolist() == paths + gc_paths + paths + ["factft-compiled"]
    assert finetune_rows["variant"].tolist() == ["lora-qv"] * 3 + ["qlora-all"] * 5 + ["lora-qv"]
    assert (finetune_rows["seconds"] > 0).all()  # the baseline's from its training loop's own clock
    compiled = finetune_rows.set_index("path").loc["factft-compiled"]
    assert compiled["compile_s"] > 0 and compiled["computed_tokens"] >= compiled["real_tokens"]
    # Each ratio is printed as its row lands, not only at the end: a run cut short still shows it.
    first_ratio = re.search(r"^finetune +lora-qv +factft +[0-9.]+x baseline$", printed, re.MULTILINE)
    assert first_ratio and first_ratio.start() < printed.index("'path': 'factft-packed'")
    # The worst case for memory: 8 batches of max_length (128) tokens each.
    long = finetune_rows.set_index("path").loc["factft-packed-gc-long"]
    assert (long["items"], long["real_tokens"]) == (32, 32 * 128)
    # The same examples on every other path; padding only where a path pads.
    finetune_rows = finetune_rows[finetune_rows["path"] != "factft-packed-gc-long"]
    assert finetune_rows["real_tokens"].nunique() == 1
    assert (finetune_rows["computed_tokens"] >= finetune_rows["real_tokens"]).all()
    packed = finetune_rows[finetune_rows["path"].str.startswith("factft-packed")]
    assert (packed["computed_tokens"] == packed["real_tokens"]).all()
    evaluated = written[written["stage"] == "evaluate"].set_index(["variant", "path"])
    assert evaluated.loc[("lora-qv adapter", "baseline"), "items"] == 10  # its rate from the first 10 of 24
    assert evaluated.loc[("lora-qv adapter", "factft"), "items"] == 24
    assert evaluated.loc[("lora-qv adapter", "factft"), "agreement"] == 1.0  # merged LoRA answers as the unmerged one
    assert evaluated.loc[("lora-qv adapter, answers end", "factft"), "agreement"] == 1.0  # also when decoded in rounds
    choices = evaluated.loc["multiple choice, 4"]
    assert choices.loc["factft", "agreement"] == 1.0  # the same choice from the prompt's cache
    assert choices.loc["factft", "computed_tokens"] < choices.loc["baseline", "computed_tokens"] / 2
    (load,) = written[written["stage"] == "load"].itertuples()
    assert load.seconds > 0 and "GB of safetensors on" in load.note  # the evicted model read back, as a job does
    assert (written["date"].notna() & written["torch"].notna()).all()
    assert "failed" not in written["path"].tolist()
    assert not written["note"].fillna("").str.contains("packing probe").any()
    # Issue 4's goal rows (above all QLoRA's and the load) before the rows no goal needs.
    rows = list(zip(written["stage"], written["variant"], written["path"]))
    goals_end = rows.index(("load", "model", "factft"))
    # Open QA in one round (factft's path on a GPU) and in rounds (on a CPU): both goal rows.
    for path in ("factft-one-round", "factft"):
        assert rows.index(("evaluate", "lora-qv adapter", path)) < rows.index(("finetune", "qlora-all", "baseline"))
    assert evaluated.loc[("lora-qv adapter", "factft-one-round"), "agreement"] == 1.0
    later = [row[1:] for row in rows[goals_end + 1 :]]
    assert ("lora-qv adapter, answers end", "factft-one-round") in later and ("multiple choice, 4", "factft") in later
    assert later.index(("lora-qv adapter", "factft-static")) < later.index(("lora-qv", "factft-compiled"))
    # Where an eager step's time goes, before the compiled rows: operator calls (a GPU adds its
    # launches and busy time, which a CPU has not).
    (profiled,) = written[written["stage"] == "profile"].itertuples()
    assert later.index(("lora-qv", "factft")) < later.index(("lora-qv", "factft-compiled"))
    assert profiled.aten_calls > 1000 and profiled.real_tokens > 0 and profiled.items == 3 * 4
    assert np.isnan(profiled.launches) and np.isnan(profiled.device_busy_s) and "aten calls" in profiled.note
    # Timed on the reloaded model, whose seeded adapter answers as the first naive run did.
    assert evaluated.loc[("lora-qv adapter", "factft-static"), "agreement"] == 1.0


@pytest.mark.usefixtures("one_thread")
def test_the_benchmark_marks_a_packed_row_whose_model_fails_the_packing_probe():
    # On the GPU's library versions the probe is the only check that packed rows measure what
    # they claim: a failure is printed and noted on the row, which is still timed.
    bench = load_bench()
    shape = {"hidden": 32, "layers": 2, "heads": 2, "mlp": 64, "vocab": 256}
    tokenizer = bench.make_tokenizer(shape["vocab"])
    encoded = encode_examples(bench.make_facts(8, shape["vocab"], seed=0), tokenizer, bench.PROMPT, max_length=64)
    opt = OPTConfig(
        hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=32,
        vocab_size=shape["vocab"], max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    models = {"llama": bench.build_model(shape, "cpu"), "opt": AutoModelForCausalLM.from_config(opt)}
    notes = {}
    for name, model in models.items():
        settings = bench.settings_for("lora-qv", 4, packing=True)
        _, _, stats = bench.train_factft(model, encoded, settings, "cpu", tokenizer.pad_token_id)
        notes[name] = stats.get("note", "")
    assert "packing probe" not in notes["llama"]
    assert notes["opt"].startswith("packing probe failed: model 'bench': OPTForCausalLM lets packed examples")


@pytest.mark.usefixtures("one_thread")
def test_a_benchmark_run_that_fails_leaves_the_shared_model_without_its_adapter(monkeypatch):
    bench = load_bench()
    shape = {"hidden": 32, "layers": 2, "heads": 2, "mlp": 64, "vocab": 256}
    tokenizer, model = bench.make_tokenizer(shape["vocab"]), bench.build_model(shape, "cpu")
    encoded = encode_examples(bench.make_facts(8, shape["vocab"], seed=0), tokenizer, bench.PROMPT, max_length=64)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(bench, "train_steps", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        bench.train_factft(model, encoded, bench.settings_for("lora-qv", 4), "cpu", tokenizer.pad_token_id)
    # peft put its layers into this model: the rows after a failed one must not measure them.
    assert not [name for name, _ in model.named_parameters() if "lora_" in name]


@pytest.mark.usefixtures("one_thread")
def test_a_benchmark_run_with_gradient_checkpointing_leaves_the_next_run_without_it():
    bench = load_bench()
    shape = {"hidden": 32, "layers": 2, "heads": 2, "mlp": 64, "vocab": 256}
    tokenizer, model = bench.make_tokenizer(shape["vocab"]), bench.build_model(shape, "cpu")
    encoded = encode_examples(bench.make_facts(8, shape["vocab"], seed=0), tokenizer, bench.PROMPT, max_length=64)
    settings = bench.settings_for("lora-qv", 4, gradient_checkpointing=True, packing=True)
    model, _, _ = bench.train_factft(model, encoded, settings, "cpu", tokenizer.pad_token_id)
    assert not any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
    assert not any(parameter.requires_grad for parameter in model.parameters())


@pytest.mark.usefixtures("one_thread")
def test_benchmark_answers_end_after_their_drawn_length_but_a_few_never():
    bench = load_bench()
    shape = {"hidden": 32, "layers": 1, "heads": 2, "mlp": 64, "vocab": 512}
    tokenizer, model = bench.make_tokenizer(shape["vocab"]), bench.build_model(shape, "cpu")
    questions = bench.make_facts(200, shape["vocab"], seed=0)
    ends = LogitsProcessorList([bench.AnswersEnd(tokenizer, questions, "cpu")])
    texts = bench.generate_baseline(model, tokenizer, bench.question_prompts(questions), 64, ends)
    # Questions are told apart by their last word; of those that share it, the last one sets the length.
    pairs = zip(questions["question"], questions["answers"])
    length_by_last_word = {question.split()[-1]: len(answers[0].split()) for question, answers in pairs}
    drawn = [length_by_last_word[q.split()[-1]] for q in questions["question"]]
    words = [len(text.split()) for text in texts]
    ended = [w == d for w, d in zip(words, drawn)]
    assert 0.9 < np.mean(ended) < 1.0  # NEVER_ENDS (2%) run on
    assert all(w == bench.MAX_NEW_TOKENS for w, e in zip(words, ended) if not e)
