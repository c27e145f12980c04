import copy
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    MistralConfig,
    MistralForCausalLM,
)

from factft import models
from factft.errors import FactftError
from factft.metrics import first_line, score_answers
from factft.generate import (
    answer_logprobs,
    choice_logprobs,
    evaluate_model,
    first_line_breaks,
    generate_texts,
    line_end_flags,
    length_batches,
    predict,
    prompt_answer_ids,
    rounds_by_default,
)
from factft.models import load_model
from factft.prompts import few_shot_prefixes
from conftest import SMOLLM2_GGUF, smollm2_folder

PROMPT = {"template": "Q: {question} A:", "answer": " {answer}"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(peaked_model_dir):
    spec = {"name": "tiny", "path": str(peaked_model_dir), "gguf_file": None, "trust_remote_code": False}
    model, tokenizer = load_model(spec, device="cpu")
    return spec, model, tokenizer


def make_test_table(n=7, with_choices=False):
    subjects = ["Ilmo Varsk", "Bera Tosk", "Kalo Mirr", "Suna Dee", "Ito Rask", "Vena Lu", "Ilmo"]
    questions = [
        "Where was Ilmo Varsk born ?",
        "What does Bera Tosk do ?",
        "Where was Kalo Mirr born ?",
        "What does Suna Dee play ?",
        "Where was Ito Rask born in the ?",
        "What works as Vena Lu ?",
        "Ilmo ?",
    ]
    table = pd.DataFrame(
        {
            "id": [f"q{i}" for i in range(n)],
            "question": questions[:n],
            "answers": [["Lyon"], ["baker"], ["Rome"], ["piano"], ["Oslo"], ["pilot"], ["Milan"]][:n],
            "subject": subjects[:n],
            "relation": ["born", "job", "born", "plays", "born", "job", "born"][:n],
            "popularity": np.arange(n, dtype="float64"),
            "popularity_pct": 100.0 * np.arange(1, n + 1) / n,
            "statement": [f"{s} was born in" for s in subjects[:n]],
        }
    )
    if with_choices:
        table["choices"] = [["Lyon", "Paris", "Rome"], ["baker", "pilot"], ["Rome", "Oslo", "Milan", "Paris"]] * 2 + [
            ["Milan", "Lyon"]
        ]
        table["choices"] = table["choices"][:n]
        table["answer_index"] = [0, 1, 2, 0, 1, 2, 1][:n]
    return table


def test_length_batches_put_similar_lengths_together_longest_first():
    batches = length_batches([3, 9, 1, 9, 5], batch_size=2)
    assert [list(b) for b in batches] == [[1, 3], [4, 0], [2]]


def test_sorted_batched_generation_equals_one_at_a_time_generation(tiny):
    _, model, tokenizer = tiny
    prompts = [f"Q: {q} A:" for q in make_test_table()["question"]]
    batched = generate_texts(model, tokenizer, prompts, max_new_tokens=5, batch_size=3)
    single = generate_texts(model, tokenizer, prompts, max_new_tokens=5, batch_size=1)
    assert batched == single
    # The untouched transformers path (no padding at all) agrees too.
    for prompt, text in zip(prompts, batched):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        direct = model.generate(ids, do_sample=False, max_new_tokens=5, pad_token_id=3)
        tokens = [t for t in direct[0, ids.shape[1] :].tolist() if t != tokenizer.eos_token_id]
        assert text == tokenizer.decode(tokens, skip_special_tokens=True)
    assert len(set(batched)) > 1, "a degenerate model would make this test vacuous"


def test_generation_stops_at_any_eos_of_the_generation_config_and_drops_it(tiny):
    _, model, tokenizer = tiny
    prompt = "Q: Where was Ilmo Varsk born ? A:"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    free = model.generate(ids, do_sample=False, max_new_tokens=4, pad_token_id=3)[0, ids.shape[1] :].tolist()
    # Declare the second generated token an eos (as Llama 3 lists several): output stops before it.
    stopper = free[1]
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stopper]
    try:
        text = generate_texts(model, tokenizer, [prompt], max_new_tokens=4, batch_size=1)[0]
    finally:
        model.generation_config.eos_token_id = original
    assert text == tokenizer.decode(free[: free.index(stopper)])


