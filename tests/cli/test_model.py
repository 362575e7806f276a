"""`rag-grpc model` (rag_grpc/cli/model.py): verify finds a model file changed
since it was prepared."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.command import cli
from tests.conftest import MODEL_DIR

# Every test runs the rag-grpc command (most against `rag-grpc serve`) as a process.
pytestmark = pytest.mark.slow


def test_model_verify_detects_tampering(tmp_path: Path) -> None:
    copy = tmp_path / "model"
    copy.mkdir()
    for path in MODEL_DIR.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    assert cli("model", "verify", "--model-dir", str(copy)).returncode == 0
    with open(copy / "tokenizer.json", "ab") as fh:
        fh.write(b" ")
    tampered = cli("model", "verify", "--model-dir", str(copy))
    assert tampered.returncode == 2 and "does not match its sha256" in tampered.stderr
