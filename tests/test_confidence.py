import logging

import numpy as np
import pandas as pd
import pytest
import torch

from factft import models
from factft.confidence import model_confidence_scores, without_letter_prior
from factft.errors import FactftError
from factft.prompts import fact_prompt, few_shot_prefixes

PROMPT = {"template": "Q: {question} A:", "answer": " {answer}"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def spec(tiny_model_dir):
    return {"name": "tiny", "path": str(tiny_model_dir), "gguf_file": None, "trust_remote_code": False}


def facts_table():
    return pd.DataFrame(
        {
            "question": [
                "Where was Ilmo Varsk born ?",
                "Where was Bera Tosk born ?",
                "Where was Kalo Mirr born ?",
                "What does Suna Dee do ?",
                "What does Ito Rask do ?",
                "What does Vena Lu play ?",
            ],
            "answers": [["Lyon"], ["Paris", "Lutetia"], ["Rome"], ["baker"], ["pilot"], ["piano"]],
            "relation": ["born", "born", "born", "job", "job", "plays"],
        },
        index=[10, 11, 12, 13, 14, 15],
    )


def test_demonstrations_come_from_other_facts_of_the_same_relation_first():
    facts = facts_table()
    prefixes = few_shot_prefixes(facts, shots=2, prompt=PROMPT)
    assert prefixes == few_shot_prefixes(facts, shots=2, prompt=PROMPT)
    first = prefixes[0].splitlines()
    assert sorted(first) == ["Q: Where was Bera Tosk born ? A: Paris", "Q: Where was Kalo Mirr born ? A: Rome"]
    for prefix, question in zip(prefixes, facts["question"]):
        assert question not in prefix and prefix.endswith("\n") and prefix.count("\n") == 2
    # "job" has one other fact: the second demonstration comes from another relation.
    job = prefixes[3].splitlines()
    assert "Q: What does Ito Rask do ? A: pilot" in job and len(job) == 2


def test_each_fact_draws_its_own_demonstrations_seeded():
    """A relation's questions sharing one set would rest a few-shot reference on one draw."""
    facts = pd.DataFrame({"question": [f"Where was P{i} born ?" for i in range(40)],
                          "answers": [[f"City{i}"] for i in range(40)], "relation": "born"})  # fmt: skip
    prefixes = few_shot_prefixes(facts, shots=3, prompt=PROMPT)
    assert prefixes == few_shot_prefixes(facts, shots=3, prompt=PROMPT)
    assert len({frozenset(prefix.splitlines()) for prefix in prefixes}) > 30
    shown = [line for prefix in prefixes for line in prefix.splitlines()]
    assert len(set(shown)) > 30  # most facts serve as a demonstration somewhere
    assert few_shot_prefixes(facts, shots=3, prompt=PROMPT, seed=1) != prefixes


def test_no_question_is_shown_twice_and_too_few_demonstrations_are_counted_in_the_log(caplog):
    # Two subjects of one name: the same question, twice in the pool.
    facts = pd.DataFrame(
        {"question": ["Where was Ann Lee born ?", "Where was Ann Lee born ?", "Where was Bo Ek born ?", "Q4"],
         "answers": [["Paris"], ["Rome"], ["Lyon"], ["x"]], "relation": ["born"] * 3 + ["other"]}
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="factft"):
        prefixes = few_shot_prefixes(facts, shots=3, prompt=PROMPT)
    for prefix, question in zip(prefixes, facts["question"]):
        shown = [line.split(" A:")[0] for line in prefix.splitlines()]
        assert len(shown) == len(set(shown)) and f"Q: {question}" not in shown
    assert "4 of 4 prompts have fewer than the 3 demonstrations asked for" in caplog.text


def test_zero_shots_is_the_bare_prompt():
    assert few_shot_prefixes(facts_table(), shots=0, prompt=PROMPT) == [""] * 6


def test_open_confidence_is_a_probability_equal_to_the_direct_product_of_answer_token_probabilities(spec):
    from factft.models import load_model

    facts = facts_table()
    scores = model_confidence_scores(facts, spec, shots=2, prompt=PROMPT, fmt="open", batch_size=4)
    assert scores.dtype == "float64" and list(scores.index) == list(facts.index)
    assert ((scores > 0) & (scores <= 1)).all()

    model, tokenizer = load_model(spec, device="cpu")
    prefix = few_shot_prefixes(facts, shots=2, prompt=PROMPT)[1]
    prompt_ids = tokenizer(prefix + "Q: Where was Bera Tosk born ? A:")["input_ids"]
    answer_ids = tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + answer_ids])).logits[0].double()
    probabilities = torch.softmax(logits, -1)
    direct = np.prod([float(probabilities[len(prompt_ids) + k - 1, t]) for k, t in enumerate(answer_ids)])
    assert scores.loc[11] == pytest.approx(direct, rel=1e-4)