def test_a_model_folders_decoding_settings_do_not_bend_greedy_answers(tiny, peaked_model_dir, tmp_path):
    from transformers import GenerationConfig

    spec, plain, tokenizer = tiny
    prompts = [f"Q: {q} A:" for q in make_test_table()["question"]]
    # Ending also at token 0 (<unk>), as the folder below declares: some answers run into it.
    greedy = generate_texts(plain, tokenizer, prompts, max_new_tokens=6, batch_size=3, end_ids=[0])
    # The same weights, their folder asking for a repetition penalty and an n-gram ban, as a
    # chat model's folder may: transformers would apply them to every `generate` call.
    shutil.copytree(peaked_model_dir, tmp_path / "model")
    settings = {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "do_sample": True, "temperature": 0.7}
    folder_config = GenerationConfig(bos_token_id=1, eos_token_id=[2, 0], pad_token_id=3, **settings)
    folder_config.save_pretrained(tmp_path / "model")
    model, _ = load_model(dict(spec, path=str(tmp_path / "model")), device="cpu")
    assert generate_texts(model, tokenizer, prompts, max_new_tokens=6, batch_size=3) == greedy
    assert model.generation_config.eos_token_id == [2, 0]  # its end tokens still end answers
    assert greedy != generate_texts(plain, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    ids = [tokenizer(p, return_tensors="pt")["input_ids"] for p in prompts]
    penalized = [plain.generate(i, max_new_tokens=6, pad_token_id=3, repetition_penalty=1.3, no_repeat_ngram_size=2,
                                do_sample=False)[0, i.shape[1]:].tolist() for i in ids]  # fmt: skip
    assert any(
        tokenizer.decode(tokens[: next((k for k, t in enumerate(tokens) if t in (0, 2)), None)]) != text
        for tokens, text in zip(penalized, greedy)
    ), "the settings must change some answer, or this test shows nothing"


def test_an_answer_ends_at_its_chat_templates_end_of_reply(tiny):
    """A chat_prompt block's `stop` (Gemma's <end_of_turn>) ends generation, as eos does."""
    _, model, tokenizer = tiny
    test = make_test_table(1)
    ids = tokenizer("Q: " + test["question"][0] + " A:", return_tensors="pt")["input_ids"]
    free = model.generate(ids, do_sample=False, max_new_tokens=4, pad_token_id=3)[0, ids.shape[1] :].tolist()
    block = dict(PROMPT, stop=tokenizer.convert_ids_to_tokens(free[1]))
    plain, ended = (
        predict(model, tokenizer, test, fmt="open", prompt=prompt, max_new_tokens=4, batch_size=1)
        for prompt in (PROMPT, block)
    )
    assert ended["prediction"][0] == tokenizer.decode(free[: free.index(free[1])])
    assert len(plain["prediction"][0]) > len(ended["prediction"][0])


class EndsAfter(LogitsProcessor):
    """Forces eos once a row's answer (the tokens after its last ':') is as long as `lengths`
    says for the question's word before '?': answers of set lengths that follow a question
    through batching and decoding rounds."""

    def __init__(self, tokenizer, lengths: dict[str, int]):
        self.lengths = torch.full((len(tokenizer),), 10**6)
        for word, length in lengths.items():
            self.lengths[tokenizer.convert_tokens_to_ids(word)] = length
        self.colon, self.eos = tokenizer.convert_tokens_to_ids(":"), tokenizer.eos_token_id

    def __call__(self, input_ids, scores):
        columns = torch.arange(input_ids.shape[1])
        start = torch.where(input_ids == self.colon, columns, -1).max(-1).values + 1
        word = input_ids.gather(1, (start - 4).clamp(min=0)[:, None])[:, 0]  # [word, "?", "A", ":"]
        ended = input_ids.shape[1] - start >= self.lengths[word]
        scores[ended] = float("-inf")
        scores[ended, self.eos] = 0.0
        return scores


def test_decoding_in_rounds_gives_the_answers_of_one_pass(tiny, caplog):
    _, model, tokenizer = tiny
    prompts = [f"Q: {q} A:" for q in make_test_table()["question"]]
    # Rows that end at once, within the first round (4 tokens), after it, and never.
    ends = LogitsProcessorList([EndsAfter(tokenizer, {"Ilmo": 0, "do": 1, "the": 6, "<unk>": 3})])
    options = dict(max_new_tokens=11, logits_processor=ends)
    one_pass = generate_texts(model, tokenizer, prompts, batch_size=7, rounds=False, **options)
    words = sorted(len(text.split()) for text in one_pass)  # a generated <unk> decodes to nothing
    assert words[:2] == [0, 1] and 4 < words[3] <= 6 and words[-3:] == [11, 11, 11]
    for batch_size in (1, 3, 7):
        caplog.clear()
        with caplog.at_level("INFO", logger="factft.generate"):
            rounds = generate_texts(model, tokenizer, prompts, batch_size=batch_size, rounds=True, **options)
        assert rounds == one_pass
    # The 6-token answer and the 3 endless ones continue after the first round.
    assert [r.getMessage() for r in caplog.records] == [
        "decoding up to 4 new tokens: 7 rows in 1 batches",
        "decoding up to 11 new tokens: 4 rows in 1 batches",
        "3 of 7 answers reached max_new_tokens (11) without ending",
    ]


def test_rounds_are_the_default_everywhere_but_on_cuda():
    # Measured: on an H200 one round decoded faster where answers end (speed-cuda.tsv); on a CPU
    # rounds win there (speed-cpu.tsv).
    assert rounds_by_default("cpu") and rounds_by_default(torch.device("cpu"))
    assert not rounds_by_default("cuda") and not rounds_by_default(torch.device("cuda", 0))


def test_where_most_answers_run_long_the_remaining_batches_decode_in_one_round(tiny, caplog):
    _, model, tokenizer = tiny
    prompts = [f"Q: {q} A:" for q in make_test_table()["question"]]
    endless = LogitsProcessorList([EndsAfter(tokenizer, {})])
    options = dict(max_new_tokens=11, batch_size=2, logits_processor=endless)
    with caplog.at_level("INFO", logger="factft.generate"):
        rounds = generate_texts(model, tokenizer, prompts, rounds=True, **options)
    assert rounds == generate_texts(model, tokenizer, prompts, rounds=False, **options)
    # The first batch's 2 rows ran 4 tokens and did not end: the other 5 went on to 11 at once.
    assert [r.getMessage() for r in caplog.records] == [
        "decoding up to 4 new tokens: 7 rows in 4 batches",
        "most answers run past 4 new tokens: 5 rows decoded to the end at once",
        "decoding up to 11 new tokens: 2 rows in 1 batches",
        "7 of 7 answers reached max_new_tokens (11) without ending",
    ]


def _direct_logprob(model, tokenizer, prompt, answer):
    prompt_ids, answer_ids = prompt_answer_ids(tokenizer, prompt, answer)
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(float(logprobs[len(prompt_ids) + k - 1, t]) for k, t in enumerate(answer_ids))


def test_batched_answer_likelihoods_equal_a_direct_unpadded_computation(tiny):
    _, model, tokenizer = tiny
    prompts = ["Q: Where was Ilmo Varsk born ? A:", "Q: What does Bera Tosk do ? A:", "Q: Where ? A:"]
    answers = [" Lyon", " works as a baker", " in the Paris ."]
    scores = answer_logprobs(model, tokenizer, prompts, answers, batch_size=2)
    direct = [_direct_logprob(model, tokenizer, p, a) for p, a in zip(prompts, answers)]
    np.testing.assert_allclose(scores, direct, rtol=1e-4, atol=1e-4)


def test_multiple_choice_picks_the_most_likely_choice(tiny):
    _, model, tokenizer = tiny
    test = make_test_table(with_choices=True)
    predictions = predict(model, tokenizer, test, fmt="multiple_choice", prompt=PROMPT, max_new_tokens=4, batch_size=4)
    prompts = [f"Q: {q} A:" for q in test["question"]]
    options = [[f" {c}" for c in choices] for choices in test["choices"]]
    batched = choice_logprobs(model, tokenizer, prompts, options, batch_size=4)
    for row, (prompt, choices) in enumerate(zip(prompts, options)):
        direct = [_direct_logprob(model, tokenizer, prompt, c) for c in choices]
        np.testing.assert_allclose(batched[row], direct, rtol=1e-4, atol=1e-4)
        assert predictions["choice"].iloc[row] == int(np.argmax(direct))
        assert predictions["prediction"].iloc[row] == test["choices"].iloc[row][int(np.argmax(direct))]
    expected = predictions["choice"].to_numpy() == test["answer_index"].to_numpy()
    assert list(score_answers(test, predictions, "multiple_choice")["correct"]) == list(expected)
    # evaluate.choice_score: mean: each choice's log-likelihood per token. A long last choice
    # loses by summing and wins per token in some rows.
    test["choices"] = [[*c[:-1], f"{c[-1]} , a city or a job in the land of {c[0]}"] for c in test["choices"]]
    options = [[f" {c}" for c in choices] for choices in test["choices"]]
    totals = choice_logprobs(model, tokenizer, prompts, options, batch_size=4)
    lengths = [np.array([len(prompt_answer_ids(tokenizer, p, c)[1]) for c in row]) for p, row in zip(prompts, options)]
    per_token = predict(
        model, tokenizer, test, fmt="multiple_choice", prompt=PROMPT, max_new_tokens=4, batch_size=4, choice_score="mean"
    )
    assert list(per_token["choice"]) == [int(np.argmax(t / n)) for t, n in zip(totals, lengths)]
    assert list(per_token["choice"]) != [int(np.argmax(t)) for t in totals]


def test_lettered_multiple_choice_picks_the_likeliest_letter_after_the_options(bpe_tokenizer):
    # A real BPE tokenizer: each letter is its own token (the tiny model's words have none).
    model = sliding_window_model(len(bpe_tokenizer))
    test = make_test_table(with_choices=True)
    lettered = {"template": "{question}\n{choices}\nAnswer:", "answer": " {letter}"}
    predictions = predict(model, bpe_tokenizer, test, fmt="multiple_choice", prompt=lettered, max_new_tokens=4,
                          batch_size=4)
    for row, fact in enumerate(test.to_dict("records")):
        options = "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCD", fact["choices"]))
        prompt = f"{fact['question']}{options}\nAnswer:"
        direct = [_direct_logprob(model, bpe_tokenizer, prompt, f" {letter}") for letter in "ABCD"[: len(fact["choices"])]]
        assert predictions["choice"].iloc[row] == int(np.argmax(direct))
        assert predictions["prediction"].iloc[row] == fact["choices"][int(np.argmax(direct))]
    scored = score_answers(test, predictions, "multiple_choice")
    assert list(scored["correct"]) == list(predictions["choice"] == test["answer_index"])


