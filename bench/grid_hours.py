"""The paper grid in GPU hours: the work of every job from a config, the rates from a speed table.

    python bench/grid_hours.py bench/results/speed-cuda.tsv               # rates measured on a GPU
    python bench/grid_hours.py --reference bench/results/speed-cpu.tsv    # the estimate (below)

The work follows the config (default config/config.yaml) as the workflow would run it: its
datasets, models (with their own finetune settings), subsets, seeds, epochs or max_steps, split
shares and caps, and `evaluate.fewshot`. What a config cannot say is assumed and printed: the
datasets' sizes (the full sources, `--size NAME=QUESTIONS` for others) and tokens per example.

The rates: with a table from `bench/speed.py --device cuda`, the measured real tokens/s of the
finetune path the config selects (method, LoRA targets, packing, checkpointing, compile: a
compiled path also pays its compile time in every finetune job) and the measured questions/s
of evaluation, for factft and for the plain baseline. With `--reference`, the reference H200
rates of docs/benchmarks.md's "GPU reference" (a plain loop on dense batches, no padding at all)
times the share of computed tokens that are real, measured by the table's rows on any device
(padding depends on the length mix, not the device): an estimate until a GPU run measures
the rates. Prints a table per dataset and, for CUDA rows, issue 4's goals.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))

from snakemake.exceptions import WorkflowError  # noqa: E402

from factft import subsets  # noqa: E402
from factft.config import finetune_settings, load_config, prompt_settings, runs_on  # noqa: E402
from factft.errors import FactftError  # noqa: E402
from factft.popularity import SCORERS  # noqa: E402

# Questions in each full source (PopQA test; EntityQuestions' train + dev + test, re-split by
# subject; MMLU test).
SIZES = {"popqa": 14_267, "entityquestions": 220_700, "mmlu": 14_042}
# Llama tokenizer: a PopQA-like question with its answer is about 20 tokens. An MMLU question
# is about 55 and each of its 4 choices 15 (scored by likelihood, no generation); shown in the
# prompt ({choices}), a choice adds its text and "A. " (2 more), and a {letter} answer is 1.
OPEN_TOKENS = 20
QUESTION_TOKENS, CHOICES, CHOICE_TOKENS, OPTION_TOKENS = 55, 4, 15, 2
# A forward pass costs 2N FLOPs a token, a LoRA training step 4N (forward + activation
# gradients): forward-only work runs at about twice the training rate.
FORWARD_SPEEDUP = 2.0
# docs/benchmarks.md, "GPU reference": one H200, Llama-2-7B shape, plain loop on full batches of
# random tokens (64 x 64), and plain `generate` (prompt 32, 16 new tokens).
REFERENCE_TOKENS_PER_S = {"lora-qv": 13_516, "lora-all": 9_374, "qlora-all": 7_787}
REFERENCE_QUESTIONS_PER_S = {"baseline": 59.5, "factft": 318.0}  # batch 64; batch 512
OPEN_QA = "lora-qv adapter"  # bench/speed.py's open-QA evaluation rows (EVAL_LABEL)
ENDING_QA = "lora-qv adapter, answers end"  # the same with answers that end (ENDING_LABEL)
GOALS = {"tokens_per_s": 17_000, "speedup": 2.0, "questions_per_s": 500, "qlora_gb": 24, "grid_h": 4.0}


# ---- the work -------------------------------------------------------------------


def choice_tokens(prompt: dict) -> tuple[int, int]:
    """A multiple-choice example's (prompt, one choice's target) tokens under its prompt block:
    the question alone and the choice's text (a cloze), or the options shown and a letter."""
    shown = CHOICES * (CHOICE_TOKENS + OPTION_TOKENS) if "{choices}" in prompt["template"] else 0
    target = ("{letter}" in prompt["answer"]) + CHOICE_TOKENS * ("{answer}" in prompt["answer"])
    return QUESTION_TOKENS + shown, target


