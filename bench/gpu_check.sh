#!/usr/bin/env bash
# The GPU benchmark as one command, for a session that is lent a GPU machine:
#
#   here (PyPI reachable), once:  bash bench/fetch_wheels.sh        # bitsandbytes into .whl/
#   device tool:                  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=560)
#
# Installs nothing but the carried bitsandbytes wheel (the machine's image has torch,
# transformers, peft and accelerate), runs bench/speed.py --device cuda (a Llama-2-7B-shaped
# model with random weights; about 6-8 minutes, cut at 470 s with every finished row kept:
# the two compiling rows, static cache then compiled blocks, come last)
# and leaves speed-cuda.tsv, the log and the GPU's description in $OUT (bench/results here).
# Copy the tsv to bench/results/, then `make bench-hours` here prints the grid's GPU hours and
# issue 4's goals from it; its numbers go into docs/benchmarks.md. Arguments go to
# bench/speed.py: if the limit cut the last rows, a second call on the still-warm machine can
# measure just those, e.g. `bash bench/gpu_check.sh --variants lora-qv --no-evaluate`
# (LoRA q,v's rows and the compiled one, a few minutes); append its rows to the first tsv.
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

# 470 s: the bench stays inside an 8-minute device slot; rows finished by then are kept.
timeout 470 python3 bench/speed.py --device cuda --out "$OUT/speed-cuda.tsv" --scratch /tmp "$@" 2>&1 \
    | grep --line-buffered -v -E '^(finetune |Loading weights|Writing model)' | tee "$OUT/bench-gpu.log"
status=${PIPESTATUS[0]}
if [ "$status" = 124 ]; then
    echo "stopped at the 470 s limit; the rows above were measured" | tee -a "$OUT/bench-gpu.log"
    status=0
fi
exit "$status"
