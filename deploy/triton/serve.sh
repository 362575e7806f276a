#!/usr/bin/env bash
# Run NVIDIA Triton Inference Server (CPU, Python backend) in the foreground
# on the model repository next to this script.
#
#   deploy/triton/serve.sh [--grpc-port P] [--http-port P] [--metrics-port P]
#
# First use makes a venv (deploy/triton/.venv, or $TRITON_VENV) from the
# system Python 3.11 and installs `tritonserver` from the PyPI wheel
# nvidia-pytriton into it.
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
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "serve.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
repo=${repo:-$here/models}
venv=${TRITON_VENV:-$here/.venv}
python=${TRITON_PYTHON:-/usr/bin/python3.11}

if [ ! -f "$venv/.installed" ] || [ "$here/requirements.txt" -nt "$venv/.installed" ]; then
    echo "serve.sh: installing Triton into $venv (first use)" >&2
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -r "$here/requirements.txt"
    touch "$venv/.installed"
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
exec "$triton/bin/tritonserver" \
    --model-repository "$repo" \
    --backend-directory "$triton/backends" \
    --grpc-port "$grpc_port" \
    --http-port "$http_port" \
    --metrics-port "$metrics_port" \
    --log-verbose 0