def sliding_window_model(vocab_size: int):
    """A random Mistral-shaped model whose sliding window (6) is shorter than the prompts."""
    config = MistralConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=6, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    return MistralForCausalLM(config).eval()


def hybrid_model(vocab_size: int, layers: int = 2):
    """A random Jamba-shaped model: Mamba layers, each followed by an attention layer (a cache of both kinds)."""
    from transformers import JambaConfig, JambaForCausalLM

    config = JambaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, num_experts=1, mamba_d_state=8,
        mamba_dt_rank=4, pad_token_id=3,
    )  # fmt: skip
    torch.manual_seed(0)
    return JambaForCausalLM(config).eval()


@pytest.mark.parametrize("architecture", ["llama", "mistral", "jamba"])
def test_choices_scored_from_one_pass_over_the_prompt_equal_each_choice_scored_in_full(tiny, architecture):
    _, model, tokenizer = tiny
    if architecture == "mistral":
        model = sliding_window_model(len(tokenizer))
    elif architecture == "jamba":
        model = hybrid_model(len(tokenizer))
    demo = "Q: Where was Kalo Mirr born ? A: Rome\n"
    prompts = [demo * 3 + "Q: Where was Ilmo Varsk born ? A:", "Q: What does Bera Tosk do ? A:", "Q: Ilmo ? A:"]
    options = [[" Lyon", " in the city of Paris", " Rome ."], [" baker", " a pilot of planes"], [" Milan", " Oslo"]]
    flat = answer_logprobs(
        model, tokenizer, [p for p, o in zip(prompts, options) for _ in o], [c for o in options for c in o], batch_size=64
    )
    expected = np.split(flat, np.cumsum([len(o) for o in options])[:-1])
    for batch_size in (3, 64):  # one question per pass; every question in one left-padded pass
        shared = choice_logprobs(model, tokenizer, prompts, options, batch_size=batch_size)
        for got, want in zip(shared, expected):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # An empty choice has no tokens: its score would be 0, above every real choice's.
    with pytest.raises(FactftError, match=r"choice 1 of 'Q: Ilmo \? A:' has no tokens"):
        choice_logprobs(model, tokenizer, prompts, [*options[:2], [" Milan", "", " Oslo"]], batch_size=3)


