# The two entry points: `make demo` and `make test`. Both install everything first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install demo test lint format docs bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Pinned: the worker extra needs exactly these builds (pyproject.toml), and pip resolves them first.
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[worker,dev,onnx]'
	touch $@

demo: install
	$(VENV)/bin/backdrop demo

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m pytest

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# docs/reference.md is generated from the code; tests/test_reference.py checks it is current.
docs: install
	$(PY) -m producer.reference --write

bench: install
	$(PY) bench/refine_error.py
	$(PY) bench/composite_speed.py
	$(PY) bench/model_speed.py
	$(PY) bench/throughput.py

clean:
	rm -rf .backdrop demo-output .pytest_cache .ruff_cache .mypy_cache
