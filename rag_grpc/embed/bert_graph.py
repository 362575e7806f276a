"""The ONNX graph of a BERT-family encoder, written node by node with the
``onnx`` package in the shape PyTorch's exporter gives BERT, so ONNX
Runtime's transformer optimizer recognises it and fuses attention,
LayerNorm+residual and Gelu+bias: the model's config and pooling files, its
safetensors weights, the graph builder, the encoder layers and the pooling.
Caching, optimising and converting the graph is export.py's job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rag_grpc.embed.model_files import ModelFilesError, read_json

OPSET = 17
# Bump when the graph this module writes changes, so old export caches
# (keyed by it, export.py) are not reused.
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
        raw = read_json(path)
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
        raw = read_json(path)
        if raw.get("pooling_mode_mean_tokens"):
            return cls("mean")
        if raw.get("pooling_mode_cls_token"):
            return cls("cls")
        raise ModelFilesError(f"{path}: only mean or CLS pooling is supported")


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
