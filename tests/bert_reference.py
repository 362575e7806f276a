"""Independent BERT forward passes in plain numpy, read straight from
model.safetensors: the yardsticks for our ONNX exports (the sentence encoder,
and the sequence-classification cross-encoder).

Written from the BERT paper's definition (post-LayerNorm blocks, exact erf
Gelu, additive attention mask, tanh pooler over [CLS]), sentence-transformers'
mean pooling and Hugging Face's BertForSequenceClassification head; it shares
no code with rag_grpc.embed.export or rag_grpc.rerank.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

_erf = np.frompyfunc(math.erf, 1, 1)


class ReferenceEncoder:
    def __init__(self, model_dir: Path) -> None:
        self.config = json.loads((model_dir / "config.json").read_text())
        # ForSequenceClassification checkpoints keep the encoder under "bert.".
        self.w = {
            k.removeprefix("bert."): v.astype(np.float64)
            for k, v in load_file(model_dir / "model.safetensors").items()
            if v.dtype == np.float32
        }

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.w[f"{name}.weight"].T + self.w[f"{name}.bias"]

    def _layer_norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        eps = self.config["layer_norm_eps"]
        return (x - mean) / np.sqrt(var + eps) * self.w[f"{name}.weight"] + self.w[f"{name}.bias"]

    def encode_one(self, ids: list[int]) -> np.ndarray:
        """One text's token ids (with [CLS]/[SEP]) -> its unit sentence vector."""
        pooled = self.token_states(ids).mean(0)
        return pooled / np.linalg.norm(pooled)

    def token_states(self, ids: list[int], type_ids: list[int] | None = None) -> np.ndarray:
        """One sequence's final hidden states [tokens, hidden] (no padding)."""
        heads = self.config["num_attention_heads"]
        n = len(ids)
        x = (
            self.w["embeddings.word_embeddings.weight"][ids]
            + self.w["embeddings.position_embeddings.weight"][:n]
            + self.w["embeddings.token_type_embeddings.weight"][type_ids or [0] * n]
        )
        x = self._layer_norm(x, "embeddings.LayerNorm")
        for i in range(self.config["num_hidden_layers"]):
            p = f"encoder.layer.{i}"
            q, k, v = (
                self._linear(x, f"{p}.attention.self.{m}") for m in ("query", "key", "value")
            )
            d = q.shape[1] // heads
            q, k, v = (t.reshape(n, heads, d).transpose(1, 0, 2) for t in (q, k, v))
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            probs = scores / scores.sum(-1, keepdims=True)
            context = (probs @ v).transpose(1, 0, 2).reshape(n, heads * d)
            x = self._layer_norm(
                x + self._linear(context, f"{p}.attention.output.dense"),
                f"{p}.attention.output.LayerNorm",
            )
            inner = self._linear(x, f"{p}.intermediate.dense")
            erf = np.asarray(_erf(inner / math.sqrt(2.0)), dtype=np.float64)
            gelu = 0.5 * inner * (1.0 + erf)
            x = self._layer_norm(
                x + self._linear(gelu, f"{p}.output.dense"), f"{p}.output.LayerNorm"
            )
        return x


class ReferenceCrossEncoder(ReferenceEncoder):
    def score_one(self, ids: list[int], type_ids: list[int]) -> float:
        """One (query, passage) pair's token and type ids -> its relevance score:
        the logit with one label, logit[1] - logit[0] with two."""
        cls_state = self.token_states(ids, type_ids)[0]
        pooled = np.tanh(self._linear(cls_state, "pooler.dense"))
        logits = self._linear(pooled, "classifier")
        return float(logits[0] if len(logits) == 1 else logits[1] - logits[0])
