"""Evaluating a model on test facts: greedy generation and choice likelihoods, into its answers
(factft.metrics scores them, in a job of its own).

Questions are processed in batches of similar token length (left-padded, longest batch
first so an out-of-memory error shows at once), and every result is put back in the
test table's order. After a batch runs out of GPU memory, it and every later batch are
halved until they fit, so a batch size that suits a large GPU is safe on a small one. Generation uses the KV cache
of `model.generate` (optionally a static one, which transformers compiles on CUDA) and
ends a row at eos or at the end of its answer's first line, the only part that is scored;
choice and answer likelihoods come from one forward pass per batch that keeps only the
answer positions' logits (a 7B vocabulary over whole few-shot prompts would not fit otherwise).
Logits of nan or inf, at any prompt or decoding step, stop it with an error naming the prompt.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from factft.errors import FactftError
from factft.logging import PROGRESS_EVERY_S
from factft.metrics import FORMATS, answers_table, first_line
from factft.models import BF16_GPU, load_model, peak_memory
from factft.prompts import (
    IGNORE,
    chat_prompt,
    choice_answers,
    encode_example,
    fact_prompt,
    few_shot_prefixes,
    in_turn,
    reply_end_id,
)

log = logging.getLogger(__name__)

TEST_COLUMNS = ("id", "question", "answers", "subject", "relation", "popularity", "popularity_pct")


# ---- batching -------------------------------------------------------------------


def length_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Row indices grouped into batches of similar length, longest first (ties keep order)."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def in_batches(batches: Sequence[np.ndarray], run: Callable[[np.ndarray], None]) -> None:
    """run(batch) for every batch, in order. When one runs out of GPU memory, every batch
    from then on is cut to half its size (and again, down to single rows). A run that takes
    long logs its progress every PROGRESS_EVERY_S."""
    pending = list(reversed(batches))
    limit = None
    rows, done = sum(len(b) for b in batches), 0
    start = reported = time.perf_counter()
    while pending:
        batch = pending.pop()
        if limit is not None and len(batch) > limit:
            pending += [batch[limit:], batch[:limit]]
            continue
        try:
            run(batch)
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise
            torch.cuda.empty_cache()
            limit = len(batch) // 2
            log.warning("out of GPU memory with a batch of %d; continuing with batches of %d", len(batch), limit)
            pending.append(batch)
            continue
        done += len(batch)
        now = time.perf_counter()
        if pending and now - reported >= PROGRESS_EVERY_S:
            rate = done / max(now - start, 1e-9)
            log.info("%d of %d prompts done, %.1f per s, about %.0f s left", done, rows, rate, (rows - done) / rate)
            reported = now


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, padded on the left so every row ends at the last column."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if token_id is not None:
            return int(token_id)


def _eos_ids(model, tokenizer) -> set[int]:
    """Every token that ends an answer: the generation config may list several (e.g. Llama 3)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, (list, tuple)) else [configured]
    return {int(i) for i in [*ids, tokenizer.eos_token_id] if i is not None}


# ---- generation -----------------------------------------------------------------


