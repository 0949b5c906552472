# The two commands of the README: `make reproduce` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint reproduce publish figures replicates ablation clean bench bench-gpu

setup: $(VENV)/.installed

# constraints.txt: the exact versions the committed results were made with (`pip freeze`); another
# version of torch, NumPy, pandas or matplotlib writes other bytes (README, "Same bytes").
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,own]' -c constraints.txt
	touch $@

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest

# The study, its executed chapters, its results without checkpoints and every figure drawn from
# them, written into runs/embedded/publish (never over the committed files), compared with the
# committed notebooks/executed, results/embedded and figures: the last line says whether they match.
reproduce: setup
	$(BIN)/python -m mmsoup reproduce --profile embedded --compare

# Maintainers: make the last `make reproduce` the committed reference.
publish: setup
	$(BIN)/python -m mmsoup publish --profile embedded

# Every figure and table from the committed results, without re-running the study (seconds).
figures: setup
	$(BIN)/python -m mmsoup figures --results results/embedded

# The replicate study behind the README's claims: R sweeps (seeds 0..R-1), one backbone.
REPLICATES ?= 5
replicates: setup
	$(BIN)/python -m mmsoup replicate --profile embedded --replicates $(REPLICATES)

# The conditions ablation (chapter 09): held-out size, MMS budget and pool size, alone and together;
# resumable (one replicate at a time, 2 cores each); finished runs published to results/ablation.
ABLATION_REPLICATES ?= 5
ablation: setup
	$(BIN)/python -m mmsoup ablation --replicates $(ABLATION_REPLICATES) --executed notebooks/executed

clean:
	rm -rf $(VENV) runs .pytest_cache

bench: setup
	$(BIN)/python benchmarks/bench_core.py
	$(BIN)/python benchmarks/bench_scale.py --threads 1 --batch-size 256
	$(BIN)/python benchmarks/bench_allocator.py

bench-gpu: setup
	$(BIN)/python benchmarks/bench_gpu.py --device cuda