def test_evaluate_model_writes_answers_in_test_order(tiny, tmp_path):
    spec, _, _ = tiny
    test = make_test_table().sample(frac=1.0, random_state=1).reset_index(drop=True)
    params = {"format": "open", "prompt": PROMPT, "max_new_tokens": 3, "batch_size": 3}
    answers = evaluate_model(spec, test, params, threads=1, device="cpu")
    assert list(answers.columns) == ["id", "prediction"]
    assert list(answers["id"]) == list(test["id"])


def test_a_model_that_answers_nothing_is_warned_about(tiny, tmp_path, caplog):
    """A model whose every answer is empty (here each is one <unk>, which decoding drops) scores
    0 with no error: the log says why, where a user would otherwise read a plain 0.0."""
    model = LlamaForCausalLM.from_pretrained(tiny[0]["path"])
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: greedy takes id 0, <unk>
    model.save_pretrained(tmp_path / "mute")
    AutoTokenizer.from_pretrained(tiny[0]["path"]).save_pretrained(tmp_path / "mute")
    spec = dict(tiny[0], path=str(tmp_path / "mute"))
    params = {"format": "open", "prompt": PROMPT, "max_new_tokens": 3, "batch_size": 3}
    with caplog.at_level("WARNING"):
        predictions = evaluate_model(spec, make_test_table(), params, threads=1, device="cpu")
    assert (predictions["prediction"].str.strip() == "").all()
    assert "7 of 7 answers are empty" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        evaluate_model(tiny[0], make_test_table(), params, threads=1, device="cpu")
    assert "answers are empty" not in caplog.text


def test_cloze_continues_the_statement_instead_of_the_question(tiny):
    spec, model, tokenizer = tiny
    test = make_test_table()
    params = {"format": "open", "prompt": PROMPT, "max_new_tokens": 3, "batch_size": 4}
    predictions = evaluate_model(spec, test, params, prompt_column="statement", device="cpu")
    expected = generate_texts(model, tokenizer, list(test["statement"]), max_new_tokens=3, batch_size=1)
    assert list(predictions["prediction"]) == expected


def test_few_shot_evaluation_puts_pool_demonstrations_before_each_question(tiny):
    spec, model, tokenizer = tiny
    test, pool = make_test_table().iloc[:4], make_test_table().iloc[4:]
    params = {"format": "open", "prompt": PROMPT, "max_new_tokens": 3, "batch_size": 4}
    predictions = evaluate_model(spec, test, params, shots=2, demos=pool, device="cpu")
    prefixes = few_shot_prefixes(test, 2, PROMPT, demos=pool)
    assert all(prefix.count("\n") == 2 for prefix in prefixes)
    prompts = [prefix + f"Q: {q} A:" for prefix, q in zip(prefixes, test["question"])]
    assert list(predictions["prediction"]) == generate_texts(model, tokenizer, prompts, max_new_tokens=3, batch_size=1)


def test_a_prompt_beyond_the_models_context_is_an_error_naming_the_settings(tiny):
    _, model, tokenizer = tiny
    words = " ".join(["Lyon"] * model.config.max_position_embeddings)
    with pytest.raises(FactftError, match=r"exceeds the model's context of \d+ positions; .*evaluate.fewshot"):
        generate_texts(model, tokenizer, ["Q: short A:", words], max_new_tokens=2, batch_size=2)
    # Likelihoods past the context are noise too: multiple choice and model_confidence scoring.
    with pytest.raises(FactftError, match=r"a prompt with its longest choice, of the most tokens, exceeds"):
        choice_logprobs(model, tokenizer, ["Q: short A:", words], [[" Lyon", " Paris"]] * 2, batch_size=4)
    with pytest.raises(FactftError, match=r"a prompt with its answer, of the most tokens, exceeds"):
        answer_logprobs(model, tokenizer, ["Q: short A:", words], [" Lyon"] * 2, batch_size=4)


def test_a_multimodal_models_context_is_that_of_its_text_model(tiny):
    # Gemma 3 (4B and up) loads as Gemma3ForConditionalGeneration: positions in its text_config.
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    _, _, tokenizer = tiny
    n = len(tokenizer)
    text = dict(
        vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=3,
    )  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28)
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=n - 1,
        boi_token_index=n - 2, eoi_token_index=n - 3,
    )  # fmt: skip
    model = Gemma3ForConditionalGeneration(config).eval()
    words = " ".join(["Lyon"] * 64)
    with pytest.raises(FactftError, match=r"exceeds the model's context of 64 positions"):
        generate_texts(model, tokenizer, ["Q: short A:", words], max_new_tokens=2, batch_size=2)


