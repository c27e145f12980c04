import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from factft.errors import FactftError
from factft.models import download_model, hub_file, load_model
from conftest import SMOLLM2_GGUF, smollm2_folder
from test_plots import snakemake_in


def spec_for(path, name="tiny", **extra):
    return {"name": name, "path": str(path), "gguf_file": None, "trust_remote_code": False, **extra}


def logits(model, tokenizer, text="Q: Where was Ilmo Varsk born? A:"):
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def test_load_model_gives_fp32_eval_model_on_cpu_with_a_pad_token(tiny_model_dir):
    model, tokenizer = load_model(spec_for(tiny_model_dir), device="cpu")
    assert model.dtype == torch.float32
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert tokenizer.pad_token is not None


def test_a_model_without_sdpa_loads_with_eager_attention(tiny_model_dir, tmp_path):
    # Gemma 2 (like Bloom, MPT) has no SDPA path: transformers' default picks eager for it.
    from transformers import Gemma2Config

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=6,
        max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tokenizer = load_model(spec_for(tmp_path), device="cpu")
    assert model.config._attn_implementation == "eager"
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(model, tokenizer), logits(reference, tokenizer))


def test_tokenizer_without_pad_token_gets_eos_as_pad(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "m")
    _, loaded = load_model(spec_for(tmp_path / "m"), device="cpu")
    assert loaded.pad_token == loaded.eos_token == "</s>"


def test_a_tokenizer_that_ends_every_text_with_eos_is_refused_before_the_weights_load(tiny_model_dir, tmp_path):
    from tokenizers import processors

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )  # what add_eos_token: true makes of a Llama tokenizer
    tokenizer.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not reached")
    problem = r"model 'tiny': its tokenizer ends every text with eos \('</s>'\), so every prompt would end there"
    with pytest.raises(FactftError, match=problem + r"; set add_eos_token to false in .*m/tokenizer_config\.json"):
        load_model(spec_for(tmp_path / "m"), device="cpu")


