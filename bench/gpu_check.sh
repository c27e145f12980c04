#!/usr/bin/env bash
# The GPU benchmark as one command, for a session that is lent a GPU machine:
#
#   here (PyPI reachable), once:  bash bench/fetch_wheels.sh        # bitsandbytes into .whl/
#   device tool:                  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=590)
#
# Installs nothing but the carried bitsandbytes wheel (the machine's image has torch,
# transformers, peft and accelerate), runs bench/speed.py --device cuda (a Llama-2-7B-shaped
# model with random weights; about 7-9 minutes, estimated, not yet measured) cut at LIMIT
# seconds (default 540) with every finished row kept, and leaves speed-cuda.tsv, the log and
# the GPU's description in $OUT (bench/results here). The rows issue 4's goals need come
# first (LoRA q,v's three paths, evaluation with the static cache, compiled blocks), then
# QLoRA's (the 24 GB goal) and a model load (the grid's hours). Copy the tsv to
# bench/results/, then `make bench-hours SPEED=bench/results/speed-cuda.tsv` here prints the
# grid's GPU hours and issue 4's goals from it; its numbers go into docs/benchmarks.md.
# Arguments go to bench/speed.py: if the limit cut QLoRA or the load, a second call on the
# still-warm machine (a session has 15 device minutes; a fresh start costs 1-2 of them)
# measures just those:
#   LIMIT=150 bash bench/gpu_check.sh --variants qlora-all --no-evaluate --no-compile --out $OUT/speed-cuda-2.tsv
# (with timeout_s=170); append its rows to the first tsv.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"

wheel=$(ls .whl/bitsandbytes-*.whl 2>/dev/null | head -1)
if [ -z "$wheel" ]; then
    echo "no bitsandbytes wheel in .whl/: run 'bash bench/fetch_wheels.sh' where PyPI is reachable and carry .whl" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheel" || exit 3
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c 'import sys, torch, transformers, peft, accelerate, bitsandbytes as b
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "peft", peft.__version__,
      "accelerate", accelerate.__version__, "bitsandbytes", b.__version__)'
} 2>&1 | tee "$OUT/gpu.txt"

# The bench stops inside the device call's limit; rows finished by then are kept. tqdm's
# progress lines start with a carriage return: filtered too, so the rows stay in output_tail.
LIMIT=${LIMIT:-540}
timeout "$LIMIT" python3 bench/speed.py --device cuda --out "$OUT/speed-cuda.tsv" --scratch /tmp "$@" 2>&1 \
    | grep --line-buffered -v -E $'^\r?(finetune |Loading weights|Writing model)' | tee "$OUT/bench-gpu.log"
status=${PIPESTATUS[0]}
if [ "$status" = 124 ]; then
    echo "stopped at the $LIMIT s limit; the rows above were measured" | tee -a "$OUT/bench-gpu.log"
    status=0
fi
exit "$status"
