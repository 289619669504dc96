# Two commands on a fresh machine:  make demo  |  make test
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch, installed first where the environment has no torch (an unpinned
# torch would pull the CUDA build with several GB of packages). GPU users: install the CUDA
# build into the environment first, or set TORCH to its requirement.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
CORE   := $(VENV)/.installed-core
FULL   := $(VENV)/.installed-full

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The demo needs only the core install (no torch).
$(CORE): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	touch $(CORE)

$(FULL): $(BIN)/python pyproject.toml constraints-test.txt
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -c constraints-test.txt -e ".[extract,dev]"
	touch $(CORE) $(FULL)

demo: $(CORE)
	$(BIN)/scdrugmap demo --out demo-out

test: $(FULL)
	$(BIN)/python -m pytest -q -n 2

bench: $(FULL)
	$(BIN)/python benchmarks/store_bench.py
	$(BIN)/python benchmarks/probe_bench.py
	$(BIN)/python benchmarks/share_bench.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
