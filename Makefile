# `make demo` and `make test` set themselves up on a fresh machine: they create .venv,
# install torch first (so no other package can pull a different build), then the project.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Override on a GPU box, e.g. `make TORCH_SPEC='torch>=2.4' demo`; the default matches the CPU wheel here.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint proto clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m peer.demo

test: $(STAMP)
	bash scripts/system_deps.sh
	$(VENV)/bin/ruff check peer bootstrap tests bench
	$(PY) -m pytest -q --durations=15 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check peer bootstrap tests bench

proto: $(STAMP)
	$(PY) -m peer.protogen

clean:
	rm -rf $(VENV) build *.egg-info
