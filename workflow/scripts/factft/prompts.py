"""QA prompts and training examples: one place that turns a fact into text and tokens.

A prompt block has a question `template` ({question}; for multiple choice also {choices},
the options as lettered lines "A. ...") and an `answer` template ({answer}, the answer's
text; for multiple choice also {letter}, the choice's letter: MMLU's usual format).
"""

from __future__ import annotations

import logging
import re
import string
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from factft.errors import FactftError

log = logging.getLogger(__name__)

# Labels the loss ignores (torch.nn.CrossEntropyLoss's default ignore_index).
IGNORE = -100
# Demonstrations are a fixed draw: the same facts and seed give the same prompts.
DEMO_SEED = 0
LETTERS = string.ascii_uppercase
# The fields each template may fill; any other {word} in one is a typo (factft.config says so).
FIELDS = {"template": ("question", "choices"), "answer": ("answer", "letter")}
_FIELD = re.compile(r"\{(" + "|".join(field for fields in FIELDS.values() for field in fields) + r")\}")


def fill(template: str, **fields: str) -> str:
    """`template` with its {field}s replaced, in one pass: a value's own braces stay as they
    are, and so does any other brace (a user's template may hold literal ones)."""
    return _FIELD.sub(lambda m: fields.get(m.group(1), m.group(0)), template)


def prompt_text(question: str, template: str) -> str:
    """The question prompt, e.g. 'Q: Where was X born? A:'."""
    return fill(template, question=question)


def answer_text(answer: str, template: str) -> str:
    """The target text after the prompt, e.g. ' Lyon' (the leading space belongs to the answer)."""
    return fill(template, answer=answer)


def chat_prompt(spec: dict, tokenizer, prompt: dict) -> dict:
    """The prompt block for the model in `spec`: as it is, or for an instruction-tuned model
    (models.<name>.chat) with its own chat template around each prompt (see in_turn).

    Each prompt is the user's turn and the answer is the assistant's reply, so it loses the
    leading space that follows "A:" in plain text, unless the template opens replies with one
    (Llama 2's). Few-shot demonstrations are the earlier turns of the conversation. The block
    records the template's text between the turns: `turn` (before and after the question) and
    `reply` (before and after a demonstration's answer). Where the template ends a reply with a
    token of its own that is not eos (Gemma's <end_of_turn>, Phi-3's <|end|>), `stop` names it:
    replies are trained to end with it and generation stops at it. The template's opening bos is
    left to the tokenizer, which adds its own.
    models.<name>.system_prompt opens the conversation as its system turn (in `turn`'s head);
    models.<name>.chat_template_kwargs are the template's variables (Qwen3's enable_thinking).
    The prompts are built turn by turn, so the template must write each turn the same wherever
    it falls: checked against its own rendering of zero and two demonstrations.
    """
    if not spec.get("chat"):
        return prompt
    name = spec["name"]
    if not getattr(tokenizer, "chat_template", None):
        raise FactftError(f"model '{name}': models.{name}.chat is on, but its tokenizer has no chat template")
    marker = "\x00"
    system = spec.get("system_prompt")
    where = f"model '{name}' (models.{name}.chat" + (f", models.{name}.system_prompt)" if system else ")")
    variables = spec.get("chat_template_kwargs", {})

    def render(shots: int) -> str:
        """The template's text of `shots` demonstrations and a question, each text a marker."""
        conversation = [{"role": "system", "content": system}] if system else []
        for role in ("user", "assistant") * shots + ("user",):
            conversation.append({"role": role, "content": marker})
        try:
            return tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False, **variables)
        except Exception as error:  # the template's own raise_exception, or a variable it lacks
            turns = ["a system turn"] * bool(system) + ["a user turn", "a reply"] * shots + ["a user turn"]
            raise FactftError(f"{where}: its chat template fails on {', '.join(turns)}: {error}") from None

    rendered = render(1)
    pieces = rendered.split(marker)
    if len(pieces) != 4:
        raise FactftError(
            f"{where}: its chat template does not render a conversation of two user turns and a reply, "
            f"which few-shot demonstrations are: {rendered!r}"
        )
    head, reply_head, reply_tail, tail = pieces
    demo = marker + reply_head + marker + reply_tail
    if render(0) != head + marker + tail or render(2) != head + demo * 2 + marker + tail:
        # Mistral's newer templates put the system prompt into the last user turn, wherever it falls.
        raise FactftError(
            f"{where}: its chat template writes a turn differently by where it falls in the conversation, "
            "so its prompts cannot be built turn by turn"
            + ("; write the instruction at the start of the dataset's prompt.template instead" if system else "")
        )
    if "strftime_now" in str(tokenizer.chat_template) and not variables:
        # Llama 3.1's system turn holds today's date: a finetune and its evaluation days apart
        # would read different prompts.
        log.warning(
            "model '%s': its chat template writes today's date into each prompt; fix the date with "
            "models.%s.chat_template_kwargs (Llama 3.1: {date_string: 26 Jul 2024})",
            name,
            name,
        )
    bos = tokenizer.bos_token
    if bos and head.startswith(bos) and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]:
        head = head[len(bos) :]
    # Llama 2's template writes a reply's opening space in the reply's turn (" [/INST] Lyon"), after
    # the generation prompt (" [/INST]"): the answer starts with it, as the model read its replies.
    opening = reply_head[len(tail) :] if reply_head.startswith(tail) else ""
    opening = "" if opening.strip() else opening  # a space, never a turn's header
    reply = [reply_head[: len(reply_head) - len(opening)], reply_tail]
    block = {**prompt, "answer": opening + prompt["answer"].lstrip(), "turn": [head, tail], "reply": reply}
    stop = _reply_stop(tokenizer, reply_tail)
    return block if stop is None else {**block, "stop": stop}


