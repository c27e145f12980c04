"""Where a finetuned model looks when it answers: attention from the last prompt position.

The paper's attention analysis: at the last prompt position, where the answer's first token is
predicted, a model finetuned on well-known facts (FT-Top) puts more attention on the
subject's tokens than one finetuned on little-known facts (FT-Bottom), which answers
generically for the relation. Per test question, layer and head we take the
weights of the last position's attention row and summarise two parts of the prompt: the
subject's tokens and the question's other words (the relation, for contrast). For each
part: the largest weight on one of its tokens (`*_max`) and the
summed weight on all of them (`*_mass`). Heads are averaged, then questions.

The subject's tokens are found through the tokenizer's offset mapping (the subject's
character span in the prompt -> the tokens overlapping it), so the same code serves a
word-level tiny model and a 7B model's BPE or SentencePiece tokenizer. Attention weights
need the eager attention implementation: SDPA and flash kernels never materialise them.

torch and the model code are imported where the analysis runs. The figures are drawn by
factft.attention_plots.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from factft.errors import FactftError
from factft.prompts import chat_prompt, in_turn, prompt_text

log = logging.getLogger(__name__)

TEST_COLUMNS = ("id", "question", "subject", "popularity")
LAYER_COLUMNS = ("layer", "subject_max", "subject_mass", "relation_max", "relation_mass", "questions")
# The sample of test questions is the same for every run of a dataset, so FT-Top and
# FT-Bottom are compared on the same questions.
SAMPLE_SEED = 0


# ---- where the subject is -------------------------------------------------------


@dataclass(frozen=True)
class PromptTokens:
    """A prompt's tokens and which positions hold the subject and the relation words."""

    prompt: str
    input_ids: list[int]
    tokens: list[str]  # each token's text in the prompt (special tokens by name), for figures
    subject: list[int]
    relation: list[int]  # the question's other tokens with a letter or digit


def subject_span(question: str, subject: str) -> tuple[int, int] | None:
    """The subject's character span in the question: as written, else ignoring case
    (PopQA's `subj` and its question differ in case now and then); None when absent.
    Whole words first: subject "W" is not the "W" of "What genre is W?". Of several, the
    last: a subject named like a question word is the second "Who" of "Who produced Who?"."""
    if not subject:
        return None
    escaped = re.escape(subject)
    for pattern in (rf"(?<!\w){escaped}(?!\w)", escaped):
        for flags in (0, re.IGNORECASE):
            matches = list(re.finditer(pattern, question, flags=flags))
            if matches:
                return matches[-1].span()
    return None


def prompt_tokens(tokenizer, question: str, subject: str, template: str, where: str = "attention") -> PromptTokens:
    """Tokenize the question's prompt and locate the subject's and the relation's tokens.

    The subject is searched in the question, never in the template's own text (a few-shot
    template names other subjects), and a token belongs to it when its characters overlap
    the subject's span: a BPE token carrying the leading space (" France") counts.
    """
    span = subject_span(question, subject)
    if span is None:
        raise FactftError(
            f"{where}: the subject {subject!r} does not occur in the question {question!r}; the "
            "attention analysis finds the subject's tokens by its text, so datasets.<name>.columns.subject "
            "must name the subject as the question writes it"
        )
    # prompt_text replaces every {question}: the first one is where the offsets point.
    start = template.index("{question}")
    prompt = prompt_text(question, template)
    subject_chars = (start + span[0], start + span[1])
    question_chars = (start, start + len(question))
    try:
        encoded = tokenizer(prompt, return_offsets_mapping=True)
    except NotImplementedError:
        raise FactftError(
            f"{where}: the model's tokenizer is a slow (Python) tokenizer without offset mappings; "
            "the attention analysis needs a fast tokenizer (tokenizer.json)"
        ) from None
    ids = list(encoded["input_ids"])
    subject_positions, relation_positions, tokens = [], [], []
    for position, (first, last) in enumerate(encoded["offset_mapping"]):
        text = prompt[first:last]
        tokens.append(text if last > first else tokenizer.convert_ids_to_tokens(ids[position]))
        if last <= first:
            continue  # special tokens (bos) cover no characters
        if _overlaps((first, last), subject_chars):
            subject_positions.append(position)
        elif _overlaps((first, last), question_chars) and any(c.isalnum() for c in text):
            relation_positions.append(position)
    if not subject_positions:
        raise FactftError(f"{where}: no token of {prompt!r} covers the subject {subject!r}")
    return PromptTokens(prompt, ids, tokens, subject_positions, relation_positions)


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and a[1] > b[0]


