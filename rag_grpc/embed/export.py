"""Our own torch-free exporter: a BERT-family encoder directory (config.json,
model.safetensors, tokenizer.json, pooling config) becomes one ONNX graph that
maps token ids to pooled, L2-normalised sentence vectors.

The graph is written node by node with the ``onnx`` package in the shape
PyTorch's exporter gives BERT, so ONNX Runtime's transformer optimizer
recognises it and fuses attention, LayerNorm+residual and Gelu+bias. From the
optimised fp32 graph come the other variants: fp16 (for GPUs) through the
optimizer's float16 conversion, int8 (for CPUs) through
``onnxruntime.quantization.quantize_dynamic``.

Exports are cached under a directory keyed by the sha256 of the source files,
so a changed source is never served from a stale export.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rag_grpc.embed.model_files import MANIFEST, ModelFilesError, sha256_file

log = logging.getLogger(__name__)

VARIANTS = ("fp32", "fp16", "int8")
OPSET = 17
# Files an export is made from; the cache key is the hash of their hashes.
SOURCE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "pooling.json")
EXPORT_MANIFEST = "export.json"
# Bump when the graph this module writes changes, so old caches are not reused.
EXPORTER_VERSION = 3


@dataclass(frozen=True)
class BertConfig:
    """The parts of a Hugging Face BERT config.json the graph needs."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelFilesError(f"{path} is unreadable: {exc}") from None
        model_type = raw.get("model_type", "bert")
        if model_type not in ("bert", "roberta", "xlm-roberta"):
            raise ModelFilesError(
                f"{path}: model_type {model_type!r} is not a BERT-family encoder this exporter "
                "knows; export it yourself and set embedding.onnx_path"
            )
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ModelFilesError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ModelFilesError(f"{path}: only absolute position embeddings are supported")
        try:
            config = cls(
                vocab_size=int(raw["vocab_size"]),
                hidden_size=int(raw["hidden_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=int(raw["num_attention_heads"]),
                intermediate_size=int(raw["intermediate_size"]),
                max_position_embeddings=int(raw["max_position_embeddings"]),
                type_vocab_size=int(raw.get("type_vocab_size", 2)),
                layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFilesError(f"{path} lacks a usable BERT field: {exc}") from None
        if config.hidden_size % config.num_attention_heads:
            raise ModelFilesError(f"{path}: hidden_size is not a multiple of the head count")
        return config


@dataclass(frozen=True)
class Pooling:
    """How token vectors become one sentence vector."""

    mode: str  # "mean" or "cls"
    normalize: bool = True

    @classmethod
    def from_file(cls, path: Path) -> Pooling:
        """Read a sentence-transformers 1_Pooling/config.json."""
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelFilesError(f"{path} is unreadable: {exc}") from None
        if raw.get("pooling_mode_mean_tokens"):
            return cls("mean")
        if raw.get("pooling_mode_cls_token"):
            return cls("cls")
        raise ModelFilesError(f"{path}: only mean or CLS pooling is supported")


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


def load_weights(path: Path) -> dict[str, np.ndarray]:
    """The safetensors tensors as numpy arrays, with any ``bert.`` prefix dropped."""
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelFilesError(f"{path} is not a readable safetensors file: {exc}") from None
    out = {}
    for name, value in tensors.items():
        for prefix in ("bert.", "roberta.", "model."):
            if name.startswith(prefix):
                name = name[len(prefix) :]
        out[name] = value
    return out


INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class GraphBuilder:
    """A small builder over onnx.helper: unique names, constants as initializers,
    and the BERT building blocks, read from one model's weights."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        from onnx import NodeProto, TensorProto, helper

        self.helper = helper
        self.weights = weights
        self.nodes: list[NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._count = 0

    def name(self, base: str) -> str:
        self._count += 1
        return f"{base}_{self._count}"

    def const(self, value: np.ndarray, base: str = "const") -> str:
        from onnx import numpy_helper

        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(
        self,
        op_type: str,
        inputs: list[str],
        base: str | None = None,
        node_name: str | None = None,
        **attrs: Any,
    ) -> str:
        out = self.name(base or op_type.lower())
        name = node_name or self.name(op_type)
        node = self.helper.make_node(op_type, inputs, [out], name=name, **attrs)
        self.nodes.append(node)
        return out

    def weight(self, name: str) -> np.ndarray:
        """One float32 tensor of the model, or an error naming the missing one."""
        try:
            return np.ascontiguousarray(self.weights[name], dtype=np.float32)
        except KeyError:
            raise ModelFilesError(f"model.safetensors has no tensor {name!r}") from None

    def linear(self, x: str, prefix: str) -> str:
        """x @ W.T + b with the weight and bias of the Hugging Face layer ``prefix``."""
        # Hugging Face stores [out, in]; MatMul wants [in, out].
        weight = self.const(self.weight(f"{prefix}.weight").T.copy(), "weight")
        product = self.op("MatMul", [x, weight], node_name=f"{prefix}/MatMul")
        return self.op("Add", [product, self.const(self.weight(f"{prefix}.bias"), "bias")])

    def layer_norm(self, x: str, prefix: str, epsilon: float) -> str:
        return self.op(
            "LayerNormalization",
            [
                x,
                self.const(self.weight(f"{prefix}.weight"), "gamma"),
                self.const(self.weight(f"{prefix}.bias"), "beta"),
            ],
            axis=-1,
            epsilon=epsilon,
        )

    def finish(self, graph_name: str, x: str, output: str, shape: list[int | str]) -> object:
        """The ONNX model: the three BERT inputs in, tensor ``x`` out as float ``output``."""
        from onnx import TensorProto

        helper = self.helper
        self.nodes.append(helper.make_node("Identity", [x], [output], name="output"))
        graph = helper.make_graph(
            self.nodes,
            graph_name,
            [
                helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
                for n in INPUT_NAMES
            ],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, shape)],
            initializer=self.initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="rag-grpc",
            producer_version=str(EXPORTER_VERSION),
        )
        model.ir_version = 8
        return model


def write_encoder(g: GraphBuilder, config: BertConfig) -> str:
    """Embeddings and encoder layers into ``g``; returns the token states
    [batch, tokens, hidden]. Written in the shape PyTorch's exporter gives
    BERT, so ONNX Runtime's optimizer fuses it."""
    f32 = np.float32
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_size = hidden // heads
    eps = config.layer_norm_eps

    def split_heads(x: str, perm: list[int]) -> str:
        shaped = g.op("Reshape", [x, g.const(np.array([0, 0, heads, head_size], np.int64))])
        return g.op("Transpose", [shaped], perm=perm)

    # Embeddings: word + position + token type, then LayerNorm.
    ids, mask, types = INPUT_NAMES
    seq_len = g.op("Gather", [g.op("Shape", [ids]), g.const(np.array(1, np.int64))], axis=0)
    positions = g.op(
        "Range", [g.const(np.array(0, np.int64)), seq_len, g.const(np.array(1, np.int64))]
    )
    positions = g.op("Unsqueeze", [positions, g.const(np.array([0], np.int64))])
    word = g.op(
        "Gather", [g.const(g.weight("embeddings.word_embeddings.weight"), "word"), ids], axis=0
    )
    pos = g.op(
        "Gather",
        [g.const(g.weight("embeddings.position_embeddings.weight"), "position"), positions],
        axis=0,
    )
    typ = g.op(
        "Gather",
        [g.const(g.weight("embeddings.token_type_embeddings.weight"), "type"), types],
        axis=0,
    )
    x = g.layer_norm(g.op("Add", [g.op("Add", [word, pos]), typ]), "embeddings.LayerNorm", eps)

    # The additive attention mask, (1 - mask) * -10000, as BERT's exporters write it.
    mask_4d = g.op(
        "Unsqueeze",
        [
            g.op("Unsqueeze", [mask, g.const(np.array([1], np.int64))]),
            g.const(np.array([2], np.int64)),
        ],
    )
    inverted = g.op("Sub", [g.const(np.array(1.0, f32)), g.op("Cast", [mask_4d], to=1)])
    mask_bias = g.op("Mul", [inverted, g.const(np.array(-10000.0, f32))])
    scale = g.const(np.array(math.sqrt(head_size), f32))

    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}"
        q = split_heads(g.linear(x, f"{p}.attention.self.query"), [0, 2, 1, 3])
        k = split_heads(g.linear(x, f"{p}.attention.self.key"), [0, 2, 3, 1])
        v = split_heads(g.linear(x, f"{p}.attention.self.value"), [0, 2, 1, 3])
        scores = g.op("Div", [g.op("MatMul", [q, k]), scale])
        probs = g.op("Softmax", [g.op("Add", [scores, mask_bias])], axis=-1)
        context = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        context = g.op("Reshape", [context, g.const(np.array([0, 0, hidden], np.int64))])
        attended = g.linear(context, f"{p}.attention.output.dense")
        x = g.layer_norm(g.op("Add", [attended, x]), f"{p}.attention.output.LayerNorm", eps)
        inner = g.linear(x, f"{p}.intermediate.dense")
        # Exact (erf) Gelu: x * 0.5 * (1 + erf(x / sqrt(2))).
        erf = g.op("Erf", [g.op("Div", [inner, g.const(np.array(math.sqrt(2.0), f32))])])
        gelu = g.op(
            "Mul",
            [
                g.op("Mul", [inner, g.op("Add", [erf, g.const(np.array(1.0, f32))])]),
                g.const(np.array(0.5, f32)),
            ],
        )
        out = g.linear(gelu, f"{p}.output.dense")
        x = g.layer_norm(g.op("Add", [out, x]), f"{p}.output.LayerNorm", eps)
    return x


def build_graph(
    config: BertConfig,
    weights: dict[str, np.ndarray],
    pooling: Pooling | None,
) -> object:
    """The fp32 ONNX model: (input_ids, attention_mask, token_type_ids) -> sentence_embedding.

    With ``pooling=None`` the graph stops at the token states
    (``last_hidden_state`` [batch, tokens, hidden]), as most public exports do.
    """
    g = GraphBuilder(weights)
    x = write_encoder(g, config)
    hidden = config.hidden_size
    if pooling is None:
        return g.finish("sentence_encoder", x, "last_hidden_state", ["batch", "sequence", hidden])
    pooled = _pool(g, x, INPUT_NAMES[1], pooling)
    return g.finish("sentence_encoder", pooled, "sentence_embedding", ["batch", hidden])


def _pool(g: GraphBuilder, x: str, mask: str, pooling: Pooling) -> str:
    """Mean (over real tokens) or CLS pooling, then optional L2 normalisation."""
    f32 = np.float32
    if pooling.mode == "mean":
        weights_3d = g.op(
            "Cast", [g.op("Unsqueeze", [mask, g.const(np.array([2], np.int64))])], to=1
        )
        axis = g.const(np.array([1], np.int64))
        summed = g.op("ReduceSum", [g.op("Mul", [x, weights_3d]), axis], keepdims=0)
        count = g.op("ReduceSum", [weights_3d, axis], keepdims=0)
        pooled = g.op("Div", [summed, g.op("Max", [count, g.const(np.array(1e-9, f32))])])
    else:
        pooled = g.op("Gather", [x, g.const(np.array(0, np.int64))], axis=1)
    if pooling.normalize:
        norm = g.op("ReduceL2", [pooled], axes=[1], keepdims=1)  # axes an attribute in opset 17
        pooled = g.op("Div", [pooled, g.op("Max", [norm, g.const(np.array(1e-12, f32))])])
    return pooled


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


__all__ = [
    "MANIFEST",
    "VARIANTS",
    "BertConfig",
    "BuiltGraph",
    "Export",
    "GraphBuilder",
    "Pooling",
    "build_graph",
    "cached_export",
    "export_model",
    "list_exports",
    "source_hash",
    "verify_export",
    "write_encoder",
]
