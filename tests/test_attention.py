import math

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from factft.attention import (
    PromptTokens,
    analyse_attention,
    attention_by_layer,
    last_position_attention,
    prompt_tokens,
    example_index,
    select_questions,
    require_eager_attention,
)
from factft.attention_plots import (
    make_attention_figures,
    plot_attention_by_layer,
    plot_attention_heatmaps,
    read_attention,
)
from factft import models
from factft.errors import FactftError
from factft.models import load_model
from factft.prompts import chat_prompt, in_turn
from test_generate import hybrid_model

TEMPLATE = "Q: {question} A:"


def parts(prompt):
    """The subject's and the relation's tokens as text."""
    return [prompt.tokens[i] for i in prompt.subject], [prompt.tokens[i] for i in prompt.relation]


@pytest.fixture(scope="module")
def word_tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_word_level_prompt_splits_into_subject_relation_and_template_tokens(word_tokenizer):
    prompt = prompt_tokens(word_tokenizer, "Where was Ilmo Varsk born?", "Ilmo Varsk", TEMPLATE)
    assert prompt.tokens == ["<s>", "Q", ":", "Where", "was", "Ilmo", "Varsk", "born", "?", "A", ":"]
    # bos, the template's "Q: ... A:" and punctuation belong to neither part.
    assert parts(prompt) == (["Ilmo", "Varsk"], ["Where", "was", "born"])
    assert prompt.input_ids == word_tokenizer(prompt.prompt)["input_ids"]


def test_the_subject_is_searched_in_the_question_not_in_a_few_shot_template(word_tokenizer):
    template = "Q: Where was Ilmo Varsk born? A: Lyon Q: {question} A:"
    prompt = prompt_tokens(word_tokenizer, "What does Ilmo Varsk play?", "Ilmo Varsk", template)
    assert prompt.subject == [16, 17] and prompt.tokens[16:18] == ["Ilmo", "Varsk"]
    assert parts(prompt)[1] == ["What", "does", "play"]


def test_bpe_tokens_carrying_the_leading_space_count_as_subject_tokens(bpe_tokenizer):
    prompt = prompt_tokens(bpe_tokenizer, "What is Barack Obama's occupation?", "Barack Obama", TEMPLATE)
    assert parts(prompt) == ([" Barack", " Obama"], [" What", " is", "'s", " occupation"])
    # The tokens' texts are exactly the prompt, in order: the offsets cover every character.
    assert "".join(prompt.tokens) == prompt.prompt == "Q: What is Barack Obama's occupation? A:"
    capital = prompt_tokens(bpe_tokenizer, "What is the capital of Tuvalu?", "Tuvalu", "Question: {question}\nAnswer:")
    subject, relation = parts(capital)
    assert "".join(subject).strip() == "Tuvalu" and relation == [" What", " is", " the", " capital", " of"]


def test_in_a_chat_models_turn_the_subject_and_relation_tokens_are_the_questions(bpe_tokenizer):
    chat = chat_prompt({"name": "smollm2", "chat": True}, bpe_tokenizer, {"template": TEMPLATE, "answer": " {answer}"})
    prompt = prompt_tokens(bpe_tokenizer, "What is Barack Obama's occupation?", "Barack Obama", in_turn(chat, TEMPLATE))
    assert parts(prompt) == ([" Barack", " Obama"], [" What", " is", "'s", " occupation"])
    assert "".join(prompt.tokens) == prompt.prompt and prompt.tokens[0] == "<|im_start|>"


def test_subject_written_in_another_case_is_found_and_a_missing_one_is_an_error_naming_it(bpe_tokenizer):
    prompt = prompt_tokens(bpe_tokenizer, "What genre is The Beatles?", "the Beatles", TEMPLATE)
    assert parts(prompt)[0] == [" The", " Beat", "les"]
    # Whole words first: the subject "W" is not the start of "What".
    assert "".join(parts(prompt_tokens(bpe_tokenizer, "What genre is W?", "W", TEMPLATE))[0]).strip() == "W"
    # A subject named like the question's first word is the later one.
    prompt = prompt_tokens(bpe_tokenizer, "Who was the producer of Who?", "Who", TEMPLATE)
    assert parts(prompt) == ([" Who"], [" Who", " was", " the", " producer", " of"])
    assert prompt.subject[0] > prompt.relation[-1]
    with pytest.raises(FactftError, match=r"subject 'Lesotho' does not occur in the question 'What is the capital"):
        prompt_tokens(bpe_tokenizer, "What is the capital of Kenya?", "Lesotho", TEMPLATE, "popqa")


