"""The `model_confidence` popularity scorer: how strongly a pretrained model stores each fact.

A fact's score is the model's probability of its gold answer after a few-shot prompt.
Datasets without a popularity signal (MMLU) are ranked by it: a fact the model already
answers confidently plays the role of a well-known fact.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from factft.errors import FactftError
from factft.generate import answer_logprobs, check_choices, check_format, choice_logprobs, demo_columns
from factft.models import load_model
from factft.prompts import chat_prompt, choice_answers, fact_prompt, few_shot_prefixes, gold_answer, in_turn

log = logging.getLogger(__name__)


def confidence_scores(
    model,
    tokenizer,
    facts: pd.DataFrame,
    shots: int,
    prompt: dict,
    fmt: str,
    *,
    batch_size: int = 16,
    choice_score: str = "sum",
    where: str = "the model",
) -> np.ndarray:
    """Probability of each fact's gold answer under the few-shot prompt (float64 in [0, 1]).

    Open QA: the product of the gold answer's token probabilities (teacher forcing).
    Multiple choice: the softmax over the choices' log-likelihoods, summed or per token as
    evaluation picks a choice (`choice_score`, evaluate.choice_score), at the gold choice;
    with lettered answers, with the model's letter preference taken out (without_letter_prior).
    `where` names the scorer and model in errors.
    """
    records = facts.to_dict("records")
    prompts = [
        in_turn(prompt, prefix + fact_prompt(fact, prompt["template"]))
        for prefix, fact in zip(few_shot_prefixes(facts, shots, prompt), records)
    ]
    if prompts:
        log.info("the first prompt: %r", prompts[0])
    if fmt == "open":
        answers = [gold_answer(fact, prompt["answer"]) for fact in records]
        return np.exp(answer_logprobs(model, tokenizer, prompts, answers, batch_size=batch_size, where=where))
    options = [choice_answers(choices, prompt["answer"]) for choices in facts["choices"]]
    scores = choice_logprobs(
        model, tokenizer, prompts, options, batch_size=batch_size, mean=choice_score == "mean", where=where
    )
    probabilities = [_softmax(s) for s in scores]
    if "{letter}" in prompt["answer"]:
        probabilities = without_letter_prior(probabilities)
    gold = facts["answer_index"].to_numpy(dtype=np.int64)
    return np.array([p[g] for p, g in zip(probabilities, gold)], dtype=np.float64)


def without_letter_prior(probabilities: list[np.ndarray]) -> list[np.ndarray]:
    """Each fact's choice probabilities divided by the model's preference for each letter,
    renormalised. A model that favours a letter, as small models favour A, would otherwise
    rank the facts by which letter is right, and FT-Top would hold the facts answered A.

    The preference is the geometric mean of each letter's probability over all the facts. A
    bias that multiplies a letter's odds in every question moves that mean by exactly its
    factor where the questions treat every position alike (MMLU's gold letters are about
    balanced), so dividing it out recovers the unbiased probabilities.
    """
    widest = max(len(p) for p in probabilities)
    logs = [np.log(np.maximum(p, np.finfo(np.float64).tiny)) for p in probabilities]
    prior = np.exp([np.mean([lp[k] for lp in logs if len(lp) > k]) for k in range(widest)])
    prior /= prior.sum()
    log.info("letter preference taken out: %s", ", ".join(f"{x:.3f}" for x in prior))
    calibrated = [p / prior[: len(p)] for p in probabilities]
    return [c / c.sum() for c in calibrated]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


def model_confidence_scores(
    facts: pd.DataFrame,
    model: dict,
    shots: int,
    prompt: dict,
    fmt: str,
    *,
    batch_size: int = 16,
    choice_score: str = "sum",
    device: str | None = None,
) -> pd.Series:
    """The scorer: the pretrained model `model` (a `model_spec` dict) scores every fact.

    Returns a float64 Series in [0, 1] aligned with `facts.index`.
    """
    where = f"popularity scorer model_confidence (model '{model['name']}')"
    check_format(fmt, where)
    missing = [c for c in demo_columns(fmt) if c not in facts.columns]  # each fact is another's demonstration
    if missing:
        raise FactftError(f"{where}: the facts lack columns {missing}; they have {list(facts.columns)}")
    if fmt == "multiple_choice":
        check_choices(facts, where)
    if facts.empty:
        return pd.Series([], index=facts.index, dtype="float64", name="model_confidence")
    loaded, tokenizer = load_model(model, device=device)
    prompt = chat_prompt(model, tokenizer, prompt)
    scores = confidence_scores(
        loaded, tokenizer, facts, shots, prompt, fmt, batch_size=batch_size, choice_score=choice_score, where=where
    )
    log.info("%s: %d facts, %d shots, mean confidence %.4f", where, len(facts), shots, float(scores.mean()))
    return pd.Series(np.clip(scores, 0.0, 1.0), index=facts.index, dtype="float64", name="model_confidence")
