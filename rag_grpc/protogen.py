"""Generates the Python gRPC code for ``proto/rag/v1`` with grpcio-tools.

Used by ``setup.py`` at build time and by the test that checks the installed
code is not stale. It imports nothing from the package, so the build can load
it before the package's dependencies exist.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

GENERATED_PACKAGE = "rag_grpc._gen"
_IMPORT_RE = re.compile(r"^from rag\.v1 import ", re.MULTILINE)


def proto_files(proto_root: Path) -> list[Path]:
    """The .proto files of the rag.v1 contract, sorted for a stable build."""
    return sorted((proto_root / "rag" / "v1").glob("*.proto"))


def generate(proto_root: Path) -> dict[str, str]:
    """Compile the contract; return {path relative to rag_grpc/_gen: source}.

    protoc writes imports as ``from rag.v1 import x_pb2`` (the .proto path);
    they are rewritten to the package the code ships in, so the generated
    modules import each other without touching ``sys.path``.
    """
    import grpc_tools
    from grpc_tools import protoc  # build-time dependency

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    sources: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as out:
        args = [
            "protoc",
            f"-I{proto_root}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *(str(p) for p in proto_files(proto_root)),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto_root}")
        for path in sorted(Path(out).rglob("*.py*")):
            rel = path.relative_to(out).as_posix()
            text = _IMPORT_RE.sub(f"from {GENERATED_PACKAGE}.rag.v1 import ", path.read_text())
            sources[rel] = text
    for package in ("", "rag/", "rag/v1/"):
        sources[f"{package}__init__.py"] = (
            '"""Generated from proto/ at build time; do not edit."""\n'
        )
    return sources


def write(proto_root: Path, gen_dir: Path) -> None:
    """Regenerate ``gen_dir`` from ``proto_root``, removing stale modules."""
    sources = generate(proto_root)
    if gen_dir.exists():
        for old in gen_dir.rglob("*.py*"):
            if old.relative_to(gen_dir).as_posix() not in sources:
                old.unlink()
    for rel, text in sources.items():
        target = gen_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