def test_multiple_choice_confidence_is_the_softmax_over_choices_at_the_gold_one(spec):
    from factft.generate import choice_logprobs
    from factft.models import load_model

    facts = facts_table().assign(
        choices=[["Lyon", "Rome"], ["Paris", "Oslo", "Milan"], ["Rome", "Lyon"], ["baker", "pilot"]] + [["a", "b"]] * 2,
        answer_index=[0, 1, 0, 1, 0, 1],
    )
    scores = model_confidence_scores(facts, spec, shots=1, prompt=PROMPT, fmt="multiple_choice")
    model, tokenizer = load_model(spec, device="cpu")
    prefix = few_shot_prefixes(facts, shots=1, prompt=PROMPT)[1]
    options = [" Paris", " Oslo", " Milan"]
    logprobs = choice_logprobs(model, tokenizer, [prefix + "Q: Where was Bera Tosk born ? A:"], [options], batch_size=1)[0]
    assert scores.loc[11] == pytest.approx(np.exp(logprobs[1]) / np.exp(logprobs).sum(), rel=1e-6)
    assert ((scores > 0) & (scores < 1)).all()
    # The probabilities over one fact's choices sum to one: flipping the gold of a 2-choice fact.
    flipped = model_confidence_scores(facts.assign(answer_index=[1, 1, 0, 1, 0, 1]), spec, 1, PROMPT, "multiple_choice")
    assert scores.loc[10] + flipped.loc[10] == pytest.approx(1.0)


def test_multiple_choice_confidence_scores_choices_per_token_as_evaluation_does_with_choice_score_mean(spec):
    """With evaluate.choice_score: mean, a long choice is not ranked down for its length alone:
    the softmax is over the per-token log-likelihoods evaluation picks by."""
    from factft.generate import choice_logprobs
    from factft.models import load_model
    from factft.popularity import SCORERS, ScoringContext

    facts = facts_table().assign(
        choices=[["Lyon", "Rome the city of the job of Lyon"]] * 6, answer_index=[1, 1, 1, 0, 0, 0]
    )
    summed = model_confidence_scores(facts, spec, 1, PROMPT, "multiple_choice")
    context = ScoringContext("x", fmt="multiple_choice", prompt=PROMPT, model=spec, choice_score="mean")
    per_token = SCORERS["model_confidence"].score(facts, {"shots": 1}, context)
    model, tokenizer = load_model(spec, device="cpu")
    prompt = few_shot_prefixes(facts, shots=1, prompt=PROMPT)[0] + "Q: Where was Ilmo Varsk born ? A:"
    options = [" Lyon", " Rome the city of the job of Lyon"]
    means = choice_logprobs(model, tokenizer, [prompt], [options], batch_size=1, mean=True)[0]
    assert per_token.loc[10] == pytest.approx(np.exp(means[1]) / np.exp(means).sum(), rel=1e-6)
    assert per_token.loc[10] > summed.loc[10]  # the long gold choice, no longer paid for its length