def facts(n, missing=0):
    rows = [
        {"id": f"f{i}", "question": f"Where was S{i} born?", "subject": f"S{i}", "popularity": float(i)}
        for i in range(n)
    ]
    for row in rows[:missing]:
        row["subject"] = "Nobody"
    return pd.DataFrame(rows)


def test_questions_are_capped_by_a_sample_that_every_run_shares_in_test_order():
    first = select_questions(facts(50), 10, 0.1, "synth")
    assert len(first) == 10 and first["id"].tolist() == select_questions(facts(50), 10, 0.1, "synth")["id"].tolist()
    assert first["popularity"].is_monotonic_increasing  # table order kept
    assert len(select_questions(facts(5), 10, 0.1, "synth")) == 5


def test_facts_without_their_subject_are_skipped_when_few_and_an_error_when_many():
    assert len(select_questions(facts(20, missing=2), 100, 0.1, "synth")) == 18
    message = r"synth: the subject does not occur in the question for 3 of 20 test facts, e.g. f0"
    with pytest.raises(FactftError, match=message):
        select_questions(facts(20, missing=3), 100, 0.1, "synth")


def test_statistics_are_max_and_summed_weight_per_part_averaged_over_heads_then_questions():
    prompts = [
        prompt_tokens_stub(subject=[1, 2], relation=[3]),
        prompt_tokens_stub(subject=[1], relation=[]),  # no relation words: no max, no mass on them
    ]
    # (layers=1, heads=2, tokens=4)
    a = np.array([[[0.1, 0.5, 0.2, 0.2], [0.4, 0.1, 0.3, 0.2]]])
    b = np.array([[[0.7, 0.3, 0.0, 0.0], [0.9, 0.1, 0.0, 0.0]]])
    table = attention_by_layer([a, b], prompts, [1])
    row = table.iloc[0]
    assert row["layer"] == 1 and row["questions"] == 2
    assert row["subject_max"] == pytest.approx(((0.5 + 0.3) / 2 + (0.3 + 0.1) / 2) / 2)
    assert row["subject_mass"] == pytest.approx(((0.7 + 0.4) / 2 + (0.3 + 0.1) / 2) / 2)
    assert row["relation_max"] == pytest.approx((0.2 + 0.2) / 2)
    assert row["relation_mass"] == pytest.approx((0.2 + 0.0) / 2)  # the rest, 1 - subject - relation, is what is left


def prompt_tokens_stub(subject, relation):
    return PromptTokens("", [0, 1, 2, 3], ["a", "b", "c", "d"], subject, relation)


def direct_last_row_attention(model, ids):
    """softmax(q_last . k / sqrt(d)) per layer and head, from each layer's own projections of
    its input (captured by hooks on an unpadded SDPA forward), rotary positions 0..T-1."""
    inputs = []
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs: inputs.append(kwargs["hidden_states"]), with_kwargs=True
        )
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
        rows = []
        for layer, hidden in zip(model.model.layers, inputs):
            attn, length = layer.self_attn, len(ids)
            d = attn.head_dim
            q = attn.q_proj(hidden).view(1, length, -1, d).transpose(1, 2)
            k = attn.k_proj(hidden).view(1, length, -1, d).transpose(1, 2)
            cos, sin = model.model.rotary_emb(hidden, torch.arange(length)[None])
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            rows.append(torch.softmax(torch.einsum("hd,htd->ht", q[0, :, -1], k[0]) / math.sqrt(d), dim=-1))
    for hook in hooks:
        hook.remove()
    return torch.stack(rows).numpy()