def dataset_work(config: dict, name: str, size: int) -> dict:
    """What one dataset's jobs compute over every model, subset and seed: finetuning tokens,
    open-QA questions (generation) and forward-only tokens (likelihoods, few-shot prefill)."""
    dataset = config["datasets"][name]
    split = dict(config["split"], **dataset.get("split", {}))
    pool = (1 - split["test_fraction"]) * size  # subjects are held out; ~ the same share of facts
    test = split["test_fraction"] * size
    pool = min(pool, split["pool_size"] or math.inf)
    test = min(test, split["test_size"] or math.inf)
    if dataset["format"] == "open":
        tokens = OPEN_TOKENS
    else:
        prompt, target = choice_tokens(prompt_settings(config, name))
        tokens = prompt + target
    readers = [model for model in config["models"] if runs_on(config, model, name)]  # the workflow's pairs
    models, seeds = len(readers), len(config["seeds"])
    examples = longest = 0.0
    for model in readers:
        settings = finetune_settings(config, model, name)
        batch = settings["batch_size"] * settings["grad_accum"]
        for subset in config["subsets"]:
            rows = subsets.pool_share(subset, split["fraction"]) * pool
            passes = settings["max_steps"] * batch if settings["max_steps"] else settings["epochs"] * rows
            examples += passes * seeds
            longest = max(longest, passes)
    finetunes = models * len(config["subsets"]) * seeds
    evaluations = finetunes + models  # every run and the base model
    shots = config["evaluate"].get("fewshot", 0)
    fewshot = models if shots else 0  # the base model once more, after `shots` solved questions
    # The attention analysis: every run of the paper's subsets, on open QA.
    paper_subsets = [s for s in config["subsets"] if not subsets.is_sized(s)]
    attention = models * len(paper_subsets) * seeds if dataset["format"] == "open" else 0
    if dataset["format"] == "open":
        questions = test * (evaluations + fewshot)
        prefill = test * fewshot * shots * tokens  # the demonstrations
        forward = {"factft": prefill, "baseline": prefill}
        evaluation = {"questions": test, "forward_tokens": {"factft": 0.0, "baseline": 0.0}}
    else:
        questions = 0.0
        # factft runs a prompt once and every choice from its KV cache; the plain way runs
        # prompt and choice in full for each choice.
        per_question = {"factft": prompt + CHOICES * target, "baseline": CHOICES * tokens}
        forward = {
            "factft": test * ((evaluations + fewshot) * per_question["factft"] + fewshot * shots * tokens),
            "baseline": test * per_question["baseline"] * (evaluations + fewshot * (shots + 1)),
        }
        evaluation = {"questions": 0.0, "forward_tokens": {who: test * n for who, n in per_question.items()}}
    popularity = dataset["popularity"]
    scorers = 0  # models that score every fact's gold answer once: the one named, or each
    if SCORERS[popularity["scorer"]].needs_model:
        scorers = 1 if popularity.get("model") else models
        for who in forward:
            forward[who] += scorers * size * (popularity.get("shots", 4) + 1) * tokens
    return {
        "dataset": name,
        "finetune_tokens": examples * tokens,
        "questions": questions,
        "forward_tokens": forward,
        "finetunes": finetunes,
        "evaluations": evaluations + fewshot,
        # Jobs that load a 7B onto a GPU: finetune, evaluate (+ base, few-shot), attention, scorer.
        "loads": finetunes + evaluations + fewshot + attention + scorers,
        # One job: the longest finetune (its tokens) and a zero-shot evaluation of a run.
        "longest_finetune_tokens": longest * tokens,
        "evaluation": evaluation,
    }


# ---- the rates --------------------------------------------------------------------


def finetune_variant(settings: dict) -> str:
    if settings["method"] == "full":
        raise SystemExit("finetune.method full: bench/speed.py measures LoRA and QLoRA only")
    targets = settings["lora"]["target_modules"]
    every = targets == "all-linear"
    if settings["method"] == "qlora":
        if not every:
            raise SystemExit(f"finetune.lora.target_modules {targets}: bench/speed.py measures QLoRA on all-linear only")
        return "qlora-all"
    if every:
        return "lora-all"
    if sorted(targets) == ["q_proj", "v_proj"]:
        return "lora-qv"
    raise SystemExit(f"finetune.lora.target_modules {targets}: bench/speed.py measures [q_proj, v_proj] and all-linear")


def factft_finetune_path(settings: dict) -> str:
    path = "factft-packed" if settings.get("packing") else "factft"
    if settings.get("gradient_checkpointing"):
        if path != "factft-packed" or settings["method"] != "qlora":
            raise SystemExit("gradient_checkpointing: bench/speed.py measures it with QLoRA + packing only")
        path += "-gc"
    if settings.get("compile"):
        if path != "factft":
            raise SystemExit("compile: bench/speed.py measures it without packing or gradient checkpointing")
        path += "-compiled"
    return path


