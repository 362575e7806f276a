"""The Python client stays light: a program that only calls a server does not
pay for (or need) the model runtime or the compiled index."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_importing_the_client_loads_neither_onnxruntime_nor_the_native_extension() -> None:
    probe = (
        "import sys, rag_grpc.client\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'onnxruntime'"
        " or m == 'rag_grpc.native' or m.startswith('rag_grpc.native.'))\n"
        "print(heavy)\n"
    )
    # A fresh interpreter: this one has long since imported the server.
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