def test_attention_weights_of_left_padded_batches_match_a_direct_computation(tiny_model_dir, word_tokenizer):
    spec = {"name": "tiny", "path": str(tiny_model_dir)}
    with pytest.raises(FactftError, match="tiny: the model did not load with eager attention"):
        require_eager_attention(load_model(spec, device="cpu")[0], "tiny")  # SDPA by default
    model, tokenizer = load_model(spec, device="cpu", attention="eager")
    require_eager_attention(model, "tiny")
    questions = [
        ("Where was Ilmo Varsk born?", "Ilmo Varsk"),
        ("What does Lu do?", "Lu"),
        ("Where was Vena Lu born, in Lyon or Milan?", "Vena Lu"),
    ]
    prompts = [prompt_tokens(tokenizer, q, s, TEMPLATE) for q, s in questions]
    weights = last_position_attention(model, prompts, pad_id=tokenizer.pad_token_id, batch_size=3)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for prompt, got in zip(prompts, weights):
        expected = direct_last_row_attention(reference, prompt.input_ids)
        assert got.shape == expected.shape == (2, 4, len(prompt.input_ids))
        np.testing.assert_allclose(got, expected, atol=1e-5)
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_attention_batches_that_run_out_of_gpu_memory_are_cut_until_they_fit(tiny_model_dir, monkeypatch):
    model, tokenizer = load_model({"name": "tiny", "path": str(tiny_model_dir)}, device="cpu", attention="eager")
    questions = [("Where was Ilmo Varsk born?", "Ilmo Varsk"), ("What does Lu do?", "Lu"), ("Was Lu born?", "Lu")]
    prompts = [prompt_tokens(tokenizer, q, s, TEMPLATE) for q, s in questions]
    whole = last_position_attention(model, prompts, pad_id=tokenizer.pad_token_id, batch_size=3)
    forward = model.forward

    def fits_one_row(**kwargs):  # a real out-of-memory error needs a GPU; this fails as one does
        if kwargs["input_ids"].shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return forward(**kwargs)

    monkeypatch.setattr(model, "forward", fits_one_row)
    cut = last_position_attention(model, prompts, pad_id=tokenizer.pad_token_id, batch_size=3)
    for got, expected in zip(cut, whole, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_analysis_tables_hold_per_layer_statistics_and_the_most_popular_question_as_example(tiny_model_dir):
    test = pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "question": ["Where was Ilmo Varsk born?", "What does Suna Dee play?", "Where was Kalo Mirr born?"],
            "answers": [["Lyon"], ["piano"], ["Rome"]],
            "subject": ["Ilmo Varsk", "Suna Dee", "Kalo Mirr"],
            "popularity": [3.0, 9.0, 1.0],
        }
    )
    params = {"questions": 10, "batch_size": 2, "prompt": {"template": TEMPLATE}, "max_drop_fraction": 0.1}
    spec = {"name": "tiny", "path": str(tiny_model_dir)}
    by_layer, example = analyse_attention(spec, test, params, device="cpu")
    assert by_layer.columns.tolist() == [
        "layer", "subject_max", "subject_mass", "relation_max", "relation_mass", "questions"
    ]
    assert by_layer["layer"].tolist() == [1, 2] and (by_layer["questions"] == 3).all()
    assert ((by_layer["subject_max"] > 0) & (by_layer["subject_max"] <= by_layer["subject_mass"])).all()
    assert set(example["id"]) == {"b"} and set(example["answer"]) == {"piano"}
    first_layer = example[example["layer"] == 1]
    assert first_layer["token"].tolist() == ["<s>", "Q", ":", "What", "does", "Suna", "Dee", "play", "?", "A", ":"]
    assert first_layer.loc[first_layer["part"] == "subject", "token"].tolist() == ["Suna", "Dee"]
    assert first_layer["weight"].sum() == pytest.approx(1.0, abs=1e-5)


def test_a_model_that_overflows_fp16_stops_the_analysis_on_a_gpu_without_bf16(fp16_overflow_model_dir, monkeypatch):
    test = pd.DataFrame(
        {"id": ["a"], "question": ["Where was Ilmo Varsk born?"], "answers": [["Lyon"]], "subject": ["Ilmo Varsk"]}
    ).assign(popularity=1.0)
    params = {"questions": 10, "batch_size": 2, "prompt": {"template": TEMPLATE}, "max_drop_fraction": 0.1}
    spec = {"name": "big", "path": str(fp16_overflow_model_dir)}
    analyse_attention(spec, test, params, device="cpu")  # in fp32 it runs
    monkeypatch.setattr(models, "compute_dtype", lambda device: torch.float16)  # a V100's or T4's
    with pytest.raises(FactftError, match=r"^attention of model 'big': its logits on 'Q: Where .*' are nan or inf"):
        analyse_attention(spec, test, params, device="cpu")


