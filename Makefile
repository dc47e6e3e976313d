# The two commands of the README: `make run` and `make test`. Everything they need is installed here and
# cached under ~/.cache/stadi so that a second run (or a fresh clone on the same machine) is fast.
SHELL := /bin/bash
CACHE ?= $(HOME)/.cache/stadi
PYTHON ?= python3
VENV := .venv
BOOT := $(CACHE)/bootstrap
UV := $(BOOT)/bin/uv
STAMP := $(VENV)/.installed
export UV_CACHE_DIR := $(CACHE)/uv
export UV_PYTHON_DOWNLOADS := never
export STADI_CACHE := $(CACHE)
PYTEST_ARGS ?=

.PHONY: run test lint setup testbin images plan crd clean

# The e2e tests' control-plane binaries (kube-apiserver & co. built from Go modules, etcd, kwok, kubectl, helm,
# and Kueue with its CRDs), cached under $(CACHE)/testbin: about half an hour the first time on 2 cores, a second
# afterwards.
# STADI_E2E=0 skips them (and the e2e tests skip themselves).
TESTBIN := $(if $(filter 0,$(STADI_E2E)),,testbin)
# The operator and worker images, built from their Dockerfiles with buildah (apt-get installs it and debootstrap
# when missing) on bases made here from Debian packages and PyPI's torch; storage under $(CACHE)/containers.
# About 7 minutes the first time on 2 cores, 4 when the sources changed, seconds otherwise (README, "Images").
# STADI_IMAGES=0 skips them (and tests/images skips itself).
IMAGES := $(if $(filter 0,$(STADI_IMAGES)),,images)

run: setup
	$(VENV)/bin/stadi run manifests/examples/small-sdxl.yaml --ranks 2 --device cpu --output out/small

test: setup $(TESTBIN) $(IMAGES)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

testbin: setup
	$(VENV)/bin/python -m stadi_operator.devcluster.testbin

images: setup
	$(VENV)/bin/python -m stadi_operator.devcluster.images

setup: $(STAMP)

$(UV):
	$(PYTHON) -m venv $(BOOT)
	$(BOOT)/bin/pip install --quiet --disable-pip-version-check uv==0.13.8

$(STAMP): pyproject.toml constraints.txt | $(UV)
	test -x $(VENV)/bin/python || $(UV) venv --quiet --python $(PYTHON) $(VENV)
	$(UV) pip install --quiet --python $(VENV)/bin/python -c constraints.txt -e ".[worker,operator,bench,train,dev]"
	touch $@

plan: setup
	$(VENV)/bin/stadi plan --gpus H100,A100-80GB,L4:0.5 --model sdxl --height 1024 --width 1024 --steps 50

crd: setup
	$(VENV)/bin/stadi crd

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis .benchmarks
