"""Loading a causal LM and its tokenizer from a local folder, with an optional finetune output.

Everything loads offline (the hub is fetched once by `download_model`), from safetensors or
a GGUF file only: pickled `.bin` weights can run arbitrary code when loaded.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import warnings
from fnmatch import fnmatch
from pathlib import Path

import torch

from factft.errors import FactftError
from factft.model_folder import check_model_folder, check_tokenizer_files
from factft.net import hub_connection_errors, hub_failure
from factft.tables import atomic_dir, check_new_dir

log = logging.getLogger(__name__)

# What a finetune output folder holds: a peft adapter, or a whole model (method full).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
QUANTIZATIONS = ("nf4",)

# peft reads transformers' renamed `is_gradient_checkpointing` whenever it wraps a model: a
# warning in every finetune, evaluation and attention log that no user can act on.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


# Weights from this size up make a CPU run of a job meant for a GPU hopeless: hours become
# days, and SLURM's retries (runtime x attempt) hold the GPU six times the runtime before failing.
CPU_WEIGHTS_LIMIT = 2**30
# Where a model that overflows fp16 runs: on a GPU without bf16 it computes in fp16 (compute_dtype).
BF16_GPU = "a GPU with bf16 (compute capability 8.0 on)"


def default_device(spec: dict | None = None) -> str:
    """The spec's `device` (a model whose resources give it no GPU: the CPU), else CUDA where
    there is one."""
    if spec and spec.get("device"):
        return spec["device"]
    return "cuda" if torch.cuda.is_available() else "cpu"


def given_gpus() -> str:
    """The GPUs a scheduler gave this job (CUDA_VISIBLE_DEVICES, as SLURM sets it); '' for
    none, also where it is set empty or to -1 to run on the CPU on purpose."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return "" if visible in ("", "-1", "NoDevFiles") else visible


def weight_files(spec: dict) -> list[Path]:
    """The files a model's weights load from: its GGUF file, or its safetensors."""
    path = Path(spec["path"])
    return [path / spec["gguf_file"]] if spec.get("gguf_file") else sorted(path.glob("*.safetensors"))


def weights_bytes(spec: dict) -> int:
    return sum(file.stat().st_size for file in weight_files(spec))


def check_device(spec: dict, device: str) -> None:
    """A job given a GPU that its torch cannot use would run on the CPU: it stops here, before
    loading, where the model is large (weights_bytes >= CPU_WEIGHTS_LIMIT), and says so in
    its log where it is not."""
    gpus = given_gpus()
    if str(device) != "cpu" or not gpus or torch.cuda.is_available() or spec.get("device") == "cpu":
        return
    if torch.version.cuda is None and torch.version.hip is None:
        why = f"torch {torch.__version__} is a CPU-only build"
    else:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {torch.version.hip}"
        why = f"torch {torch.__version__} ({build}) finds no usable GPU (its driver too old? nvidia-smi)"
    name, size = spec["name"], weights_bytes(spec)
    if size < CPU_WEIGHTS_LIMIT:
        log.warning("model '%s': this job was given GPU(s) %s, but %s: it runs on the CPU", name, gpus, why)
        return
    raise FactftError(
        f"model '{name}' ({size / 1e9:.1f} GB of weights) would run on the CPU: this job was given "
        f"GPU(s) (CUDA_VISIBLE_DEVICES={gpus}), but {why}; install a CUDA build of torch where the "
        "jobs run, or set CUDA_VISIBLE_DEVICES empty to run on the CPU on purpose"
    )


def compute_dtype(device: str) -> torch.dtype:
    """bf16 on GPUs that compute in it, fp16 on older ones (gpu_computes_bf16), fp32 on CPU
    (bf16 matmuls are slow and lossy there)."""
    if not str(device).startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if gpu_computes_bf16() else torch.float16


@functools.cache
def gpu_computes_bf16() -> bool:
    """Whether this job's GPU has bf16 arithmetic (compute capability 8.0 on: A100, H100, L40;
    AMD's MI200 on). A V100 or T4 emulates bf16 in fp32, at an eighth of its fp16 tensor-core
    peak: there the models run in fp16, as transformers' Trainer does with fp16=True, and a
    finetune scales its loss (factft.train.loss_scaler). Said once in the job's log. Without a
    GPU to ask (a plan made on a CPU), bf16."""
    if not torch.cuda.is_available() or torch.cuda.is_bf16_supported(including_emulation=False):
        return True
    major, minor = torch.cuda.get_device_capability()
    log.warning(
        "GPU %s (compute capability %d.%d) has no bf16 arithmetic: models run in fp16, and a "
        "finetune scales its loss to keep small gradients from rounding to zero",
        torch.cuda.get_device_name(),
        major,
        minor,
    )
    return False


