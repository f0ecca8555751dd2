# The two commands of the README: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench bench-speed bench-budget bench-zeroshot bench-finetune clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build (a bare `torch` would pull a multi-GB CUDA build)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# Triton's interpreter runs the GPU kernels' tests on this CPU. Not a package dependency: a CUDA torch
	# pins its own Triton, which this pin must not fight.
	$(BIN)/python -m pip install --quiet triton==3.9.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cmoe demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Benchmarks write bench/results/*.json; BENCHMARKS.md summarises them. Each takes from minutes to hours.
bench: bench-speed
	$(BIN)/python bench/perplexity.py

bench-speed: $(STAMP)
	$(BIN)/python bench/speed.py

# Issue 25's table: every preset at 75%, 50% and 25% of the FFN's compute (hours on two cores; resumable),
# then their speed against the paper's layouts at the same budgets.
bench-budget: $(STAMP)
	PYTHONPATH=src:bench $(BIN)/python bench/budget.py
	PYTHONPATH=src:bench $(BIN)/python bench/budget_speed.py

bench-zeroshot: $(STAMP)
	$(BIN)/python bench/zeroshot.py

bench-finetune: $(STAMP)
	$(BIN)/python bench/finetune.py

clean:
	rm -rf $(VENV) demo_results .pytest_cache
