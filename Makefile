# detbench — every target installs what it needs first (a virtualenv from pyproject.toml).
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
TABLE    ?= soco_table1
GRID     ?= soco_table5
SCALE    ?= tiny
SEEDS    ?=
FRESH    ?=
EXECUTOR ?= local
PROFILE  ?= local-ci
JOBS     ?= 0
ARGS     ?=

.PHONY: setup reproduce grid test test-slow test-slurm test-mmdet test-all bench bench-micro status collect clean-cache slurm-up slurm-down slurm2-up slurm2-down

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip || true
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/.installed

# make reproduce TABLE=soco_table1 [SCALE=tiny] [SEEDS=3] [FRESH=1] [EXECUTOR=local|submitit-local|slurm]
# (SEEDS unset: the seeds the table was last built with; FRESH=1: a new, empty run store)
reproduce: setup
	$(BIN)/detbench reproduce --table $(TABLE) --scale $(SCALE) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(FRESH),--fresh) --executor $(EXECUTOR) --profile $(PROFILE) --jobs $(JOBS) $(ARGS)

# make grid GRID=soco_table5 [EXECUTOR=slurm]
grid: setup
	$(BIN)/detbench grid --grid $(GRID) --scale $(SCALE) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(FRESH),--fresh) --executor $(EXECUTOR) --profile $(PROFILE) --jobs $(JOBS) $(ARGS)

status: setup
	$(BIN)/detbench status $(ARGS)

collect: setup
	$(BIN)/detbench collect $(ARGS)

# the fast suite (a few minutes on 2 CPU cores)
test: setup
	$(BIN)/python -m pytest -q

# end-to-end tests (minutes each)
test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# tests that submit real jobs to a single-node Slurm and to a two-node one (two slurmd in
# network namespaces: tests/test_slurm_two_nodes.py), both started here (root, Debian)
# (MaxArraySize 4 so that the array-chunking test submits an array larger than it)
test-slurm: setup
	MAX_ARRAY_SIZE=$${MAX_ARRAY_SIZE:-4} slurm/cluster/start.sh
	slurm/cluster/start2.sh || { slurm/cluster/stop.sh; slurm/cluster/stop2.sh; exit 1; }
	. $${SLURM_BASE:-/tmp/detbench-slurm}/env.sh && $(BIN)/python -m pytest -q -m slurm; rc=$$?; \
	  slurm/cluster/stop.sh; slurm/cluster/stop2.sh; exit $$rc

# the exports loaded into the real mmdet (tests/test_export_mmdet.py); mmdet, mmengine and mmcv-lite
# (no compiled ops; full mmcv does not build against this torch) go into .cache/mmdet-site, off the
# default path, with the pure-python packages they import that the venv lacks
MMDET_SITE := .cache/mmdet-site
MMDET_PKGS := mmdet==3.3.0 mmengine==0.10.7 mmcv-lite==2.2.0 addict==2.4.0 yapf==0.43.0 platformdirs==4.14.9 termcolor==3.3.0 terminaltables==3.1.10 shapely==2.2.0

$(MMDET_SITE)/.installed: | $(BIN)/.installed
	rm -rf $(MMDET_SITE)
	$(BIN)/pip install -q --no-deps --target $(MMDET_SITE) $(MMDET_PKGS)
	touch $@

test-mmdet: setup $(MMDET_SITE)/.installed
	$(BIN)/python -m pytest -q -m mmdet tests/test_export_mmdet.py

test-all: test test-slow test-slurm

bench: setup
	$(BIN)/python -m tools.bench.proposals_bench

# micro-benchmarks of the hot pieces (tests/bench; the fast suite runs each once, untimed),
# timed and stored as results/benchmarks/pytest-benchmark/<machine>/NNNN_<commit>_<date>.json;
# against the last stored run: make bench-micro ARGS="--benchmark-compare --benchmark-compare-fail=min:50%"
bench-micro: setup
	$(BIN)/python -m pytest -q tests/bench --benchmark-enable --benchmark-storage=results/benchmarks/pytest-benchmark \
	  --benchmark-autosave --benchmark-columns=min,median,rounds $(ARGS)

slurm-up:
	slurm/cluster/start.sh

slurm-down:
	slurm/cluster/stop.sh

# the two-node test cluster (nodes n1, n2 in network namespaces; SLURM_CONF in /tmp/detbench-slurm2/env.sh)
slurm2-up:
	slurm/cluster/start2.sh

slurm2-down:
	slurm/cluster/stop2.sh

clean-cache:
	rm -rf .cache/detbench
