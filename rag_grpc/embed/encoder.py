"""The ONNX Runtime sentence encoder: tokenise, run the graph in
length-sorted batches, pool and L2-normalise when the graph does not.
Providers are picked at run time (TensorRT, then CUDA, then CPU)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from rag_grpc.embed.model_files import ModelFilesError

log = logging.getLogger(__name__)

_PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)


class Embedder(Protocol):
    """What the rest of the system needs from an embedding model."""

    model_id: str
    dimension: int

    def embed(self, texts: Sequence[str]) -> EmbedOutput:
        """Unit vectors float32 [len(texts), dimension], in input order."""
        ...


@dataclass(frozen=True)
class EmbedOutput:
    """Vectors, and the tokens the model read to make them (in all and per text)."""

    vectors: np.ndarray
    token_count: int
    token_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to load one encoder: graph, tokenizer and how to pool."""

    graph: Path
    tokenizer: Path
    model_id: str
    variant: str
    # "none": the graph outputs sentence vectors; "mean" / "cls": token states.
    pooling: str = "none"
    normalize: bool = True
    max_sequence_length: int = 256
    providers: tuple[str, ...] = ()


def pick_providers(requested: Sequence[str] = ()) -> list[str]:
    """The requested providers that this ONNX Runtime offers, else the best of them."""
    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ModelFilesError(
                f"ONNX Runtime here offers {available}, not {missing}; "
                "install rag-grpc[gpu] for CUDA/TensorRT or change embedding.providers"
            )
        return list(requested)
    return [p for p in _PREFERRED_PROVIDERS if p in available]


class OnnxEncoder:
    """A transformer encoder in ONNX, with its Hugging Face tokenizer."""

    def __init__(
        self,
        spec: EncoderSpec,
        *,
        batch_size: int = 32,
        intra_op_threads: int = 0,
        intra_op_spinning: bool = True,
    ) -> None:
        self.spec = spec
        self.model_id = spec.model_id
        self.variant = spec.variant
        self.batch_size = batch_size
        self.max_sequence_length = spec.max_sequence_length
        self.tokenizer = load_tokenizer(spec.tokenizer)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=spec.max_sequence_length)
        self.session = open_session(
            spec.graph, spec.providers, intra_op_threads, spinning=intra_op_spinning
        )
        self.provider = self.session.get_providers()[0]
        self._input_names = {i.name for i in self.session.get_inputs()}
        output = self.session.get_outputs()[0]
        expected_rank = 2 if spec.pooling == "none" else 3
        if len(output.shape) != expected_rank:
            raise ModelFilesError(
                f"{spec.graph} outputs {output.name} of rank {len(output.shape)}; pooling "
                f"{spec.pooling!r} needs rank {expected_rank}"
            )
        width = output.shape[-1]
        if not isinstance(width, int):
            raise ModelFilesError(f"{spec.graph}: output {output.name} has no fixed dimension")
        self.dimension = width
        # Tokenizer objects hold truncation state; guard against concurrent
        # reconfiguration by other users of the same tokenizer.
        self._tokenize_lock = threading.Lock()
        log.info(
            "embedding model %s (%s) on %s, dimension %d",
            self.model_id,
            self.variant,
            self.provider,
            self.dimension,
        )

    def embed(self, texts: Sequence[str]) -> EmbedOutput:
        """Embed texts in length-sorted batches, so each batch pads little."""
        if not texts:
            return EmbedOutput(np.zeros((0, self.dimension), np.float32), 0)
        with self._tokenize_lock:
            encodings = self.tokenizer.encode_batch(list(texts))
        lengths = np.array([len(e.ids) for e in encodings])
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        for batch in _buckets(order, lengths, self.batch_size):
            width = int(lengths[batch].max())
            ids = np.zeros((len(batch), width), dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            for row, i in enumerate(batch):
                n = lengths[i]
                ids[row, :n] = encodings[i].ids
                mask[row, :n] = 1
            feeds = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self._input_names:
                feeds["token_type_ids"] = np.zeros_like(ids)
            result = self.session.run(None, feeds)[0]
            out[batch] = self._pool(result, mask)
        return EmbedOutput(out, int(lengths.sum()), lengths.astype(np.int64))

    def count_tokens(self, text: str) -> int:
        """Tokens of text without special tokens or truncation."""
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _pool(self, result: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.spec.pooling == "mean":
            weights = mask[:, :, None].astype(np.float32)
            result = (result * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        elif self.spec.pooling == "cls":
            result = result[:, 0]
        if self.spec.normalize:
            norms = np.linalg.norm(result, axis=1, keepdims=True)
            result = result / np.maximum(norms, 1e-12)
        return result.astype(np.float32, copy=False)


# A model call costs about as much as a few dozen tokens of work, so a bucket
# is not split below this many texts to save padding.
_MIN_BUCKET = 8
# Split when padding would make a bucket this many times its real tokens.
_MAX_PADDING = 1.3


def _buckets(order: np.ndarray, lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Cut length-sorted texts into model batches of at most batch_size that
    pad little: a new bucket starts when the next (longer) text would make
    the padded batch more than _MAX_PADDING times its real tokens."""
    buckets: list[np.ndarray] = []
    start, real = 0, 0
    for pos, i in enumerate(order):
        n = int(lengths[i])
        size = pos - start
        padded = (size + 1) * n
        if size and (
            size >= batch_size or (size >= _MIN_BUCKET and padded > _MAX_PADDING * (real + n))
        ):
            buckets.append(order[start:pos])
            start, real = pos, 0
        real += n
    buckets.append(order[start:])
    return buckets


def validate_embed_request(
    texts: Sequence[str], model_id: str, embedder: Embedder, max_texts: int, max_text_bytes: int
) -> None:
    """Raise InvalidArgument / NotFound for an Embed request the model cannot serve."""
    from rag_grpc.errors import InvalidArgument, NotFound

    if model_id and model_id != embedder.model_id:
        raise NotFound(f"model {model_id!r} is not loaded; this server has {embedder.model_id!r}")
    if not texts:
        raise InvalidArgument("give at least one text to embed")
    if len(texts) > max_texts:
        raise InvalidArgument(f"{len(texts)} texts in one request; at most {max_texts}")
    for i, text in enumerate(texts):
        if not text.strip():
            raise InvalidArgument(f"text {i} is empty")
        size = len(text.encode("utf-8", errors="surrogatepass"))
        if size > max_text_bytes:
            raise InvalidArgument(f"text {i} is {size} bytes; at most {max_text_bytes}")


def load_tokenizer(path: Path) -> Tokenizer:
    """A Hugging Face tokenizer.json; ModelFilesError if it is not usable."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception
        raise ModelFilesError(f"{path} is not a usable tokenizer.json: {exc}") from None


def open_session(
    graph: Path, providers: Sequence[str], intra_op_threads: int = 0, *, spinning: bool = True
) -> ort.InferenceSession:
    """An ONNX Runtime session for a text model's graph (the embedder's or the
    re-ranker's): every graph optimisation, the provider choice, and the
    token inputs it must take (input_ids, attention_mask) checked."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(graph), options, providers=pick_providers(providers))
    except ModelFilesError:
        raise
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelFilesError(f"ONNX Runtime cannot load {graph}: {exc}") from None
    inputs = {i.name for i in session.get_inputs()}
    for name in ("input_ids", "attention_mask"):
        if name not in inputs:
            raise ModelFilesError(f"{graph} has no input {name!r} (inputs: {sorted(inputs)})")
    return session
