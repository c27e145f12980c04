#!/usr/bin/env bash
# Fetch the one package bench/gpu_check.sh installs on the GPU machine (which has no network):
# bitsandbytes for QLoRA, as a wheel for that machine's Python 3.12 on x86-64, into .whl/
# (ignored by git; name it in the device tool's `carry`). 0.50.2 is the version measured
# there in docs/benchmarks.md's "GPU reference".
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
"$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl bitsandbytes==0.50.2
ls -l .whl