@torch.inference_mode()
def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    static_cache: bool = False,
    stop_at_line_end: bool = True,
    rounds: bool | None = None,
    logits_processor: LogitsProcessorList | None = None,
    end_ids: Sequence[int] = (),
    where: str = "the model",
) -> list[str]:
    """Each prompt's greedy continuation (up to eos, one of `end_ids`, or max_new_tokens),
    decoded, in prompt order.

    With `stop_at_line_end`, a row also ends with the token that completes its first line
    (FirstLineEnd): a base model would otherwise invent the next "Q: ... A: ..." up to
    max_new_tokens, which scoring drops. Its first line is the same either way.

    With `rounds`, decoding runs in rounds of 4, 16, 64, ... new tokens in all: `generate` runs
    a batch until its slowest row ends, so one answer that never ends would keep all 512
    rows decoding to max_new_tokens. After each round the unfinished rows of every batch are
    pooled and continue together (prompt and answer so far as their new prompt). Where most
    answers run past the first round, the remaining batches decode in one round instead.
    By default (None) rounds run everywhere but on CUDA (rounds_by_default).

    `static_cache` preallocates the KV cache, which transformers then compiles the decoding
    step for on CUDA (CUDA graphs: no per-kernel launch cost). Longest batch first, the
    first batch's cache fits every later one, so the compiled step is reused; so it decodes
    in one round, whose shapes do not change, and a short last batch is filled up to the
    batch size with copies of its last row (a new batch size would compile the step again).
    `logits_processor` goes to `generate` (the benchmark shapes a random model's answers
    with it). Logits of nan or inf at any step stop it (check_finite_rows); `where` names the model.
    """
    encoded = tokenizer(list(prompts))["input_ids"]
    longest = max((len(e) for e in encoded), default=0)
    what = f"a prompt of {longest} tokens plus {max_new_tokens} new tokens"
    check_context(model, longest + max_new_tokens, what, "evaluate.fewshot or evaluate.max_new_tokens")
    pad = pad_id(tokenizer)
    eos = _eos_ids(model, tokenizer) | {int(i) for i in end_ids if i is not None}
    cache = {"cache_implementation": "static"} if static_cache else {}
    vocabulary = max(len(tokenizer), model.get_input_embeddings().num_embeddings)
    flags = line_end_flags(tokenizer, vocabulary, model.device) if stop_at_line_end else None
    answers: list[list[int]] = [[] for _ in encoded]
    finished = np.zeros(len(encoded), dtype=bool)
    cut_off = np.zeros(len(encoded), dtype=bool)  # stopped by max_new_tokens, not by their own end

    def run(batch: np.ndarray, budget: int) -> None:
        if finished[batch].all():
            return  # the copies that filled up a last batch, cut off from it after running out of memory
        steps = budget - len(answers[batch[0]])  # the rows of a batch have decoded as many tokens
        ids, mask = left_pad([encoded[i] + answers[i] for i in batch], pad, model.device)
        starts = torch.tensor([ids.shape[1] - len(answers[i]) for i in batch], device=model.device)
        watch = NonFiniteRows(len(batch), model.device)
        output = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=steps,
            pad_token_id=pad,
            eos_token_id=sorted(eos) or None,
            stopping_criteria=StoppingCriteriaList([FirstLineEnd(flags, starts)] if flags is not None else []),
            logits_processor=LogitsProcessorList([*(logits_processor or []), watch]),
            **cache,
        )
        check_finite_rows(watch.seen, model, [prompts[i] for i in batch], where)
        begins = starts.tolist()
        line_ends = [None] * len(batch)  # per row, its answer's length through its first line break
        if flags is not None:
            breaks = first_line_breaks(output, starts, flags)
            found, first = breaks.any(-1).tolist(), breaks.int().argmax(-1).tolist()
            line_ends = [k - begin + 1 if f else None for f, k, begin in zip(found, first, begins)]
        for i, tokens, begin, line_end in zip(batch, output.tolist(), begins, line_ends):
            answer = tokens[begin:]
            # Finished rows are filled up with padding, which may be a real token.
            at_eos = next((k for k, token in enumerate(answer) if token in eos), None)
            ends = [k for k in (at_eos, line_end) if k is not None]
            answers[i] = answer[: min(ends)] if ends else answer
            cut_off[i] = not ends and len(answer) >= max_new_tokens
            finished[i] = bool(ends) or cut_off[i]

    rounds = rounds_by_default(model.device) if rounds is None else rounds
    budgets = round_budgets(max_new_tokens) if rounds and not static_cache else [max_new_tokens]
    first_round_rows: list[int] = []

    def first_round(batch: np.ndarray) -> None:
        # Once most rows so far are unfinished, answers run long here: re-reading their prompts in
        # a later round would cost more than it saves, so the remaining batches decode to the end.
        if first_round_rows and (~finished[first_round_rows]).mean() > 0.5:
            run(batch, max_new_tokens)
        else:
            run(batch, budgets[0])
            first_round_rows.extend(np.unique(batch))  # a filled-up last batch repeats a row

    for k, budget in enumerate(budgets):
        pending = np.flatnonzero(~finished)
        if not len(pending):
            break
        lengths = [len(encoded[i]) + len(answers[i]) for i in pending]
        batches = [pending[b] for b in length_batches(lengths, batch_size)]
        if static_cache and len(batches) > 1:
            # Before in_batches, so that a batch cut after running out of memory stays cut.
            last = batches[-1]
            batches[-1] = np.concatenate([last, np.repeat(last[-1:], len(batches[0]) - len(last))])
        log.info("decoding up to %d new tokens: %d rows in %d batches", budget, len(pending), len(batches))
        in_batches(batches, first_round if k == 0 else functools.partial(run, budget=budget))
        if k == 0 and len(first_round_rows) < len(pending):
            log.info("most answers run past %d new tokens: %d rows decoded to the end at once",
                     budget, len(pending) - len(first_round_rows))  # fmt: skip
    # Many answers cut off would mean max_new_tokens truncates them, or the model never learned to stop.
    log.info("%d of %d answers reached max_new_tokens (%d) without ending", cut_off.sum(), len(encoded), max_new_tokens)
    return tokenizer.batch_decode(answers, skip_special_tokens=True)


