#!/usr/bin/env bash
# Install llama-cpp-python (requirements-llm.txt) into a Triton venv.
#
#   deploy/triton/build-llama-cpp.sh VENV
#
# PyPI has llama-cpp-python only as source: pip compiles llama.cpp (about
# 10 minutes on 2 cores). The wheel is built once per machine into
# $RAG_GRPC_WHEEL_CACHE (default ~/.cache/rag-grpc/wheels), under a folder
# named for the CPU features it was compiled for, and installed from there
# afterwards, so every clone on the machine reuses it. It is compiled for
# x86-64-v3 (AVX2, FMA, F16C), not for this CPU: the CPU model changes
# between machines here, and a -march=native build can die with SIGILL on
# the next one. Set LLAMA_CMAKE_ARGS to build differently (another folder).
set -euo pipefail

venv=$1
here=$(cd "$(dirname "$0")" && pwd)
spec=$(grep -E '^llama-cpp-python==' "$here/requirements-llm.txt")
flags=${LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON}
# What the wheel must not carry or build: examples, tests, tools, the
# multimodal projector and curl (the model is a local file).
flags="$flags -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
key=$(printf '%s %s' "$spec" "$flags" | sha256sum | cut -c1-12)
cache=${RAG_GRPC_WHEEL_CACHE:-$HOME/.cache/rag-grpc/wheels}/llama-cpp-$key
if ! ls "$cache"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "build-llama-cpp.sh: building $spec into $cache (once per machine, ~10 min on 2 cores)" >&2
    mkdir -p "$cache"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
        "$venv/bin/python" -m pip wheel --quiet --no-deps --no-cache-dir -w "$tmp" "$spec"
    mv "$tmp"/llama_cpp_python-*.whl "$cache/"
fi
"$venv/bin/python" -m pip install --quiet --find-links "$cache" -r "$here/requirements-llm.txt"
"$venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'in', '$venv')" >&2
