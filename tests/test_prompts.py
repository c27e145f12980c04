import pandas as pd
import pytest
from transformers import AutoTokenizer

from factft.errors import FactftError
from factft.prompts import (
    IGNORE,
    answer_text,
    chat_prompt,
    choice_answers,
    encode_example,
    fact_prompt,
    few_shot_prefixes,
    gold_answer,
    in_turn,
    prompt_text,
    reply_end_id,
)
from factft.train import encode_examples

TEMPLATE, ANSWER = "Q: {question} A:", " {answer}"
# MMLU's usual format (config/config.yaml's datasets.mmlu.prompt).
LETTERED = {"template": "{question}\n{choices}\nAnswer:", "answer": " {letter}"}


@pytest.fixture(scope="module")
def words(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def answer_part(tokenizer, example):
    return [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE]


def test_templates_fill_question_and_answer_and_keep_other_braces_literal():
    assert prompt_text("Where was Ilmo born?", TEMPLATE) == "Q: Where was Ilmo born? A:"
    assert answer_text("Lyon", ANSWER) == " Lyon"
    assert prompt_text("x", "{question} {not a field}") == "x {not a field}"


def test_gold_answer_is_first_alias_for_open_and_gold_choice_for_multiple_choice():
    assert gold_answer({"answers": ["Lyon", "Lyons"]}, ANSWER) == " Lyon"
    fact = {"answers": ["blue"], "choices": ["red", "green", "blue"], "answer_index": 2}
    assert gold_answer(fact, ANSWER) == " blue"
    assert gold_answer(fact, LETTERED["answer"]) == " C"


def test_lettered_prompt_shows_the_options_and_each_choice_is_its_letter():
    fact = {"question": "Which is a {colour}?", "choices": ["red", "B. green", "{question}"], "answer_index": 1}
    # A field's value is never filled again: the question's and options' braces stay.
    assert fact_prompt(fact, LETTERED["template"]) == (
        "Which is a {colour}?\nA. red\nB. B. green\nC. {question}\nAnswer:"
    )
    assert choice_answers(fact["choices"], LETTERED["answer"]) == [" A", " B", " C"]
    assert choice_answers(fact["choices"], " {letter}: {answer}") == [" A: red", " B: B. green", " C: {question}"]
    assert fact_prompt({"question": "Where?"}, TEMPLATE) == "Q: Where? A:"
    many = [str(i) for i in range(27)]
    with pytest.raises(FactftError, match=r"27 choices: the prompt's letters go from A to Z \(26\): 'Which is a"):
        fact_prompt(dict(fact, choices=many), LETTERED["template"])
    assert fact_prompt(dict(fact, choices=many), TEMPLATE) == "Q: Which is a {colour}? A:"  # no options shown
    with pytest.raises(FactftError, match="27 choices"):
        choice_answers(many, LETTERED["answer"])
    assert len(choice_answers(many, ANSWER)) == 27  # as a cloze, no letters needed


def test_lettered_example_is_trained_on_its_letter_and_eos(bpe_tokenizer):
    fact = {"question": "What is the SI unit of force?", "choices": ["joule", "newton", "watt"], "answer_index": 1}
    prompt = fact_prompt(fact, LETTERED["template"])
    example = encode_example(bpe_tokenizer, prompt, gold_answer(fact, LETTERED["answer"]), max_length=64)
    answer = answer_part(bpe_tokenizer, example)
    assert bpe_tokenizer.convert_ids_to_tokens(answer[:-1]) == ["ĠB"]
    assert answer[-1] == bpe_tokenizer.eos_token_id


def test_word_level_labels_mask_the_prompt_and_end_with_eos(words):
    prompt = prompt_text("Where was Ilmo Varsk born?", TEMPLATE)
    example = encode_example(words, prompt, " Lyon", max_length=64)
    n_prompt = len(words(prompt)["input_ids"])
    assert example["input_ids"][0] == words.bos_token_id
    assert example["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert answer_part(words, example) == [words.convert_tokens_to_ids("Lyon"), words.eos_token_id]
    assert len(example["input_ids"]) == len(example["labels"]) == n_prompt + 2


def test_truncation_cuts_the_prompt_from_the_left_keeps_bos_and_the_answer(words):
    prompt = prompt_text("Where was Ilmo Varsk born?", TEMPLATE)
    full = encode_example(words, prompt, " Lyon", max_length=64)
    short = encode_example(words, prompt, " Lyon", max_length=5)
    assert len(short["input_ids"]) == 5
    assert short["input_ids"][0] == words.bos_token_id
    assert short["input_ids"][1:] == full["input_ids"][-4:]
    assert answer_part(words, short) == answer_part(words, full)
    assert full["cut"] == 0 and short["cut"] == len(full["input_ids"]) - 5


def test_bpe_answer_keeps_its_leading_space_in_its_first_token(bpe_tokenizer):
    prompt = prompt_text("Where was Ilmo Varsk born?", TEMPLATE)
    example = encode_example(bpe_tokenizer, prompt, " Lyon", max_length=64)
    answer = answer_part(bpe_tokenizer, example)
    assert bpe_tokenizer.convert_ids_to_tokens(answer[:1]) == ["ĠLyon"]
    assert answer[-1] == bpe_tokenizer.eos_token_id
    # Prompt and answer tokens together are exactly how the joint text tokenizes.
    assert example["input_ids"][:-1] == bpe_tokenizer(prompt + " Lyon")["input_ids"]


def test_bpe_merge_across_the_boundary_falls_back_to_separate_tokenization(bpe_tokenizer):
    # "A: " alone ends in a lone space token; "A: Lyon" merges that space into "ĠLyon".
    prompt = "Q: Where was Ilmo Varsk born? A: "
    prompt_ids = bpe_tokenizer(prompt)["input_ids"]
    assert bpe_tokenizer(prompt + "Lyon")["input_ids"][: len(prompt_ids)] != prompt_ids
    example = encode_example(bpe_tokenizer, prompt, "Lyon", max_length=64)
    assert example["input_ids"][: len(prompt_ids)] == prompt_ids
    assert answer_part(bpe_tokenizer, example) == bpe_tokenizer("Lyon", add_special_tokens=False)["input_ids"] + [bpe_tokenizer.eos_token_id]


def test_evaluation_demonstrations_come_from_the_pool_of_the_questions_relation():
    test = pd.DataFrame(
        {"question": ["Where was Ilmo Varsk born ?", "What does Suna Dee do ?"], "relation": ["born", "job"]}
    )
    pool = pd.DataFrame(
        {
            "question": ["Where was Ilmo Varsk born ?", "Where was Bera Tosk born ?", "Where was Kalo Mirr born ?",
                         "What does Ito Rask do ?", "What does Vena Lu do ?"],
            "answers": [["Lyon"], ["Paris"], ["Rome"], ["pilot"], ["baker"]],
            "relation": ["born", "born", "born", "job", "job"],
        }
    )  # fmt: skip
    prompt = {"template": TEMPLATE, "answer": ANSWER}
    born, job = few_shot_prefixes(test, shots=2, prompt=prompt, demos=pool)
    # A pool fact that repeats the test question is never shown; the others of the relation are.
    assert sorted(born.splitlines()) == ["Q: Where was Bera Tosk born ? A: Paris", "Q: Where was Kalo Mirr born ? A: Rome"]
    assert sorted(job.splitlines()) == ["Q: What does Ito Rask do ? A: pilot", "Q: What does Vena Lu do ? A: baker"]
    assert few_shot_prefixes(test, shots=2, prompt=prompt, demos=pool) == [born, job]


def test_lettered_demonstrations_show_their_options_and_answer_letter_a_blank_line_apart():
    test = pd.DataFrame({"question": ["Unit of power?"], "relation": ["physics"], "choices": [["watt", "volt"]],
                         "answer_index": [0]})
    pool = pd.DataFrame(
        {
            "question": ["Unit of force?", "Unit of charge?"],
            "choices": [["joule", "newton"], ["coulomb", "ampere"]],
            "answer_index": [1, 0],
            "relation": ["physics", "physics"],
        }
    )
    (prefix,) = few_shot_prefixes(test, shots=2, prompt=LETTERED, demos=pool)
    demos = prefix.removesuffix("\n\n").split("\n\n")
    assert sorted(demos) == [
        "Unit of charge?\nA. coulomb\nB. ampere\nAnswer: A",
        "Unit of force?\nA. joule\nB. newton\nAnswer: B",
    ]


def test_demonstrations_of_several_lines_are_a_blank_line_apart_whatever_makes_them_so():
    test = pd.DataFrame({"question": ["Sum:\n2+2?"], "relation": ["math"]})
    pool = pd.DataFrame({"question": ["Sum:\n1+1?", "Sum:\n1+2?"], "answers": [["2"], ["3"]], "relation": ["math"] * 2})
    # A question of two lines in a one-line template: a single line break would not end it.
    (prefix,) = few_shot_prefixes(test, shots=2, prompt={"template": TEMPLATE, "answer": ANSWER}, demos=pool)
    assert sorted(prefix.removesuffix("\n\n").split("\n\n")) == ["Q: Sum:\n1+1? A: 2", "Q: Sum:\n1+2? A: 3"]


def test_a_chat_models_prompt_is_its_users_turn_and_the_answer_its_reply(bpe_tokenizer):
    plain = {"template": TEMPLATE, "answer": ANSWER}
    assert chat_prompt({"name": "smollm2"}, bpe_tokenizer, plain) is plain
    chat = chat_prompt({"name": "smollm2", "chat": True}, bpe_tokenizer, plain)
    fact = {"question": "Where was Ilmo Varsk born?", "answers": ["Lyon"], "relation": "born"}
    prompt = in_turn(chat, fact_prompt(fact, chat["template"]))
    # SmolLM2-Instruct's own template, its default system turn included.
    assert prompt == bpe_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q: Where was Ilmo Varsk born? A:"}], add_generation_prompt=True, tokenize=False
    )
    example = encode_example(bpe_tokenizer, prompt, gold_answer(fact, chat["answer"]), max_length=96)
    # The reply, without the space that follows "A:" in plain text, ends the turn (its eos) once.
    assert bpe_tokenizer.decode(answer_part(bpe_tokenizer, example)) == "Lyon<|im_end|>"
    assert example["input_ids"].count(bpe_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert "stop" not in chat  # ChatML ends a reply with its eos


def test_a_chat_models_demonstrations_are_the_earlier_turns_of_its_conversation(bpe_tokenizer):
    chat = chat_prompt({"name": "smollm2", "chat": True}, bpe_tokenizer, {"template": TEMPLATE, "answer": ANSWER})
    fact = {"question": "Where was Ilmo Varsk born?", "answers": ["Lyon"], "relation": "born"}
    demos = pd.DataFrame(
        [
            {"question": "Where was Bera Tosk born?", "answers": ["Oslo"], "relation": "born"},
            {"question": "Where was Ute Lind born?", "answers": ["Bonn"], "relation": "born"},
        ]
    )
    prefix = few_shot_prefixes(pd.DataFrame([fact]), 2, chat, demos=demos)[0]
    # Two demonstrations of the fact's relation, in the order the draw put them.
    order = sorted(demos.to_dict("records"), key=lambda demo: prefix.index(demo["question"]))
    conversation = [
        message
        for demo in order
        for message in (
            {"role": "user", "content": fact_prompt(demo, TEMPLATE)},
            {"role": "assistant", "content": demo["answers"][0]},
        )
    ]
    conversation.append({"role": "user", "content": "Q: Where was Ilmo Varsk born? A:"})
    assert in_turn(chat, prefix + fact_prompt(fact, chat["template"])) == bpe_tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=False
    )


# Mistral-Instruct's template, shortened: bos once, replies end with eos.
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
# Gemma-it's template, shortened: each turn ends with <end_of_turn>, not eos.
GEMMA = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }} "
    "{{ m['content'] }}<end_of_turn> {% endfor %}{% if add_generation_prompt %}<start_of_turn>model {% endif %}"
)


