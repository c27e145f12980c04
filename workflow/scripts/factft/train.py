"""QA finetuning (LoRA, QLoRA, full) in a plain, seeded, resumable torch loop.

The loop is small on purpose: every piece of state that decides the result (trainable
weights, optimizer moments, step, RNG) is in a checkpoint, and the data order is a pure
function of (seed, epoch), so a killed or requeued job resumes to the same weights as an
uninterrupted run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from factft.errors import FactftError
from factft.generate import accepts_logits_to_keep
from factft.logging import PROGRESS_EVERY_S
from factft.models import (
    BF16_GPU,
    compute_dtype,
    default_device,
    load_model,
    peak_memory,
    probing,
    require_bitsandbytes,
    weight_files,
)
from factft.prompts import IGNORE, chat_prompt, encode_example, fact_prompt, gold_answer, in_turn, reply_end_id
from factft.tables import atomic_dir, check_new_dir, make_parent, remove_stale_temps, write_tsv

log = logging.getLogger(__name__)

METHODS = ("lora", "qlora", "full")
# How a run goes, not what it learns: left out of its checkpoints' fingerprint. The same keys as
# factft.config.RUNNING_SETTINGS (a test holds them equal), not imported from there: this module
# runs where only torch's libraries are installed (envs/torch.yaml, the GPU benchmark's image).
RUNNING_SETTINGS = ("checkpoint_every", "gradient_checkpointing")
LOG_COLUMNS = ["step", "epoch", "loss", "lr", "tokens", "tokens_per_s"]
# finetune.group_by_length sorts within windows of this many batches: batches of similar
# length (little padding) while the data order stays random at the scale of an epoch.
MEGA_BATCHES = 50
CHECKPOINT_PREFIX = "step-"
STATE = "state.json"  # written last inside a checkpoint: its presence marks it complete
# compile: graphs pads each batch's width up to a multiple of this: a CUDA graph is recorded
# for each batch shape, and QA widths (10-60 tokens) then make four or five, not fifty.
GRAPH_WIDTH_MULTIPLE = 16
# optimizer adamw8bit: smaller tensors (norms, small adapters) keep 32-bit moments, as in
# bitsandbytes' default; tests lower it so that the tiny model's weights get 8-bit ones.
MIN_8BIT_SIZE = 4096

# GPT-2's Conv1D layers store their weights transposed; peft sets fan_in_fan_out for them itself
# and warns, in every such job's log, about what no user needs to act on.
warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False but the target module is `Conv1D`")


# ---- data ------------------------------------------------------------------------


def encode_examples(examples: pd.DataFrame, tokenizer, prompt: dict, max_length: int) -> list[dict]:
    """Each fact as token ids with prompt-masked labels (see factft.prompts.encode_example)."""
    has_choices = {"choices", "answer_index"} <= set(examples.columns)
    if "question" not in examples.columns or not (has_choices or "answers" in examples.columns):
        raise FactftError(
            "finetune examples need a question column and answers (or choices + answer_index); "
            f"columns are: {list(examples.columns)}"
        )
    if examples.empty:
        raise FactftError("finetune examples: the split is empty; check split.fraction and pool_size")
    end_id = reply_end_id(tokenizer, prompt)
    return [
        encode_example(
            tokenizer,
            in_turn(prompt, fact_prompt(fact, prompt["template"])),
            gold_answer(fact, prompt["answer"]),
            max_length,
            end_id=end_id,
        )
        for fact in examples.to_dict("records")
    ]


# Above this share of unknown tokens, a tokenizer cannot read the examples: warned about.
UNKNOWN_SHARE = 0.05


def log_examples(encoded: list[dict], tokenizer, max_length: int) -> None:
    """The first example as the model reads it (prompt -> target), and how many max_length
    cut: a prompt template's effect, seen. Cut ones are warned about: their prompts lost their
    start (a chat model's system turn first), which evaluation keeps. So are examples that the
    tokenizer reads as unknown tokens."""
    first = encoded[0]
    prompt_length = sum(1 for label in first["labels"] if label == IGNORE)
    cut = sum(1 for example in encoded if example["cut"])
    log.info(
        "%d examples, the first: %r -> %r; %d of them cut to max_length %d",
        len(encoded),
        tokenizer.decode(first["input_ids"][:prompt_length]),
        tokenizer.decode(first["input_ids"][prompt_length:]),
        cut,
        max_length,
    )
    if cut:
        log.warning(
            "%d of %d finetuning examples are longer than finetune.max_length %d: their prompts are cut at "
            "the start, so the model trains on other prompts than it is asked; raise finetune.max_length",
            cut,
            len(encoded),
            max_length,
        )
    # GPT-2's family uses its end-of-text token as unk too: that one is no unknown word.
    special = {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id}
    unk = tokenizer.unk_token_id
    unknown = sum(sum(1 for token in example["input_ids"] if token == unk) for example in encoded)
    tokens = sum(len(example["input_ids"]) for example in encoded)
    if unk is not None and unk not in special and unknown > UNKNOWN_SHARE * tokens:
        log.warning(
            "%d of the finetuning examples' %d tokens are unknown to the tokenizer (%s): this model cannot "
            "read these questions (a model pretrained on another world's words?)",
            unknown,
            tokens,
            tokenizer.unk_token,
        )


def epoch_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = False
) -> list[list[int]]:
    """One epoch's batches (lists of example indices), a pure function of (seed, epoch):
    a seeded permutation cut into batches.

    `group_by_length` cuts the permutation into mega-batches, each sorted by length and cut
    into batches, the batch order then shuffled: less padding, but a prompt's length is
    mostly its relation's template, so such batches hold one or two relations (on the demo's
    FT-Bottom 56% of a batch is one relation, 26% at random). That rewards answering from the
    relation alone, the very failure FT-Bottom measures: it widened the demo's FT-Top minus
    FT-Bottom gap from 0.05 to 0.10. Off by default; `finetune.packing` removes the padding
    with the batches left random.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if not group_by_length:
        return [[int(i) for i in order[b : b + batch_size]] for b in range(0, len(order), batch_size)]
    window = batch_size * MEGA_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches += [[int(i) for i in chunk[b : b + batch_size]] for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def batch_width(lengths: list[int], multiple: int = 1) -> int:
    """A padded batch's width: its longest example, rounded up to a multiple of `multiple`."""
    return -(-max(lengths) // multiple) * multiple


def cuda_graphs(settings: dict) -> bool:
    """Whether `compile: graphs` replays the compiled blocks as CUDA graphs (compile_blocks)."""
    return settings.get("compile") == "graphs"


def width_multiple(settings: dict) -> int:
    """What padded widths are rounded up to: GRAPH_WIDTH_MULTIPLE with `compile: graphs`, else 1."""
    return GRAPH_WIDTH_MULTIPLE if cuda_graphs(settings) else 1


def collate(encoded: list[dict], indices: list[int], pad_id: int, device, multiple: int = 1) -> dict:
    """Right-padded tensors, padded only to this batch's longest example (batch_width).

    No attention mask: the padding comes after every real token, so under causal attention
    no real token sees it, and no padding position has a label; the loss and gradients are
    those of the masked batch. Without a mask, SDPA takes its fused causal kernel and compiled
    blocks meet one kind of input, not two.
    """
    width = batch_width([len(encoded[i]["input_ids"]) for i in indices], multiple)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    labels = torch.full((len(indices), width), IGNORE, dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(encoded[i]["input_ids"])
        ids[row, :n] = torch.tensor(encoded[i]["input_ids"])
        labels[row, :n] = torch.tensor(encoded[i]["labels"])
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def collate_packed(encoded: list[dict], indices: list[int], device) -> dict:
    """The examples concatenated into one row without padding (`settings['packing']`).

    Positions restart at 0 for every example: from position_ids alone (and no attention
    mask) transformers builds a block-diagonal causal mask, so no token attends across
    examples. `keep` lists the positions whose next token is a label: only there are
    logits computed (the prompt tokens' vocabulary projection is wasted work), and
    `targets` are those labels. An example's first token never gets a label, as in a
    padded row, so the last token of one example never learns to predict the next one.
    """
    ids, positions, labels = [], [], []
    for i in indices:
        example = encoded[i]
        ids += example["input_ids"]
        positions += range(len(example["input_ids"]))
        labels += [IGNORE] + example["labels"][1:]
    labels = torch.tensor(labels[1:] + [IGNORE])  # the label each position predicts
    keep = torch.nonzero(labels != IGNORE).squeeze(-1)
    return {
        "input_ids": torch.tensor([ids]).to(device),
        "position_ids": torch.tensor([positions]).to(device),
        "keep": keep.to(device),
        "targets": labels[keep].to(device),
    }


def check_packing(model, encoded: list[dict], name: str) -> None:
    """Fail before training where `finetune.packing` would let examples see each other.

    Packing needs a model that builds its attention mask from position_ids (Llama, Mistral,
    Qwen, Gemma, GPT-2, GPT-NeoX, ...); OPT, Falcon, Bloom and MPT build it from the row alone
    and Mamba carries a state along it, so each packed example would read the ones before it.
    The probe: one example after two different heads of the same length. Kept apart, its
    logits are the same both times (same shapes, so to the last bit but for kernel noise).
    """
    embeddings = model.get_input_embeddings()
    first, second = encoded[0], encoded[min(1, len(encoded) - 1)]
    other = dict(first, input_ids=[(token + 1) % embeddings.num_embeddings for token in first["input_ids"]])
    device, logits = embeddings.weight.device, []
    with probing(model):
        for head in (first, other):
            torch.manual_seed(0)  # the same dropout in both passes
            row = collate_packed([head, second], [0, 1], device)
            output = model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False)
            logits.append(output.logits[0, len(head["input_ids"]) :])
    tolerance = (1e-4 if logits[0].dtype == torch.float32 else 1e-2) * max(1.0, logits[0].abs().max().item())
    if (logits[0] - logits[1]).abs().max().item() > tolerance:
        raise FactftError(
            f"model '{name}': {type(model).__name__} lets packed examples see each other (position_ids do "
            "not separate them), so finetune.packing would train each example on the ones before it; set "
            f"packing: false for this model (models.{name}.finetune: {{packing: false}})"
        )


def batch_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of a batch from `collate` or `collate_packed`.

    Without a KV cache: training never reads one, yet a model in train mode builds it (with
    transformers 5.17, a copy of each layer's keys and values), and transformers reads packing
    from position_ids only where there is none."""
    if "keep" not in batch:
        return model(**batch, use_cache=False).loss
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if accepts_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=batch["keep"]).logits[0]
    else:
        logits = model(**inputs).logits[0, batch["keep"]]
    return torch.nn.functional.cross_entropy(logits.float(), batch["targets"])


def micro_batch_weights(encoded: list[dict], micro_batches: list[list[int]]) -> list[float]:
    """Each micro-batch's share of a step's answer tokens: its mean loss times its share sums
    to the mean over every answer token of the step, as one batch of them all would give
    (a plain 1/accum would weigh a token of a batch of short answers more). 1.0 alone."""
    counts = [sum(_answer_tokens(encoded[i]) for i in indices) for indices in micro_batches]
    total = sum(counts) or 1
    return [count / total for count in counts]


def _answer_tokens(example: dict) -> int:
    """The tokens an example's loss is over: those with a label after the first position."""
    return sum(label != IGNORE for label in example["labels"][1:])


# ---- model -----------------------------------------------------------------------


def lora_config(lora: dict, model):
    """peft's LoraConfig from the config's finetune.lora block, over the model's text decoder:
    a multimodal model's vision tower (Gemma 3's) has q_proj, v_proj, ... too, whose adapters
    text QA never trains but which would be saved, counted as trained and merged."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        exclude_modules=[name for name, in_text in linear_layers(model).items() if not in_text] or None,
        task_type="CAUSAL_LM",
    )


def prepare_model(model, settings: dict):
    """Make the weights `settings['method']` trains trainable (LoRA adapters or all)."""
    method = settings["method"]
    checkpointing = settings.get("gradient_checkpointing", False)
    model.config.use_cache = False  # a KV cache is useless in teacher-forced training
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        # Checkpointing is switched on below: peft's own call uses a name transformers 6 drops.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if checkpointing:
        enable_checkpointing(model)
    if method == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    from peft import get_peft_model

    config = lora_config(settings["lora"], model)
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as USUAL

        family, reason = model.config.model_type, str(error).rstrip(".")
        if config.exclude_modules:  # peft's reason would name its exclude_modules, not a factft key
            reason = "no layer of the model's text decoder has these names"
        usual = f"peft's usual ones for {family}: {USUAL[family]}, " if family in USUAL else ""
        raise FactftError(
            f"finetune.lora.target_modules {settings['lora']['target_modules']}: {reason}; this model's linear "
            f"layers are {linear_layer_names(model)} ({usual}or all-linear); set them for this model alone "
            "under models.<name>.finetune.lora"
        ) from None


def linear_layer_names(model) -> list[str]:
    """What LoRA can target, by the last part of the text decoder's layers' names: q_proj,
    v_proj, ... in Llama; query_key_value in Falcon and GPT-NeoX; c_attn in GPT-2."""
    return sorted({name.rsplit(".", 1)[-1] for name, in_text in linear_layers(model).items() if in_text})


def linear_layers(model) -> dict[str, bool]:
    """The model's linear layers (the output layer aside) by full name, each with whether it is
    in the text decoder: all of a text-only model's are; of a model with a vision or audio
    tower (a vision_config or audio_config), those inside its get_decoder()."""
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings()
    linear = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not output
    }
    if not {"vision_config", "audio_config"} & set(getattr(model.config, "sub_configs", {})):
        return dict.fromkeys(linear, True)
    text = {id(module) for module in model.get_decoder().modules()}
    return {name: id(module) in text for name, module in linear.items()}


def weights_dtype(method: str, device) -> torch.dtype:
    """The trained weights' dtype: fp32 master weights for a full finetune (autocast does the
    arithmetic in the compute dtype on a GPU), since a bf16 weight (8 significant bits) drops
    any update below 1/256 of its size, which is most AdamW steps at finetuning learning rates.
    LoRA and QLoRA keep the frozen base in the compute dtype; peft creates its adapters in fp32."""
    return torch.float32 if method == "full" else compute_dtype(device)


def enable_checkpointing(model) -> None:
    """Recompute activations in the backward pass (non-reentrant, so frozen inputs work)."""
    # transformers 5.23 renamed gradient_checkpointing_enable; GPU images may carry an older 5.x.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def check_compile(device, graphs: bool = False) -> None:
    """torch.compile's backend needs triton on a GPU and a C++ compiler on a CPU, CUDA graphs
    a GPU: say so before a 7B is loaded, not at the first step."""
    if graphs and not str(device).startswith("cuda"):
        raise FactftError(
            f"finetune.compile: graphs replays CUDA graphs and this job runs on {device}; use compile: true"
        )
    if str(device).startswith("cuda"):
        if importlib.util.find_spec("triton") is None:
            raise FactftError("finetune.compile: torch.compile needs triton on a GPU (pip install triton)")
    elif shutil.which(os.environ.get("CXX") or "g++") is None:
        raise FactftError(
            "finetune.compile: torch.compile needs a C++ compiler on a CPU and "
            f"{os.environ.get('CXX') or 'g++'} is not on PATH (set CXX, or finetune.compile: false)"
        )


def compile_blocks(model, graphs: bool = False) -> int:
    """torch.compile each transformer block (the model's `_no_split_modules`), in place so
    weight names and checkpoints stay as they are. The blocks share their compiled code, so
    the cost is one block's compilation, not the model's: once for each kind of input (with
    LoRA, the first block's input needs no gradient and the others' do). Shapes are dynamic
    from the start: no batch width recompiles it. A packed batch's attention mask, built from
    the data outside the blocks, stays eager.

    `graphs` (`compile: graphs`) adds CUDA graphs (mode reduce-overhead): each block's kernels
    are replayed with one launch, recorded once for each batch shape. On a GPU a 7B's step at
    batch 16 is mostly launch overhead (docs/benchmarks.md). A CPU compiles without graphs."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [module for module in base.modules() if type(module).__name__ in names]
    if not blocks:
        raise FactftError(
            f"finetune.compile: {type(base).__name__} names no transformer block (_no_split_modules) to "
            "compile; set finetune.compile: false"
        )
    for block in blocks:
        block.compile(dynamic=True, mode="reduce-overhead" if graphs else None)
    log.info("%d %s blocks compile in the first steps (torch.compile)", len(blocks), type(blocks[0]).__name__)
    return len(blocks)


def make_optimizer(model, settings: dict, device) -> torch.optim.Optimizer:
    """AdamW over the trainable weights: torch's, fused (one kernel for all tensors) on CUDA,
    or with `optimizer: adamw8bit` bitsandbytes' AdamW8bit, whose moments are block-wise 8-bit
    (2 bytes a weight instead of 8; tensors under MIN_8BIT_SIZE weights keep 32-bit moments)."""
    parameters = trainable_parameters(model).values()
    options = {"lr": settings["learning_rate"], "weight_decay": settings.get("weight_decay", 0.0)}
    if settings.get("optimizer") == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(parameters, **options, min_8bit_size=MIN_8BIT_SIZE)
    return torch.optim.AdamW(parameters, **options, fused=str(device).startswith("cuda"))


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def learning_rate(step: int, total: int, settings: dict) -> float:
    """Linear warmup over warmup_ratio of the steps, then linear decay to zero."""
    peak = settings["learning_rate"]
    warmup = math.ceil(settings.get("warmup_ratio", 0.0) * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def total_micro_batches(n_examples: int, settings: dict) -> int:
    """Micro-batches of a run: max_steps x grad_accum, else epochs over the examples."""
    accum = settings.get("grad_accum", 1)
    if settings.get("max_steps"):
        return settings["max_steps"] * accum
    return math.ceil(settings["epochs"] * math.ceil(n_examples / settings["batch_size"]))


def total_steps(n_examples: int, settings: dict) -> int:
    """Optimizer steps of a run; where grad_accum does not divide its micro-batches, the last
    step takes those left (a full step would train past the epochs asked for)."""
    return math.ceil(total_micro_batches(n_examples, settings) / settings.get("grad_accum", 1))


def train_steps(
    model,
    optimizer,
    encoded: list[dict],
    settings: dict,
    *,
    device,
    pad_id: int,
    step: int = 0,
    rows: list[dict] | None = None,
    after_step: Callable[[int, list[dict]], None] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> list[dict]:
    """Train from `step` to total_steps(); returns the train log rows (one per step).

    The data order is a pure function of (seed, epoch, step), so starting at a checkpoint's
    step continues the uninterrupted run. `after_step(step, rows)` runs after each step.
    `settings['packing']` concatenates each micro-batch into one unpadded row
    (collate_packed): the same examples and loss, no padding tokens computed. `scaler` is
    loss_scaler(device), passed in to be checkpointed. `settings['max_grad_norm']` clips each
    step's gradients to that total norm (a row's grad_norm: theirs before). A loss of nan or
    inf stops it (FloatingPointError): the weights it updated are lost. With
    `settings['compile'] == 'graphs'` (blocks compiled with compile_blocks(graphs=True)) widths
    are rounded up to GRAPH_WIDTH_MULTIPLE and the gradients live in buffers of their own.
    """
    seed, batch_size, accum = int(settings["seed"]), settings["batch_size"], settings.get("grad_accum", 1)
    packing, grouped = settings.get("packing", False), settings.get("group_by_length", False)
    graphs = cuda_graphs(settings)
    if graphs and (packing or settings.get("gradient_checkpointing")):
        raise FactftError(
            "finetune.compile: graphs needs padded batches (a packed row's width changes every step) and no "
            "gradient_checkpointing (untried: it would replay graphs inside the backward); set them false"
        )
    multiple = width_multiple(settings)
    lengths = [len(e["input_ids"]) for e in encoded]
    per_epoch = math.ceil(len(encoded) / batch_size)
    total, n_micro = total_steps(len(encoded), settings), total_micro_batches(len(encoded), settings)
    rows = list(rows or [])
    epochs_cache: dict[int, list[list[int]]] = {}

    def micro_batch(index: int) -> list[int]:
        epoch = index // per_epoch
        if epoch not in epochs_cache:
            epochs_cache.clear()
            epochs_cache[epoch] = epoch_batches(lengths, batch_size, seed, epoch, grouped)
        return epochs_cache[epoch][index % per_epoch]

    # On a GPU the arithmetic runs in the compute dtype, over a base kept in it or over a full
    # finetune's fp32 master weights; a CPU computes in fp32 and has nothing to cast.
    precision = compute_dtype(device)
    autocast = torch.autocast(torch.device(device).type, dtype=precision, enabled=precision != torch.float32)
    scaler = loss_scaler(device) if scaler is None else scaler
    clip = settings.get("max_grad_norm")
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    if graphs:
        # A gradient first set inside a CUDA graph's backward would live in its memory pool and be
        # overwritten by the next replay; zeroed buffers of their own are added to in place instead.
        for parameter in trainable:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
    model.train()
    reported: tuple[float, int] | None = None  # (time, step) of the last progress line
    while step < total:
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total, settings)
        loss_sum, tokens = 0.0, 0
        micro_batches = [micro_batch(i) for i in range(step * accum, min((step + 1) * accum, n_micro))]
        for indices, weight in zip(micro_batches, micro_batch_weights(encoded, micro_batches)):
            if packing:
                batch = collate_packed(encoded, indices, device)
            else:
                batch = collate(encoded, indices, pad_id, device, multiple)
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with autocast:
                loss = batch_loss(model, batch)
            scaler.scale(loss * weight).backward()
            # Summed on the device: one host sync per step, not per micro-batch.
            loss_sum = loss_sum + loss.detach() * weight
            tokens += sum(lengths[i] for i in indices)
        if clip:
            scaler.unscale_(optimizer)  # fp16's scaled gradients back to their size, to be clipped
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=not graphs)
        step += 1
        step_loss = float(loss_sum)  # the step's host sync: on a GPU, elapsed then holds its queued work
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"the loss is {step_loss} at step {step} of {total}")
        elapsed = time.perf_counter() - started
        rows.append(
            {
                "step": step,
                "epoch": min(step * accum, n_micro) / per_epoch,
                "loss": step_loss,
                "lr": optimizer.param_groups[0]["lr"],
                "tokens": tokens,
                "tokens_per_s": tokens / elapsed if elapsed > 0 else float("nan"),
                **({"grad_norm": float(grad_norm)} if clip else {}),
            }
        )
        if reported is None or step == total or time.perf_counter() - reported[0] >= PROGRESS_EVERY_S:
            _log_progress(rows, total, since_step=reported[1] if reported else step - 1)
            reported = (time.perf_counter(), step)
        if after_step is not None:
            after_step(step, rows)
    return rows


def loss_scaler(device) -> torch.amp.GradScaler:
    """fp16's loss scaling (GPUs without bf16: compute_dtype): the loss is multiplied before
    the backward pass, so that small gradients do not round to zero in fp16, and divided out
    of them before the optimizer step, which is skipped, the scale halved, where one
    overflowed. bf16 and fp32 have fp32's range: for them it is disabled and passes through."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=compute_dtype(device) == torch.float16)


def diverged(name: str, error: FloatingPointError, settings: dict, device) -> str:
    """Why a finetune stopped at a loss of nan or inf, and what to change."""
    rate = f"finetune.learning_rate ({settings['learning_rate']:g})"
    if compute_dtype(device) == torch.float16:
        fix = (
            "this GPU has no bf16 and computes in fp16, whose range (to 65504) a model's activations can "
            f"overflow: run it on {BF16_GPU}, or, if training diverged, lower {rate}"
        )
    else:
        fix = f"training diverged: lower {rate}"
    return f"finetune of model '{name}': {error}, and nothing is saved; {fix}"


def out_of_memory(name: str, settings: dict, device) -> str:
    """What to change when a finetune runs out of GPU memory: the same step fails again on
    every retry, whatever host memory SLURM gives it."""
    remedies = []
    if settings["batch_size"] > 1:
        remedies.append("lower batch_size and raise grad_accum as much (the same batch_size x grad_accum per step)")
    if not settings.get("gradient_checkpointing"):
        remedies.append("set gradient_checkpointing: true")
    if settings["method"] != "qlora":
        remedies.append("use method qlora")
    return (
        f"model '{name}': out of GPU memory while finetuning{peak_memory(device)}, in micro-batches of "
        f"finetune.batch_size {settings['batch_size']} examples of up to finetune.max_length "
        f"{settings['max_length']} tokens; under finetune (models.{name}.finetune for this model "
        f"alone): {', or '.join(remedies + ['lower max_length'])}"
    )


def steps_seconds(rows: list[dict]) -> float:
    """The time the train log's steps took (their own clock: no loading or saving)."""
    return sum(r["tokens"] / r["tokens_per_s"] for r in rows if r["tokens_per_s"] > 0)


def _log_progress(rows: list[dict], total: int, since_step: int) -> None:
    """One progress line: the last step's loss, and tokens/s over the steps since `since_step`."""
    recent = [r for r in rows if r["step"] > since_step]
    seconds = steps_seconds(recent)
    tokens_per_s = sum(r["tokens"] for r in recent) / seconds if seconds > 0 else float("nan")
    step = rows[-1]["step"]
    log.info(
        "step %d/%d loss %.4f lr %.2e %.0f tokens/s, %.0f s left",
        step, total, rows[-1]["loss"], rows[-1]["lr"], tokens_per_s, seconds / len(recent) * (total - step),
    )  # fmt: skip


# ---- checkpoints -----------------------------------------------------------------


def weights_identity(model_spec: dict) -> list:
    """Name, size and the first and last MiB of each weight file: enough to tell a re-made
    base model (same shapes, new values) from the one a checkpoint was trained on, without
    reading gigabytes."""
    identity = []
    for file in weight_files(model_spec):
        size = file.stat().st_size
        with open(file, "rb") as stream:
            head = stream.read(2**20)
            stream.seek(max(0, size - 2**20))
            tail = stream.read()
        identity.append([file.name, size, hashlib.sha256(head + tail).hexdigest()])
    return identity


def fingerprint(settings: dict, model_spec: dict, encoded: list[dict]) -> str:
    """What decides the result: settings (but RUNNING_SETTINGS), base weights and token ids."""
    digest = hashlib.sha256()
    relevant = {k: v for k, v in settings.items() if k not in RUNNING_SETTINGS}
    digest.update(json.dumps([weights_identity(model_spec), relevant], sort_keys=True, default=str).encode())
    for example in encoded:
        digest.update(json.dumps([example["input_ids"], example["labels"]]).encode())
    return digest.hexdigest()


def save_checkpoint(directory: Path, step: int, model, optimizer, state: dict) -> None:
    """Write step-<step> atomically (temp dir + rename), then drop older checkpoints."""
    from safetensors.torch import save_file

    target = directory / f"{CHECKPOINT_PREFIX}{step:08d}"
    # Only a checkpoint of other settings or data can be here (latest_checkpoint skipped it).
    shutil.rmtree(target, ignore_errors=True)
    with atomic_dir(target) as tmp:
        weights = {name: p.detach().contiguous().cpu() for name, p in trainable_parameters(model).items()}
        save_file(weights, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, tmp / "rng.safetensors")
        (tmp / STATE).write_text(json.dumps(dict(state, step=step)))
    log.info("checkpoint %s", target)
    for old in directory.glob(f"{CHECKPOINT_PREFIX}*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(directory: Path, print_: str) -> tuple[Path, dict] | None:
    """The newest complete checkpoint whose fingerprint is `print_`, with its state."""
    if not directory.is_dir():
        return None
    for candidate in sorted(directory.glob(f"{CHECKPOINT_PREFIX}*"), reverse=True):
        files = [candidate / f for f in (STATE, "trainable.safetensors", "optimizer.pt", "rng.safetensors")]
        if not all(f.is_file() for f in files):
            log.info("skipping incomplete checkpoint %s", candidate)
            continue
        with unreadable_checkpoint(candidate):
            state = json.loads((candidate / STATE).read_text())
        if state.get("fingerprint") != print_:
            log.info("skipping checkpoint %s: trained with other settings or data", candidate)
            continue
        return candidate, state
    return None


@contextlib.contextmanager
def one_writer(checkpoint_dir: Path):
    """Hold `<checkpoint_dir>.lock` while a finetune runs: a second copy of the same run (one
    resubmitted while the first still runs, e.g. after the Snakemake that submitted it died)
    stops at once, instead of sharing and then deleting the first one's checkpoints.

    flock: released by the kernel when its holder dies, however it dies, and seen across
    nodes on NFS and on Lustre mounted with `flock`; where the file system has no locks,
    the run goes on unguarded, with a warning.
    """
    lock = checkpoint_dir.with_name(checkpoint_dir.name + ".lock")
    make_parent(lock)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise FactftError(
            f"another finetune of this run is running ({holder}; it holds {lock}): cancel it "
            "(scancel, kill) or let it finish; this copy stops before touching its checkpoints"
        ) from None
    except OSError as error:
        log.warning("cannot lock %s (%s): a second copy of this finetune would go unnoticed", lock, error)
    else:
        job = os.environ.get("SLURM_JOB_ID", "-")
        holder = f"host {socket.gethostname()}, pid {os.getpid()}, SLURM job {job}, since {time.strftime('%F %T')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder}\n".encode(), 0)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still held: a copy that opens it later locks a new file
        os.close(fd)


@contextlib.contextmanager
def unreadable_checkpoint(path: Path):
    """A checkpoint that cannot be read (its storage failed) is a clear error, not a
    traceback each retry repeats; it is not deleted here, in case the failure passes."""
    try:
        yield
    except Exception as error:  # only reads in the block: json, safetensors, torch.load errors
        raise FactftError(
            f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); delete that folder "
            "to start this finetune over"
        ) from None


def load_checkpoint(path: Path, model, optimizer) -> None:
    from safetensors.torch import load_file

    parameters = trainable_parameters(model)
    with unreadable_checkpoint(path):
        weights = load_file(path / "trainable.safetensors")
        # weights_only: a checkpoint folder must not be able to run code when loaded.
        # On the CPU first: a checkpoint written on a GPU still reads on a node without one
        # (load_state_dict moves the state to the weights' device).
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        rng = load_file(path / "rng.safetensors")
    if set(weights) != set(parameters):
        raise FactftError(f"checkpoint {path} does not match the model's trainable weights; delete it")
    with torch.no_grad():
        for name, tensor in weights.items():
            parameters[name].copy_(tensor)
    optimizer.load_state_dict(optimizer_state)
    torch.set_rng_state(rng["cpu"])
    # The GPUs' generators where the checkpoint has them: one written on the CPU has none.
    cuda_states = [rng.get(f"cuda{i}") for i in range(torch.cuda.device_count())]
    if cuda_states and all(state is not None for state in cuda_states):
        torch.cuda.set_rng_state_all(cuda_states)


# ---- outputs ---------------------------------------------------------------------


def library_versions(settings: dict) -> dict:
    import peft
    import transformers

    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    if settings["method"] == "qlora" or settings.get("optimizer") == "adamw8bit":
        import bitsandbytes

        versions["bitsandbytes"] = bitsandbytes.__version__
    return versions


def save_output(out_dir: Path, model, tokenizer, summary: dict, method: str) -> None:
    """The adapter (or full model + tokenizer) and trained.json, renamed into place at once."""
    with atomic_dir(out_dir) as tmp:
        if method == "full":
            # Saved in the compute dtype, as evaluation loads it: half the disk of fp32 on a GPU.
            model.to(compute_dtype(next(model.parameters()).device))
            tokenizer.save_pretrained(tmp)
        else:
            # peft keeps module names as sets, written in an order that follows the hash seed.
            for config in model.peft_config.values():
                for key in ("target_modules", "exclude_modules"):
                    if isinstance(getattr(config, key), (set, frozenset)):
                        setattr(config, key, sorted(getattr(config, key)))
        # factft adds no tokens, so no embedding layer to save: peft's check for added ones
        # looks for a config.json a GGUF model folder lacks, and warns in every such log.
        model.save_pretrained(tmp, **({} if method == "full" else {"save_embedding_layers": False}))
        (tmp / "trained.json").write_text(json.dumps(summary, indent=2) + "\n")


# ---- the loop --------------------------------------------------------------------


def finetune(
    model_spec: dict,
    examples: pd.DataFrame,
    out_dir: str | Path,
    settings: dict,
    prompt: dict,
    checkpoint_dir: str | Path,
    *,
    train_log: str | Path | None = None,
    meta: dict | None = None,
    device: str | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Finetune `model_spec` on `examples` and write the result to `out_dir`.

    `settings` is the merged finetune config plus `seed`; `prompt` is the dataset's prompt
    block (`prompt_params` in rules/common.smk: the top-level one with the dataset's over it).
    Resumes from the newest matching checkpoint in `checkpoint_dir` and deletes the
    checkpoints once `out_dir` is written; a second copy of the same run, started while this
    one runs, stops at once (one_writer). `train_log` receives one row per step; `meta`
    (dataset, subset, ...) is recorded in trained.json; `on_step(step, loss)` runs after
    each step and its checkpoint. Returns the summary written as trained.json.
    """
    out_dir, checkpoint_dir = Path(out_dir), Path(checkpoint_dir)
    with one_writer(checkpoint_dir):
        method, seed = settings["method"], int(settings["seed"])
        if method not in METHODS:
            raise FactftError(f"finetune.method '{method}' is unknown; use one of {METHODS}")
        device = device or default_device(model_spec)
        check_new_dir(out_dir)
        if settings.get("compile"):
            check_compile(device, graphs=cuda_graphs(settings))
        if settings.get("optimizer") == "adamw8bit":
            require_bitsandbytes("finetune.optimizer adamw8bit needs bitsandbytes (8-bit moments)", "use adamw")
        # A checkpoint a killed attempt was writing when it died; its last complete one stays.
        remove_stale_temps(checkpoint_dir)
        precision = str(compute_dtype(device)).removeprefix("torch.")  # bfloat16, float16, float32
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        log.info("device %s, computing in %s (CUDA_VISIBLE_DEVICES=%s)", device, precision, visible)
        seed_everything(seed)
        model, tokenizer = load_model(
            model_spec,
            quantize="nf4" if method == "qlora" else None,
            device=device,
            for_training=True,
            dtype=weights_dtype(method, device),
        )
        prompt = chat_prompt(model_spec, tokenizer, prompt)
        encoded = encode_examples(examples, tokenizer, prompt, settings["max_length"])
        log_examples(encoded, tokenizer, settings["max_length"])
        if settings.get("packing"):
            check_packing(model, encoded, model_spec["name"])
        print_ = fingerprint(settings, model_spec, encoded)
        model = prepare_model(model, settings)
        if settings.get("compile"):
            compile_blocks(model, graphs=cuda_graphs(settings))
        parameters = trainable_parameters(model)
        n_trainable = sum(p.numel() for p in parameters.values())
        log.info("%s: %d trainable of %d weights", method, n_trainable, sum(p.numel() for p in model.parameters()))

        optimizer, scaler = make_optimizer(model, settings, device), loss_scaler(device)
        total = total_steps(len(encoded), settings)
        step, rows = 0, []
        found = latest_checkpoint(checkpoint_dir, print_)
        if found:
            path, state = found
            load_checkpoint(path, model, optimizer)
            step, rows = state["step"], state["rows"]
            log.info("resuming from %s (step %d of %d)", path, step, total)
            if state.get("precision", precision) != precision:
                # A requeued job can land on another kind of GPU: it goes on, in the other precision.
                log.warning("this run computed in %s to step %d; it goes on in %s", state["precision"], step, precision)
            if scaler.is_enabled() and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])

        def after_step(step: int, rows: list[dict]) -> None:
            if step % settings["checkpoint_every"] == 0 and step < total:
                state = {"fingerprint": print_, "rows": rows, "precision": precision, "scaler": scaler.state_dict()}
                save_checkpoint(checkpoint_dir, step, model, optimizer, state)
            if on_step is not None:
                on_step(step, rows[-1]["loss"])

        try:
            rows = train_steps(
                model,
                optimizer,
                encoded,
                settings,
                device=device,
                pad_id=tokenizer.pad_token_id,
                step=step,
                rows=rows,
                after_step=after_step,
                scaler=scaler,
            )
        except torch.OutOfMemoryError as error:
            raise FactftError(out_of_memory(model_spec["name"], settings, device)) from error
        except FloatingPointError as error:
            raise FactftError(diverged(model_spec["name"], error, settings, device)) from None
        step = rows[-1]["step"] if rows else 0

        model.eval()
        summary = {
            "model": model_spec["name"],
            **(meta or {}),
            "seed": seed,
            "method": method,
            "precision": precision,
            "settings": settings,
            "prompt": prompt,
            "examples": len(encoded),
            "steps": step,
            "epochs": rows[-1]["epoch"] if rows else 0.0,
            "tokens": int(sum(r["tokens"] for r in rows)),
            "trainable_params": n_trainable,
            "final_loss": rows[-1]["loss"] if rows else None,
            "fingerprint": print_,
            "versions": library_versions(settings),
        }
        if train_log is not None:
            columns = LOG_COLUMNS + (["grad_norm"] if settings.get("max_grad_norm") else [])
            write_tsv(pd.DataFrame(rows, columns=columns), train_log)
        save_output(out_dir, model, tokenizer, summary, method)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        seconds = steps_seconds(rows)
        log.info(
            "finetuned %d steps, final loss %.4f, %.0f real tokens/s over the steps%s -> %s",
            step,
            summary["final_loss"],
            summary["tokens"] / seconds if seconds else float("nan"),
            peak_memory(device),
            out_dir,
        )
        return summary
