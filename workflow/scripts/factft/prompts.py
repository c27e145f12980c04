"""QA prompts and training examples: one place that turns a fact into text and tokens."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import numpy as np
import pandas as pd

# Labels the loss ignores (torch.nn.CrossEntropyLoss's default ignore_index).
IGNORE = -100
# Demonstrations are a fixed draw: the same facts and seed give the same prompts.
DEMO_SEED = 0


def prompt_text(question: str, template: str) -> str:
    """The question prompt, e.g. 'Q: Where was X born? A:'."""
    # replace, not str.format: braces elsewhere in a user's template stay literal.
    return template.replace("{question}", question)


def answer_text(answer: str, template: str) -> str:
    """The target text after the prompt, e.g. ' Lyon' (the leading space belongs to the answer)."""
    return template.replace("{answer}", answer)


def gold_answer(fact: Mapping) -> str:
    """The answer a fact is trained on: the gold choice's text for multiple choice, else answers[0]."""
    choices = fact.get("choices")
    if choices is not None and fact.get("answer_index") is not None:
        return str(choices[int(fact["answer_index"])])
    return str(fact["answers"][0])


def encode_example(tokenizer, prompt: str, answer: str, max_length: int) -> dict:
    """Token ids of prompt + answer + eos, with labels -100 on every prompt token.

    The answer's tokens are the suffix of the joint tokenization beyond the prompt's own
    tokens, so a BPE tokenizer keeps the answer's leading space in its first token, as at
    generation time. When a merge crosses the boundary (the joint tokens do not start with
    the prompt's), the two parts are tokenized separately. Truncation to `max_length` drops
    the prompt's left side (after a leading bos) and keeps the answer.
    """
    prompt_ids = tokenizer(prompt)["input_ids"]
    joint = tokenizer(prompt + answer)["input_ids"]
    if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
        answer_ids = joint[len(prompt_ids) :]
    else:
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    # Learning to emit eos after the answer is what makes generation stop there.
    if tokenizer.eos_token_id is not None and (not answer_ids or answer_ids[-1] != tokenizer.eos_token_id):
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    answer_ids = answer_ids[:max_length]
    room = max_length - len(answer_ids)
    if len(prompt_ids) > room:
        bos = tokenizer.bos_token_id
        head = prompt_ids[:1] if bos is not None and prompt_ids[:1] == [bos] and room > 0 else []
        tail = room - len(head)
        prompt_ids = head + (prompt_ids[len(prompt_ids) - tail :] if tail > 0 else [])
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE] * len(prompt_ids) + answer_ids,
    }


def few_shot_prefixes(
    facts: pd.DataFrame,
    shots: int,
    prompt: dict,
    seed: int = DEMO_SEED,
    demos: pd.DataFrame | None = None,
) -> list[str]:
    """Per fact, `shots` solved demonstrations, one per line, ending in a newline.

    They are drawn from `demos` (for evaluation: the finetuning pool, whose subjects the test
    set never shares) or, without it, from the other facts of `facts` (popularity scoring).
    Demonstrations come from the fact's own relation when it has enough of them (the model
    then sees the expected answer type), topped up from the whole table otherwise. A fact is
    never its own demonstration, nor is a fact with the same question.
    """
    if shots == 0:
        return [""] * len(facts)
    records = facts.to_dict("records")
    candidates = records if demos is None else demos.to_dict("records")
    order = np.random.default_rng(seed).permutation(len(candidates))
    by_relation: dict[str, list[int]] = defaultdict(list)
    for j in order:
        by_relation[str(candidates[j]["relation"])].append(int(j))
    demo_text = {}
    prefixes = []
    for i, fact in enumerate(records):
        picks: list[int] = []
        # The first 2*shots+1 candidates always hold `shots` usable ones, unless the table is too small.
        for pool in (by_relation[str(fact["relation"])], order):
            for j in pool[: 2 * shots + 1]:
                if len(picks) == shots:
                    break
                itself = demos is None and j == i
                if not itself and j not in picks and candidates[j]["question"] != fact["question"]:
                    picks.append(int(j))
        for j in picks:
            if j not in demo_text:
                demo = candidates[j]
                demo_text[j] = prompt_text(str(demo["question"]), prompt["template"]) + answer_text(
                    gold_answer(demo), prompt["answer"]
                )
        prefixes.append("".join(demo_text[j] + "\n" for j in picks))
    return prefixes