def peak_memory(device) -> str:
    """", peak GPU memory X GiB": what the job's tensors took at most on a CUDA device (the
    figure to size a GPU by); empty on CPU, where the job's benchmark file has its memory."""
    if not str(device).startswith("cuda"):
        return ""
    return f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


def trained_quantization(adapter: str | Path) -> str | None:
    """The quantization of the base an adapter was trained on ("nf4" for QLoRA), from the
    trained.json that factft's finetune writes beside it; None for other adapters."""
    record = Path(adapter) / "trained.json"
    if not record.is_file():
        return None
    return "nf4" if json.loads(record.read_text()).get("method") == "qlora" else None


def require_bitsandbytes(
    why: str = "finetune.method qlora needs bitsandbytes (4-bit NF4 base)", instead: str = "use method lora or full"
) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise FactftError(f"{why}: pip install 'factft[qlora]' (envs/torch.yaml has it), or {instead}") from None


def adapter_kind(adapter: str | Path) -> str:
    """'peft' for a LoRA adapter folder, 'full' for a whole finetuned model."""
    adapter = Path(adapter)
    if (adapter / ADAPTER_CONFIG).is_file():
        if not (adapter / ADAPTER_WEIGHTS).is_file():
            # peft would fall back to a pickled adapter_model.bin.
            raise FactftError(
                f"finetune output {adapter} has no {ADAPTER_WEIGHTS} (found "
                f"{sorted(p.name for p in adapter.iterdir())[:10]}); only safetensors weights are "
                "loaded, since pickled .bin weights can run code: delete it and rerun `finetune`"
            )
        return "peft"
    if (adapter / "config.json").is_file() and any(adapter.glob("*.safetensors")):
        return "full"
    raise FactftError(
        f"finetune output {adapter} holds neither a peft adapter ({ADAPTER_CONFIG}) nor full "
        "safetensors weights (config.json + *.safetensors); delete it and rerun `finetune`"
    )


