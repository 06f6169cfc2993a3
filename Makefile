# Two commands do everything on a fresh machine:
#   make run                       (the main job: `ggufbot run`, the bot; ARGS="..." runs another command)
#   make test                      (the test suite)
PYTHON ?= python3
VENV ?= .venv
# CPU build of PyTorch; on a GPU box: make TORCH_SPEC=torch (a CUDA build)
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
ARGS ?= run
# the suite in two worker processes (pytest-xdist), each file's tests in one worker, each worker on its own cores;
# the files in the suite's order (tests/conftest.py: the longest first), not xdist's (most tests first)
PYTEST_WORKERS ?= -n 2 --dist loadfile --no-loadscope-reorder

.PHONY: setup toolchain run test bench clean

$(BIN)/ggufbot: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(BIN)/ggufbot

setup: $(BIN)/ggufbot

toolchain: setup
	$(BIN)/ggufbot toolchain install

run: toolchain
	$(BIN)/ggufbot $(ARGS)

test: toolchain
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

bench: toolchain
	$(BIN)/python benchmarks/ladder.py

clean:
	rm -rf $(VENV) build *.egg-info