def row(table: pd.DataFrame, stage: str, variant: str, path: str, source: str, batch_size: int | None = None):
    """The last row of (stage, variant, path), of `batch_size` where given: a step's fixed cost
    makes a finetuning rate depend on the batch (2.7x from 16 to 128 on an H200)."""
    found = table[(table["stage"] == stage) & (table["variant"] == variant) & (table["path"] == path)]
    at = rerun = ""
    if batch_size is not None:
        found = found[found["batch_size"] == batch_size]
        at, rerun = f" at batch size {batch_size}", f" --batch-size {batch_size}"
    if found.empty:
        what = f"stage {stage}, variant {variant}, path {path}{at}"
        raise SystemExit(f"{source}: no row for {what}; rerun bench/speed.py{rerun}")
    return found.iloc[-1]


def rates(table: pd.DataFrame, config: dict, source: str, reference: bool) -> dict:
    """Real tokens/s of finetuning and questions/s of evaluation, factft's and the baseline's."""
    pairs = [(m, d) for m in config["models"] for d in config["datasets"] if runs_on(config, m, d)]
    settings = [finetune_settings(config, m, d) for m, d in pairs]
    variants = {finetune_variant(s) for s in settings}
    paths = {factft_finetune_path(s) for s in settings}
    batches = {s["batch_size"] for s in settings}
    if len(variants) > 1 or len(paths) > 1 or len(batches) > 1:
        kinds = sorted(variants | paths) + [f"batch {b}" for b in sorted(batches)]
        raise SystemExit(f"jobs finetune differently ({kinds}): give each its own config")
    variant, path, batch = variants.pop(), paths.pop(), batches.pop()
    # As factft.generate.rounds_by_default decides: one round on CUDA, rounds (the "factft" row) elsewhere.
    eval_path = "factft-one-round" if (table["device"] == "cuda").any() else "factft"
    if config["evaluate"].get("static_cache"):
        eval_path = "factft-static"
    out = {"variant": variant}
    loads = table[table["stage"] == "load"]
    # A job's model load, measured on the GPU's machine; the reference rates come with none.
    out["load_s"] = None if reference or loads.empty else float(loads["seconds"].iloc[-1])
    out["load_where"] = None if loads.empty else str(loads["note"].iloc[-1])
    if reference and path.endswith("-compiled"):
        raise SystemExit("finetune.compile: the reference rates are of an eager loop; give a table measured on a GPU")
    for who, finetune_path, evaluate_path in (("factft", path, eval_path), ("baseline", "baseline", "baseline")):
        train = row(table, "finetune", variant, finetune_path, source, batch_size=batch)
        # Compiling the blocks: once in every finetune job.
        out[f"{who}_compile_s"] = float(train["compile_s"]) if finetune_path.endswith("-compiled") else 0.0
        if reference:
            real_share = float(train["real_tokens"]) / float(train["computed_tokens"])
            out[f"{who}_tokens_per_s"] = REFERENCE_TOKENS_PER_S[variant] * real_share
            out[f"{who}_questions_per_s"] = REFERENCE_QUESTIONS_PER_S[who]
            out[f"{who}_eval_compile_s"] = 0.0  # the reference rates include no compiling
        else:
            out[f"{who}_tokens_per_s"] = float(train["tokens_per_s"])
            evaluate = row(table, "evaluate", OPEN_QA, evaluate_path, source)
            out[f"{who}_questions_per_s"] = float(evaluate["questions_per_s"])
            # The static cache's decoding step: compiled once in every job that generates.
            compiled = evaluate.get("compile_s")
            out[f"{who}_eval_compile_s"] = float(compiled) if pd.notna(compiled) else 0.0
    return out


def compiling(seconds: float) -> str:
    """A rate's one-off compile, as printed beside it."""
    return f" (+ {seconds:.0f} s compiling a job)" if seconds else ""


def gpu_hours(work: dict, speed: dict, who: str) -> float:
    compute = compute_seconds(work["finetune_tokens"], work["questions"], work["forward_tokens"][who], speed, who)
    generating = work["evaluations"] if work["questions"] else 0  # open QA's evaluation jobs
    once_a_job = (
        work["finetunes"] * speed[f"{who}_compile_s"]
        + generating * speed[f"{who}_eval_compile_s"]
        + work["loads"] * (speed["load_s"] or 0.0)
    )
    return (compute + once_a_job) / 3600


def compute_seconds(finetune_tokens: float, questions: float, forward_tokens: float, speed: dict, who: str) -> float:
    # Forward-only work at factft's rate for both (the baseline's own count of tokens): the
    # benchmark's multiple-choice rows time short QA prompts and count no padding, so they
    # give no rate for the grid's forward-only tokens.
    forward_per_s = speed["factft_tokens_per_s"] * FORWARD_SPEEDUP
    return (
        finetune_tokens / speed[f"{who}_tokens_per_s"]
        + questions / speed[f"{who}_questions_per_s"]
        + forward_tokens / forward_per_s
    )


