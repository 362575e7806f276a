#!/usr/bin/env bash
# Run NVIDIA Triton Inference Server (CPU, Python backend) in the foreground
# on the model repository next to this script.
#
#   deploy/triton/serve.sh [--grpc-port P] [--http-port P] [--metrics-port P]
#                          [--models rag_llm,rag_llm_sync | llm] [--prepare]
#
# First use makes a venv (deploy/triton/.venv, or $TRITON_VENV) from the
# system Python 3.11 and installs `tritonserver` from the PyPI wheel
# nvidia-pytriton into it; with the `llm` model also llama-cpp-python
# (requirements-llm.txt), built once per machine. --prepare installs and exits.
# Only the models named are loaded (default: the two demo models); the llm
# model reads its weights from RAG_LLM_MODEL_PATH / RAG_LLM_MODEL_SHA256
# (models/llm/1/model.py).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
grpc_port=8001
http_port=8000
metrics_port=8002
while [ $# -gt 0 ]; do
    case "$1" in
        --grpc-port) grpc_port=$2; shift 2 ;;
        --http-port) http_port=$2; shift 2 ;;
        --metrics-port) metrics_port=$2; shift 2 ;;
        --model-repository) repo=$2; shift 2 ;;
        --models) models=$2; shift 2 ;;
        --prepare) prepare=1; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "serve.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
repo=${repo:-$here/models}
models=${models:-rag_llm,rag_llm_sync}
prepare=${prepare:-0}
venv=${TRITON_VENV:-$here/.venv}
python=${TRITON_PYTHON:-/usr/bin/python3.11}

if [ ! -f "$venv/.installed" ] || [ "$here/requirements.txt" -nt "$venv/.installed" ]; then
    echo "serve.sh: installing Triton into $venv (first use)" >&2
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -r "$here/requirements.txt"
    touch "$venv/.installed"
fi

case ",$models," in
    *,llm,*)
        if [ ! -f "$venv/.installed-llm" ] || [ "$here/requirements-llm.txt" -nt "$venv/.installed-llm" ]; then
            "$here/build-llama-cpp.sh" "$venv"
            touch "$venv/.installed-llm"
        fi ;;
esac
if [ "$prepare" = 1 ]; then
    exit 0
fi

triton=$("$venv/bin/python" -c 'import pathlib, pytriton; print(pathlib.Path(pytriton.__file__).parent / "tritonserver")')
# The wheel keeps one Python-backend stub per Python version aside; the
# backend looks for it next to libtriton_python.so (pytriton copies it there
# at run time, we once).
stub="$triton/backends/python/triton_python_backend_stub"
if [ ! -x "$stub" ]; then
    cp "$triton/python_backend_stubs/3.11/triton_python_backend_stub" "$stub"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# The Python-backend stub embeds the system libpython; point it at the venv's packages.
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$venv/bin:$PATH"
load=()
IFS=, read -r -a names <<< "$models"
for name in "${names[@]}"; do
    load+=(--load-model "$name")
done
exec "$triton/bin/tritonserver" \
    --model-repository "$repo" \
    --model-control-mode explicit \
    "${load[@]}" \
    --backend-directory "$triton/backends" \
    --grpc-port "$grpc_port" \
    --http-port "$http_port" \
    --metrics-port "$metrics_port" \
    --log-verbose 0
