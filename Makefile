# The everyday verbs. `make test` and `make compare` set everything up first
# (a virtualenv in .venv, the native module built into it), so they work from
# a fresh clone with only Rust and Python 3.11 present.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.deps-stamp

# maturin develop installs the package's dependencies through pip: keep that quiet.
export PIP_QUIET := 1

.PHONY: help setup build lint fmt rust-test py-test test compare proptest-long stress clean

help:
	@echo "make test     set up, then fmt check, clippy and rustdoc -D warnings, cargo test, ruff, pytest"
	@echo "make compare  set up, then the matrix and the benchmark over every backend, as reports/<time>/ (reports/latest links to it)"
	@echo "make build    build the native module into .venv (release)"
	@echo "make lint     cargo fmt --check, clippy -D warnings, rustdoc -D warnings, ruff"
	@echo "make fmt      format Rust and Python sources"
	@echo "make proptest-long  the core against its reference model, a million random cases (release, minutes)"
	@echo "make stress   opt-in, about two hours: 10 000 connections, every close under strace, 10-minute"
	@echo "              soaks of 10 000 connections, the matrix 20 times; a verdict per step"

$(STAMP): pyproject.toml requirements-dev.txt
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python >= 3.11 needed"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

# strace counts the benchmark's syscalls per frame: installed where it is missing and apt-get can
# (as root, as in CI); otherwise setup goes on, and the benchmark says "strace not installed".
setup: $(STAMP)
	@command -v strace >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace >/dev/null; } \
		|| echo "strace not installed: the benchmark's syscall phase will say so"

build: setup
	$(BIN)/maturin develop --release --quiet

lint: setup
	cargo fmt --all --check
	RUSTFLAGS="-D warnings" RUSTDOCFLAGS="-D warnings" cargo clippy --workspace --all-targets --locked -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
	$(BIN)/ruff check pybind/python tests_py
	$(BIN)/ruff format --check pybind/python tests_py

fmt: setup
	cargo fmt --all
	$(BIN)/ruff format pybind/python tests_py
	$(BIN)/ruff check --fix pybind/python tests_py

rust-test:
	cargo test --workspace --locked

py-test: build
	$(BIN)/pytest

test: lint rust-test py-test

# The property tests of the core at length: `make test` runs 3 000 cases of each.
PROPTEST_CASES ?= 1000000
proptest-long:
	CONNLAB_PROPTEST_CASES=$(PROPTEST_CASES) cargo test --release --locked -p connlab-servers --test props

compare: build
	$(BIN)/connlab compare

# Opt-in and long (about two hours), never part of `make test`. Every step runs even when one
# before it failed; each ends with its verdict line, and the target fails if any step did.
STRESS_STEPS = \
	"$(BIN)/connlab stress connections" \
	"$(BIN)/connlab stress closes" \
	"$(BIN)/connlab soak --backend epoll --connections 10000 --duration 600 --sample-every 30 --max-error-rate 0.001" \
	"$(BIN)/connlab soak --backend pool --connections 10000 --duration 600 --sample-every 30 --max-error-rate 0.001" \
	"$(BIN)/connlab matrix --backends all --repeat 20 --quiet"
stress: build
	@failed=""; start=$$(date +%s); \
	for step in $(STRESS_STEPS); do \
		echo "== $$step"; \
		$$step || failed="$$failed\n  $$step"; \
	done; \
	took=$$(( $$(date +%s) - start )); \
	if [ -z "$$failed" ]; then echo "make stress: PASS, every step, in $$took s"; \
	else printf "make stress: FAIL in $$took s:$$failed\n"; exit 1; fi

clean:
	rm -rf $(VENV) target
