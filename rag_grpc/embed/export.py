"""Our own torch-free exporter: a BERT-family encoder directory (config.json,
model.safetensors, tokenizer.json, pooling config) becomes one ONNX graph that
maps token ids to pooled, L2-normalised sentence vectors.

The graph is written by bert_graph.py in the shape PyTorch's exporter gives
BERT, so ONNX Runtime's transformer optimizer fuses it. From the optimised
fp32 graph come the other variants: fp16 (for GPUs) through the
optimizer's float16 conversion, int8 (for CPUs) through
``onnxruntime.quantization.quantize_dynamic``.

Exports are cached under a directory keyed by the sha256 of the source files,
so a changed source is never served from a stale export.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from rag_grpc.embed.bert_graph import (
    EXPORTER_VERSION,
    INPUT_NAMES,
    OPSET,
    BertConfig,
    GraphBuilder,
    Pooling,
    build_graph,
    load_weights,
    write_encoder,
)
from rag_grpc.embed.model_files import MANIFEST, ModelFilesError, sha256_file

# The graph's names stay importable from here (rerank/export.py, tests).
__all__ = [
    "EXPORTER_VERSION",
    "EXPORT_MANIFEST",
    "INPUT_NAMES",
    "MANIFEST",
    "OPSET",
    "SOURCE_FILES",
    "VARIANTS",
    "BertConfig",
    "BuiltGraph",
    "Export",
    "GraphBuilder",
    "Pooling",
    "build_graph",
    "cached_export",
    "export_dir",
    "export_model",
    "list_exports",
    "load_weights",
    "source_hash",
    "verify_export",
    "write_encoder",
]

log = logging.getLogger(__name__)

VARIANTS = ("fp32", "fp16", "int8")
# Files an export is made from; the cache key is the hash of their hashes.
SOURCE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "pooling.json")
EXPORT_MANIFEST = "export.json"


def source_hash(source: Path, files: Sequence[str] = SOURCE_FILES, *, salt: str = "") -> str:
    """One sha256 over the source files' names and hashes (and ``salt``, which
    names a graph other than the sentence encoder, so its exports never share a key)."""
    digest = hashlib.sha256(f"exporter {EXPORTER_VERSION}\n".encode())
    if salt:
        digest.update(f"{salt}\n".encode())
    for name in files:
        path = source / name
        if not path.is_file():
            raise ModelFilesError(f"model source {source} has no {name}")
        digest.update(f"{name} {sha256_file(path)}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Export:
    """One cached export: its graph file and what it was made from."""

    path: Path
    variant: str
    source_hash: str
    manifest: dict[str, object]


def export_dir(cache_root: Path, digest: str, variant: str) -> Path:
    return cache_root / digest[:16] / variant


@dataclass(frozen=True)
class BuiltGraph:
    """An fp32 graph ready to optimise, its encoder's shape, and facts for the manifest."""

    model: object
    config: BertConfig
    facts: dict[str, object]


def export_model(source: Path, cache_root: Path, variant: str, *, force: bool = False) -> Export:
    """Export sentence encoder ``source`` as ``variant`` into the cache (or reuse it)."""

    def build() -> BuiltGraph:
        config = BertConfig.from_file(source / "config.json")
        pooling = Pooling.from_file(source / "pooling.json")
        model = build_graph(config, load_weights(source / "model.safetensors"), pooling)
        facts: dict[str, object] = {
            "dimension": config.hidden_size,
            "pooling": pooling.mode,
            "normalize": pooling.normalize,
        }
        return BuiltGraph(model, config, facts)

    return cached_export(source, cache_root, variant, SOURCE_FILES, build, force=force)


