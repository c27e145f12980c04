"""The tiny pretrained Llama: a folder that loads like a hub model, seeded, covering QA words."""

import json

import torch
from safetensors.torch import load_file
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from factft.errors import FactftError
from factft.pretrain import build_model, pack, pretrain, save_model, tokenizer_texts, train_tokenizer
from factft.world import generate_world

PROMPT = {"template": "Q: {question} A:", "answer": " {answer}"}
TINY = dict(
    hidden_size=32, layers=1, heads=2, intermediate_size=64, epochs=2, batch_size=8, seq_len=16, seed=0
)


@pytest.fixture(scope="module")
def world():
    return generate_world(
        subjects=30, relations=2, answers_per_relation=5, mentions=300, min_mentions=1, seed=0
    )


@pytest.fixture(scope="module")
def pretrained(world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny"
    summary = pretrain(world.corpus, world.facts, PROMPT, folder, threads=1, **TINY)
    return folder, summary


def test_the_folder_loads_through_the_auto_classes_like_a_hub_model(pretrained, world):
    folder, _ = pretrained
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    # Readable like its config in a shared cache, not private to the user who pretrained it.
    assert (folder / "model.safetensors").stat().st_mode == (folder / "config.json").stat().st_mode
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token} == {
        "<s>", "</s>", "<pad>", "<unk>"
    }  # fmt: skip
    generation = model.generation_config
    assert (generation.eos_token_id, generation.pad_token_id) == (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert model.config.vocab_size == len(tokenizer)
    ids = tokenizer(world.facts["statement"][0])["input_ids"]
    assert ids[0] == tokenizer.bos_token_id, "a bos is prepended, as Llama's tokenizer does"


def test_saved_and_reloaded_model_gives_the_same_logits(world, tmp_path):
    tokenizer = train_tokenizer(tokenizer_texts(world.corpus, world.facts, PROMPT))
    model = build_model(
        tokenizer, hidden_size=32, layers=1, heads=2, intermediate_size=64, seq_len=16, seed=0
    )
    model.eval()
    save_model(model, tokenizer, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tokens = AutoTokenizer.from_pretrained(tmp_path / "m")
    text = PROMPT["template"].replace("{question}", world.facts["question"][0])
    ids = tokens(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == tokenizer(text, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_tokenizer_covers_qa_prompts_and_answers_with_no_unknowns(pretrained, world):
    tokenizer = AutoTokenizer.from_pretrained(pretrained[0])
    for fact in world.facts.itertuples():
        text = PROMPT["template"].replace("{question}", fact.question) + PROMPT["answer"].replace(
            "{answer}", fact.answers[0]
        )
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text


def test_answer_tokens_ignore_the_leading_space_and_decoding_reads_naturally(pretrained, world):
    tokenizer = AutoTokenizer.from_pretrained(pretrained[0])
    answer = world.facts["answers"][0][0]
    assert (
        tokenizer(f" {answer}", add_special_tokens=False)["input_ids"]
        == tokenizer(answer, add_special_tokens=False)["input_ids"]
    )
    assert len(tokenizer(answer, add_special_tokens=False)["input_ids"]) == 1
    line = world.corpus[0]
    assert tokenizer.decode(tokenizer(line)["input_ids"], skip_special_tokens=True) == line


def test_pretraining_is_deterministic_for_a_seed(pretrained, world, tmp_path):
    folder, summary = pretrained
    again = pretrain(world.corpus, world.facts, PROMPT, tmp_path / "again", threads=1, **TINY)
    first, second = load_file(folder / "model.safetensors"), load_file(
        tmp_path / "again" / "model.safetensors"
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert again["loss_per_epoch"] == summary["loss_per_epoch"]


def test_pretraining_lowers_the_loss_and_records_the_run(pretrained, world):
    folder, summary = pretrained
    assert summary["loss_per_epoch"][-1] < summary["loss_per_epoch"][0]
    assert summary["steps"] >= TINY["epochs"] and len(summary["loss_per_epoch"]) == TINY["epochs"]
    # pretrain.json is the summary, with every setting the run used.
    assert json.loads((folder / "pretrain.json").read_text()) == summary
    assert {key: summary[key] for key in TINY} == TINY


def test_an_existing_model_folder_is_never_overwritten(pretrained, world):
    folder, _ = pretrained
    before = (folder / "model.safetensors").read_bytes()
    with pytest.raises(FactftError, match="exists"):
        pretrain(world.corpus, world.facts, PROMPT, folder, **TINY)
    assert (folder / "model.safetensors").read_bytes() == before


def test_seq_len_shorter_than_a_statement_is_a_clear_error_before_training(world, tmp_path):
    with pytest.raises(FactftError, match="seq_len: 4"):
        pretrain(world.corpus, world.facts, PROMPT, tmp_path / "m", **dict(TINY, seq_len=4))
    assert not (tmp_path / "m").exists()


def test_packing_fills_windows_with_whole_statements_each_once():
    sequences = [[1] + [7] * n + [2] for n in (3, 8, 1, 5, 2, 6, 4)]
    order = [3, 0, 6, 1, 5, 2, 4]
    windows = pack(sequences, order, seq_len=12)
    assert all(len(w) <= 12 for w in windows)
    assert [t for w in windows for t in w] == [t for k in order for t in sequences[k]]
    # Every window starts at a statement's bos: no statement is cut.
    assert all(w[0] == 1 for w in windows)
    assert len(windows) < len(sequences)