def _reply_stop(tokenizer, reply_tail: str) -> str | None:
    """The template's token that ends its replies, where it is not eos: the first added token
    after a reply (flagged special or not: some tokenizers leave their turn markers unflagged)."""
    added = set(tokenizer.added_tokens_decoder)
    ids = tokenizer(reply_tail, add_special_tokens=False)["input_ids"]
    first = next((i for i in ids if i in added), None)
    if first is None or first == tokenizer.eos_token_id:
        return None
    return tokenizer.convert_ids_to_tokens(first)


def reply_end_id(tokenizer, prompt: dict) -> int | None:
    """The token that ends an answer: the chat template's `stop`, else eos."""
    if "stop" in prompt:
        return tokenizer.convert_tokens_to_ids(prompt["stop"])
    return tokenizer.eos_token_id


def in_turn(prompt: dict, text: str) -> str:
    """`text` as the user's turn of a chat_prompt block; unchanged for any other block."""
    head, tail = prompt.get("turn", ("", ""))
    return head + text + tail


def letters(choices: Sequence) -> str:
    """A letter for each choice, A for the first."""
    if len(choices) > len(LETTERS):
        raise FactftError(f"{len(choices)} choices: the prompt's letters go from A to Z ({len(LETTERS)})")
    return LETTERS[: len(choices)]


def lettered(choices: Sequence) -> str:
    """The options as lines 'A. first', 'B. second', ..."""
    return "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters(choices), choices))


def fact_prompt(fact: Mapping, template: str) -> str:
    """A fact's question prompt; a multiple-choice fact's options fill {choices}."""
    choices = fact.get("choices")
    if choices is None or "{choices}" not in template:
        return prompt_text(str(fact["question"]), template)
    try:
        return fill(template, question=str(fact["question"]), choices=lettered(choices))
    except FactftError as error:
        raise FactftError(f"{error}: {fact['question']!r}") from None


def choice_answers(choices: Sequence, template: str) -> list[str]:
    """Each choice's target text: its text as {answer}, its letter as {letter}."""
    if "{letter}" not in template:
        return [answer_text(str(choice), template) for choice in choices]
    return [fill(template, answer=str(choice), letter=letter) for letter, choice in zip(letters(choices), choices)]


def gold_answer(fact: Mapping, template: str) -> str:
    """The target a fact is trained on: its gold choice's for multiple choice, else answers[0]'s."""
    choices = fact.get("choices")
    if choices is not None and fact.get("answer_index") is not None:
        return choice_answers(choices, template)[int(fact["answer_index"])]
    return answer_text(str(fact["answers"][0]), template)


