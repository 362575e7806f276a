#!/usr/bin/env bash
# `make serve-llm`: rag-grpc answering with a real LLM on CPU. Starts Triton
# with the llm model (llama.cpp over a pinned GGUF) in the background, waits
# until it is ready, then runs `rag-grpc serve --generator triton` in the
# foreground on the demo corpus; Triton stops with it.
#
#   deploy/triton/serve-llm.sh [rag-grpc serve options...]
#
# Environment: LLM (a name from `deploy/triton/weights.py list`, default the
# Qwen2.5-Coder 0.5B), or LLM_PATH + LLM_SHA256 for your own GGUF;
# TRITON_GRPC_PORT (8001), TRITON_HTTP_PORT (8000), TRITON_METRICS_PORT (8002);
# RAG_LLM_* as in models/llm/1/model.py (threads, contexts, queue bound);
# PYTHON (the rag-grpc venv's python, default .venv/bin/python).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
grpc_port=${TRITON_GRPC_PORT:-8001}
http_port=${TRITON_HTTP_PORT:-8000}
metrics_port=${TRITON_METRICS_PORT:-8002}

if [ -n "${LLM_PATH:-}" ]; then
    : "${LLM_SHA256:?set LLM_SHA256 to the expected sha256 of $LLM_PATH}"
    "$python" "$here/weights.py" verify "$LLM_PATH" "$LLM_SHA256"
    model_path=$LLM_PATH
    model_sha256=$LLM_SHA256
else
    name=${LLM:-qwen2.5-coder-0.5b-instruct-q4_k_m}
    model_path=$("$python" "$here/weights.py" fetch "$name" | tail -n 1)
    model_sha256=$("$python" "$here/weights.py" sha256 "$name")
fi

"$here/serve.sh" --models llm --prepare
log=${TRITON_LOG:-$root/data/triton-llm.log}
mkdir -p "$(dirname "$log")"
echo "serve-llm: starting Triton with $model_path (log: $log)" >&2
RAG_LLM_MODEL_PATH=$model_path RAG_LLM_MODEL_SHA256=$model_sha256 \
    "$here/serve.sh" --models llm --grpc-port "$grpc_port" --http-port "$http_port" \
    --metrics-port "$metrics_port" >"$log" 2>&1 &
triton=$!
trap 'kill "$triton" 2>/dev/null || true; wait "$triton" 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 1 600); do
    if ! kill -0 "$triton" 2>/dev/null; then
        echo "serve-llm: Triton exited; the end of its log:" >&2
        tail -n 20 "$log" >&2
        exit 1
    fi
    if "$python" -c "import urllib.request, sys; urllib.request.urlopen('http://127.0.0.1:$http_port/v2/models/llm/ready', timeout=1)" 2>/dev/null; then
        break
    fi
    sleep 1
done
echo "serve-llm: Triton's llm model is ready on 127.0.0.1:$grpc_port" >&2
# cite: the llm model holds decoding to sentences that end in a passage
# number (models/llm/1/model.py); a 0.5B model rarely cites otherwise.
RAG_GRPC_GENERATION__TRITON__PARAMETERS=sampling_parameters \
RAG_GRPC_GENERATION__TRITON__EXTRA_PARAMETERS=${RAG_GRPC_GENERATION__TRITON__EXTRA_PARAMETERS:-'{"cite": true}'} \
    "$root/.venv/bin/rag-grpc" serve --generator triton --triton-url "127.0.0.1:$grpc_port" \
    --triton-model llm "$@"