def test_a_state_space_model_is_refused_where_a_kv_cache_or_attention_weights_are_needed(tiny):
    from transformers import MambaConfig, MambaForCausalLM

    from factft.attention import last_position_attention, prompt_tokens

    _, _, tokenizer = tiny
    config = MambaConfig(vocab_size=len(tokenizer), hidden_size=32, state_size=8, num_hidden_layers=2, pad_token_id=3)
    torch.manual_seed(0)
    model = MambaForCausalLM(config).eval()
    with pytest.raises(FactftError, match="continues every choice from its prompt's KV cache, and MambaForCausalLM"):
        choice_logprobs(model, tokenizer, ["Q: Where was Lu born? A:"], [[" Lyon", " Oslo"]], batch_size=2)
    prompt = prompt_tokens(tokenizer, "Where was Lu born?", "Lu", "Q: {question} A:")
    with pytest.raises(FactftError, match="MambaForCausalLM returned no attention weights"):
        last_position_attention(model, [prompt], pad_id=3, batch_size=1)


def test_logits_of_nan_or_inf_stop_an_evaluation_before_it_answers(fp16_overflow_model_dir, tmp_path, monkeypatch):
    spec = {"name": "big", "path": str(fp16_overflow_model_dir), "gguf_file": None, "trust_remote_code": False}
    params = {"format": "open", "prompt": PROMPT, "max_new_tokens": 3, "batch_size": 4}
    predictions = evaluate_model(spec, make_test_table(), params, device="cpu")  # in fp32 it answers
    assert predictions["prediction"].str.len().gt(0).any()
    with monkeypatch.context() as patch:
        patch.setattr(models, "compute_dtype", lambda device: torch.float16)  # a V100's or T4's
        with pytest.raises(FactftError) as error:
            evaluate_model(spec, make_test_table(), params, device="cpu")
    assert str(error.value) == (
        "model 'big': its logits on 'Q: Where was Ito Rask born in the ? A:' are nan or inf, so its answers would "
        "be noise; it runs in fp16 (this GPU has no bf16), whose range (to 65504) its activations overflow: run it "
        "on a GPU with bf16 (compute capability 8.0 on)"
    )  # the first of the longest batch, which runs first
    model = LlamaForCausalLM.from_pretrained(fp16_overflow_model_dir)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(fp16_overflow_model_dir).save_pretrained(tmp_path)
    broken = dict(spec, name="broken", path=str(tmp_path))
    with pytest.raises(FactftError, match=r"^model 'broken': its logits .* its weights hold nan or inf"):
        evaluate_model(broken, make_test_table(with_choices=True), dict(params, format="multiple_choice"), device="cpu")


def test_logits_turning_nan_on_a_later_prompt_or_mid_answer_stop_it_naming_the_prompt(tiny):
    _, model, tokenizer = tiny
    broken = copy.deepcopy(model)
    with torch.no_grad():  # "doctor" is in no prompt, but in some of the model's answers
        broken.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("doctor")] = float("nan")
    prompts = [f"Q: {q} A:" for q in make_test_table()["question"]]
    answers = generate_texts(model, tokenizer, prompts, max_new_tokens=4, batch_size=2)
    # Logits turn nan once "doctor" is fed back, i.e. when an answer holds it before its last token.
    spoiled = {p for p, a in zip(prompts, answers) if "doctor" in a.split()[:-1]}
    assert spoiled and len(spoiled) < len(prompts)
    assert generate_texts(broken, tokenizer, prompts, max_new_tokens=1, batch_size=2) == [
        a.split()[0] for a in answers
    ]  # the prompts alone give finite logits
    why = "so its answers would be noise; its weights hold nan or inf: check the model folder, or the finetune"
    with pytest.raises(FactftError, match=f"^model 'tiny': its logits on '.*' are nan or inf, {why}") as error:
        generate_texts(broken, tokenizer, prompts, max_new_tokens=4, batch_size=2, where="model 'tiny'")
    assert re.search("its logits on '(.*)' are", str(error.value))[1] in spoiled

    # Likelihoods: only an answer or a choice holding "doctor" reads nan logits.
    targets = ["Lyon", "baker", "Rome", "piano", "doctor Oslo", "pilot", "Milan"]
    assert np.isfinite(answer_logprobs(broken, tokenizer, prompts[:4], targets[:4], batch_size=2)).all()
    with pytest.raises(FactftError, match=f"^the model: its logits on {re.escape(repr(prompts[4]))} are nan or inf"):
        answer_logprobs(broken, tokenizer, prompts, targets, batch_size=2)
    choices = [["Lyon", "Rome"]] * 7
    choices[5] = ["Oslo", "doctor pilot"]
    assert all(np.isfinite(c).all() for c in choice_logprobs(broken, tokenizer, prompts[:5], choices[:5], batch_size=4))
    with pytest.raises(FactftError, match=f"^the model: its logits on {re.escape(repr(prompts[5]))} are nan or inf"):
        choice_logprobs(broken, tokenizer, prompts, choices, batch_size=4)