def test_nan_logits_on_a_later_prompt_stop_the_analysis_naming_it(tiny_model_dir):
    model, tokenizer = load_model({"name": "tiny", "path": str(tiny_model_dir)}, device="cpu", attention="eager")
    with torch.no_grad():
        model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("Milan")] = float("nan")
    questions = [("Where was Ilmo Varsk born?", "Ilmo Varsk"), ("Was Vena Lu born in Milan?", "Vena Lu")]
    prompts = [prompt_tokens(tokenizer, q, s, TEMPLATE) for q, s in questions]
    last_position_attention(model, prompts[:1], pad_id=tokenizer.pad_token_id, batch_size=1)
    with pytest.raises(FactftError, match=r"^tiny: its logits on 'Q: Was Vena Lu born in Milan\? A:' are nan or inf"):
        last_position_attention(model, prompts, pad_id=tokenizer.pad_token_id, batch_size=1, where="tiny")


def test_a_hybrid_models_attention_layers_keep_their_numbers_in_the_model(word_tokenizer, tmp_path):
    # Jamba interleaves Mamba layers (no attention weights) with attention layers: here layers 2 and 4.
    model = hybrid_model(len(word_tokenizer), layers=4)
    assert model.config.layer_types == ["linear_attention", "full_attention"] * 2
    model.save_pretrained(tmp_path / "jamba")
    word_tokenizer.save_pretrained(tmp_path / "jamba")
    test = pd.DataFrame(
        {"id": ["b"], "question": ["What does Suna Dee play?"], "answers": [["piano"]], "subject": ["Suna Dee"],
         "popularity": [9.0]}
    )  # fmt: skip
    params = {"questions": 10, "batch_size": 2, "prompt": {"template": TEMPLATE}, "max_drop_fraction": 0.1}
    spec = {"name": "jamba", "path": str(tmp_path / "jamba")}
    by_layer, example = analyse_attention(spec, test, params, device="cpu")
    assert by_layer["layer"].tolist() == [2, 4] and sorted(example["layer"].unique()) == [2, 4]
    assert example.groupby("layer")["weight"].sum().to_numpy() == pytest.approx([1.0, 1.0], abs=1e-5)
    (axes, *_) = plot_attention_heatmaps({"top": example}, "jamba", "synth").axes
    assert [label.get_text() for label in axes.get_yticklabels()] == ["2", "4"]


def test_per_layer_statistics_are_the_max_and_sum_of_the_example_questions_token_weights(tiny_model_dir):
    # One question: its per-layer mass is the sum of its head-mean token weights; its max, a
    # mean over heads of each head's max, lies between the largest head-mean weight and the mass.
    test = pd.DataFrame(
        {"id": ["b"], "question": ["What does Suna Dee play?"], "answers": [["piano"]], "subject": ["Suna Dee"],
         "popularity": [9.0]}
    )  # fmt: skip
    params = {"questions": 10, "batch_size": 2, "prompt": {"template": TEMPLATE}, "max_drop_fraction": 0.1}
    by_layer, example = analyse_attention({"name": "tiny", "path": str(tiny_model_dir)}, test, params, device="cpu")
    for layer, weights in example.groupby("layer"):
        row = by_layer.set_index("layer").loc[layer]
        for part in ("subject", "relation"):
            mine = weights.loc[weights["part"] == part, "weight"]
            assert len(mine) > 0
            assert row[f"{part}_mass"] == pytest.approx(mine.sum(), abs=1e-6)
            assert mine.max() - 1e-6 <= row[f"{part}_max"] <= row[f"{part}_mass"] + 1e-6


