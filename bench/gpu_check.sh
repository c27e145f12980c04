#!/usr/bin/env bash
# The GPU benchmark as one command, for a session that is lent a GPU machine:
#
#   here (PyPI reachable), once:  bash bench/fetch_wheels.sh        # bitsandbytes into .whl/
#   device tool:                  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=590)
#
# Installs nothing but the carried bitsandbytes wheel (the machine's image has torch,
# transformers, peft and accelerate), runs bench/speed.py --device cuda (a Llama-2-7B-shaped
# model with random weights; 553 s on 2026-12-04, cut just before its last row) cut at LIMIT
# seconds (default 520) with every finished row kept, and leaves speed-cuda.tsv, the log and
# the GPU's description in $OUT (bench/results here). The rows issue 4's goals need come
# first (LoRA q,v's three paths, evaluation, QLoRA's with its 24 GB setting first, a model
# load for the grid's hours), then the rows no goal needs but where they beat the eager paths
# (answers that end, the static cache, multiple choice, compiled blocks as CUDA graphs and not;
# a goal takes its best path); LoRA on all linear
# layers, which no goal needs either, only when asked (--variants lora-qv,lora-all,qlora-all). Copy
# the tsv to bench/results/, then `make bench-hours SPEED=bench/results/speed-cuda.tsv` here
# prints the grid's GPU hours and issue 4's goals from it; its numbers go into
# docs/benchmarks.md. Arguments go to bench/speed.py (the last of an option wins): if the
# limit cut QLoRA or the load, a second call on the still-warm machine (a session has 15
# device minutes; a fresh start costs 1-2 of them) measures just those:
#   LIMIT=180 bash bench/gpu_check.sh --variants qlora-all --no-evaluate --no-compile --out $OUT/speed-cuda-2.tsv
# (with timeout_s=200: it builds and saves the model again first); then
# `make bench-hours SPEED="speed-cuda.tsv speed-cuda-2.tsv"` reads both (a later table's rows
# replace an earlier's).
# Measured on 2026-12-04 (docs/benchmarks.md): every goal's row is in bench/results/; what a
# next lent GPU should run, the compiled blocks with CUDA graphs and without, is at the end
# of docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"

# Without bitsandbytes the QLoRA rows fail (each a row saying why); every other row runs.
wheel=$(ls .whl/bitsandbytes-*.whl 2>/dev/null | head -1)
if [ -z "$wheel" ]; then
    echo "no bitsandbytes wheel in .whl/ (bash bench/fetch_wheels.sh where PyPI is reachable, carry .whl): no QLoRA rows" >&2
elif ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheel"; then
    echo "pip could not install $wheel: no QLoRA rows" >&2
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# Job logs are read as lines: no hub progress bars (finetune logs its progress as lines).
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_DISABLE_PROGRESS_BARS=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c 'import sys, torch, transformers, peft, accelerate
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__)'
    python3 -c 'import bitsandbytes; print("bitsandbytes", bitsandbytes.__version__)' 2>/dev/null \
        || echo "bitsandbytes: does not import"
} 2>&1 | tee "$OUT/gpu.txt"

# The model's QLoRA copy goes to a folder of its own, emptied first: a call cut at its limit
# leaves a 13.5 GB copy that a second call on the same machine must not add to.
SCRATCH=/tmp/factft-bench
rm -rf "$SCRATCH" && mkdir -p "$SCRATCH"
# The bench stops inside the device call's limit; rows finished by then are kept.
LIMIT=${LIMIT:-520}
timeout -k 10 "$LIMIT" python3 bench/speed.py --device cuda --variants lora-qv,qlora-all \
    --out "$OUT/speed-cuda.tsv" --scratch "$SCRATCH" "$@" 2>&1 | tee "$OUT/bench-gpu.log"
status=${PIPESTATUS[0]}
if [ "$status" = 124 ] || [ "$status" = 137 ]; then
    echo "stopped at the $LIMIT s limit; the rows above were measured" | tee -a "$OUT/bench-gpu.log"
    status=0
fi
exit "$status"