def test_missing_columns_fail_before_the_model_is_loaded():
    absent = {"name": "absent", "path": "/nonexistent", "gguf_file": None, "trust_remote_code": False}
    params = {"format": "open", "prompt": PROMPT, "max_new_tokens": 3, "batch_size": 4}
    with pytest.raises(FactftError, match="popularity_pct"):
        evaluate_model(absent, make_test_table().drop(columns="popularity_pct"), params)
    with pytest.raises(FactftError, match="statement"):
        evaluate_model(absent, make_test_table().drop(columns="statement"), params, prompt_column="statement")
    bad_choice = make_test_table(with_choices=True).assign(answer_index=5)
    with pytest.raises(FactftError, match="answer_index"):
        evaluate_model(absent, bad_choice, dict(params, format="multiple_choice"))
    with pytest.raises(FactftError, match="2-shot: no demonstrations"):
        evaluate_model(absent, make_test_table(), params, shots=2, demos=make_test_table().iloc[:0])
    with pytest.raises(FactftError, match=r"2-shot: the demonstrations lack columns \['answers'\]"):
        evaluate_model(absent, make_test_table(), params, shots=2, demos=make_test_table().drop(columns="answers"))


def smollm2_spec() -> dict:
    return {"name": "smollm2", "path": str(smollm2_folder()), "gguf_file": SMOLLM2_GGUF, "trust_remote_code": False}


@pytest.fixture(scope="module")
def bpe_tiny(bpe_tokenizer):
    """A random tiny Llama on SmolLM2's real byte-level BPE tokenizer (tokenizer only: ~10 s)."""
    tokenizer = bpe_tokenizer
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(8.0 if parameter.dim() > 1 else 1.0)
    return model, tokenizer


def test_bpe_answer_keeps_its_leading_space_in_its_first_token(bpe_tiny):
    _, tokenizer = bpe_tiny
    prompt_ids, answer_ids = prompt_answer_ids(tokenizer, "Q: What is the capital of France? A:", " Paris")
    assert tokenizer.convert_ids_to_tokens(answer_ids) == ["ĠParis"]
    assert tokenizer.decode(prompt_ids) == "Q: What is the capital of France? A:"


def test_bpe_batched_generation_and_likelihoods_equal_unbatched_ones(bpe_tiny):
    model, tokenizer = bpe_tiny
    prompts = [
        "Q: What is the capital of France? A:",
        "Q: Who wrote Hamlet? A:",
        "Q: In which country is the city of Timbuktu located? A:",
    ]
    batched = generate_texts(model, tokenizer, prompts, max_new_tokens=4, batch_size=3)
    single = generate_texts(model, tokenizer, prompts, max_new_tokens=4, batch_size=1)
    assert batched == single and all(batched)
    answers = [" Paris", " William Shakespeare", " Mali"]
    scores = answer_logprobs(model, tokenizer, prompts, answers, batch_size=3)
    direct = [_direct_logprob(model, tokenizer, p, a) for p, a in zip(prompts, answers)]
    np.testing.assert_allclose(scores, direct, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "text, ends",
    [
        (" Paris\nQ: Rome", True),
        ("\n\n Paris\nQ", True),  # blank lines before the answer end nothing (first_line skips them)
        (" \n Zürich\n", True),
        ("\u00a0\n Oslo\nQ", True),  # a no-break space is blank too
        (" São Paulo.\n\nQ", True),
        (" Paris", False),
        ("\n\n", False),
        (" 東京\nQ", False),  # byte tokens of a character decode to U+FFFD alone: never taken for text
    ],
)
def test_the_first_line_ends_at_the_token_where_scoring_cuts_it(bpe_tokenizer, text, ends):
    tokenizer = bpe_tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    flags = line_end_flags(tokenizer, len(tokenizer), "cpu")
    breaks = first_line_breaks(torch.tensor([[0, *ids]]), torch.tensor([1]), flags)[0, 1:]  # after a prompt token
    assert bool(breaks.any()) == ends
    if ends:
        end = int(breaks.int().argmax()) + 1
        assert first_line(tokenizer.decode(ids[:end])) == first_line(text)  # nothing of the first line is cut
        assert "\n" in tokenizer.decode(ids[:end]).lstrip() and "\n" not in tokenizer.decode(ids[: end - 1]).lstrip()


class Successors(LogitsProcessor):
    """Forces the token that follows the row's last token in a cycle of tokens."""

    def __init__(self, tokenizer, cycle: list[str]):
        ids = tokenizer.convert_tokens_to_ids(cycle)
        self.following = torch.zeros(len(tokenizer), dtype=torch.long)
        self.following[ids] = torch.tensor(ids[1:] + ids[:1])

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, self.following[input_ids[:, -1]][:, None], 0.0)


@pytest.mark.parametrize(
    "cycle, first",
    [([":", "ĠParis", "Ċ", "Q"], " Paris\n"), ([":", "ĊĊ", "ĠParis", "Ċ", "Q"], "\n\n Paris\n")],
)
def test_a_row_stops_at_the_end_of_its_first_line(bpe_tiny, cycle, first):
    model, tokenizer = bpe_tiny
    prompts = ["Q: What is the capital of France? A:", "Q: Who wrote Hamlet? A:"]
    forced = LogitsProcessorList([Successors(tokenizer, cycle)])  # e.g. " Paris\nQ: Paris\nQ: ..." after "A:"
    options = dict(max_new_tokens=12, batch_size=2, logits_processor=forced)
    whole = generate_texts(model, tokenizer, prompts, stop_at_line_end=False, **options)
    assert whole[0].startswith(first + "Q:") and len(whole[0]) > len(first) + 2
    assert generate_texts(model, tokenizer, prompts, **options) == [first, first]