def select_questions(test: pd.DataFrame, limit: int, max_drop_fraction: float, where: str) -> pd.DataFrame:
    """Up to `limit` test facts whose subject occurs in their question (a seeded sample, in
    test-table order). Facts without it are dropped when they are at most
    `max_drop_fraction` of the test set, else the analysis cannot stand for the dataset."""
    missing = [c for c in TEST_COLUMNS if c not in test.columns]
    if missing:
        raise FactftError(f"{where}: test table lacks columns {missing}; rebuild it with the `split` rule")
    found = np.array([subject_span(str(q), str(s)) is not None for q, s in zip(test["question"], test["subject"])])
    lost = int((~found).sum())
    if lost and (not found.any() or lost / len(test) > max_drop_fraction):
        example = test[~found].iloc[0]
        raise FactftError(
            f"{where}: the subject does not occur in the question for {lost} of {len(test)} test facts, "
            f"e.g. {example['id']}: subject {example['subject']!r}, question {example['question']!r}; "
            "the attention analysis needs the subject written in the question (check "
            "datasets.<name>.columns.subject; multiple-choice topics are not subjects), or raise "
            "split.max_drop_fraction to skip such facts"
        )
    if lost:
        log.warning("%s: %d of %d test facts skipped: their subject is not in the question", where, lost, len(test))
    kept = test[found]
    if len(kept) > limit:
        kept = kept.sample(n=limit, random_state=SAMPLE_SEED).sort_index()
    return kept.reset_index(drop=True)


def example_index(questions: pd.DataFrame) -> int:
    """The question of the heatmap: the most popular one analysed (ties: the smallest id)."""
    order = questions.assign(_id=questions["id"].astype(str)).sort_values(
        ["popularity", "_id"], ascending=[False, True], kind="stable"
    )
    return int(order.index[0])


# ---- attention weights ----------------------------------------------------------


def require_eager_attention(model, where: str) -> None:
    """Eager attention is the one implementation that returns weights; a model's own code
    (trust_remote_code) may ignore the request for it."""
    if getattr(model.config, "_attn_implementation", None) != "eager":
        raise FactftError(
            f"{where}: the model did not load with eager attention (its own code may not support it), "
            "so it returns no attention weights"
        )


def last_position_attention(
    model, prompts: Sequence[PromptTokens], *, pad_id: int, batch_size: int, where: str = "the model"
) -> list[np.ndarray]:
    """Per prompt, its last position's attention weights over its own tokens: an array
    (layers, heads, tokens), float32. Batches are left-padded, so the last column is every
    row's last position; position ids count real tokens only, as for an unpadded prompt.
    Batches that run out of GPU memory are halved (factft.generate.in_batches). Logits of nan
    or inf stop it (check_finite_rows): a model that overflows is no model to analyse. `where`
    names the model."""
    import torch

    from factft.generate import accepts_logits_to_keep, check_finite_rows, in_batches, left_pad, length_batches

    keeps_logits = accepts_logits_to_keep(model)
    weights: list[np.ndarray | None] = [None] * len(prompts)

    @torch.inference_mode()
    def run(batch: np.ndarray) -> None:
        ids, mask = left_pad([prompts[i].input_ids for i in batch], pad_id, model.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        output = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=False,
            output_attentions=True,
            # The logits are not needed: one position's keeps a 7B vocabulary small.
            **({"logits_to_keep": 1} if keeps_logits else {}),
        )
        attentions = getattr(output, "attentions", None)  # a state-space model (Mamba) has none
        if not attentions or any(a is None for a in attentions):
            raise FactftError(
                f"{type(model).__name__} returned no attention weights: it needs attention layers, run eagerly"
            )
        finite = torch.isfinite(output.logits[:, -1]).all(-1)
        check_finite_rows(~finite, model, [prompts[i].prompt for i in batch], where)
        last = torch.stack([a[:, :, -1, :] for a in attentions], dim=1).float().cpu().numpy()
        for row, i in enumerate(batch):
            weights[i] = last[row, :, :, last.shape[-1] - len(prompts[i].input_ids) :]

    in_batches(length_batches([len(p.input_ids) for p in prompts], batch_size), run)
    return weights


def attention_layer_numbers(model, count: int, where: str) -> np.ndarray:
    """The numbers (1 = the first) of the `count` layers whose weights the model returned.

    A hybrid model (Jamba, Bamba, Qwen3-Next, Nemotron-H) interleaves attention layers with
    state-space or linear-attention ones, which have no weights to return: its first
    attention layer may be its fourth. transformers names each layer's kind in layer_types."""
    config = model.config.get_text_config()
    if count == config.num_hidden_layers:
        return np.arange(1, count + 1)
    kinds = list(getattr(config, "layer_types", None) or [])
    attending = [i + 1 for i, kind in enumerate(kinds) if kind.endswith("attention") and kind != "linear_attention"]
    if len(attending) != count:
        raise FactftError(
            f"{where}: {type(model).__name__} returned attention weights for {count} of its "
            f"{config.num_hidden_layers} layers, and its config's layer_types ({kinds}) do not say which"
        )
    return np.array(attending)


