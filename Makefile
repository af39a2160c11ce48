# Developer shortcuts. `make bench`: the benchmark beside Postfix and Dovecot (bench/run.py,
# README "Benchmarks"); BENCH_ARGS passes options, e.g. make bench BENCH_ARGS="--runs 5".
PYTHON := $(shell [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)

.PHONY: bench soak
bench:
	$(PYTHON) bench/run.py $(BENCH_ARGS)

# `make soak`: the soak with faults (soak/run.py, README "Soak with faults"); needs root (tmpfs,
# slapd). SOAK_ARGS passes options, e.g. make soak SOAK_ARGS="--duration 300 --json soak.json".
soak:
	$(PYTHON) soak/run.py $(SOAK_ARGS)
