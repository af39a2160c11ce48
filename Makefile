# Developer shortcuts. `make bench`: the benchmark beside Postfix and Dovecot (bench/run.py,
# README "Benchmarks"); BENCH_ARGS passes options, e.g. make bench BENCH_ARGS="--runs 5".
PYTHON := $(shell [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)

.PHONY: bench soak
bench:
	$(PYTHON) bench/run.py $(BENCH_ARGS)

# `make fuzz`: the long fuzz campaign (README "Fuzzing"): every atheris harness for FUZZ_SECONDS
# each (FUZZ_RUNS caps the inputs, 0: none; FUZZ_NAMES picks harnesses), the grown corpus and
# any crashing input kept in .fuzz/, then the hypothesis property and stateful tests under the
# "long" profile (HYPOTHESIS_PROFILE). Example: make fuzz FUZZ_SECONDS=3600 FUZZ_NAMES=smtp_data
FUZZ_SECONDS ?= 600
FUZZ_RUNS ?= 0
FUZZ_NAMES ?=
HYPOTHESIS_PROFILE ?= long

.PHONY: fuzz
fuzz:
	$(PYTHON) -m tests.fuzz.campaign --seconds $(FUZZ_SECONDS) --runs $(FUZZ_RUNS) --work .fuzz $(FUZZ_NAMES)
	HYPOTHESIS_PROFILE=$(HYPOTHESIS_PROFILE) $(PYTHON) -m pytest -q -p no:cacheprovider --timeout=0 \
		tests/fuzz/test_smtp_stateful.py tests/fuzz/test_pop3_stateful.py \
		tests/fuzz/test_harness_properties.py tests/fuzz/test_config_properties.py
# `make soak`: the soak with faults (soak/run.py, README "Soak with faults"); needs root (tmpfs,
# slapd). SOAK_ARGS passes options, e.g. make soak SOAK_ARGS="--duration 300 --json soak.json".
soak:
	$(PYTHON) soak/run.py $(SOAK_ARGS)

# `make cluster`: a 3-host test cluster (README "Several servers"): three GlusterFS brick hosts
# in network namespaces, a replica-3 volume, three pop3coexist nodes over it, until Ctrl-C; needs
# root, glusterfs-server and glusterfs-client. CLUSTER_ARGS passes options ("--check": one
# message across nodes, then stop). `make cluster-test`: the cluster integration test alone.
.PHONY: cluster cluster-test
cluster:
	$(PYTHON) cluster/run.py $(CLUSTER_ARGS)
cluster-test:
	$(PYTHON) -m pytest -q -p no:cacheprovider -m cluster tests/integration/test_cluster.py