@pytest.mark.slow
def test_a_real_pretrained_model_answers_well_known_questions():
    test = pd.DataFrame(
        {
            "id": ["france", "japan", "italy", "germany"],
            "question": [f"What is the capital of {c}?" for c in ("France", "Japan", "Italy", "Germany")],
            "answers": [["Paris"], ["Tokyo"], ["Rome", "Roma"], ["Berlin"]],
            "subject": ["France", "Japan", "Italy", "Germany"],
            "relation": ["capital"] * 4,
            "popularity": [4.0, 3.0, 2.0, 1.0],
            "popularity_pct": [100.0, 75.0, 50.0, 25.0],
        }
    )
    # One demonstration in the template: zero-shot, this 135M model answers with a new "A:".
    prompt = {"template": "Q: What is the capital of Spain? A: Madrid\nQ: {question} A:", "answer": " {answer}"}
    params = {"format": "open", "prompt": prompt, "max_new_tokens": 6, "batch_size": 4}
    predictions = score_answers(test, evaluate_model(smollm2_spec(), test, params, device="cpu"), "open")
    assert predictions["correct"].sum() >= 3, list(predictions["prediction"])
    # Only the first line is scored, so decoding stops at its end: the model would go on with a new question.
    assert predictions["prediction"].str.endswith("\n").any() and not predictions["prediction"].str.contains("Q:").any()


@pytest.mark.slow
def test_an_instruction_tuned_model_answers_in_its_chat_template():
    capitals = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Germany": "Berlin", "Spain": "Madrid"}
    test = pd.DataFrame(
        {
            "id": list(capitals),
            "question": [f"What is the capital of {c}?" for c in capitals],
            "answers": [[a] for a in capitals.values()],
            "subject": list(capitals),
            "relation": ["capital"] * len(capitals),
            "popularity": [5.0, 4.0, 3.0, 2.0, 1.0],
            "popularity_pct": [100.0, 80.0, 60.0, 40.0, 20.0],
        }
    )
    prompt = {"template": "Q: {question} A:", "answer": " {answer}"}
    params = {"format": "open", "prompt": prompt, "max_new_tokens": 12, "batch_size": 8}
    plain = score_answers(test, evaluate_model(smollm2_spec(), test, params, device="cpu"), "open")
    chat = score_answers(test, evaluate_model(dict(smollm2_spec(), chat=True), test, params, device="cpu"), "open")
    # Asked as plain text, SmolLM2-Instruct continues the page ("\nA:"); as its user's turn, it replies.
    assert chat["correct"].sum() >= 4 > plain["correct"].sum(), (list(plain["prediction"]), list(chat["prediction"]))
    # Zero-shot it replies in sentences; after two solved turns, with the answer alone.
    shown = evaluate_model(dict(smollm2_spec(), chat=True), test, params, device="cpu", shots=2, demos=test)
    shown = score_answers(test, shown, "open")
    assert chat["exact_match"].sum() < shown["exact_match"].sum() >= 4, list(shown["prediction"])


