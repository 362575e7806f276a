"""Fetch hnswlib's C++ headers for the native build: release 0.8.0, taken
from the pinned PyPI sdist and checked against its sha256 (the headers are
third-party source and are never committed).

    python native/fetch_hnswlib.py DIR    # prints DIR, which then holds hnswlib/*.h

Standard library only: setup.py runs it before any dependency is installed.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.8.0"
SDIST = f"hnswlib-{VERSION}.tar.gz"
SHA256 = "cb6d037eedebb34a7134e7dc78966441dfd04c9cf5ee93911be911ced951c44c"
HEADERS = (
    "bruteforce.h",
    "hnswalg.h",
    "hnswlib.h",
    "space_ip.h",
    "space_l2.h",
    "stop_condition.h",
    "visited_list_pool.h",
)


def headers_present(include_dir: Path) -> bool:
    """Whether include_dir/hnswlib holds every header."""
    return all((include_dir / "hnswlib" / name).is_file() for name in HEADERS)


def fetch(include_dir: Path) -> Path:
    """Make include_dir/hnswlib/*.h exist (idempotent); return include_dir."""
    if headers_present(include_dir):
        return include_dir
    with tempfile.TemporaryDirectory(prefix="hnswlib-") as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "hnswlib",
             "--quiet", "-d", tmp, f"hnswlib=={VERSION}"],
            capture_output=True,
            text=True,
        )
        sdist = Path(tmp) / SDIST
        if result.returncode != 0 or not sdist.is_file():
            raise SystemExit(
                f"could not download the hnswlib {VERSION} sdist with pip "
                f"({result.stderr.strip()[-400:]}); set HNSWLIB_INCLUDE to a directory "
                "holding hnswlib/hnswalg.h instead"
            )
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SHA256:
            raise SystemExit(f"{SDIST} has sha256 {digest}, expected {SHA256}; refusing it")
        target = include_dir / "hnswlib"
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as archive:
            for name in HEADERS:
                member = archive.extractfile(f"hnswlib-{VERSION}/hnswlib/{name}")
                if member is None:
                    raise SystemExit(f"{SDIST} has no hnswlib/{name}")
                (target / name).write_bytes(member.read())
    return include_dir


if __name__ == "__main__":
    print(fetch(Path(sys.argv[1] if len(sys.argv) > 1 else "build/hnswlib-include")))