def test_a_folder_without_tokenizer_files_is_named_before_the_weights_load(tiny_model_dir, tmp_path):
    # transformers' own error blames a missing package (sentencepiece or tiktoken).
    shutil.copytree(tiny_model_dir, tmp_path / "m", ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not reached")
    with pytest.raises(FactftError) as error:
        load_model(spec_for(tmp_path / "m"), device="cpu")
    message = str(error.value)
    assert message.startswith(f"model 'tiny': no tokenizer files in {tmp_path / 'm'} (files: ['config.json', ")
    assert "save the model's tokenizer there" in message and "models.tiny.source.path" in message


def test_chat_needs_a_chat_template_in_the_folder_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", None)  # not reached
    with pytest.raises(FactftError, match=r"models\.tiny\.chat is on, but .* holds no chat template"):
        load_model(spec_for(tiny_model_dir, chat=True), device="cpu")
    monkeypatch.undo()
    # Where transformers writes one (chat_template.jinja), it is found, and the tokenizer has it.
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    tokenizer.save_pretrained(tmp_path / "m")
    _, loaded = load_model(spec_for(tmp_path / "m", chat=True), device="cpu")
    assert loaded.chat_template == "{{ messages[0]['content'] }}"


def test_missing_model_folder_says_how_to_get_it(tmp_path):
    with pytest.raises(FactftError, match=r"model 'llama'.*download_models.*models\.llama\.source\.path"):
        load_model(spec_for(tmp_path / "nowhere", name="llama"), device="cpu")


def test_missing_gguf_file_is_named(tiny_model_dir):
    with pytest.raises(FactftError, match=r"GGUF file missing\.gguf .*gguf_file"):
        load_model(spec_for(tiny_model_dir, gguf_file="missing.gguf"), device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="here torch can use the GPU it is given")
def test_a_job_given_a_gpu_its_torch_cannot_use_stops_before_loading_a_large_model(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")  # the folder check passes; never read
    with open(tmp_path / "model.safetensors", "wb") as weights:
        weights.truncate(3 * 2**30)  # sparse: 3.2 GB to stat, nothing on disk, never read
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # what SLURM sets for `sbatch --gpus=1`
    with pytest.raises(FactftError) as error:
        load_model(spec_for(tmp_path, name="llama2-7b"))
    message = str(error.value)
    assert message.startswith("model 'llama2-7b' (3.2 GB of weights) would run on the CPU: this job was given GPU(s) ")
    why = r"(is a CPU-only build|\(\w+ \S+\) finds no usable GPU)"  # a CPU wheel; a CUDA one on a GPU-less node
    assert re.search(r"\(CUDA_VISIBLE_DEVICES=0\), but torch \S+ " + why, message)
    assert "set CUDA_VISIBLE_DEVICES empty to run on the CPU on purpose" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="here torch can use the GPU it is given")
def test_a_small_model_given_a_gpu_its_torch_cannot_use_runs_on_the_cpu_saying_so(tiny_model_dir, monkeypatch, caplog):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with caplog.at_level(logging.WARNING, logger="factft.models"):
        model, _ = load_model(spec_for(tiny_model_dir))
    assert model.device.type == "cpu"
    assert re.search(r"model 'tiny': this job was given GPU\(s\) 0, but torch \S+ .*: it runs on the CPU", caplog.text)
    caplog.clear()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the CPU on purpose
    with caplog.at_level(logging.WARNING, logger="factft.models"):
        load_model(spec_for(tiny_model_dir))
    assert "given GPU" not in caplog.text


def test_a_model_whose_resources_give_it_no_gpu_loads_on_the_cpu_whatever_is_visible(tiny_model_dir, monkeypatch):
    """models.<name>.resources: {gpu: 0} puts `device: cpu` in its spec (rules/common.smk,
    model_spec): its jobs hold no GPU, so they must not use one that is visible."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU workstation
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    model, _ = load_model(spec_for(tiny_model_dir, device="cpu"))
    assert model.device.type == "cpu"


def test_a_model_too_large_for_its_gpu_is_an_error_naming_the_remedies(tiny_model_dir, monkeypatch):
    spec = {"name": "tiny", "path": str(tiny_model_dir)}

    def out_of_memory(self, *args, **kwargs):  # a real one needs a GPU; this fails as one does
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 250.00 MiB")

    monkeypatch.setattr(torch.nn.Module, "to", out_of_memory)
    with pytest.raises(FactftError) as error:
        load_model(spec, device="cpu", for_training=True)
    assert str(error.value) == (
        "model 'tiny' (0.0 GiB of weights on disk) does not fit in the memory of its GPU: run it on a GPU with "
        "more memory (slurm_partition and gpu_model in the SLURM profile), or use finetune.method qlora (a 4-bit base)"
    )
    assert isinstance(error.value.__cause__, torch.OutOfMemoryError)
    with pytest.raises(FactftError) as error:  # evaluation: a QLoRA finetune would not shrink the base
        load_model(spec, device="cpu")
    assert str(error.value).endswith(
        "in the SLURM profile), or hold it in 4 bits in every job (models.tiny.quantize: nf4; its finetunes QLoRA)"
    )
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", out_of_memory)  # 4-bit layers load in place
    for training in (False, True):  # already 4 bits: only a larger GPU helps
        with pytest.raises(FactftError, match=r"does not fit .*: run it on a GPU with more memory \(.*profile\)$"):
            load_model(dict(spec, quantize="nf4"), device="cpu", for_training=training)


def test_peft_adapter_is_merged_for_evaluation_and_trainable_for_training(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    # Random B (not the zero init) so the adapter visibly changes the outputs.
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = logits(peft_model.eval(), tokenizer)

    merged, _ = load_model(spec_for(tiny_model_dir), tmp_path / "adapter", device="cpu")
    assert not hasattr(merged, "peft_config")
    assert torch.allclose(logits(merged, tokenizer), expected, atol=1e-5)
    plain, _ = load_model(spec_for(tiny_model_dir), device="cpu")
    assert not torch.allclose(logits(plain, tokenizer), expected, atol=1e-3)

    trainable, _ = load_model(spec_for(tiny_model_dir), tmp_path / "adapter", device="cpu", for_training=True)
    assert trainable.training
    assert any(p.requires_grad for n, p in trainable.named_parameters() if "lora_" in n)


def test_in_bf16_the_adapter_stays_beside_the_weights_as_in_training(tiny_model_dir, tmp_path):
    # A bf16 merge would round the adapter's updates into 8-bit-mantissa weights (merges_exactly).
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).save_pretrained(
        tmp_path / "adapter"
    )
    kept, tokenizer = load_model(spec_for(tiny_model_dir), tmp_path / "adapter", device="cpu", dtype=torch.bfloat16)
    assert hasattr(kept, "peft_config") and not kept.training
    bf16_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    trained = PeftModel.from_pretrained(bf16_base, str(tmp_path / "adapter")).eval()
    assert torch.equal(logits(kept, tokenizer), logits(trained, tokenizer))


def test_full_weights_output_replaces_the_base(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    model.save_pretrained(tmp_path / "full")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "full")
    loaded, tokenizer = load_model(spec_for(tiny_model_dir), tmp_path / "full", device="cpu")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_unrecognised_finetune_output_is_a_clear_error(tiny_model_dir, tmp_path):
    (tmp_path / "adapter").mkdir()
    with pytest.raises(FactftError, match="neither a peft adapter"):
        load_model(spec_for(tiny_model_dir), tmp_path / "adapter", device="cpu")


def test_download_model_with_the_hub_unreachable_names_the_model_and_the_fix(tmp_path):
    source = {"hf": "factft-test/not-cached", "cache_dir": str(tmp_path / "hf")}
    with pytest.raises(FactftError, match=r"model 'llama2-7b': cannot reach the hub.*snakemake download_models"):
        download_model("llama2-7b", source, tmp_path / "models" / "llama2-7b")
    assert not (tmp_path / "models" / "llama2-7b").exists()


def test_download_model_fills_the_target_from_the_cache_with_safetensors_configs_and_tokenizer_only(tmp_path, caplog):
    # A hub cache as a login node leaves it: refs/main names the snapshot that holds the files.
    repo = tmp_path / "hf" / "models--factft-test--cached"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "pytorch_model.bin", "consolidated.safetensors"):
        (snapshot / name).write_text(name)
    source = {"hf": "factft-test/cached", "cache_dir": str(tmp_path / "hf")}
    with caplog.at_level(logging.INFO, logger="factft.models"):
        target = download_model("cached", source, tmp_path / "m")
    assert sorted(p.name for p in Path(target).iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (target / "config.json").read_text() == "config.json"
    assert f"factft-test/cached at commit {'0' * 40}" in caplog.text  # what to pin as source.revision


@pytest.mark.slow
def test_the_download_model_rule_takes_the_pinned_revision_from_the_configured_cache(tmp_path):
    repo = tmp_path / "hf" / "models--factft-test--cached"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    for commit in ("0" * 40, "1" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text(f'{{"commit": "{commit}"}}')
        (repo / "snapshots" / commit / "model.safetensors").write_text("weights")
    never_read = {"source": {"path": "never-read.csv"}, "popularity": {"scorer": "column", "column": "x"}}
    config = {
        "cache_dir": "hf",
        "models": {"cached": {"source": {"hf": "factft-test/cached", "revision": "1" * 40}}},
        "datasets": {"trivia": never_read},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = snakemake_in(tmp_path, tmp_path / "config.yaml", ["resources/models/cached"], "--cores", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "resources/models/cached/config.json").read_text() == f'{{"commit": "{"1" * 40}"}}'


@pytest.mark.slow
def test_a_gguf_model_loads_dequantized_and_generates():
    folder = smollm2_folder()
    model, tokenizer = load_model(
        spec_for(folder, name="smollm2", gguf_file=SMOLLM2_GGUF), device="cpu"
    )
    assert model.dtype == torch.float32
    batch = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
    # Dequantised right, the 135M model knows this one (garbage weights would not).
    assert tokenizer.decode(out[0, batch["input_ids"].shape[1] :]).startswith(" Paris")


def test_a_hub_download_keeps_safetensors_configs_and_tokenizer_and_skips_duplicates():
    # A 7B repository's files (Llama-3's layout: pickled .bin shards beside safetensors, and
    # the original/ checkpoint for Meta's own code), as the hub lists them.
    listing = [
        "LICENSE", "README.md", "config.json", "generation_config.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
        "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json", "consolidated.00.pth",
        "original/params.json", "original/tokenizer.model", "original/model.safetensors",
        "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
        "chat_template.jinja",
    ]  # fmt: skip
    assert [name for name in listing if hub_file(name)] == [
        "config.json", "generation_config.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
        "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
        "chat_template.jinja",
    ]  # fmt: skip
