"""Finetuning and evaluation throughput: plain transformers + peft against factft's paths.

    python bench/speed.py --device cuda   # Llama-2-7B shape, random weights (make bench-gpu)
    python bench/speed.py --device cpu    # a tiny Llama, minutes on 2 cores (make bench-cpu)

One run, one device, one random model and one set of QA-like examples (prompt 8-48
tokens, answer 1-8 tokens, skewed short as in PopQA), measured side by side:

- finetuning: transformers `Trainer` + peft LoRA with DataCollatorForSeq2Seq (random
  batches padded to their longest example, default settings) against factft.train's loop
  (seeded random batches, bf16 autocast and fused AdamW on CUDA), padded and packed
  (`finetune.packing`), for LoRA on q,v, LoRA on all linear layers and QLoRA (NF4;
  bitsandbytes runs it on a CPU too, slowly), with the same LoRA settings, examples, batch
  size and learning rate: real (non-pad) tokens/s, MFU ((4N + 6 x trainable) FLOPs per
  token against 989 TFLOP/s, CUDA only) and peak memory; and LoRA q,v with compiled
  blocks (`finetune.compile`), timed over a second epoch (the first compiles them), on CUDA
  also replayed as CUDA graphs (factft-graphs: the library's `compile: graphs`, widths
  rounded up to multiples of 16; in the config's schema once a GPU has measured it);
- profile: where an eager LoRA q,v step's time goes (torch.profiler over 3 steps): operator
  calls, and on CUDA the launches and the GPU's busy time against the step's wall time;
- loading: the model read from disk onto the device, page cache evicted (every GPU job's
  first cost; bench/grid_hours.py counts it per job);
- evaluation: a naive `generate` loop (batches of 64 in test order, padded, LoRA not
  merged) against factft.generate.generate_texts (length-sorted batches, a larger batch,
  LoRA merged where that is exact, fp32, as factft.models.load_model does; decoding in
  rounds, and in one round) on the same questions (on a GPU the naive loop the first 1,000
  of them), max_new_tokens 16: questions/s, and the share of questions where both give the
  same answer. Twice: as the random model answers (16 tokens each: no answer ends), and
  with answers that end as a finetuned model's do (AnswersEnd: eos after 1-8 tokens, median
  2; 1 in 50 never ends); and multiple choice (4 options, MMLU's path): every choice scored
  with its prompt in full against factft.generate.choice_logprobs (each prompt once, every
  choice from its KV cache).

Every finished row is written at once (atomically) to the tsv, so a run stopped at a time
limit keeps what it measured; each row's ratio to its baseline is printed as it lands, and
all of them at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch._dynamo.utils import counters
from torch.autograd import DeviceType
from transformers import LogitsProcessor, LogitsProcessorList, TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))  # factft without installing it (GPU image)

from factft.errors import FactftError  # noqa: E402
from factft.generate import answer_logprobs, choice_logprobs, generate_texts, left_pad, prompt_answer_ids  # noqa: E402
from factft.prompts import prompt_text  # noqa: E402
from factft.tables import write_tsv  # noqa: E402
from factft.train import (  # noqa: E402
    batch_width,
    check_packing,
    compile_blocks,
    cuda_graphs,
    encode_examples,
    epoch_batches,
    lora_config,
    make_optimizer,
    prepare_model,
    seed_everything,
    train_steps,
    trainable_parameters,
    width_multiple,
)

PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16
PROMPT = {"template": "Q: {question} A:", "answer": " {answer}"}
SHAPES = {
    # Llama-2-7B: 6.74e9 parameters.
    "cuda": {"hidden": 4096, "layers": 32, "heads": 32, "mlp": 11008, "vocab": 32000},
    # Wide enough that matrix work, not Python, dominates a step on a CPU core.
    "cpu": {"hidden": 256, "layers": 4, "heads": 8, "mlp": 688, "vocab": 4096},
}
SIZES = {  # examples per finetune run; evaluation questions, of them with AnswersEnd and for the naive
    # generate loop (its rate is per question at any count: on a GPU the first 1,000 save ~35 s
    # of the device's few minutes, agreement is over them); factft's eval batch.
    # eval_batch 500: six equal batches of 3,000, one compile of the static cache's step.
    "cuda": {
        "examples": 2048, "questions": 3000, "ending_questions": 1000, "baseline_questions": 1000, "eval_batch": 500,
    },
    "cpu": {"examples": 512, "questions": 300, "ending_questions": 2000, "baseline_questions": 300, "eval_batch": 256},
}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}  # config/config.yaml
COMPILED = "lora-qv"  # the variant measured with compiled blocks too, and profiled
PROFILED_STEPS = 3  # steps of factft's eager loop under torch.profiler, after UNPROFILED_STEPS
UNPROFILED_STEPS = 3  # first steps choose kernels and fill the allocator
TARGETS = {"lora-qv": ["q_proj", "v_proj"], "lora-all": "all-linear", "qlora-all": "all-linear"}
BASELINE_EVAL_BATCH = 64
MAX_NEW_TOKENS = 16
EVAL_LABEL = "lora-qv adapter"
ENDING_LABEL = "lora-qv adapter, answers end"
NEVER_ENDS = 0.02  # share of answers that run to max_new_tokens (a finetuned model repeating itself)
CHOICE_LABEL = "multiple choice, 4"
COLUMNS = [
    "date", "device", "device_name", "torch", "transformers", "peft", "bitsandbytes", "model",
    "stage", "variant", "path", "batch_size", "items", "real_tokens", "computed_tokens",
    "seconds", "wall_s", "cpu_s", "tokens_per_s", "questions_per_s", "forward_passes", "mfu", "peak_gb",
    "peak_reserved_gb", "context_gb", "compile_s", "mean_loss", "agreement",
    "aten_calls", "launches", "device_busy_s", "note",
]  # fmt: skip


# ---- inputs ----------------------------------------------------------------------


def make_tokenizer(vocab: int):
    """A word-level tokenizer: one token per word, so lengths are exactly as drawn."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>", "Q", ":", "A"]
    words += [f"w{i}" for i in range(vocab - len(words))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def make_facts(n: int, vocab: int, seed: int) -> pd.DataFrame:
    """QA pairs of random words: prompts of 8-48 tokens (bos, 'Q :', question, 'A :'),
    median about 17, and answers of 1-8 tokens (+ eos), median 2: PopQA-like lengths."""
    rng = np.random.default_rng(seed)
    prompt_len = np.clip(np.rint(rng.lognormal(np.log(17), 0.45, n)), 8, 48).astype(int)
    answer_len = np.clip(rng.geometric(0.45, n), 1, 8)
    word = lambda: f"w{rng.integers(0, vocab - 7)}"  # noqa: E731
    questions = [" ".join(word() for _ in range(k - 5)) for k in prompt_len]
    answers = [[" ".join(word() for _ in range(k))] for k in answer_len]
    return pd.DataFrame({"question": questions, "answers": answers})


def question_prompts(questions: pd.DataFrame) -> list[str]:
    return [prompt_text(q, PROMPT["template"]) for q in questions["question"]]


def build_model(shape: dict, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["mlp"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        attn_implementation="sdpa",
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    seed_everything(0)
    with torch.device(device):  # initialised where it runs: a 7B is built in seconds on a GPU
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    # Random weights give near-flat next-token distributions; a larger scale gives distinct,
    # confident greedy answers, so agreement between the two evaluation paths means something.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.generation_config.pad_token_id = 3
    return model.eval()


class AnswersEnd(LogitsProcessor):
    """Makes the random model's answers end as a finetuned model's do: eos after the length
    drawn for the question's answer (make_facts), except for NEVER_ENDS of the questions.

    The length is found from the question's last word, the token before "A :", so it follows
    a question through any batching, padding or re-prompting (factft's decoding rounds);
    questions that share a last word (a few in a hundred) share the last one's length.
    """

    def __init__(self, tokenizer, questions: pd.DataFrame, device: str, seed: int = 1):
        never = np.random.default_rng(seed).random(len(questions)) < NEVER_ENDS
        self.lengths = torch.full((len(tokenizer),), 10**6, dtype=torch.long)
        for question, answers, endless in zip(questions["question"], questions["answers"], never):
            if not endless:
                self.lengths[tokenizer.convert_tokens_to_ids(question.split()[-1])] = len(answers[0].split())
        self.lengths = self.lengths.to(device)
        self.colon, self.eos = tokenizer.convert_tokens_to_ids(":"), tokenizer.eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        columns = torch.arange(input_ids.shape[1], device=input_ids.device)
        answer_start = torch.where(input_ids == self.colon, columns, -1).max(-1).values + 1
        last_word = input_ids.gather(1, (answer_start - 3).clamp(min=0)[:, None])[:, 0]
        ended = input_ids.shape[1] - answer_start >= self.lengths[last_word]
        only_eos = torch.full_like(scores, float("-inf"))
        only_eos[:, self.eos] = 0.0
        return torch.where(ended[:, None], only_eos, scores)


# ---- measuring -------------------------------------------------------------------


class Clock:
    """Wall time, process CPU time and peak device memory of a block (CUDA work finished
    at both ends). `seconds` is what throughput is computed from: wall time on a GPU, CPU
    time on a CPU, where a shared machine's other jobs would otherwise set the result."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.wall = time.perf_counter() - self.start
        self.cpu = time.process_time() - self.cpu_start
        self.seconds = self.wall if self.cuda else self.cpu
        self.peak_gb = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else float("nan")
        # What the allocator held, and what the device holds beside it (the CUDA context, loaded
        # kernels): together, what must fit on a smaller card.
        self.peak_reserved_gb = torch.cuda.max_memory_reserved() / 2**30 if self.cuda else float("nan")
        self.context_gb = float("nan")
        if self.cuda:
            free, total = torch.cuda.mem_get_info()
            self.context_gb = (total - free - torch.cuda.memory_reserved()) / 2**30


def base_parameters(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


def mfu(tokens_per_s: float, n_base: int, n_trainable: int, device: str) -> float:
    if device != "cuda":
        return float("nan")
    # Frozen base: forward + activation gradients (4N); trainable weights also get weight gradients.
    return tokens_per_s * (4 * n_base + 6 * n_trainable) / PEAK_FLOPS


class Passes:
    """Counts a model's forward passes in a block and the tokens they compute (padding
    included): evaluation's work in device-independent terms. A 7B's decoding step on a
    GPU costs about the same at any batch size (reference: 67 ms at 64 rows, 100 ms at 512),
    so there the passes, not the tokens, set the time."""

    def __init__(self, model):
        self.model = model.get_base_model() if hasattr(model, "get_base_model") else model

    def count(self, module, args, kwargs) -> None:
        self.passes += 1
        self.tokens += kwargs["input_ids"].numel() if kwargs.get("input_ids") is not None else args[0].numel()

    def __enter__(self):
        self.passes = self.tokens = 0
        self.handle = self.model.register_forward_pre_hook(self.count, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def settings_for(variant: str, batch_size: int, **extra) -> dict:
    return {
        "method": "qlora" if variant.startswith("qlora") else "lora",
        "lora": dict(LORA, target_modules=TARGETS[variant]),
        "epochs": 1,
        "max_steps": None,
        "learning_rate": 1e-4,
        "weight_decay": 0.0,
        "warmup_ratio": 0.0,
        "batch_size": batch_size,
        "grad_accum": 1,
        "max_length": 128,
        "checkpoint_every": 10**9,
        "gradient_checkpointing": False,
        "packing": False,
        "group_by_length": False,
        "seed": 0,
        **extra,
    }


@contextlib.contextmanager
def unwrapped_on_failure(peft_model):
    """peft adds its layers into the shared model: a run that fails takes them out again, so
    that the rows after it measure the plain model."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # the run's own error is the one to report
            unwrap(peft_model)
        raise


def unwrap(peft_model):
    """The base model with every LoRA layer removed, ready for the next run."""
    base = peft_model.unload()
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    # Checkpointing is set on the blocks and outlives the adapter: the next run starts without it.
    # (transformers 5.23 renamed gradient_checkpointing_disable; the GPU image has 5.17.)
    disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
    disable()
    return base


class CountingCollator:
    """DataCollatorForSeq2Seq that also counts the padded tokens it builds."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        self.inner = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        self.computed = 0

    def __call__(self, features):
        batch = self.inner(features)
        self.computed += batch["input_ids"].numel()
        return batch


class TrainingLoopClock(TrainerCallback):
    """Times Trainer's training loop alone (a Clock from its first step's start to its last
    step's end): its optimizer and accelerate setup left out, as train_factft leaves out
    factft's (prepare_model, make_optimizer)."""

    def __init__(self, device: str):
        self.clock = Clock(device)

    def on_train_begin(self, *args, **kwargs) -> None:
        self.clock.__enter__()

    def on_train_end(self, *args, **kwargs) -> None:
        self.clock.__exit__(None, None, None)


def train_baseline(model, tokenizer, encoded: list[dict], settings: dict, device: str, workdir: str):
    """transformers Trainer + peft, defaults apart from what both paths share (so it clips
    gradients at norm 1.0, which factft does not: a few norms a step, no measurable cost)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    seed_everything(0)
    if settings["method"] == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = get_peft_model(model, lora_config(settings["lora"], model))
    with unwrapped_on_failure(peft_model):
        return _train_baseline(peft_model, tokenizer, encoded, settings, device, workdir)


def _train_baseline(peft_model, tokenizer, encoded: list[dict], settings: dict, device: str, workdir: str):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=workdir,
        per_device_train_batch_size=settings["batch_size"],
        num_train_epochs=1,
        learning_rate=settings["learning_rate"],
        bf16=device == "cuda",
        use_cpu=device != "cuda",
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
    )
    collator = CountingCollator(tokenizer)
    features = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in encoded]
    timer = TrainingLoopClock(device)
    trainer = Trainer(model=peft_model, args=args, train_dataset=features, data_collator=collator, callbacks=[timer])
    result = trainer.train()
    clock = timer.clock
    n_trainable = sum(p.numel() for p in trainable_parameters(peft_model).values())
    stats = {
        "loss": result.training_loss, "real": sum(len(e["input_ids"]) for e in encoded), "items": len(encoded),
        "computed": collator.computed, "trainable": n_trainable,
    }  # fmt: skip
    del trainer
    return unwrap(peft_model), clock, stats


def train_factft(model, encoded: list[dict], settings: dict, device: str, pad_id: int):
    """factft's loop over every example once. With `settings['compile']` it runs two epochs
    and times the second: in the first the blocks compile, once for each kind of input the
    data brings, which a job pays once: `stats['compile_s']`, how much longer the first
    epoch took."""
    probe = packing_probe(model, encoded) if settings["packing"] else None
    seed_everything(0)
    peft_model = prepare_model(model, settings)
    with unwrapped_on_failure(peft_model):
        model, clock, stats = _train_factft(peft_model, encoded, settings, device, pad_id)
    if probe:
        stats["note"] = "; ".join(filter(None, (probe, stats.get("note"))))
    return model, clock, stats


def packing_probe(model, encoded: list[dict]) -> str | None:
    """What factft's finetune checks before packing (factft.train.check_packing), on this
    device and library versions; untimed. A failure marks the row rather than dropping it."""
    try:
        check_packing(model, encoded, "bench")
    except FactftError as error:
        print(f"PACKING PROBE FAILED: {error}", flush=True)
        return f"packing probe failed: {error}"
    return None


def _train_factft(peft_model, encoded: list[dict], settings: dict, device: str, pad_id: int):
    optimizer = make_optimizer(peft_model, settings, device)
    lengths = [len(e["input_ids"]) for e in encoded]
    per_epoch = math.ceil(len(encoded) / settings["batch_size"])
    rows, epoch = [], 0
    if settings.get("compile"):
        compile_blocks(peft_model, graphs=cuda_graphs(settings))
        settings, epoch = {**settings, "epochs": 2}, 1
        with Clock(device) as untimed:
            rows = train_steps(
                peft_model, optimizer, encoded, {**settings, "max_steps": per_epoch}, device=device, pad_id=pad_id
            )
    with Clock(device) as clock:
        rows = train_steps(
            peft_model, optimizer, encoded, settings, device=device, pad_id=pad_id, step=len(rows), rows=rows
        )
    batches = epoch_batches(lengths, settings["batch_size"], settings["seed"], epoch, settings["group_by_length"])
    widths = [batch_width([lengths[i] for i in b], width_multiple(settings)) for b in batches]
    stats = {
        "loss": float(np.mean([r["loss"] for r in rows[epoch * per_epoch :]])),
        "real": sum(lengths),
        "items": len(encoded),
        "computed": sum(lengths) if settings["packing"] else sum(len(b) * w for b, w in zip(batches, widths)),
        "trainable": sum(p.numel() for p in trainable_parameters(peft_model).values()),
    }
    if epoch:  # what compiling added to the first epoch: a job's one-off cost
        stats.update(compile_s=untimed.wall - clock.wall, note="second epoch timed; the first compiled the blocks")
    del optimizer
    return unwrap(peft_model), clock, stats


@torch.inference_mode()
def generate_baseline(model, tokenizer, prompts: list[str], batch_size: int, logits_processor=None) -> list[str]:
    """What a first script does: test order, batches of 64 padded on the left, greedy."""
    texts = []
    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer(prompts[start : start + batch_size])["input_ids"]
        ids, mask = left_pad(encoded, tokenizer.pad_token_id, model.device)
        output = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
            logits_processor=logits_processor,
        )  # fmt: skip
        texts += tokenizer.batch_decode(output[:, ids.shape[1] :], skip_special_tokens=True)
    return texts


# ---- the run ---------------------------------------------------------------------


class Table:
    def __init__(self, out: Path, common: dict):
        self.out, self.common, self.rows = out, common, []

    def add(self, **row) -> None:
        self.rows.append({**self.common, **row})
        table = pd.DataFrame(self.rows).reindex(columns=COLUMNS)
        write_tsv(table, self.out)
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items() if v == v}
        print(f"[{time.strftime('%H:%M:%S')}]", shown, flush=True)
        # Its ratio at once: a run cut at a time limit still shows the ones it measured.
        for line in ratios(table, only=table.iloc[-1]):
            print(line, flush=True)


def environment(device: str) -> dict:
    import peft
    import transformers

    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except Exception:  # absent, or present without its CUDA library
        bnb = ""
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    if device == "cpu":
        with contextlib.suppress(OSError):
            models = [l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")]
            name = f"{models[0].split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "device_name": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bnb,
    }


def finetune_row(table, variant: str, path: str, args, clock, stats: dict) -> None:
    speed = stats["real"] / clock.seconds
    # N of the bf16 model (args.base_parameters): an NF4 model's packed weights count half their elements.
    table.add(
        stage="finetune", variant=variant, path=path, batch_size=args.batch_size, items=stats["items"],
        real_tokens=stats["real"], computed_tokens=stats["computed"], seconds=clock.seconds, wall_s=clock.wall,
        cpu_s=clock.cpu, tokens_per_s=speed, mfu=mfu(speed, args.base_parameters, stats["trainable"], args.device),
        peak_gb=clock.peak_gb, peak_reserved_gb=clock.peak_reserved_gb, context_gb=clock.context_gb,
        mean_loss=stats["loss"],
        **{k: v for k, v in stats.items() if k in ("compile_s", "note")},
    )  # fmt: skip


def finetune_rows(table, model, tokenizer, encoded, variant, args, workdir) -> object:
    """Baseline, factft padded and factft packed for one variant, each a failed row of its own
    if it fails (a failed run takes its adapter out again); returns the base model."""
    for path in ("baseline", "factft", "factft-packed"):
        settings = settings_for(variant, args.batch_size, packing=path == "factft-packed")
        with recorded_failure(table, "finetune", variant, path):
            if path == "baseline":
                model, clock, stats = train_baseline(model, tokenizer, encoded, settings, args.device, workdir)
            else:
                model, clock, stats = train_factft(model, encoded, settings, args.device, tokenizer.pad_token_id)
            finetune_row(table, variant, path, args, clock, stats)
    return model


def eval_adapter(model):
    """The model with a seeded LoRA on q,v whose weights are random and non-zero: merging it
    changes the model, as a trained adapter does, and the same seed gives the same adapter."""
    from peft import LoraConfig, get_peft_model

    seed_everything(0)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, config).eval()


def eval_row(
    table, args, path, batch_size, prompts, real, clock, passes=None, reference=None, texts=None, label=EVAL_LABEL,
    **extra,
):  # fmt: skip
    table.add(
        stage="evaluate", variant=label, path=path, batch_size=batch_size, items=len(prompts), real_tokens=real,
        computed_tokens=passes.tokens if passes else float("nan"),
        forward_passes=passes.passes if passes else float("nan"), seconds=clock.seconds, wall_s=clock.wall,
        cpu_s=clock.cpu, questions_per_s=len(prompts) / clock.seconds, peak_gb=clock.peak_gb,
        peak_reserved_gb=clock.peak_reserved_gb,
        # over the naive run's questions, the first of `texts` (all of them off a GPU)
        agreement=float(np.mean([a == b for a, b in zip(reference, texts)])) if reference else float("nan"),
        **extra,
    )  # fmt: skip


def evaluate_rows(
    table, model, tokenizer, questions: pd.DataFrame, args, rows: list[tuple[str, str, bool]], naive: dict
):
    """Naive generate on the unmerged LoRA model, then factft's path on the model as factft
    evaluates it (merged in fp32, unmerged in bf16: merges_exactly). `rows`: (label, path,
    decode in rounds) to time, where EVAL_LABEL is every question as the random model answers
    and ENDING_LABEL the first args.ending_questions with AnswersEnd. A label's naive run is
    timed first unless `naive` holds its answers (the reference of agreement); answers timed
    here are added to `naive`, so a later call has them even if this one fails. Returns the
    evaluated model."""
    ending = questions.iloc[: args.ending_questions]
    runs = {
        EVAL_LABEL: (question_prompts(questions), None),
        ENDING_LABEL: (question_prompts(ending), LogitsProcessorList([AnswersEnd(tokenizer, ending, args.device)])),
    }
    runs = {label: runs[label] for label, _, _ in rows}
    real_tokens = {label: sum(map(len, tokenizer(prompts)["input_ids"])) for label, (prompts, _) in runs.items()}
    peft_model = eval_adapter(model)
    with unwrapped_on_failure(peft_model):
        for label, (prompts, processors) in runs.items():
            if label in naive:
                continue
            first = prompts[: args.baseline_questions]
            with Passes(peft_model) as passes, Clock(args.device) as clock:
                naive[label] = generate_baseline(peft_model, tokenizer, first, BASELINE_EVAL_BATCH, processors)
            real = sum(map(len, tokenizer(first)["input_ids"]))
            eval_row(table, args, "baseline", BASELINE_EVAL_BATCH, first, real, clock, passes, label=label)
        from factft.models import merges_exactly

        evaluated = peft_model.merge_and_unload() if merges_exactly(peft_model) else peft_model
        # Untimed: a first batch of a new size grows the allocator's pool and picks kernels, which
        # probably slowed 2026-12-04's first timed row (rounds) against the later one-round row.
        warm = runs[rows[0][0]][0][: args.eval_batch]
        generate_texts(evaluated, tokenizer, warm, max_new_tokens=MAX_NEW_TOKENS, batch_size=len(warm), rounds=False)
        for label, path, rounds in rows:
            prompts, processors = runs[label]
            with Passes(evaluated) as passes, Clock(args.device) as clock:
                fast = generate_texts(
                    evaluated, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=args.eval_batch,
                    rounds=rounds, logits_processor=processors,
                )  # fmt: skip
            eval_row(
                table, args, path, args.eval_batch, prompts, real_tokens[label], clock, passes, naive[label], fast,
                label=label,
            )  # fmt: skip
    return evaluated


def choice_rows(table, model, tokenizer, questions: pd.DataFrame, args) -> None:
    """Multiple choice (MMLU's path: the likeliest of 4 answer texts): every choice scored in
    full, prompt included (batches of 64 rows), against factft's, which runs each prompt once
    and continues every choice from its KV cache."""
    prompts = question_prompts(questions)
    answers = [f" {a[0]}" for a in questions["answers"]]
    options = [[answers[(i + k) % len(answers)] for k in range(4)] for i in range(len(answers))]
    pairs = [prompt_answer_ids(tokenizer, p, c) for p, o in zip(prompts, options) for c in o]
    real = sum(len(q) + len(a) for q, a in pairs)
    shared = sum(len(q) for q, _ in pairs[::4]) + sum(len(a) for _, a in pairs)
    flat_prompts = [p for p, o in zip(prompts, options) for _ in o]
    with Clock(args.device) as clock:
        flat = answer_logprobs(model, tokenizer, flat_prompts, [c for o in options for c in o], batch_size=64)
    picked = flat.reshape(-1, 4).argmax(-1)
    # Both paths pad their batches; computed_tokens counts the tokens each must compute, padding left out.
    common = dict(
        stage="evaluate", variant=CHOICE_LABEL, items=len(prompts), real_tokens=real, note="no padding counted"
    )
    table.add(
        **common, path="baseline", batch_size=64, computed_tokens=real, seconds=clock.seconds, wall_s=clock.wall,
        cpu_s=clock.cpu, questions_per_s=len(prompts) / clock.seconds, peak_gb=clock.peak_gb,
        peak_reserved_gb=clock.peak_reserved_gb,
    )  # fmt: skip
    with Clock(args.device) as clock:
        scores = choice_logprobs(model, tokenizer, prompts, options, batch_size=args.eval_batch)
    table.add(
        **common, path="factft", batch_size=args.eval_batch, computed_tokens=shared, seconds=clock.seconds,
        wall_s=clock.wall, cpu_s=clock.cpu, questions_per_s=len(prompts) / clock.seconds, peak_gb=clock.peak_gb,
        peak_reserved_gb=clock.peak_reserved_gb,
        agreement=float(np.mean([np.argmax(s) == p for s, p in zip(scores, picked)])),
    )  # fmt: skip


def later_rows(table, model, tokenizer, questions: pd.DataFrame, encoded: list[dict], args, naive: dict) -> None:
    """The rows no goal needs, on the loaded model (the saved one; evaluate_rows puts the same
    seeded adapter on it): answers that end (in one round and in rounds), the static
    cache, multiple choice, then a profile of an eager finetuning step and compiled blocks:
    with CUDA graphs (CUDA only), and without."""
    if args.evaluate:
        rows = [(ENDING_LABEL, "factft-one-round", False), (ENDING_LABEL, "factft", True)]
        evaluated = None
        with recorded_failure(table, "evaluate", ENDING_LABEL):
            model = evaluated = evaluate_rows(table, model, tokenizer, questions, args, rows, naive)
        # Compared with the naive answers of the model with the adapter: only on that model.
        if args.static_cache and (evaluated is None or EVAL_LABEL not in naive):
            table.add(stage="evaluate", variant=EVAL_LABEL, path="failed", note="factft-static: not run, the rows "
                      "before it failed")  # fmt: skip
        elif args.static_cache:
            with recorded_failure(table, "evaluate", EVAL_LABEL, "factft-static"):
                static_cache_row(table, model, tokenizer, questions, naive[EVAL_LABEL], args)
            release_compiled(model, args.device)
        with recorded_failure(table, "evaluate", CHOICE_LABEL):
            choice_rows(table, model, tokenizer, questions, args)
        if hasattr(model, "peft_config"):  # bf16 kept the evaluation's adapter beside the weights
            model = model.unload()
    if args.compile:
        with recorded_failure(table, "profile", COMPILED):
            profile_row(table, model, tokenizer, encoded, args)
        # CUDA graphs first: the lever a GPU step's fixed cost points to (docs/benchmarks.md).
        for mode in ["graphs", True] if args.device == "cuda" else [True]:
            with recorded_failure(table, "finetune", COMPILED):
                compiled_row(table, model, tokenizer, encoded, args, mode)


def static_cache_row(table, evaluated, tokenizer, questions: pd.DataFrame, naive: list[str], args) -> None:
    """factft's path with the static KV cache, on evaluate_rows' model. One batch first,
    untimed: transformers compiles the decoding step there, which a job pays once (compile_s:
    how much longer that batch took than a timed one)."""
    prompts = question_prompts(questions)
    real = sum(len(ids) for ids in tokenizer(prompts)["input_ids"])
    options = dict(max_new_tokens=MAX_NEW_TOKENS, batch_size=args.eval_batch, static_cache=True)
    first = prompts[: args.eval_batch]
    with Clock(args.device) as untimed:
        generate_texts(evaluated, tokenizer, first, **options)
    # Not counted: a hook's Python side effects would not survive transformers' compilation.
    with Clock(args.device) as clock:
        texts = generate_texts(evaluated, tokenizer, prompts, **options)
    compile_s = max(0.0, untimed.wall - clock.wall * len(first) / len(prompts))
    eval_row(
        table, args, "factft-static", args.eval_batch, prompts, real, clock, reference=naive, texts=texts,
        compile_s=compile_s, note="timed after one batch that compiled the decoding step",
    )  # fmt: skip


def evict_from_page_cache(folder: Path) -> bool:
    """Drop a folder's files from the page cache (written back first), so that the next read
    comes from the disk, as on a node that has not read them. Linux; not for tmpfs."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for file in (path for path in folder.iterdir() if path.is_file()):
        descriptor = os.open(file, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)
    return True


def file_system(path: Path) -> str:
    """The type of the file system holding `path` (ext4, xfs, tmpfs, ...), from /proc/mounts."""
    with contextlib.suppress(OSError):
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
        resolved = str(path.resolve()).rstrip("/") + "/"
        inside = [(point, kind) for point, kind in mounts if resolved.startswith(point.rstrip("/") + "/")]
        return max(inside, key=lambda mount: len(mount[0]))[1]
    return "unknown"


def load_row(table, spec: dict, args):
    """What every GPU job pays first: loading the model from disk onto the device (bf16 on a
    GPU), the files evicted from the page cache. A cluster's shared file system may be slower.
    Returns the loaded model."""
    from factft.models import load_model, weights_bytes

    folder = Path(spec["path"])
    evicted = evict_from_page_cache(folder)
    with Clock(args.device) as clock:
        model, _ = load_model(spec, device=args.device)
    size = weights_bytes(spec)
    where = f"{size / 1e9:.2f} GB of safetensors on {file_system(folder)}" + ("" if evicted else ", page cache kept")
    table.add(
        stage="load", variant="model", path="factft", items=1, seconds=clock.wall, wall_s=clock.wall,
        cpu_s=clock.cpu, note=where,
    )  # fmt: skip
    return model


def save_model(model, tokenizer, folder: Path) -> dict:
    """The model as safetensors, for the rows that load it as a job does (QLoRA quantizes
    while loading, as factft does)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"name": "bench", "path": str(folder), "gguf_file": None, "trust_remote_code": False}


def qlora_rows(table, spec: dict, tokenizer, encoded: list[dict], variant: str, args, workdir: str) -> None:
    """factft's memory-saving setting on the NF4 model (packing + gradient checkpointing) first,
    on the examples and on examples at max_length (the 24 GB goal's worst case), then the
    three paths."""
    from factft.models import load_model

    gc.collect()
    with Clock(args.device) as clock:
        model, _ = load_model(spec, quantize="nf4", device=args.device, for_training=True)
    print(f"loaded the model in NF4 in {clock.wall:.0f} s", flush=True)
    settings = settings_for(variant, args.batch_size, gradient_checkpointing=True, packing=True)
    long = long_examples(tokenizer, 8 * args.batch_size, settings["max_length"])
    for path, examples in [("factft-packed-gc", encoded), ("factft-packed-gc-long", long)]:
        model, clock, stats = train_factft(model, examples, settings, args.device, tokenizer.pad_token_id)
        finetune_row(table, variant, path, args, clock, stats)
    finetune_rows(table, model, tokenizer, encoded, variant, args, workdir)


def long_examples(tokenizer, n: int, max_length: int) -> list[dict]:
    """n examples of exactly max_length tokens (a 2-word answer and eos after the prompt): a
    batch's most memory."""
    words = len(tokenizer) - 7  # make_tokenizer's w0, w1, ...
    questions = [" ".join(f"w{(i + k) % words}" for k in range(max_length - 8)) for i in range(n)]
    facts = pd.DataFrame({"question": questions, "answers": [["w1 w2"]] * n})
    examples = encode_examples(facts, tokenizer, PROMPT, max_length=max_length)
    assert {len(e["input_ids"]) for e in examples} == {max_length}, "long_examples: not max_length tokens"
    return examples


def profile_row(table, model, tokenizer, encoded: list[dict], args) -> None:
    """Where a step of factft's eager padded loop (LoRA q,v) spends its time: PROFILED_STEPS
    steps under torch.profiler after UNPROFILED_STEPS, counting operator calls (aten, nested
    ones included: each costs the CPU thread) and, on CUDA, what ran on the GPU (kernels,
    copies, fills: each a launch) and its busy time. A GPU busy for a small part of a step's
    wall time waits on the CPU's launches, which CUDA graphs replay at once; the profiler slows
    the CPU side, so the step's wall time to compare with is the `factft` row's."""
    total = UNPROFILED_STEPS + PROFILED_STEPS
    settings = settings_for(COMPILED, args.batch_size, max_steps=total)
    seed_everything(0)
    peft_model = prepare_model(model, settings)
    pad_id = tokenizer.pad_token_id
    with unwrapped_on_failure(peft_model):
        optimizer = make_optimizer(peft_model, settings, args.device)
        first = {**settings, "max_steps": UNPROFILED_STEPS}
        rows = train_steps(peft_model, optimizer, encoded, first, device=args.device, pad_id=pad_id)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if args.device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profiler, Clock(args.device) as clock:
            rows = train_steps(
                peft_model, optimizer, encoded, settings, device=args.device, pad_id=pad_id, step=len(rows), rows=rows
            )
        del optimizer
    unwrap(peft_model)
    calls = launches = busy_us = 0
    for event in profiler.key_averages():
        if event.device_type == DeviceType.CPU:
            calls += event.count if event.key.startswith("aten::") else 0
        elif not event.is_user_annotation:  # a record_function range (the optimizer's step) spans kernels
            launches += event.count
            busy_us += event.self_device_time_total  # a CPU op's self time would count its kernels again
    tokens = sum(r["tokens"] for r in rows[UNPROFILED_STEPS:])
    busy = busy_us / 1e6 if args.device == "cuda" else float("nan")
    note = f"a step: {calls / PROFILED_STEPS:,.0f} aten calls, profiled wall {clock.wall / PROFILED_STEPS * 1e3:.0f} ms"
    if args.device == "cuda":
        note += f", {launches / PROFILED_STEPS:,.0f} launches, GPU busy {busy / PROFILED_STEPS * 1e3:.0f} ms"
    table.add(
        stage="profile", variant=COMPILED, path="factft", batch_size=args.batch_size,
        items=PROFILED_STEPS * args.batch_size, real_tokens=tokens, seconds=clock.seconds, wall_s=clock.wall,
        cpu_s=clock.cpu, aten_calls=calls, launches=launches if args.device == "cuda" else float("nan"),
        device_busy_s=busy, note=note,
    )  # fmt: skip


def compiled_row(table, model, tokenizer, encoded: list[dict], args, mode: bool | str) -> None:
    """factft's padded path on LoRA q,v with compiled blocks (`finetune.compile`: true, or
    graphs, CUDA graphs of them, with widths rounded up), on the loaded model (its weights may
    be the evaluation's merged ones; random either way), left uncompiled again."""
    settings = settings_for(COMPILED, args.batch_size, compile=mode)
    graphs = cuda_graphs(settings)
    skipped = counters["inductor"]["cudagraph_skips"]
    # Inductor's reasons for running a graph without CUDA graphs, into the log (unless TORCH_LOGS chose).
    logs = graphs and not os.environ.get("TORCH_LOGS")
    if logs:
        torch._logging.set_logs(cudagraphs=True)
    try:
        model, clock, stats = train_factft(model, encoded, settings, args.device, tokenizer.pad_token_id)
        if graphs:  # inductor falls back to launching kernels where a graph cannot hold them
            skipped = counters["inductor"]["cudagraph_skips"] - skipped
            ran = f"{skipped} compiled graphs ran without CUDA graphs (why: the log)"
            stats["note"] = f"{stats['note']}; {ran if skipped else 'every compiled graph ran in CUDA graphs'}"
        finetune_row(table, COMPILED, "factft-graphs" if graphs else "factft-compiled", args, clock, stats)
    finally:
        if logs:
            torch._logging.set_logs()
        release_compiled(model, args.device)


def release_compiled(model, device: str) -> None:
    """Drop what compiling left, so that no later row's peak memory holds it: the decoding step
    transformers compiled for the static cache (kept on the model as `_compiled_call`), compiled
    blocks (`_compiled_call_impl`, from Module.compile), dynamo's caches and the CUDA graphs'
    memory pool."""
    for module in model.modules():
        module.__dict__.pop("_compiled_call", None)
        module.__dict__.pop("_compiled_call_impl", None)
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def recorded_failure(table, stage: str, variant: str, path: str | None = None):
    """An optional part that fails (a missing bitsandbytes, a compile error) becomes a row
    saying why (and which `path` failed, where one is given), and the run goes on."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 (any failure here is a result to report)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        why = f"{path + ': ' if path else ''}{type(error).__name__}: {error}"
        table.add(stage=stage, variant=variant, path="failed", note=why[:300])


def ratios(table: pd.DataFrame, only: pd.Series | None = None) -> list[str]:
    """Each path's speed over its (stage, variant)'s baseline, one line each; `only`: that
    row's line alone."""
    if only is not None:
        table = table[(table["stage"] == only["stage"]) & (table["variant"] == only["variant"])]
        table = table[table["path"].isin(["baseline", only["path"]])]
    lines = []
    for (stage, variant), group in table.groupby(["stage", "variant"], sort=False):
        column = "tokens_per_s" if stage == "finetune" else "questions_per_s"
        speeds = group.drop_duplicates("path", keep="last").set_index("path")[column]  # a rerun row replaces
        if "baseline" not in speeds:
            continue
        for path, speed in speeds.items():
            # A -long row trains on other examples (max_length), so no ratio to the baseline.
            if path != "baseline" and not path.endswith("-long") and speed == speed:
                lines.append(f"{stage:9s} {variant:27s} {path:16s} {speed / speeds['baseline']:5.2f}x baseline")
    return lines


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="tsv to write (default bench/results/speed-<device>.tsv)")
    parser.add_argument("--examples", type=int, help="finetuning examples per run")
    parser.add_argument("--questions", type=int, help="evaluation questions")
    parser.add_argument("--batch-size", type=int, default=16, help="finetuning batch (config.yaml: 16)")
    parser.add_argument("--eval-batch", type=int, help="factft's evaluation batch")
    parser.add_argument("--variants", default="lora-qv,lora-all,qlora-all")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (--device cpu); 1 keeps CPU time honest")
    parser.add_argument(
        "--static-cache",
        action=argparse.BooleanOptionalAction,
        help="also time evaluation with a static, compiled KV cache (default: on CUDA only)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"also time finetuning {COMPILED} with compiled blocks (compile_s: the one-off compile time; on CUDA "
        "also as CUDA graphs), after a profile of an eager step",
    )
    parser.add_argument(
        "--evaluate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time evaluation (open QA, multiple choice, the static cache); --no-evaluate: finetuning only",
    )
    parser.add_argument("--scratch", type=Path, help="folder for the QLoRA copy of the model (default: a temp dir)")
    args = parser.parse_args(argv)
    sizes = SIZES[args.device]
    args.examples = args.examples or sizes["examples"]
    args.questions = args.questions or sizes["questions"]
    args.eval_batch = args.eval_batch or sizes["eval_batch"]
    args.ending_questions = min(args.questions, sizes["ending_questions"])
    args.baseline_questions = min(args.questions, sizes["baseline_questions"])
    args.static_cache = args.evaluate and (args.device == "cuda" if args.static_cache is None else args.static_cache)
    args.out = args.out or ROOT / "bench" / "results" / f"speed-{args.device}.tsv"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    if args.scratch:
        args.scratch.mkdir(parents=True, exist_ok=True)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    shape = SHAPES[args.device]
    tokenizer = make_tokenizer(shape["vocab"])
    facts = make_facts(args.examples + args.questions, shape["vocab"], seed=0)
    encoded = encode_examples(facts.iloc[: args.examples], tokenizer, PROMPT, max_length=128)
    questions = facts.iloc[args.examples :]
    model = build_model(shape, args.device)
    label = "{hidden}x{layers} L, MLP {mlp}, vocab {vocab}".format(**shape)
    n = args.base_parameters = base_parameters(model)
    table = Table(args.out, {**environment(args.device), "model": f"llama {label} ({n / 1e9:.3g}e9 params)"})
    print(f"{table.common}\n{len(encoded)} finetuning examples, {len(questions)} questions", flush=True)

    # Issue 4's goals first (finetuning speed, evaluation speed, QLoRA's memory, a job's load:
    # the grid's hours), then the rows no goal needs, the compiling ones among them: a run cut
    # at its time limit loses only those.
    naive = {}
    with tempfile.TemporaryDirectory(dir=args.scratch) as workdir:
        # Warm-up of both paths (kernel selection, allocator, lazy imports) outside every measurement.
        warm = settings_for("lora-qv", args.batch_size, max_steps=3)
        model, _, _ = train_factft(model, encoded, warm, args.device, tokenizer.pad_token_id)
        with recorded_failure(table, "finetune", "warm-up", "baseline"):  # its own rows will say so too
            model, _, _ = train_baseline(model, tokenizer, encoded[: 3 * args.batch_size], warm, args.device, workdir)
        for variant in [v for v in variants if v.startswith("lora")]:
            model = finetune_rows(table, model, tokenizer, encoded, variant, args, workdir)
        with Clock(args.device) as clock:
            spec = save_model(model, tokenizer, Path(workdir) / "model")
        print(f"saved the model for the rows that reload it in {clock.wall:.0f} s", flush=True)
        if args.evaluate:
            with recorded_failure(table, "evaluate", EVAL_LABEL):
                # One round is factft's path on CUDA, rounds elsewhere (rounds_by_default): both goal rows.
                rows = [(EVAL_LABEL, "factft-one-round", False), (EVAL_LABEL, "factft", True)]
                evaluate_rows(table, model, tokenizer, questions, args, rows, naive)
        # QLoRA's peak memory must not count the bf16 model: the load row brings it back.
        del model
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
            print(f"before QLoRA: {torch.cuda.memory_allocated() / 2**30:.2f} GB still allocated", flush=True)
        for variant in [v for v in variants if v.startswith("qlora")]:
            with recorded_failure(table, "finetune", variant):
                qlora_rows(table, spec, tokenizer, encoded, variant, args, workdir)
        model = None
        with recorded_failure(table, "load", "model"):
            model = load_row(table, spec, args)
        if model is not None:
            later_rows(table, model, tokenizer, questions, encoded, args, naive)

    result = pd.DataFrame(table.rows).reindex(columns=COLUMNS)
    print(f"\n{args.out}\n" + "\n".join(ratios(result)), flush=True)
    return result


if __name__ == "__main__":
    main()
