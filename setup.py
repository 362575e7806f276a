"""Build: generate the gRPC code from proto/ before the package is assembled.

The generated modules go to rag_grpc/_gen/ (ignored by git) and ship in the
wheel; an editable install imports them from the source tree. They are
generated before setup() runs because every setuptools step, egg_info
included, needs the package directories to exist.
"""

import importlib.util
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _generate_protos() -> None:
    # protogen.py is loaded by path: the package's own imports need
    # dependencies that the isolated build environment does not have.
    spec = importlib.util.spec_from_file_location("_protogen", ROOT / "rag_grpc" / "protogen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write(ROOT / "proto", ROOT / "rag_grpc" / "_gen")


_generate_protos()

setup(
    packages=[
        "rag_grpc",
        "rag_grpc._gen",
        "rag_grpc._gen.rag",
        "rag_grpc._gen.rag.v1",
        "rag_grpc.services",
        "rag_grpc.store",
        "rag_grpc.index",
        "rag_grpc.embed",
        "rag_grpc.generate",
        "rag_grpc.ingest",
    ],
    package_data={"rag_grpc._gen.rag.v1": ["*.pyi"], "rag_grpc": ["py.typed"]},
)