def encode_example(tokenizer, prompt: str, answer: str, max_length: int, end_id: int | None = None) -> dict:
    """Token ids of prompt + answer + eos (or `end_id`: see reply_end_id), with labels -100 on
    every prompt token, and `cut`: how many tokens max_length dropped.

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
    end_id = tokenizer.eos_token_id if end_id is None else end_id
    if end_id is not None and (not answer_ids or answer_ids[-1] != end_id):
        answer_ids = answer_ids + [end_id]
    full_length = len(prompt_ids) + len(answer_ids)
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
        "cut": full_length - len(prompt_ids) - len(answer_ids),
    }


def few_shot_prefixes(
    facts: pd.DataFrame,
    shots: int,
    prompt: dict,
    seed: int = DEMO_SEED,
    demos: pd.DataFrame | None = None,
) -> list[str]:
    """Per fact, `shots` solved demonstrations, one per line (a blank line between prompts of
    several lines), ending in a newline; for a chat_prompt block, the conversation's earlier
    turns, each a question and its reply (in_turn puts the fact's own question after them).

    They are drawn from `demos` (for evaluation: the finetuning pool, whose subjects the test
    set never shares) or, without it, from the other facts of `facts` (popularity scoring).
    Demonstrations come from the fact's own relation when it has enough of them (the model
    then sees the expected answer type), topped up from the whole table otherwise. Each fact
    draws its own, seeded, as lm-eval draws per document: a relation's questions sharing one
    set would rest the reference on that one draw. A fact is never its own demonstration, nor
    is a fact with the same question.
    """
    if shots == 0:
        return [""] * len(facts)
    records = facts.to_dict("records")
    candidates = records if demos is None else demos.to_dict("records")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(candidates))
    by_relation: dict[str, list[int]] = defaultdict(list)
    for j in order:
        by_relation[str(candidates[j]["relation"])].append(int(j))
    # A chat model's demonstrations are earlier turns of its conversation (chat_prompt).
    reply_head, reply_tail = prompt.get("reply", ("", None))
    demo_text = {}
    prefixes, short = [], 0
    for i, fact in enumerate(records):
        picks: list[int] = []
        # Any 2*shots+1 candidates hold `shots` usable ones, unless the table is too small.
        for pool in (by_relation[str(fact["relation"])], order):
            if len(picks) == shots:
                break
            drawn = rng.choice(len(pool), size=min(len(pool), 2 * shots + 1), replace=False)
            for j in (pool[k] for k in drawn):
                if len(picks) == shots:
                    break
                itself = demos is None and j == i
                # No question twice in one prompt, the fact's own among them (a name two subjects share).
                asked = [fact["question"], *(candidates[k]["question"] for k in picks)]
                if not itself and j not in picks and candidates[j]["question"] not in asked:
                    picks.append(int(j))
        for j in picks:
            if j not in demo_text:
                demo = candidates[j]
                answer = gold_answer(demo, prompt["answer"])
                text = fact_prompt(demo, prompt["template"]) + reply_head + answer
                # A demonstration of several lines (a question and its options) needs a blank line to end it.
                demo_text[j] = text + (reply_tail if reply_tail is not None else "\n\n" if "\n" in text else "\n")
        prefixes.append("".join(demo_text[j] for j in picks))
        short += len(picks) < shots
    if short:
        log.warning(
            "%d of %d prompts have fewer than the %d demonstrations asked for: too few facts to draw them from",
            short, len(records), shots,
        )  # fmt: skip
    return prefixes


def text_key(text) -> str:
    """A question or an answer as compared for repeats and for subjects that share a question:
    in any case and spacing ("What is X?" and "what is  x?" prompt the same answer)."""
    return " ".join(str(text).casefold().split())


def prompt_keys(facts: pd.DataFrame) -> pd.Series:
    """Per fact, what its prompt shows: the question (text_key) and the choices, in their order."""
    choices = facts["choices"].map(tuple) if "choices" in facts else pd.Series([()] * len(facts), index=facts.index)
    return pd.Series(list(zip(facts["question"].map(text_key), choices)), index=facts.index)