def part_statistics(weights: np.ndarray, positions: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(max, mass) per layer of one prompt's (layers, heads, tokens) weights on `positions`,
    averaged over heads. Without such positions the max is NaN and the mass 0, so that the
    subject's, the relation's and the rest's masses still add up to 1 (the rest is what is left)."""
    if not len(positions):
        return np.full(weights.shape[0], np.nan), np.zeros(weights.shape[0])
    part = weights[:, :, list(positions)]
    return part.max(-1).mean(-1), part.sum(-1).mean(-1)


def attention_by_layer(
    weights: Sequence[np.ndarray], prompts: Sequence[PromptTokens], layers: Sequence[int]
) -> pd.DataFrame:
    """One row per layer the weights come from (`layers`, numbered by attention_layer_numbers):
    the statistics averaged over questions."""
    stats = {name: [] for name in LAYER_COLUMNS[1:-1]}
    for w, p in zip(weights, prompts, strict=True):
        for part in ("subject", "relation"):
            top, mass = part_statistics(w, getattr(p, part))
            stats[f"{part}_max"].append(top)
            stats[f"{part}_mass"].append(mass)
    table = pd.DataFrame({"layer": layers})
    for name, rows in stats.items():
        rows = np.vstack(rows)
        # A question whose words are all subject has no relation tokens: no max, and no mass on them.
        table[name] = np.nanmean(rows, axis=0) if not np.isnan(rows).all() else np.nan
    table["questions"] = len(weights)
    return table


def attention_example(weights: np.ndarray, prompt: PromptTokens, fact: Mapping, layers: Sequence[int]) -> pd.DataFrame:
    """The heatmap's data for one question: head-mean weight per (layer, token), long format."""
    parts = np.full(len(prompt.input_ids), "other", dtype=object)
    parts[prompt.relation] = "relation"
    parts[prompt.subject] = "subject"
    head_mean = weights.mean(axis=1)
    rows, positions = np.meshgrid(np.asarray(layers), np.arange(head_mean.shape[1]), indexing="ij")
    answers = fact.get("answers")
    return pd.DataFrame(
        {
            "id": str(fact["id"]),
            "question": str(fact["question"]),
            "answer": str(answers[0]) if answers is not None and len(answers) else "",
            "layer": rows.ravel(),
            "position": positions.ravel(),
            # Escaped: a few-shot template's line breaks stay visible and the TSV stays one line per row.
            "token": [_visible(prompt.tokens[p]) for p in positions.ravel()],
            "part": parts[positions.ravel()],
            "weight": head_mean.ravel(),
        }
    )


def _visible(token: str) -> str:
    return token.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def analyse_attention(
    spec: dict,
    test: pd.DataFrame,
    params: dict,
    *,
    adapter: str | Path | None = None,
    threads: int | None = None,
    device: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-layer statistics, the example question's heatmap data) of a model on `test`.

    `spec` is `model_spec(name)` and `params` is `attention_params` from rules/common.smk
    (questions, the cap; prompt) plus what the script adds: `evaluate_running` (batch_size,
    static_cache) and max_drop_fraction.
    """
    from factft.generate import pad_id
    from factft.models import load_model

    where = f"attention of model '{spec['name']}'" + (f" + {adapter}" if adapter else "")
    questions = select_questions(test, params["questions"], params["max_drop_fraction"], where)
    if threads:
        import torch

        torch.set_num_threads(threads)
    model, tokenizer = load_model(spec, adapter, device=device, attention="eager")
    require_eager_attention(model, where)
    prompt = chat_prompt(spec, tokenizer, params["prompt"])
    template = in_turn(prompt, prompt["template"])
    prompts = [
        prompt_tokens(tokenizer, str(q), str(s), template, f"{where}, test fact {i}")
        for q, s, i in zip(questions["question"], questions["subject"], questions["id"])
    ]
    weights = last_position_attention(
        model, prompts, pad_id=pad_id(tokenizer), batch_size=params["batch_size"], where=where
    )
    layers = attention_layer_numbers(model, weights[0].shape[0], where)
    by_layer = attention_by_layer(weights, prompts, layers)
    chosen = example_index(questions)
    example = attention_example(weights[chosen], prompts[chosen], questions.loc[chosen], layers)
    log.info(
        "%s: %d questions, %d layers; subject max %.4f (last layer %.4f), relation max %.4f",
        where,
        len(questions),
        len(by_layer),
        by_layer["subject_max"].mean(),
        by_layer["subject_max"].iloc[-1],
        by_layer["relation_max"].mean(),
    )
    return by_layer, example
