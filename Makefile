# The two set-up commands of the README. Both make a virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# MLX has wheels for macOS and for Linux with glibc 2.35 or newer; elsewhere its install fails, the MLX backend reports
# itself unavailable and its tests are skipped, so a failed MLX install must not stop the rest.
MLX_INSTALL = $(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[mlx]' || echo "MLX does not install here: its tests will be skipped."

.PHONY: chat test test-fast

# Install pocketlm with the llama.cpp backend and open the app (it offers the starter model when none is installed).
chat: $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[llama]'
	$(BIN)/pocketlm

# Install everything the tests need and run the whole suite.
test: $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[llama,gptq,test]'
	$(MLX_INSTALL)
	$(BIN)/python -m pytest

# The inner loop: everything but the tests that need the real starter model (marked slow), in under two minutes.
test-fast: $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[llama,gptq,test]'
	$(MLX_INSTALL)
	$(BIN)/python -m pytest -m "not slow"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