def load_model(
    spec: dict,
    adapter: str | Path | None = None,
    *,
    quantize: str | None = None,
    device: str | None = None,
    for_training: bool = False,
    dtype: torch.dtype | None = None,
    attention: str | None = None,
):
    """The model (on `device`, eval mode unless `for_training`) and its tokenizer.

    `spec` is `model_spec(name)` from rules/common.smk. `adapter` is a `finetune` output: a
    peft adapter is attached (trainable when `for_training`, else merged into the weights
    where that is exact: merges_exactly) or full weights replace the base. `quantize="nf4"`
    loads the base in 4-bit NF4 with double quantization (QLoRA; bitsandbytes, on CUDA or
    CPU), as does `spec["quantize"]` (models.<name>.quantize) in every job. `dtype` is the
    weights' dtype (default: compute_dtype(device)). `attention` is the attention
    implementation; by default transformers' own choice, SDPA where the model has it (Llama,
    Mistral, ...), else eager (Gemma 2, Bloom, ...). The tokenizer gets the eos token as its
    pad token when it has none; the caller sets `padding_side`.

    A QLoRA adapter was trained on the NF4-rounded base, not on the original weights: for
    evaluation that base is rebuilt (quantized, then dequantized to the compute dtype) with
    the adapter on it: the trained weights, without 4-bit arithmetic. Not bit for bit the
    trained model: training held the norms, embeddings and output layer in fp32 (peft's
    prepare_model_for_kbit_training), evaluation in the compute dtype, as every other model
    is evaluated. A model held in 4 bits stays so, its adapter beside the 4-bit layers.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantize = quantize or spec.get("quantize")
    if quantize not in (None, *QUANTIZATIONS):
        raise FactftError(f"quantize '{quantize}' is not supported; use one of {QUANTIZATIONS} or none")
    device = device or default_device(spec)
    check_model_folder(spec)
    check_device(spec, device)
    name, trust = spec["name"], bool(spec.get("trust_remote_code"))
    if trust:
        log.warning("model '%s': trust_remote_code is on: running the model folder's own Python code", name)
    kind = adapter_kind(adapter) if adapter is not None else None
    # For evaluation, a QLoRA adapter's base is rebuilt as it was trained (see above).
    rebuilt = None if for_training or quantize or kind != "peft" else trained_quantization(adapter)
    quantize = quantize or rebuilt
    if quantize:
        require_bitsandbytes()

    # A full finetune saved a whole model (plain safetensors, tokenizer beside it).
    weights = Path(adapter) if kind == "full" else Path(spec["path"])
    gguf = None if kind == "full" else spec.get("gguf_file")
    common = {"local_files_only": True, "trust_remote_code": trust}
    source = {"gguf_file": gguf} if gguf else {"use_safetensors": True}
    # The tokenizer first: checked in a second, where the weights may take minutes.
    if not gguf:
        check_tokenizer_files(name, weights)
    tokenizer = AutoTokenizer.from_pretrained(weights, **common, **({"gguf_file": gguf} if gguf else {}))
    check_tokenizer(tokenizer, name, weights)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    options = {"dtype": dtype or compute_dtype(device), "attn_implementation": attention}
    if quantize:
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(device),
        )
        options["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(weights, **common, **source, **options)
        if quantize:
            layers = check_quantized(model, name, held=bool(spec.get("quantize")))
            log.info("model '%s': %d linear layers in 4-bit NF4 (bitsandbytes)", name, layers)
        if rebuilt:
            model = model.dequantize(dtype=compute_dtype(device))
            log.info("model '%s': dequantized to %s, the QLoRA adapter's base as it was trained", name, model.dtype)
        elif not quantize:
            model.to(device)

        if kind == "peft":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter), is_trainable=for_training)
            # A 4-bit base cannot absorb the adapter.
            if not for_training and (rebuilt or not quantize) and merges_exactly(model):
                model = model.merge_and_unload()
    except torch.OutOfMemoryError as error:
        in_4bit = bool(quantize) and not rebuilt
        raise FactftError(does_not_fit(spec, device, finetune=for_training, in_4bit=in_4bit)) from error

    if getattr(model, "generation_config", None) is not None:
        if not for_training:  # a full finetune saves the folder's own
            model.generation_config = greedy_generation_config(model.generation_config)
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.train(for_training)
    return model, tokenizer


def check_tokenizer(tokenizer, name: str, folder: Path) -> None:
    """A tokenizer that ends every text with eos (add_eos_token, as some Llama derivatives ship
    it) would end each prompt there: the model would answer after an end of text."""
    eos = tokenizer.eos_token_id
    ids = tokenizer("x")["input_ids"]
    if eos is not None and ids[-1:] == [eos] and eos not in tokenizer("x", add_special_tokens=False)["input_ids"]:
        raise FactftError(
            f"model '{name}': its tokenizer ends every text with eos ({tokenizer.eos_token!r}), so every prompt "
            f"would end there; set add_eos_token to false in {folder / 'tokenizer_config.json'}"
        )


def greedy_generation_config(config):
    """A model folder's generation config with only its special tokens kept.

    transformers fills every generation setting left unset in a `generate` call from the
    model's config: a folder's repetition penalty (some instruct models ship one), n-gram ban,
    beams or minimum length would change its greedy answers, unlike its likelihoods, and
    differently for each model. Its end tokens (several for chat models) stay."""
    from transformers import GenerationConfig

    ids = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    return GenerationConfig(**{key: getattr(config, key) for key in ids if getattr(config, key, None) is not None})


def does_not_fit(spec: dict, device, *, finetune: bool, in_4bit: bool) -> str:
    """What to change when a model's weights do not fit in its GPU's memory: every retry of
    the job fails the same way, whatever host memory SLURM gives it. A 16-bit model takes a
    quarter of the memory in 4 bits: for a finetune, QLoRA; for the other jobs (and a QLoRA
    adapter's base, rebuilt in 16 bits to evaluate), models.<name>.quantize."""
    gpu = ""
    if str(device).startswith("cuda"):
        total = torch.cuda.get_device_properties(device).total_memory
        gpu = f" ({torch.cuda.get_device_name(device)}, {total / 2**30:.0f} GiB)"
    remedies = ["run it on a GPU with more memory (slurm_partition and gpu_model in the SLURM profile)"]
    if not in_4bit:
        remedies.append(
            "use finetune.method qlora (a 4-bit base)"
            if finetune
            else f"hold it in 4 bits in every job (models.{spec['name']}.quantize: nf4; its finetunes QLoRA)"
        )
    return (
        f"model '{spec['name']}' ({weights_bytes(spec) / 2**30:.1f} GiB of weights on disk) does not fit in the "
        f"memory of its GPU{gpu}: {', or '.join(remedies)}"
    )


def merges_exactly(model) -> bool:
    """Whether merging a peft model's adapter into its base weights keeps the trained model.
    In fp32 (CPU) it does, and the merged model generates as fast as the base. A bf16 sum
    (GPU) keeps 8 significant bits: an update below 1/256 of its weight is lost and larger
    ones are rounded (23% of a LoRA's effect lost where its updates are ~1/140 of the weights,
    2% at ~1/14; fp16, on GPUs without bf16, keeps 11 bits and rounds less), so there the
    adapter stays beside the weights, computed as in training."""
    return model.get_base_model().dtype == torch.float32


def check_quantized(model, name: str, *, held: bool = False) -> int:
    """The number of 4-bit layers. bitsandbytes replaces only plain nn.Linear layers: a model
    with linear layers of its own class (Falcon's FalconLinear) loads with none in 4 bits, and
    QLoRA would silently train a full-precision base (and fail later, when it is dequantized
    for evaluation). A model whose forward reads a layer's weight itself (Mamba's dt_proj)
    fails on its packed 4-bit weights: a two-token forward finds that here, with the model's
    name, not at the first step. `held`: models.<name>.quantize asked for the 4 bits."""
    from bitsandbytes.nn import Linear4bit

    model_class = type(model).__name__
    remedy = f"remove models.{name}.quantize and " if held else ""
    remedy += "use finetune.method lora for this model"
    layers = sum(isinstance(module, Linear4bit) for module in model.modules())
    if not layers:
        raise FactftError(
            f"model '{name}': bitsandbytes quantized none of {model_class}'s layers to 4 bits, so "
            f"it would run, and QLoRA train, in full precision; {remedy}"
        )
    try:
        with probing(model):
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=model.device), use_cache=False)
    except Exception as error:  # noqa: BLE001 - whatever stops it, training would stop there too
        log.debug("the 4-bit model's two-token forward failed", exc_info=True)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise FactftError(
            f"model '{name}': {model_class} with bitsandbytes' 4-bit layers fails a two-token forward "
            f"({type(error).__name__}: {reason}); {remedy}"
        ) from None
    return layers