def write_tables(folder, subsets=("top", "bottom"), seeds=(0, 1), layers=3):
    sources, examples = [], {}
    for k, subset in enumerate(subsets):
        for seed in seeds:
            path = folder / f"{subset}{seed}.tsv"
            values = np.linspace(0.1, 0.3, layers) * (2 - k) + 0.01 * seed
            pd.DataFrame(
                {
                    "layer": range(1, layers + 1),
                    "subject_max": values,
                    "subject_mass": values * 2,
                    "relation_max": values / 2,
                    "relation_mass": values,
                    "questions": 7,
                }
            ).to_csv(path, sep="\t", index=False)
            sources.append({"subset": subset, "seed": seed, "path": str(path)})
        tokens = ["<s>", "Q", ":", "Where", "NA", "born", "\\n", "A", ":"]
        rows = [
            {"id": "x", "question": "Where was NA born?", "answer": "Oslo", "layer": layer, "position": p,
             "token": t, "part": "subject" if t == "NA" else "other", "weight": 1 / len(tokens)}
            for layer in range(1, layers + 1)
            for p, t in enumerate(tokens)
        ]
        examples[subset] = folder / f"{subset}_example.tsv"
        pd.DataFrame(rows).to_csv(examples[subset], sep="\t", index=False)
    return sources, examples


def test_figures_are_written_from_the_attention_tables(tmp_path):
    sources, examples = write_tables(tmp_path)
    by_layer, heatmap = [tmp_path / "a.png", tmp_path / "a.pdf"], [tmp_path / "b.png", tmp_path / "b.pdf"]
    make_attention_figures(sources, examples, "tiny", "synth", by_layer, heatmap)
    assert (tmp_path / "a.png").stat().st_size > 10_000 and (tmp_path / "b.png").stat().st_size > 10_000
    assert all((tmp_path / name).read_bytes().startswith(b"%PDF") for name in ("a.pdf", "b.pdf"))


def test_each_heatmap_panel_is_its_subsets_weights_layer_by_token_subject_in_red(tmp_path):
    _, paths = write_tables(tmp_path)
    examples = {s: pd.read_csv(p, sep="\t", keep_default_na=False, dtype={"token": str}) for s, p in paths.items()}
    bottom = examples["bottom"]
    examples["bottom"] = bottom.assign(weight=bottom["weight"] * bottom["layer"] / 3)  # panels that differ
    figure = plot_attention_heatmaps(examples, "tiny", "synth")
    for ax, (subset, example) in zip(figure.axes, examples.items()):
        drawn = ax.images[0].get_array()
        expected = example.pivot(index="layer", columns="position", values="weight").to_numpy()
        np.testing.assert_allclose(drawn, expected)  # row 0 = layer 1, drawn at the bottom
        red = [label.get_text() for label in ax.get_xticklabels() if label.get_color() == "tab:red"]
        assert red == ["NA"]
    assert figure.axes[0].images[0].norm.vmax == max(e["weight"].max() for e in examples.values())


def test_the_right_panel_shows_where_attention_off_the_subject_and_relation_goes(tmp_path):
    sources, _ = write_tables(tmp_path)
    data = read_attention(sources)
    subject, relation, rest = plot_attention_by_layer(data, "tiny", "synth").axes
    assert "subject" in subject.get_title() and "relation" in relation.get_title() and "rest" in rest.get_title()
    top = data[data["subset"] == "top"]
    expected = (1 - top["subject_mass"] - top["relation_mass"]).groupby(top["layer"]).mean()
    drawn = [line for line in rest.get_lines() if line.get_label() == "FT-Top"][0]
    np.testing.assert_allclose(drawn.get_ydata(), expected.to_numpy())
    assert rest.get_ylim() == (0, 1)


def test_a_missing_attention_table_is_an_error_naming_it(tmp_path):
    sources, examples = write_tables(tmp_path)
    sources[1]["path"] = str(tmp_path / "gone.tsv")
    with pytest.raises(FactftError, match=r"gone.tsv is missing; run the `attention` rule"):
        make_attention_figures(sources, examples, "tiny", "synth", [tmp_path / "a.png"], [tmp_path / "b.png"])
    assert not (tmp_path / "a.png").exists()


def test_the_heatmaps_question_is_the_most_popular_ties_going_to_the_smallest_id():
    questions = pd.DataFrame({"id": ["q9", "q10", "q2", "q3"], "popularity": [5.0, 7.0, 7.0, 1.0]}, index=[4, 5, 6, 7])
    assert example_index(questions) == 5  # "q10" sorts before "q2"
    assert example_index(questions.iloc[::-1]) == 5  # whatever the row order