def check_context(model, tokens: int, what: str, settings: str = "evaluate.fewshot or popularity.shots") -> None:
    """Past its trained positions a model's answers and likelihoods are noise, not a finding."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)  # Gemma 3: text_config
    if limit and tokens > limit:
        raise FactftError(
            f"{what} exceeds the model's context of {limit} positions; shorten prompt.template, or lower {settings}"
        )


def rounds_by_default(device) -> bool:
    """Whether to decode in rounds on `device`: everywhere but on CUDA. On a CPU the tokens set
    the time, and rounds save those of rows that have ended (1.2x where answers end,
    bench/results/speed-cpu.tsv). On an H200 the passes rounds save did not pay for their extra
    `generate` calls and re-read prompts: one round was 1.12x where answers end, timed back to
    back (bench/results/speed-cuda.tsv; 1.7x where none ends, a pair not timed alike). Other
    accelerators (MPS, XPU) keep rounds: not measured."""
    return torch.device(device).type != "cuda"


def round_budgets(max_new_tokens: int, first: int = 4, growth: int = 4) -> list[int]:
    """New tokens in all after each decoding round: 4, 16, 64, ..., max_new_tokens.

    Most short answers end within 4 tokens, eos included. Each later round re-reads its
    rows' prompts, so a few large rounds cost less than many small ones when rows run long.
    """
    budgets = [min(first, max_new_tokens)]
    while budgets[-1] < max_new_tokens:
        budgets.append(min(growth * budgets[-1], max_new_tokens))
    return budgets


def line_end_flags(tokenizer, vocabulary: int, device) -> torch.Tensor:
    """Per token id, three flags for first_line_breaks: (0) it holds non-blank text, (1) it
    holds a line break, (2) it holds non-blank text followed by a line break.

    Each token is decoded alone. A token that decodes to a replacement character (part of a
    multi-byte character) counts as neither text nor its end, since in context it may be
    whitespace; a line break is one byte, so it is never part of such a character.
    """
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
    texts += [""] * (vocabulary - len(texts))  # ids the model has beyond its tokenizer
    flags = [
        (
            bool(text.strip()) and "\ufffd" not in text,
            "\n" in text,
            "\n" in text.lstrip() and "\ufffd" not in text,
        )
        for text in texts
    ]
    return torch.tensor(flags, dtype=torch.bool).T.contiguous().to(device)


def first_line_breaks(ids: torch.Tensor, starts: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Per row and column, whether that token ends a line of the answer that starts at column
    `starts[row]`, after non-blank text: the first such column ends the first line, all that
    factft.metrics.first_line scores (it skips blank leading lines, so they end nothing here)."""
    text, line_break, text_then_break = flags
    in_answer = torch.arange(ids.shape[1], device=ids.device)[None, :] >= starts[:, None]
    has_text = text[ids] & in_answer
    text_before = (has_text.cumsum(-1) - has_text.long()) > 0
    return in_answer & torch.where(text_before, line_break[ids], text_then_break[ids])