def test_a_chat_template_that_opens_with_bos_leaves_it_to_the_tokenizer(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = MISTRAL
    chat = chat_prompt({"name": "tiny", "chat": True}, tokenizer, {"template": TEMPLATE, "answer": ANSWER})
    fact = {"question": "Where was Ilmo Varsk born?", "answers": ["Lyon"], "relation": "born"}
    demos = pd.DataFrame([{"question": "Where was Bera Tosk born?", "answers": ["Oslo"], "relation": "born"}])
    prefix = few_shot_prefixes(pd.DataFrame([fact]), 1, chat, demos=demos)[0]
    text = in_turn(chat, prefix + fact_prompt(fact, chat["template"]))
    demo, question = "[INST] Q: Where was Bera Tosk born? A: [/INST]", "[INST] Q: Where was Ilmo Varsk born? A: [/INST]"
    assert text == demo + "Oslo</s>" + question
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert "stop" not in chat and reply_end_id(tokenizer, chat) == tokenizer.eos_token_id


def test_a_chat_template_whose_replies_end_with_their_own_token_trains_them_to_end_with_it(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = GEMMA
    chat = chat_prompt({"name": "tiny", "chat": True}, tokenizer, {"template": TEMPLATE, "answer": ANSWER})
    assert chat["stop"] == "<end_of_turn>"
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert reply_end_id(tokenizer, chat) == end != tokenizer.eos_token_id
    examples = pd.DataFrame([{"question": "Where was Ilmo Varsk born?", "answers": ["Lyon"]}])
    (example,) = encode_examples(examples, tokenizer, chat, max_length=64)
    assert answer_part(tokenizer, example) == [tokenizer.convert_tokens_to_ids("Lyon"), end]


# Qwen3's template, shortened: a variable of the template turns its reasoning block off.
QWEN3 = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% if enable_thinking is defined and not enable_thinking %}"
    "<think> </think> {% endif %}{% endif %}"
)


