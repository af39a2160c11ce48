# Developer shortcuts. `make bench`: the benchmark beside Postfix and Dovecot (bench/run.py,
# README "Benchmarks"); BENCH_ARGS passes options, e.g. make bench BENCH_ARGS="--runs 5".
PYTHON := $(shell [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)

.PHONY: bench
bench:
	$(PYTHON) bench/run.py $(BENCH_ARGS)
