"""The ONNX Runtime sentence encoder: tokenise, run the graph, mean-pool,
L2-normalise. Providers are picked at run time (CUDA when present, else CPU)."""

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

from rag_grpc.embed.model_files import verify_model_dir

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


class OnnxEncoder:
    """A BERT-style encoder exported to ONNX, with its Hugging Face tokenizer."""

    def __init__(
        self,
        model_dir: Path,
        *,
        max_sequence_length: int = 256,
        batch_size: int = 32,
        intra_op_threads: int = 0,
    ) -> None:
        manifest = verify_model_dir(model_dir)
        self.model_id = str(manifest["model_id"])
        self.variant = str(manifest.get("variant", "fp32"))
        self.batch_size = batch_size
        self.max_sequence_length = max_sequence_length
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_sequence_length)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        available = ort.get_available_providers()
        providers = [p for p in _PREFERRED_PROVIDERS if p in available]
        self.session = ort.InferenceSession(
            str(model_dir / "model.onnx"), options, providers=providers
        )
        self.provider = self.session.get_providers()[0]
        self._input_names = {i.name for i in self.session.get_inputs()}
        width = self.session.get_outputs()[0].shape[-1]
        self.dimension = width if isinstance(width, int) else int(str(manifest["dimension"]))
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
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
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
            hidden = self.session.run(None, feeds)[0]
            out[batch] = _mean_pool_normalise(hidden, mask)
        return EmbedOutput(out, int(lengths.sum()), lengths.astype(np.int64))

    def count_tokens(self, text: str) -> int:
        """Tokens of text without special tokens or truncation."""
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)


def _mean_pool_normalise(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask[:, :, None].astype(np.float32)
    pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


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