@contextlib.contextmanager
def probing(model):
    """For a check's forward pass before training: no gradients, in training mode (the kernels
    training runs; in eval mode on a CPU, bitsandbytes repacks 4-bit weights in place for its
    inference kernel), with the random state (dropout) and the model's mode left as they were."""
    device, mode = model.device, model.training
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.train()
        try:
            yield
        finally:
            model.train(mode)


# ---- fetching from the hub (login node) ------------------------------------------

# Weights as safetensors, configs and tokenizer files: never pickled .bin weights, and not
# the duplicate "consolidated"/"original" checkpoints some repositories ship for other tools.
HUB_FILES = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",  # an instruction-tuned model's chat template (models.<name>.chat)
    "chat_template.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
]
HUB_SKIP = ["consolidated*", "original/*"]


def hub_file(name: str) -> bool:
    """Whether `download_model` keeps a repository file (a path relative to the repository)."""
    return any(fnmatch(name, p) for p in HUB_FILES) and not any(fnmatch(name, p) for p in HUB_SKIP)


def download_model(name: str, source: dict, target: str | Path) -> Path:
    """Fetch `source['hf']` at `source.get('revision')` into the hub cache, then fill `target`.

    `source` is `hub_model_spec` from rules/common.smk (hf, revision, cache_dir). Files are
    hard-linked from the cache where the file system allows it, else copied, into a temp
    folder beside `target` that is renamed into place: `target` is complete or absent.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision = source["hf"], source.get("revision")
    target = Path(target)
    check_new_dir(target)
    try:
        snapshot = Path(
            snapshot_download(
                repo,
                revision=revision,
                cache_dir=source.get("cache_dir"),
                allow_patterns=HUB_FILES,
                ignore_patterns=HUB_SKIP,
            )
        )
    except GatedRepoError:
        raise FactftError(
            f"model '{name}': {repo} is gated; accept its license on huggingface.co and log in "
            "(`hf auth login` or HF_TOKEN) on the machine that runs `snakemake download_models`"
        ) from None
    except RevisionNotFoundError:
        raise FactftError(
            f"model '{name}': revision '{revision}' of {repo} does not exist (models.{name}.source.revision)"
        ) from None
    except RepositoryNotFoundError:
        raise FactftError(f"model '{name}': no hub repository {repo} (models.{name}.source.hf)") from None
    except (OSError, *hub_connection_errors()) as error:
        raise FactftError(
            f"model '{name}': cannot reach the hub for {repo} ({hub_failure(error)}); run "
            f"`snakemake download_models` where there is internet, or set models.{name}.source.path "
            "to a local model folder"
        ) from None
    weights = [f for f in snapshot.rglob("*.safetensors") if hub_file(f.relative_to(snapshot).as_posix())]
    if not weights:
        raise FactftError(
            f"model '{name}': {repo} has no safetensors weights; convert them and set "
            f"models.{name}.source.path to the converted folder"
        )
    with atomic_dir(target) as tmp:
        for file in snapshot.rglob("*"):
            # An offline hit returns the cached snapshot unfiltered: apply the same patterns.
            if file.is_dir() or not hub_file(file.relative_to(snapshot).as_posix()):
                continue
            dest = tmp / file.relative_to(snapshot)
            dest.parent.mkdir(parents=True, exist_ok=True)
            blob = file.resolve()  # the cache's snapshot entries are links to content blobs
            try:
                os.link(blob, dest)
            except OSError:
                shutil.copy2(blob, dest)
    # The snapshot's folder is the commit: to pin exactly these weights, models.<name>.source.revision.
    log.info("model '%s': %s at commit %s (%d weight files) -> %s", name, repo, snapshot.name, len(weights), target)
    return target
