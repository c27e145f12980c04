"""QA prompts and training examples: one place that turns a fact into text and tokens."""

from __future__ import annotations

from collections.abc import Mapping

# Labels the loss ignores (torch.nn.CrossEntropyLoss's default ignore_index).
IGNORE = -100


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
