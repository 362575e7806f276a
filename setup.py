"""Build: generate the gRPC code from proto/ before the package is assembled.

The generated modules go to rag_grpc/_gen/ (ignored by git) and ship in the
wheel; an editable install imports them from the source tree. They are
generated before setup() runs because every setuptools step, egg_info
included, needs the package directories to exist.
"""

import importlib.util
import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

ROOT = Path(__file__).resolve().parent


def _load(name: str, path: Path):
    # Loaded by path: the package's own imports need dependencies that the
    # isolated build environment does not have.
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hnswlib_include() -> str:
    """hnswlib's headers: $HNSWLIB_INCLUDE, else release 0.8.0 from its pinned,
    hash-checked PyPI sdist, unpacked under build/ (never committed)."""
    if os.environ.get("HNSWLIB_INCLUDE"):
        return os.environ["HNSWLIB_INCLUDE"]
    fetcher = _load("_fetch_hnswlib", ROOT / "native" / "fetch_hnswlib.py")
    return str(fetcher.fetch(ROOT / "build" / "hnswlib-include"))


_load("_protogen", ROOT / "rag_grpc" / "protogen.py").write(ROOT / "proto", ROOT / "rag_grpc" / "_gen")

# -march=native: the extension is built on the machine that runs it (make
# install), and hnswlib's distance kernels need AVX to be fast.
native_core = Extension(
    "rag_grpc.native._vector_index",
    sources=["native/vector_index.pyx"],
    include_dirs=["native", _hnswlib_include()],
    language="c++",
    extra_compile_args=["-O3", os.environ.get("RAG_NATIVE_MARCH", "-march=native"), "-std=c++17",
                        "-DNDEBUG", "-Wno-sign-compare", "-Wno-unused-variable"],
    extra_link_args=["-pthread"],
)

setup(
    # Every package under rag_grpc/ (a hand-kept list left rerank and
    # security out of the wheel while editable installs hid it).
    packages=find_packages(include=["rag_grpc", "rag_grpc.*"]),
    ext_modules=cythonize([native_core], language_level=3, include_path=["native"]),
    package_data={
        "rag_grpc._gen.rag.v1": ["*.pyi"],
        "rag_grpc": ["py.typed"],
        "rag_grpc.native": ["*.pyi"],
    },
)