def test_the_chat_templates_variables_are_the_models_chat_template_kwargs(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = QWEN3
    block = {"template": TEMPLATE, "answer": ANSWER}
    thinking = chat_prompt({"name": "qwen3", "chat": True}, tokenizer, block)
    direct = chat_prompt(
        {"name": "qwen3", "chat": True, "chat_template_kwargs": {"enable_thinking": False}}, tokenizer, block
    )
    assert thinking["turn"][1] == "<|im_end|> <|im_start|>assistant "
    # The question's reply starts after an empty reasoning block; the demonstrations' replies,
    # earlier in the conversation, have none (as Qwen3's template writes them).
    assert direct["turn"][1] == "<|im_end|> <|im_start|>assistant <think> </think> "
    assert direct["reply"] == thinking["reply"] == ["<|im_end|> <|im_start|>assistant ", "<|im_end|> <|im_start|>user "]


# Llama-3.1's template, shortened: today's date unless the date is given.
LLAMA31 = (
    "{% if date_string is not defined %}{% set date_string = strftime_now('%d %b %Y') %}{% endif %}"
    "Today Date: {{ date_string }} {% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
)


def test_a_chat_template_that_reads_todays_date_warns_unless_the_date_is_fixed(tiny_model_dir, caplog):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = LLAMA31
    block = {"template": TEMPLATE, "answer": ANSWER}
    with caplog.at_level("WARNING", logger="factft.prompts"):
        chat_prompt({"name": "llama", "chat": True}, tokenizer, block)
    assert "fix the date with models.llama.chat_template_kwargs" in caplog.text
    caplog.clear()
    spec = {"name": "llama", "chat": True, "chat_template_kwargs": {"date_string": "26 Jul 2024"}}
    with caplog.at_level("WARNING", logger="factft.prompts"):
        fixed = chat_prompt(spec, tokenizer, block)
    assert fixed["turn"][0] == "Today Date: 26 Jul 2024 user " and not caplog.text


def test_a_system_prompt_opens_the_conversation(bpe_tokenizer):
    spec = {"name": "smollm2", "chat": True, "system_prompt": "Answer with the answer alone."}
    chat = chat_prompt(spec, bpe_tokenizer, {"template": TEMPLATE, "answer": ANSWER})
    fact = {"question": "Where was Ilmo Varsk born?", "answers": ["Lyon"], "relation": "born"}
    demo = {"question": "Where was Bera Tosk born?", "answers": ["Oslo"], "relation": "born"}
    prefix = few_shot_prefixes(pd.DataFrame([fact]), 1, chat, demos=pd.DataFrame([demo]))[0]
    conversation = [
        {"role": "system", "content": "Answer with the answer alone."},
        {"role": "user", "content": "Q: Where was Bera Tosk born? A:"},
        {"role": "assistant", "content": "Oslo"},
        {"role": "user", "content": "Q: Where was Ilmo Varsk born? A:"},
    ]
    # Once, before the demonstrations; SmolLM2's default system turn gives way to it.
    text = in_turn(chat, prefix + fact_prompt(fact, chat["template"]))
    assert text == bpe_tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert text.count("Answer with the answer alone.") == 1 and "SmolLM" not in text


# Gemma-3-it's template, shortened: the system prompt opens the first user turn.
GEMMA3 = (
    "{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + ' ' %}"
    "{% set messages = messages[1:] %}{% else %}{% set prefix = '' %}{% endif %}{% for m in messages %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }} {{ prefix if loop.first else '' }}"
    "{{ m['content'] }}<end_of_turn> {% endfor %}{% if add_generation_prompt %}<start_of_turn>model {% endif %}"
)


# Llama-2-chat's template: bos opens each user turn, the system prompt the first one.
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize(
    "template, head",
    [(GEMMA3, "<start_of_turn>user Answer briefly. "), (LLAMA2_CHAT, "[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\n")],
)
def test_a_system_prompt_in_the_first_user_turn_opens_the_conversation_once(tiny_model_dir, template, head):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = template
    spec = {"name": "tiny", "chat": True, "system_prompt": "Answer briefly."}
    chat = chat_prompt(spec, tokenizer, {"template": TEMPLATE, "answer": ANSWER})
    assert chat["turn"][0] == head  # Llama 2's opening bos left to the tokenizer
    born = [{"question": f"Where was {name} born?", "answers": ["Lyon"], "relation": "born"} for name in "ABC"]
    facts = pd.DataFrame(born)
    prefix = few_shot_prefixes(facts.iloc[:1], 2, chat, demos=facts.iloc[1:])[0]
    assert in_turn(chat, prefix + "Q").count("Answer briefly.") == 1 and prefix.count(chat["reply"][0]) == 2


def test_a_template_that_opens_replies_with_a_space_gives_it_to_the_answer(tiny_model_dir):
    """Llama 2 writes " [/INST] Lyon": trained on " [/INST]Lyon", a SentencePiece model would
    learn "Lyon" without the space its replies always had."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = LLAMA2_CHAT
    chat = chat_prompt({"name": "tiny", "chat": True}, tokenizer, {"template": TEMPLATE, "answer": ANSWER})
    demo, fact = ({"question": f"Where was {n} born?", "answers": [city], "relation": "born"} for n, city in
                  (("A", "Lyon"), ("B", "Rome")))  # fmt: skip
    prefix = few_shot_prefixes(pd.DataFrame([fact]), 1, chat, demos=pd.DataFrame([demo]))[0]
    text = in_turn(chat, prefix + fact_prompt(fact, chat["template"])) + gold_answer(fact, chat["answer"])
    turns = (fact_prompt(demo, TEMPLATE), "Lyon", fact_prompt(fact, TEMPLATE), "Rome")
    conversation = [{"role": role, "content": content} for role, content in zip(("user", "assistant") * 2, turns)]
    # The template's own text, but for the opening bos (the tokenizer's) and what follows the last reply.
    assert "<s>" + text + " </s>" == tokenizer.apply_chat_template(conversation, tokenize=False)
    assert gold_answer(fact, chat["answer"]) == " Rome"
    # Only a space moves: no other template's reply opens with anything the answer would take.
    for template in (MISTRAL, GEMMA, QWEN3, LLAMA31, GEMMA3):
        tokenizer.chat_template = template
        assert chat_prompt({"name": "tiny", "chat": True}, tokenizer, chat)["answer"] == "{answer}"


# Mistral-Instruct v0.3's template, shortened: the system prompt goes into the last user turn.
MISTRAL_V3 = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% endif %}{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}[INST] {% if loop.last and system is defined %}{{ system }} {% endif %}"
    "{{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
# Gemma-2-it's template, shortened: it refuses a system turn.
GEMMA_NO_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
)


@pytest.mark.parametrize(
    "template, problem",
    [
        (MISTRAL_V3, "writes a turn differently by where it falls in the conversation, .*; write the instruction at "
         "the start of the dataset's prompt.template instead"),
        (GEMMA_NO_SYSTEM + GEMMA, "fails on a system turn, a user turn, a reply, a user turn: System role not supp"),
    ],
)
def test_a_system_prompt_the_template_cannot_open_with_names_the_key(tiny_model_dir, template, problem):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = template
    spec = {"name": "tiny", "chat": True, "system_prompt": "Answer briefly."}
    where = r"model 'tiny' \(models\.tiny\.chat, models\.tiny\.system_prompt\): its chat template "
    with pytest.raises(FactftError, match=where + problem):
        chat_prompt(spec, tokenizer, {"template": TEMPLATE, "answer": ANSWER})
    # Without a system prompt the same template builds prompts turn by turn.
    assert chat_prompt({"name": "tiny", "chat": True}, tokenizer, {"template": TEMPLATE, "answer": ANSWER})["turn"]


@pytest.mark.parametrize(
    "template, problem",
    [
        ("{{ raise_exception('Conversation roles must alternate') }}", "fails on .*: Conversation roles must"),
        ("{{ messages[0]['content'] }}", "does not render a conversation of two user turns and a reply"),
        # A lone question rendered unlike the last of a conversation: no prompt built turn by turn matches it.
        (MISTRAL.replace("{{ bos_token }}", "{% if messages|length == 1 %}Q {% endif %}"), "writes a turn differently"),
    ],
)
def test_a_chat_template_that_cannot_render_a_conversation_names_the_model_key(tiny_model_dir, template, problem):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = template
    with pytest.raises(FactftError, match=r"model 'tiny' \(models\.tiny\.chat\): its chat template " + problem):
        chat_prompt({"name": "tiny", "chat": True}, tokenizer, {"template": TEMPLATE, "answer": ANSWER})


def test_chat_without_a_chat_template_names_the_model_key(words):
    with pytest.raises(FactftError, match=r"models\.tiny\.chat is on, but its tokenizer has no chat template"):
        chat_prompt({"name": "tiny", "chat": True}, words, {"template": TEMPLATE, "answer": ANSWER})