class FirstLineEnd(StoppingCriteria):
    """Ends a row once its answer's first line is complete (first_line_breaks)."""

    def __init__(self, flags: torch.Tensor, starts: torch.Tensor):
        self.flags, self.starts = flags, starts

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return first_line_breaks(input_ids, self.starts, self.flags).any(-1)


class NonFiniteRows(LogitsProcessor):
    """Marks the rows whose next-token logits hold nan or +inf at any step, without a sync
    (`seen`, on the model's device). Processors before it may set -inf (suppressed tokens)."""

    def __init__(self, rows: int, device):
        self.seen = torch.zeros(rows, dtype=torch.bool, device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        top = scores.amax(-1)  # nan if any is nan: one pass over the vocabulary
        self.seen |= torch.isnan(top) | torch.isposinf(top)
        return scores


# ---- nan and inf ----------------------------------------------------------------


def non_finite_logits(model, where: str, prompt: str) -> FactftError:
    """The error for logits of nan or inf on `prompt`. They make greedy decoding emit one token
    id over and over (answers that score near zero) and every likelihood nan, with no error."""
    if torch.float16 in {p.dtype for p in model.parameters()}:
        why = (
            "it runs in fp16 (this GPU has no bf16), whose range (to 65504) its activations overflow: "
            f"run it on {BF16_GPU}"
        )
    else:
        why = "its weights hold nan or inf: check the model folder, or the finetune that made the adapter"
    return FactftError(f"{where}: its logits on {prompt!r} are nan or inf, so its answers would be noise; {why}")


def check_finite_rows(bad: torch.Tensor | np.ndarray, model, prompts: Sequence[str], where: str) -> None:
    """Raises non_finite_logits for the first of `prompts` whose row is marked in `bad`."""
    rows = np.flatnonzero(bad.cpu().numpy() if isinstance(bad, torch.Tensor) else bad)
    if len(rows):
        raise non_finite_logits(model, where, prompts[rows[0]])


# ---- likelihoods ----------------------------------------------------------------


def prompt_answer_ids(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """The prompt's and the answer's token ids, split exactly as in finetuning, without eos."""
    example = encode_example(tokenizer, prompt, answer, max_length=sys.maxsize)
    cut = sum(1 for label in example["labels"] if label == IGNORE)
    prompt_ids, answer_ids = example["input_ids"][:cut], example["input_ids"][cut:]
    if answer_ids and answer_ids[-1] == tokenizer.eos_token_id:
        answer_ids = answer_ids[:-1]
    return prompt_ids, answer_ids


@torch.inference_mode()
def answer_logprobs(
    model, tokenizer, prompts: Sequence[str], answers: Sequence[str], *, batch_size: int, where: str = "the model"
) -> np.ndarray:
    """Summed log-probability of each answer's tokens after its prompt (teacher forcing), float64.
    Logits of nan or inf stop it (check_finite_rows); `where` names the model."""
    pairs = [prompt_answer_ids(tokenizer, p, a) for p, a in zip(prompts, answers, strict=True)]
    sequences = [p + a for p, a in pairs]
    check_context(model, max(map(len, sequences), default=0), "a prompt with its answer, of the most tokens,")
    answer_lengths = np.array([len(a) for _, a in pairs])
    pad = pad_id(tokenizer)
    keeps_logits = accepts_logits_to_keep(model)
    scores = np.zeros(len(sequences), dtype=np.float64)

    def run(batch: np.ndarray) -> None:
        lengths = answer_lengths[batch]
        k = int(lengths.max())
        if k == 0:
            return
        ids, mask = left_pad([sequences[i] for i in batch], pad, model.device)
        # Positions count real tokens only, so a left-padded row sees the same positions as alone.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        extra = {"logits_to_keep": k + 1} if keeps_logits else {}
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **extra
        ).logits
        # Every row ends at the last column: its answer is in the last len(answer) columns,
        # predicted by the logits one column to the left.
        logprobs = torch.log_softmax(logits[:, -(k + 1) : -1].float(), dim=-1)
        token_logprobs = logprobs.gather(-1, ids[:, -k:, None]).squeeze(-1)
        in_answer = (
            torch.arange(k, device=ids.device)[None, :]
            >= (k - torch.as_tensor(lengths, device=ids.device))[:, None]
        )
        sums = torch.where(in_answer, token_logprobs, torch.zeros_like(token_logprobs)).sum(-1)
        scores[batch] = sums.double().cpu().numpy()
        # Only the answers' positions: a padding position's logits may be nan and are never used.
        check_finite_rows(~np.isfinite(scores[batch]), model, [prompts[i] for i in batch], where)

    in_batches(length_batches([len(s) for s in sequences], batch_size), run)
    return scores


def accepts_logits_to_keep(model) -> bool:
    """Whether the model can compute logits at chosen positions only (built-in models can)."""
    # A peft model forwards **kwargs; what it accepts is the base model's signature.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def holds_keys(cache) -> bool:
    """Whether a model's cache holds attention keys and values that a continuation can reuse.
    A state-space model (Mamba) keeps a state instead: transformers 5.23 returns no cache for
    it, later versions one whose layers hold no keys (a hybrid such as Jamba has both kinds)."""
    layers = getattr(cache, "layers", None)  # None: a model's own code may return (key, value) tuples
    return cache is not None and (layers is None or any(hasattr(layer, "keys") for layer in layers))


@torch.inference_mode()
def choice_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    *,
    batch_size: int,
    mean: bool = False,
    where: str = "the model",
) -> list[np.ndarray]:
    """Per question, the summed log-likelihood of each choice text after its prompt (with
    `mean`, divided by the choice's tokens: evaluate.choice_score).

    The prompt runs once and every choice continues from a copy of its KV cache: a question
    of 55 tokens with four choices of 15 computes 115 tokens instead of 4 x 70 (and a 5-shot
    prompt 3.6x fewer). `batch_size` counts rows per forward pass, as in answer_logprobs.
    Logits of nan or inf stop it (check_finite_rows); `where` names the model.
    """
    pairs = [[prompt_answer_ids(tokenizer, p, c) for c in options] for p, options in zip(prompts, choices, strict=True)]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]  # every choice's prompt part (prompt_answer_ids)
    choice_ids = [[answer for _, answer in row] for row in pairs]
    for question, row in enumerate(choice_ids):
        if not all(row):  # its score would be 0, above every real choice's
            raise FactftError(
                f"choice {[len(ids) for ids in row].index(0)} of {prompts[question]!r} has no tokens: "
                f"choices {list(choices[question])}"
            )
    longest = max((len(p) + max(map(len, row), default=0) for p, row in zip(prompt_ids, choice_ids)), default=0)
    check_context(model, longest, "a prompt with its longest choice, of the most tokens,")
    scores = [np.zeros(len(options), dtype=np.float64) for options in choices]
    widest = max((len(options) for options in choices), default=1)
    pad = pad_id(tokenizer)
    keeps_logits = accepts_logits_to_keep(model)

    def run(batch: np.ndarray) -> None:
        ids, mask = left_pad([prompt_ids[i] for i in batch], pad, model.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        extra = {"logits_to_keep": 1} if keeps_logits else {}
        prefix = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
        if not holds_keys(getattr(prefix, "past_key_values", None)):
            raise FactftError(
                f"multiple-choice scoring continues every choice from its prompt's KV cache, and "
                f"{type(model).__name__} keeps none (a state-space model such as Mamba has a state instead)"
            )
        first = prefix.logits[:, -1:].float()  # predicts each choice's first token
        lengths = mask.sum(-1, keepdim=True)
        for j in range(max(len(choice_ids[i]) for i in batch)):
            options = [choice_ids[i][j] if j < len(choice_ids[i]) else [] for i in batch]
            k = max(len(o) for o in options)
            if k == 0:
                continue
            tokens = torch.full((len(batch), k), pad, dtype=torch.long)
            in_choice = torch.zeros((len(batch), k), dtype=torch.long)
            for row, option in enumerate(options):
                tokens[row, : len(option)] = torch.as_tensor(option, dtype=torch.long)
                in_choice[row, : len(option)] = 1
            tokens, in_choice = tokens.to(model.device), in_choice.to(model.device)
            # Right-padded after the prompt: a choice's tokens never see its padding.
            logits = model(
                input_ids=tokens,
                attention_mask=torch.cat([mask, in_choice], dim=-1),
                position_ids=lengths + torch.arange(k, device=model.device)[None, :],
                past_key_values=copy.deepcopy(prefix.past_key_values),
                use_cache=True,
            ).logits
            logprobs = torch.log_softmax(torch.cat([first, logits[:, :-1].float()], dim=1), dim=-1)
            token_logprobs = logprobs.gather(-1, tokens[:, :, None]).squeeze(-1)
            sums = torch.where(in_choice.bool(), token_logprobs, torch.zeros_like(token_logprobs)).sum(-1)
            totals = sums.double().cpu().numpy()
            for i, total in zip(batch, totals):
                if j < len(choice_ids[i]):
                    scores[i][j] = total
            check_finite_rows(~np.isfinite(totals), model, [prompts[i] for i in batch], where)

    questions = max(1, batch_size // widest)  # each choice is a row of its own
    in_batches(length_batches([len(p) for p in prompt_ids], questions), run)
    if mean:
        return [total / np.array([len(ids) for ids in row]) for total, row in zip(scores, choice_ids)]
    return scores


# ---- evaluation -----------------------------------------------------------------


def check_format(fmt: str, where: str) -> None:
    if fmt not in FORMATS:
        raise FactftError(f"{where}: format '{fmt}' is unknown; formats are {list(FORMATS)}")


def demo_columns(fmt: str) -> list[str]:
    """What a solved question shows as a demonstration (few-shot prompts, model_confidence)."""
    return ["question", "relation", *(["choices", "answer_index"] if fmt == "multiple_choice" else ["answers"])]


def check_test_table(test: pd.DataFrame, fmt: str, where: str, prompt_column: str = "question") -> None:
    """Fail before loading a model when the test table cannot be evaluated."""
    check_format(fmt, where)
    if prompt_column == "statement" and "statement" not in test.columns:
        raise FactftError(
            f"{where}: the test facts have no `statement` column; cloze prompts exist only for "
            "synthetic worlds (datasets.<name>.source.synthetic)"
        )
    needed = [*TEST_COLUMNS, prompt_column] + (
        ["choices", "answer_index"] if fmt == "multiple_choice" else []
    )
    missing = [c for c in dict.fromkeys(needed) if c not in test.columns]
    if missing:
        raise FactftError(
            f"{where}: test table lacks columns {missing} (has {list(test.columns)}); "
            "rebuild it with the `split` rule"
        )
    if test.empty:
        raise FactftError(f"{where}: the test table is empty; raise split.test_fraction or split.test_size")
    if fmt == "multiple_choice":
        check_choices(test, where)


def check_demos(demos: pd.DataFrame | None, fmt: str, where: str) -> None:
    """Fail before loading a model when the demonstrations cannot be shown."""
    if demos is None or demos.empty:
        raise FactftError(f"{where}: no demonstrations; the finetuning pool (split `whole`) is empty")
    missing = [c for c in demo_columns(fmt) if c not in demos.columns]
    if missing:
        raise FactftError(f"{where}: the demonstrations lack columns {missing}; rebuild them with the `split` rule")


def check_choices(facts: pd.DataFrame, where: str) -> None:
    """Every multiple-choice fact's answer_index points into its choices."""
    counts = facts["choices"].map(len).to_numpy()
    index = facts["answer_index"].to_numpy()
    bad = (index < 0) | (index >= counts)
    if bad.any():
        first = int(np.argmax(bad))
        example = facts["id"].iloc[first] if "id" in facts.columns else f"row {first}"
        raise FactftError(
            f"{where}: {int(bad.sum())} rows have answer_index outside their choices, e.g. {example}; "
            "check datasets.<name>.columns.answer_index"
        )


def predict(
    model,
    tokenizer,
    test: pd.DataFrame,
    *,
    fmt: str,
    prompt: dict,
    max_new_tokens: int,
    batch_size: int,
    prompt_column: str = "question",
    static_cache: bool = False,
    prefixes: Sequence[str] | None = None,
    choice_score: str = "sum",
    where: str = "the model",
) -> pd.DataFrame:
    """The answers table for `test` (factft.metrics.answers_table).

    Open QA: greedy generation after the prompt. Multiple choice: the choice whose target
    (its text or letter in the answer template) is most likely after the prompt, in all or per token
    (`choice_score` "sum" or "mean"). `prompt_column="statement"`
    uses the facts' cloze prefix verbatim instead of the question template. `prefixes`, one
    per fact, go before each prompt (few-shot demonstrations: factft.prompts.few_shot_prefixes),
    and a chat model's template goes around both (its demonstrations are earlier turns, and its
    answers end at its end of reply: factft.prompts.chat_prompt). `where` names the model in errors.
    """
    if prompt_column == "question":
        prompts = [fact_prompt(fact, prompt["template"]) for fact in test.to_dict("records")]
    else:
        prompts = [str(s) for s in test[prompt_column]]
    if prefixes is not None:
        prompts = [prefix + text for prefix, text in zip(prefixes, prompts, strict=True)]
    prompts = [in_turn(prompt, text) for text in prompts]
    if prompts:
        log.info("the first prompt: %r", prompts[0])
    if fmt == "open":
        texts = generate_texts(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            static_cache=static_cache,
            end_ids=[reply_end_id(tokenizer, prompt)],
            where=where,
        )
        return answers_table(test, texts)
    options = [choice_answers(choices, prompt["answer"]) for choices in test["choices"]]
    if options:
        log.info("its choices: %r", options[0])
    scores = choice_logprobs(
        model, tokenizer, prompts, options, batch_size=batch_size, mean=choice_score == "mean", where=where
    )
    picked = [int(np.argmax(s)) for s in scores]
    texts = [str(choices[i]) for choices, i in zip(test["choices"], picked)]
    return answers_table(test, texts, choices=picked)


def evaluate_model(
    spec: dict,
    test: pd.DataFrame,
    params: dict,
    *,
    adapter: str | Path | None = None,
    prompt_column: str = "question",
    threads: int | None = None,
    device: str | None = None,
    shots: int = 0,
    demos: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The answers of the model in `spec` (plus a finetune `adapter`) to `test`
    (factft.metrics.score_answers scores them).

    `params` is `evaluate_params` with `evaluate_running` from rules/common.smk:
    max_new_tokens, format, prompt, choice_score (multiple choice), batch_size and
    static_cache (used on CUDA only: on a CPU nothing compiles it and it only costs memory).
    With `shots`, every question follows that many solved demonstrations from `demos` (the
    finetuning pool), of its relation where it can.
    """
    where = f"model '{spec['name']}'" + (f" + {adapter}" if adapter else "")
    check_test_table(test, params["format"], where, prompt_column)
    if shots:
        check_demos(demos, params["format"], f"{where}, {shots}-shot")
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_model(spec, adapter, device=device)
    prompt = chat_prompt(spec, tokenizer, params["prompt"])
    prefixes = few_shot_prefixes(test, shots, prompt, demos=demos) if shots else None
    start = time.perf_counter()
    answers = predict(
        model,
        tokenizer,
        test,
        fmt=params["format"],
        prompt=prompt,
        max_new_tokens=params["max_new_tokens"],
        batch_size=params["batch_size"],
        prompt_column=prompt_column,
        static_cache=bool(params.get("static_cache")) and model.device.type == "cuda",
        prefixes=prefixes,
        choice_score=params.get("choice_score", "sum"),
        where=where,
    )
    seconds = time.perf_counter() - start
    log.info(
        "%s%s: %d test facts in %.1f s (%.1f questions/s) on %s%s",
        where,
        f", {shots}-shot" if shots else "",
        len(test),
        seconds,
        len(test) / max(seconds, 1e-9),
        model.device,
        peak_memory(model.device),
    )
    if params["format"] == "open":
        empty = int((answers["prediction"].map(first_line).str.strip() == "").sum())
        if empty > len(answers) / 2:
            log.warning(
                "%s: %d of %d answers are empty (the model ends them at once, or writes only blank lines or "
                "tokens that decoding drops): an undertrained model, or a prompt it does not answer in",
                where,
                empty,
                len(answers),
            )
    return answers