def cached_export(
    source: Path,
    cache_root: Path,
    variant: str,
    source_files: Sequence[str],
    build: Callable[[], BuiltGraph],
    *,
    salt: str = "",
    force: bool = False,
) -> Export:
    """The one export path for every graph kind: key by the source files' hashes,
    reuse a verified cached export, else build, optimise, convert to ``variant``
    and move the result into place whole."""
    if variant not in VARIANTS:
        raise ModelFilesError(f"unknown model variant {variant!r}; choose one of {VARIANTS}")
    digest = source_hash(source, source_files, salt=salt)
    target = export_dir(cache_root, digest, variant)
    if not force:
        try:
            return verify_export(target, digest)
        except ModelFilesError:
            pass
    started = time.perf_counter()
    built = build()  # before anything is written, so a bad source leaves no trace
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{variant}-", dir=target.parent) as tmp:
        staging = Path(tmp) / "out"
        staging.mkdir()
        fusions = _optimize_and_save(built.model, built.config, variant, staging / "model.onnx")
        manifest: dict[str, object] = {
            "variant": variant,
            "source_hash": digest,
            "exporter_version": EXPORTER_VERSION,
            "opset": OPSET,
            **built.facts,
            "fusions": fusions,
            "model_sha256": sha256_file(staging / "model.onnx"),
            "seconds": round(time.perf_counter() - started, 1),
        }
        (staging / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    log.info("exported %s as %s in %.1f s: %s", source, variant, manifest["seconds"], fusions)
    return Export(target / "model.onnx", variant, digest, manifest)


class _DropNoise(logging.Filter):
    """Warnings ONNX Runtime's tools give for every model not exported by PyTorch."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(
            (
                "Model producer not matched",
                "Please consider to run pre",
                "Quantization parameters for tensor",
                "get_tensor_type returns DefaultTensorType",
            )
        )


def _optimize_and_save(model: object, config: BertConfig, variant: str, out: Path) -> dict:
    """Fuse with ONNX Runtime's transformer optimizer, convert, save; return fusion counts."""
    noise = _DropNoise()
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.transformers.optimizer")]
    for logger in loggers:
        logger.addFilter(noise)
    # The weight-only quantiser logs every node it skips at INFO.
    chatty = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        return _optimize_and_save_quietly(model, config, variant, out)
    finally:
        chatty.setLevel(level)
        for logger in loggers:
            logger.removeFilter(noise)


def _optimize_and_save_quietly(model: object, config: BertConfig, variant: str, out: Path) -> dict:
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(
        model,
        model_type="bert",
        num_heads=config.num_attention_heads,
        hidden_size=config.hidden_size,
        opt_level=0,  # the Python fusions only; the session optimises the rest at load
    )
    fusions = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    if variant == "fp16":
        optimized.convert_float_to_float16(keep_io_types=True)
    if variant != "int8":
        optimized.save_model_to_file(str(out))
        return fusions
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    # Every MatMul outside the fused attention becomes MatMulNBits: 8-bit
    # weights in blocks of 128, int8 compute on activations quantised per row
    # and block (accuracy_level 4). Chosen by measurement on MiniLM-L6
    # (bench/RESULTS.md) over quantize_dynamic, whose single activation scale
    # per tensor was up to 20% faster but (a) left short texts at cosine
    # 0.989 to fp32 and (b) made a text's vector depend on the other texts in
    # its batch, so micro-batching and the cache would disagree. This keeps
    # every text above 0.999 and batch-invariant. The attention stays float.
    fp32 = out.with_name("fp32.onnx")
    optimized.save_model_to_file(str(fp32))
    nbits = DefaultWeightOnlyQuantConfig(
        block_size=128, is_symmetric=True, accuracy_level=4, bits=8
    )
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), algo_config=nbits)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    fp32.unlink()
    return fusions


def verify_export(target: Path, digest: str | None = None) -> Export:
    """Check a cached export against its manifest (and the source hash, when given)."""
    manifest_path = target / EXPORT_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFilesError(f"{target} holds no usable export: {exc}") from None
    if digest is not None and manifest.get("source_hash") != digest:
        raise ModelFilesError(f"{target} was exported from other source files")
    if manifest.get("exporter_version") != EXPORTER_VERSION:
        raise ModelFilesError(f"{target} was made by another exporter version")
    graph = target / "model.onnx"
    if not graph.is_file() or sha256_file(graph) != manifest.get("model_sha256"):
        raise ModelFilesError(f"{graph} is missing or does not match its sha256")
    return Export(graph, str(manifest["variant"]), str(manifest["source_hash"]), manifest)


def list_exports(cache_root: Path) -> Iterator[tuple[Path, dict[str, object] | None, str]]:
    """Every export under the cache: (directory, manifest or None, "ok" or the problem)."""
    for manifest_path in sorted(cache_root.glob(f"*/*/{EXPORT_MANIFEST}")):
        try:
            export = verify_export(manifest_path.parent)
            yield manifest_path.parent, export.manifest, "ok"
        except ModelFilesError as exc:
            yield manifest_path.parent, None, str(exc)