def test_lettered_confidence_is_the_softmax_over_the_letters_after_lettered_demonstrations(bpe_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from factft.confidence import confidence_scores
    from factft.generate import choice_logprobs

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(bpe_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    ).eval()
    facts = facts_table().assign(
        choices=[["Lyon", "Rome"], ["Paris", "Oslo", "Milan"], ["Rome", "Lyon"], ["baker", "pilot"]] + [["a", "b"]] * 2,
        answer_index=[0, 1, 0, 1, 0, 1],
    )
    lettered = {"template": "{question}\n{choices}\nAnswer:", "answer": " {letter}"}
    scores = confidence_scores(model, bpe_tokenizer, facts, 2, lettered, "multiple_choice", batch_size=4)
    # Fact 11's demonstrations: the other two "born" facts, each with its options and letter.
    demos = ["Where was Ilmo Varsk born ?\nA. Lyon\nB. Rome\nAnswer: A",
             "Where was Kalo Mirr born ?\nA. Rome\nB. Lyon\nAnswer: A"]
    prefix = few_shot_prefixes(facts, shots=2, prompt=lettered)[1]
    assert sorted(prefix.split("\n\n")[:2]) == demos and prefix.endswith("\n\n")
    prompt = prefix + "Where was Bera Tosk born ?\nA. Paris\nB. Oslo\nC. Milan\nAnswer:"
    logprobs = choice_logprobs(model, bpe_tokenizer, [prompt], [[" A", " B", " C"]], batch_size=1)[0]
    raw = np.exp(logprobs) / np.exp(logprobs).sum()
    # The model's letter preference over the six facts divides out (without_letter_prior).
    prefixes = few_shot_prefixes(facts, shots=2, prompt=lettered)
    every = choice_logprobs(
        model, bpe_tokenizer, [p + fact_prompt(f, lettered["template"]) for p, f in zip(prefixes, facts.to_dict("records"))],
        [[" A", " B", " C"][: len(c)] for c in facts["choices"]], batch_size=4,
    )  # fmt: skip
    softmax = [np.exp(e) / np.exp(e).sum() for e in every]
    preference = np.exp([np.mean([np.log(p[k]) for p in softmax if len(p) > k]) for k in range(3)])
    calibrated = raw / (preference / preference.sum())
    assert scores[1] == pytest.approx(calibrated[1] / calibrated.sum(), rel=1e-6)


def test_a_letter_preference_multiplying_every_questions_odds_is_taken_out_exactly():
    rng = np.random.default_rng(0)
    unbiased = [rng.dirichlet([1.0] * 4) for _ in range(400)]
    # Positions treated alike: each question's probabilities also appear in every rotation.
    unbiased = [np.roll(p, k) for p in unbiased for k in range(4)]
    favour_a = np.array([8.0, 1.0, 1.0, 1.0])
    biased = [p * favour_a / (p * favour_a).sum() for p in unbiased]
    for got, want in zip(without_letter_prior(biased), unbiased):
        np.testing.assert_allclose(got, want, rtol=1e-9)


def test_a_model_that_overflows_fp16_stops_the_scorer_on_a_gpu_without_bf16(fp16_overflow_model_dir, monkeypatch):
    spec = {"name": "big", "path": str(fp16_overflow_model_dir), "gguf_file": None, "trust_remote_code": False}
    assert model_confidence_scores(facts_table(), spec, 2, PROMPT, "open").between(0, 1).all()  # fp32
    monkeypatch.setattr(models, "compute_dtype", lambda device: torch.float16)  # a V100's or T4's
    with pytest.raises(FactftError, match=r"^popularity scorer model_confidence \(model 'big'\): its logits on "):
        model_confidence_scores(facts_table(), spec, 2, PROMPT, "open")


def test_missing_columns_name_the_scorer_and_the_columns(spec):
    with pytest.raises(FactftError, match=r"model_confidence.*\['choices', 'answer_index'\]"):
        model_confidence_scores(facts_table(), spec, 2, PROMPT, "multiple_choice")


def test_the_model_confidence_scorer_scores_in_the_batch_size_its_context_gives(spec, monkeypatch):
    from factft import confidence
    from factft.popularity import SCORERS, ScoringContext

    given, real = [], confidence.model_confidence_scores

    def recording(*args, **kwargs):  # the real scorer, its batch size noted
        given.append(kwargs.get("batch_size"))
        return real(*args, **kwargs)

    monkeypatch.setattr(confidence, "model_confidence_scores", recording)
    context = ScoringContext("x", prompt=PROMPT, model=spec, batch_size=3)  # evaluate.batch_size, from the rule
    scores = SCORERS["model_confidence"].score(facts_table(), {"shots": 1}, context)
    assert given == [3] and scores.between(0, 1).all()