def job_minutes(work: dict, speed: dict, who: str) -> tuple[float, float]:
    """Minutes of the dataset's longest finetune job and of one evaluation job, load included:
    what a SLURM time limit must cover."""
    load = speed["load_s"] or 0.0
    finetune = compute_seconds(work["longest_finetune_tokens"], 0.0, 0.0, speed, who) + speed[f"{who}_compile_s"]
    evaluation = work["evaluation"]
    evaluate = compute_seconds(0.0, evaluation["questions"], evaluation["forward_tokens"][who], speed, who)
    evaluate += speed[f"{who}_eval_compile_s"] if evaluation["questions"] else 0.0
    return (finetune + load) / 60, (evaluate + load) / 60


# ---- report ---------------------------------------------------------------------


def goal_lines(table: pd.DataFrame, hours: float) -> list[str]:
    """Issue 4's goals, for a table measured on CUDA."""

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    def speeds(stage: str, variant: str, column: str) -> pd.Series:
        rows = table[(table["stage"] == stage) & (table["variant"] == variant)]
        return rows.groupby("path")[column].last()

    lines = []
    qv = speeds("finetune", "lora-qv", "tokens_per_s")
    if {"baseline", "factft"} <= set(qv.index):
        # factft-graphs is the library's compile: graphs, not a config setting until measured.
        best = qv.drop(["baseline", "factft-graphs"], errors="ignore").idxmax()
        ratio = qv[best] / qv["baseline"]
        lines.append(
            f"finetune LoRA q,v: {best} {qv[best]:,.0f} real tokens/s (goal >= {GOALS['tokens_per_s']:,}): "
            f"{verdict(qv[best] >= GOALS['tokens_per_s'])}; {ratio:.2f}x the baseline (goal >= 2x): "
            f"{verdict(ratio >= GOALS['speedup'])}"
        )
    # factft's best open-QA path on this table: one round (its default on CUDA), the static cache
    # (a setting), or rounds (its default elsewhere).
    fast = speeds("evaluate", OPEN_QA, "questions_per_s").drop("baseline", errors="ignore")
    if len(fast):
        best = fast.idxmax()
        lines.append(
            f"evaluate, 16 new tokens: {best} {fast[best]:,.0f} questions/s (goal >= {GOALS['questions_per_s']}): "
            f"{verdict(fast[best] >= GOALS['questions_per_s'])}"
        )
    ending = speeds("evaluate", ENDING_QA, "questions_per_s")
    if {"baseline", "factft-one-round"} <= set(ending.index):
        rate = ending["factft-one-round"]
        lines.append(
            f"evaluate, answers that end as a finetuned model's: factft-one-round {rate:,.0f} questions/s, "
            f"{rate / ending['baseline']:.2f}x the baseline (no goal; the grid's hours use 16 tokens)"
        )
    # What must fit on the card: the allocator's peak reservation and the CUDA context beside
    # it (older tables: the allocated peak alone), for the examples and at max_length.
    qlora = table[(table["stage"] == "finetune") & (table["variant"] == "qlora-all")]
    checkpointed = qlora[qlora["path"].isin(["factft-packed-gc", "factft-packed-gc-long"])].groupby("path").last()
    if len(checkpointed):
        if "peak_reserved_gb" in checkpointed and checkpointed["peak_reserved_gb"].notna().all():
            context = checkpointed["context_gb"].fillna(0.0) if "context_gb" in checkpointed else 0.0
            needed = checkpointed["peak_reserved_gb"] + context
            what = "reserved + CUDA context"
        else:
            needed, what = checkpointed["peak_gb"], "allocated"
        path = needed.idxmax()
        worst = "at max_length" if path.endswith("-long") else "on the examples"
        lines.append(
            f"QLoRA, packing + gradient checkpointing: peak {needed[path]:.1f} GB {what}, {worst} "
            f"(goal <= {GOALS['qlora_gb']} GB): {verdict(needed[path] <= GOALS['qlora_gb'])}"
        )
    lines.append(f"paper grid: {hours:.1f} GPU-h with factft (goal <= {GOALS['grid_h']:.0f}): {verdict(hours <= GOALS['grid_h'])}")
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "speed", type=Path, nargs="+", help="tsvs written by bench/speed.py; a later one's rows replace an earlier's"
    )
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "config.yaml")
    parser.add_argument("--reference", action="store_true", help="reference H200 rates x the table's real-token share")
    parser.add_argument("--size", action="append", default=[], metavar="NAME=QUESTIONS", help="a dataset's size")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except (OSError, FactftError, WorkflowError) as error:  # unreadable, or fails the schema or its checks
        first = " ".join(str(error).split("\n\n")[0].splitlines())  # not the schema dump after it
        raise SystemExit(f"{args.config}: {first}") from None
    for path in args.speed:
        if not path.is_file():
            raise SystemExit(f"{path}: no such speed table; bench/speed.py writes one (make bench-gpu, bench-cpu)")
    table = pd.concat([pd.read_csv(path, sep="\t") for path in args.speed], ignore_index=True)
    source = " + ".join(map(str, args.speed))
    sizes = dict(SIZES)
    for item in args.size:
        name, _, value = item.partition("=")
        if not value.isdigit():
            raise SystemExit(f"--size {item}: write NAME=QUESTIONS, e.g. popqa=14267")
        sizes[name] = int(value)
    missing = sorted(set(config["datasets"]) - set(sizes))
    if missing:
        raise SystemExit(f"no size for datasets {missing}: add --size NAME=QUESTIONS")

    speed = rates(table, config, source, args.reference)
    works = [dataset_work(config, name, sizes[name]) for name in config["datasets"]]
    where = "reference H200 rates x real-token shares of" if args.reference else "measured in"
    first = table.iloc[0]
    shown = args.config.resolve().relative_to(ROOT) if args.config.resolve().is_relative_to(ROOT) else args.config
    print(
        f"{shown}: {sum(w['finetunes'] for w in works)} finetunes ({speed['variant']}), "
        f"{sum(w['evaluations'] for w in works)} evaluations; rates {where} {source} "
        f"({first['device_name']}, {first['date']})"
    )
    for who in ("factft", "baseline"):
        print(
            f"  {who:9s} finetune {speed[f'{who}_tokens_per_s']:,.0f} real tokens/s"
            f"{compiling(speed[f'{who}_compile_s'])}, evaluate {speed[f'{who}_questions_per_s']:,.1f} "
            f"questions/s{compiling(speed[f'{who}_eval_compile_s'])}"
        )
    print(
        f"  assumed: sizes {sizes}, tokens per example: open QA {OPEN_TOKENS}, multiple choice "
        f"{QUESTION_TOKENS} + {CHOICES} choices of {CHOICE_TOKENS}; forward-only at {FORWARD_SPEEDUP:g}x training; "
        "forward tokens: factft's"
    )
    print(
        f"{'dataset':16s} {'finetune tokens':>16s} {'QA questions':>13s} {'forward tokens':>15s} {'factft GPU-h':>13s} "
        f"{'baseline GPU-h':>15s} {'longest finetune':>17s} {'an evaluation':>14s}"
    )
    totals = {"factft": 0.0, "baseline": 0.0}
    for work in works:
        for who in totals:
            work[who] = gpu_hours(work, speed, who)
            totals[who] += work[who]
        work["finetune_min"], work["evaluate_min"] = job_minutes(work, speed, "factft")
        print(
            f"{work['dataset']:16s} {work['finetune_tokens'] / 1e6:15.1f}M {work['questions'] / 1e6:12.2f}M "
            f"{work['forward_tokens']['factft'] / 1e6:14.1f}M {work['factft']:13.2f} {work['baseline']:15.2f} "
            f"{work['finetune_min']:13.1f} min {work['evaluate_min']:10.1f} min"
        )
    print(f"{'total':16s} {'':>16s} {'':>13s} {'':>15s} {totals['factft']:13.2f} {totals['baseline']:15.2f}")
    print(
        "a job (factft): the dataset's longest finetune and one evaluation, loading included where measured; "
        "compare the runtimes rules/common.smk asks SLURM for"
    )
    jobs = sum(w["loads"] for w in works)
    if speed["load_s"] is None:
        print(f"not counted: loading a model in each of {jobs} GPU jobs, queueing, the attention analysis's questions")
    else:
        print(
            f"counted: loading a model in each of {jobs} GPU jobs, {speed['load_s']:.0f} s each as measured "
            f"({speed['load_where']}); not counted: queueing, the attention analysis's questions"
        )
    if not args.reference and (table["device"] == "cuda").all():
        print("issue 4's goals (one H200):")
        for line in goal_lines(table, totals["factft"]):
            print(f"  {line}")
    return works


if __name__ == "__main__":
    main()