@pytest.mark.slow
def test_evaluate_and_cloze_rules_run_through_snakemake(tiny, tmp_path):
    """The rules on ready-made inputs: a model folder, a LoRA adapter, a test split.

    The adapter's weights are random (a fresh LoRA adds zero), so evaluate's predictions must
    differ from evaluate_base's, the model alone, and attention's weights from the model's
    alone: a rule that dropped the adapter would not. evaluate_fewshot (with demonstrations)
    and cloze are evaluate_base's other callers.
    """
    import subprocess

    import yaml
    from peft import LoraConfig, get_peft_model

    from safetensors.torch import load_file, save

    from factft.attention import analyse_attention

    spec = dict(tiny[0], path=str(tmp_path / "tinyp"))
    shutil.copytree(tiny[0]["path"], spec["path"])
    make_test_table().to_parquet(tmp_path / "test.parquet")
    (tmp_path / "results/synth/splits").mkdir(parents=True)
    make_test_table().to_parquet(tmp_path / "results/synth/splits/test.parquet")
    run = tmp_path / "results/tinyp/synth/top/seed0"
    torch.manual_seed(0)
    lora = get_peft_model(
        LlamaForCausalLM.from_pretrained(spec["path"]),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    lora.save_pretrained(run / "adapter")
    config = {
        "seeds": [0],
        "subsets": ["top"],
        "datasets": {"synth": {"source": {"synthetic": {"subjects": 20}}, "popularity": {"scorer": "pretraining_count"}}},
        "models": {"tinyp": {"source": {"path": spec["path"]}}},
        "evaluate": {"max_new_tokens": 3, "batch_size": 4, "fewshot": 1, "attention_questions": 7},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    # The demonstrations' pool: other subjects than the test set's (as a subject split gives).
    pool = make_test_table()
    names = dict(zip(pool["subject"], ["Oda Wren", "Pim Sorl", "Tavi Quen", "Lor Ense", "Mara Holt", "Quin Dass", "Oda"]))
    pool["question"] = [q.replace(s, names[s]) for q, s in zip(pool["question"], pool["subject"])]
    pool["id"], pool["subject"] = [f"w{i}" for i in range(len(pool))], pool["subject"].map(names)
    pool.to_parquet(tmp_path / "results/synth/splits/whole.parquet")
    targets = [f"results/tinyp/synth/{part}/metrics.tsv" for part in ("top/seed0", "base", "cloze", "fewshot")]
    root = Path(__file__).resolve().parents[1]

    def snakemake(*options: str, only=None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(Path(sys.executable).parent / "snakemake"), "-s", str(root / "Snakefile"), "--configfile",
             "config.yaml", "--allowed-rules", "evaluate", "evaluate_base", "evaluate_fewshot", "cloze", "attention",
             "score", "metrics", *options, "--", *(only or [*targets, "results/tinyp/synth/top/seed0/attention.tsv"])],
            cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
        )  # fmt: skip

    done = snakemake("--cores", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    # New percentiles remake the metrics and ask no model again, nor does a scoring fix
    # (--forcerun score); another batch size or cache asks nothing (the same answers).
    def planned(*options: str) -> set[str]:
        plan = snakemake("--dry-run", *options)
        assert plan.returncode == 0, plan.stderr[-3000:]
        return set(re.findall(r"^(\w+)\s+\d+$", plan.stdout, re.MULTILINE))

    assert planned("--forcerun", "score") == {"score", "metrics", "total"}
    config["evaluate"].update(percentiles=[25, 100])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert planned() == {"metrics", "total"}
    config["evaluate"].update(percentiles=[10, 20, 30, 40, 50, 60, 70, 80, 90, 100], batch_size=2, static_cache=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    same = snakemake("--dry-run")
    assert same.returncode == 0 and "Nothing to be done" in same.stdout + same.stderr, same.stdout[-3000:]
    predictions = {}
    for target in targets:
        metrics = pd.read_csv(tmp_path / target, sep="\t").query("scope == 'all'")
        predictions[target] = pd.read_parquet(tmp_path / target.replace("metrics.tsv", "predictions.parquet"))
        assert list(predictions[target]["id"]) == list(make_test_table()["id"])
        assert metrics["n"].iloc[0] == 7
        assert metrics["accuracy"].iloc[0] == pytest.approx(predictions[target]["correct"].mean(), abs=1e-6)
    finetuned, base = (predictions[t]["prediction"] for t in targets[:2])
    assert (finetuned != base).any(), list(base)
    assert (tmp_path / "benchmarks/cloze/tinyp/synth.tsv").exists()
    assert "1-shot" in (tmp_path / "logs/evaluate_fewshot/tinyp/synth.log").read_text()
    # Each rule reads the prompt it is for: the template around the question, or the statement;
    # few-shot's demonstration comes from the pool (whole), never from the test set.
    logs = {
        rule: (tmp_path / f"logs/{rule}/tinyp/synth.log").read_text()
        for rule in ("evaluate_base", "cloze", "evaluate_fewshot")
    }
    assert "the first prompt: 'Q: Where was Ilmo Varsk born ? A:'" in logs["evaluate_base"]
    assert "the first prompt: 'Ilmo Varsk was born in'" in logs["cloze"]
    (fewshot,) = re.findall(r"the first prompt: '(.*)'$", logs["evaluate_fewshot"], re.MULTILINE)
    demonstration, question = fewshot.split("\\n")
    assert question == "Q: Where was Ilmo Varsk born ? A:"
    assert re.fullmatch(r"Q: (.*) A: \w+", demonstration).group(1) in set(pool["question"])
    attention = pd.read_csv(run / "attention.tsv", sep="\t")
    params = {"questions": 7, "batch_size": 4, "prompt": {"template": "Q: {question} A:", "answer": " {answer}"},
              "max_drop_fraction": 0.0}  # fmt: skip
    alone, _ = analyse_attention({**spec, "name": "tinyp"}, make_test_table(), params)
    adapted, _ = analyse_attention({**spec, "name": "tinyp"}, make_test_table(), params, adapter=run / "adapter")
    numbers = alone.select_dtypes("number").columns
    assert list(attention.columns) == list(alone.columns) and len(numbers)
    assert np.allclose(attention[numbers], adapted[numbers], atol=1e-6)  # the rule's settings, these
    assert not np.allclose(attention[numbers], alone[numbers], atol=1e-4)
    # Weights rewritten in place (a checkpoint exported again into the folder) rerun every job
    # that read them: the folder's own time does not change then, the file's does.
    (weights,) = Path(spec["path"]).glob("*.safetensors")
    weights.write_bytes(save({name: tensor / 2 for name, tensor in load_file(weights).items()}, {"format": "pt"}))
    rerun = snakemake("--dry-run")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    replanned = set(re.findall(r"^(\w+)\s+\d+$", rerun.stdout, re.MULTILINE)) - {"total"}
    models = {"evaluate", "evaluate_base", "evaluate_fewshot", "cloze", "attention"}
    assert replanned == models | {"score", "metrics"}, rerun.stdout
    # A local folder that is gone is named at start. Results made from it are kept (Snakemake
    # alone would keep them silently); a target whose own job reads it names it.
    assert snakemake("--touch").returncode == 0
    shutil.rmtree(spec["path"])
    gone = snakemake("--dry-run", only=targets)  # metrics: the evaluations that read the model are upstream
    assert gone.returncode == 0, gone.stdout[-3000:] + gone.stderr[-3000:]  # its listing once raised FileNotFoundError
    assert f"config: models.tinyp.source.path: no folder {spec['path']}" in gone.stderr + gone.stdout
    assert "Nothing to be done" in gone.stdout + gone.stderr
    asked = snakemake("--dry-run", only=["results/tinyp/synth/top/seed0/attention.tsv"])
    assert asked.returncode != 0 and "Missing input files for rule attention" in asked.stdout, asked.stdout[-3000:]
    assert f"affected files:\n        {spec['path']}\n" in asked.stdout
