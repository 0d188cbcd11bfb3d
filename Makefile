# Two commands for a new user: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0

.PHONY: install install-test demo test bench soak clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(PY)
	$(PIP) install --quiet -e '.[server]'

# torch is installed by exact version first, so the `torch` extra's range is
# already satisfied and resolves nothing from the registry.
install-test: $(PY)
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e '.[server,test,torch]'

demo: install
	$(VENV)/bin/rdzv demo

test: install-test
	$(PY) -m pytest -q

bench: install-test
	$(PIP) install --quiet -e '.[bench]'
	$(PY) benchmarks/join_latency.py

clean:
	rm -rf build dist src/*.egg-info src/rdzv/_state.c src/rdzv/*.so
