# Two commands for a new user: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0

.PHONY: install install-test demo test bench bench-recovery compat clean

# protobuf releases `make compat` checks etcd3 against (the newest is what `make test` gets).
PROTOBUF_VERSIONS := 3.20.3 4.21.12 4.25.8 5.29.5 6.33.0

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

# Appends its run to benchmarks/RESULTS.md and plots it beside; earlier runs stay.
bench: install-test
	@echo "make bench: about 8 minutes on 2 cores (every backend at N = 8, 64, 256); progress follows"
	$(PIP) install --quiet -e '.[bench]'
	$(PY) benchmarks/join_latency.py

# A hung and a crashed host under real torchrun: rdzv vs torch's c10d and etcd-v2
# (3 agents, median of 3; about 15 minutes). Appends its table to RESULTS.md.
bench-recovery: install-test
	$(PIP) install --quiet -e '.[bench]'
	$(PY) benchmarks/recovery.py --append

# The compatibility tests and a real rendezvous on each older protobuf, each
# installed to a folder of its own that shadows the venv's copy.
compat: install-test
	@for v in $(PROTOBUF_VERSIONS); do \
	  echo "== protobuf $$v"; \
	  $(PIP) install --quiet --target build/protobuf-$$v protobuf==$$v || exit 1; \
	  PYTHONPATH=build/protobuf-$$v $(PY) -m pytest -q tests/test_compat.py tests/test_seed.py \
	    tests/test_rendezvous.py -k "compat or seed or full_round" || exit 1; \
	done

# Hundreds of rounds over 32 node processes under random faults (node kills, stalls,
# closes, etcd leader kills), checked after every round; not part of `make test`.
# Options: make soak SOAK_ARGS="--rounds 100 --nodes 16 --seed 7 --minutes 10"
.PHONY: soak soak-hosts
soak: install-test
	$(PY) benchmarks/soak.py $(SOAK_ARGS)

# The same with every node and etcd member on a test host of its own (a network
# namespace), partitions among the faults; needs root, iproute2 and iptables.
soak-hosts: install-test
	$(PY) benchmarks/soak.py --hosts $(SOAK_ARGS)

clean:
	rm -rf build dist src/*.egg-info src/rdzv/_state.c src/rdzv/*.so
