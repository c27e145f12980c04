"""Pretrain a tiny Llama on a synthetic world's corpus, saved like a hub model.

The folder loads with AutoModelForCausalLM/AutoTokenizer.from_pretrained, so the
finetune, evaluate and popularity rules treat it exactly like a 7B checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from factft.errors import FactftError
from factft.tables import atomic_dir, check_new_dir

log = logging.getLogger(__name__)

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
WHERE = "source.pretrain"


def tokenizer_texts(corpus: list[str], facts: pd.DataFrame, prompt: dict) -> list[str]:
    """What the vocabulary must cover: the corpus, the questions, the prompt's literal words.

    QA text is never pretrained on, but finetuning and evaluation feed it to this
    tokenizer; without its words here, "Where" or "Q" would become <unk>.
    """
    literal = [re.sub(r"\{\w+\}", " ", template) for template in prompt.values()]
    return [*corpus, *facts["question"], *literal]


def train_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: one id per word or punctuation run, Llama's special tokens.

    Splitting on whitespace makes " Lyon" and "Lyon" the same token (the answer template's
    leading space changes nothing); a bos is prepended as Llama's tokenizer does.
    """
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=[UNK, BOS, EOS, PAD], min_frequency=0)
    tokenizer.train_from_iterator(texts, trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        # Decoding joins words with spaces; this glues punctuation back: "Lyon." not "Lyon .".
        clean_up_tokenization_spaces=True,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int,
    layers: int,
    heads: int,
    intermediate_size: int,
    seq_len: int,
    seed: int,
) -> LlamaForCausalLM:
    """A freshly initialised Llama with the tokenizer's vocabulary and special ids."""
    if hidden_size % heads:
        raise FactftError(f"{WHERE}: hidden_size {hidden_size} must be a multiple of heads {heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=seq_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def encode_corpus(tokenizer: PreTrainedTokenizerFast, corpus: list[str], seq_len: int) -> list[list[int]]:
    """One sequence per statement: bos, words, eos. Refuses lines longer than seq_len."""
    if not corpus:
        raise FactftError("the pretraining corpus is empty")
    ids = [line + [tokenizer.eos_token_id] for line in tokenizer(corpus)["input_ids"]]
    longest = max(map(len, ids))
    if longest > seq_len:
        raise FactftError(
            f"{WHERE}.seq_len: {seq_len} is shorter than the longest corpus statement "
            f"({longest} tokens); raise seq_len"
        )
    return ids


def pack(sequences: list[list[int]], order: list[int], seq_len: int) -> list[list[int]]:
    """Whole statements, taken in `order`, filled greedily into windows of <= seq_len tokens.

    A statement is never cut, so each one still starts at its bos, as the cloze and QA
    prompts the model is later asked do.
    """
    windows, window = [], []
    for k in order:
        if window and len(window) + len(sequences[k]) > seq_len:
            windows.append(window)
            window = []
        window = window + sequences[k]
    return windows + [window] if window else windows


def train_lm(
    model: LlamaForCausalLM,
    sequences: list[list[int]],
    pad_id: int,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seq_len: int,
    seed: int,
) -> tuple[list[float], int]:
    """Next-token training on packed windows of statements: AdamW, linear decay to zero.

    Packing (batch_size windows of seq_len tokens per step, as in LM pretraining) rather
    than one statement per row matters for the science: with 7x more, smaller steps the
    tiny model memorises facts seen once per epoch, and the popularity gradient of stored
    knowledge that the experiment needs fades (demo world, 6 epochs: cloze accuracy 0.76,
    bottom half 0.58, one statement per row; 0.47-0.55, bottom half 0.29-0.35, packed).
    Returns the mean loss per epoch and the number of steps.
    """
    generator = torch.Generator().manual_seed(seed)
    plan = [
        pack(sequences, torch.randperm(len(sequences), generator=generator).tolist(), seq_len)
        for _ in range(epochs)
    ]
    total = sum(math.ceil(len(windows) / batch_size) for windows in plan)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    log.info(
        "pretraining: %d statements in %d windows, %d epochs, %d steps",
        len(sequences),
        len(plan[0]),
        epochs,
        total,
    )
    model.train()
    losses, step, start = [], 0, time.perf_counter()
    for epoch, windows in enumerate(plan, start=1):
        epoch_losses = []
        for first in range(0, len(windows), batch_size):
            input_ids, attention, labels = _batch(windows[first : first + batch_size], pad_id)
            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            epoch_losses.append(loss.item())
            if step % 50 == 0:
                log.info("step %d/%d loss %.4f lr %.2e", step, total, loss.item(), schedule.get_last_lr()[0])
        losses.append(sum(epoch_losses) / len(epoch_losses))
        log.info(
            "epoch %d/%d mean loss %.4f (%.0f s)", epoch, epochs, losses[-1], time.perf_counter() - start
        )
    model.eval()
    return losses, step


def _batch(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
    labels = input_ids.masked_fill(attention == 0, -100)
    return input_ids, attention, labels


def pretrain(
    corpus: list[str],
    facts: pd.DataFrame,
    prompt: dict,
    output: str | Path,
    *,
    hidden_size: int = 128,
    layers: int = 2,
    heads: int = 4,
    intermediate_size: int = 512,
    epochs: int = 6,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    seq_len: int = 64,
    seed: int = 0,
    dataset: str | None = None,
    threads: int | None = None,
) -> dict:
    """Train tokenizer and model on `corpus`, save both to the folder `output` atomically.

    `dataset` only labels the run in the log and in pretrain.json. Returns the summary
    that pretrain.json holds (settings, steps, loss per epoch, seconds).
    """
    check_new_dir(output)  # before minutes of training, not after
    if threads:
        torch.set_num_threads(threads)
    settings = dict(
        dataset=dataset, hidden_size=hidden_size, layers=layers, heads=heads, intermediate_size=intermediate_size,
        epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seq_len=seq_len, seed=seed,
    )  # fmt: skip
    log.info("pretrain settings: %s", settings)
    start = time.perf_counter()
    tokenizer = train_tokenizer(tokenizer_texts(corpus, facts, prompt))
    sequences = encode_corpus(tokenizer, corpus, seq_len)
    model = build_model(tokenizer, hidden_size, layers, heads, intermediate_size, seq_len, seed)
    log.info("vocabulary %d, parameters %d", len(tokenizer), sum(p.numel() for p in model.parameters()))
    losses, steps = train_lm(
        model, sequences, tokenizer.pad_token_id, epochs, batch_size, learning_rate, seq_len, seed
    )
    summary = dict(
        settings,
        vocab_size=len(tokenizer),
        steps=steps,
        loss_per_epoch=losses,
        seconds=round(time.perf_counter() - start, 1),
    )
    save_model(model, tokenizer, output, summary)
    return summary


def save_model(model, tokenizer, output: str | Path, summary: dict | None = None) -> None:
    """Write model, tokenizer (and pretrain.json) into a temp folder beside `output`, then rename."""
    with atomic_dir(output) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if summary is not None:
            (tmp / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
        # transformers writes model.safetensors private (0600); a shared model cache needs
        # it readable like the other files.
        mode = (tmp / "config.json").stat().st_mode & 0o777
        for path in tmp.iterdir():
            path.chmod(mode)
