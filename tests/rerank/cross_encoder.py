"""A tiny random-weight BERT cross-encoder saved as Hugging Face saves one
(model.safetensors, config.json, a WordPiece tokenizer.json over made-up
words), for the re-ranker's tests (tests/rerank/test_reranker.py) and Search
with re-ranking through a server (tests/test_rerank_search.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SYLLABLES = ["ka", "lo", "mi", "nu", "re", "sa", "ti", "vo", "be", "du", "fe", "go"]
WORDS = [a + b for a in SYLLABLES for b in SYLLABLES]
HIDDEN, LAYERS, HEADS, INTERMEDIATE, POSITIONS = 128, 2, 4, 256, 64
WINDOW = 48  # rerank.max_sequence_length in these tests, below POSITIONS


def write_tokenizer(path: Path) -> None:
    """A BERT-style WordPiece tokenizer over WORDS, with the pair template."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.save(str(path))


def write_cross_encoder(
    model_dir: Path, *, num_labels: int, prefix: str = "bert.", seed: int = 0
) -> Path:
    """A tiny BertForSequenceClassification with random weights, as Hugging Face saves it."""
    rng = np.random.default_rng(seed)
    model_dir.mkdir(parents=True)
    vocab = len(SPECIALS) + len(WORDS)

    def dense(out: int, inp: int) -> np.ndarray:
        return rng.normal(0, 1 / np.sqrt(inp), (out, inp)).astype(np.float32)

    def vector(n: int, scale: float = 0.1, offset: float = 0.0) -> np.ndarray:
        return (offset + rng.normal(0, scale, n)).astype(np.float32)

    tensors = {
        "embeddings.word_embeddings.weight": rng.normal(0, 1, (vocab, HIDDEN)),
        "embeddings.position_embeddings.weight": rng.normal(0, 0.5, (POSITIONS, HIDDEN)),
        "embeddings.token_type_embeddings.weight": rng.normal(0, 0.5, (2, HIDDEN)),
        "embeddings.LayerNorm.weight": vector(HIDDEN, offset=1.0),
        "embeddings.LayerNorm.bias": vector(HIDDEN),
        "pooler.dense.weight": dense(HIDDEN, HIDDEN),
        "pooler.dense.bias": vector(HIDDEN),
    }
    for i in range(LAYERS):
        p = f"encoder.layer.{i}"
        for name, (out, inp) in {
            "attention.self.query": (HIDDEN, HIDDEN),
            "attention.self.key": (HIDDEN, HIDDEN),
            "attention.self.value": (HIDDEN, HIDDEN),
            "attention.output.dense": (HIDDEN, HIDDEN),
            "intermediate.dense": (INTERMEDIATE, HIDDEN),
            "output.dense": (HIDDEN, INTERMEDIATE),
        }.items():
            tensors[f"{p}.{name}.weight"] = dense(out, inp)
            tensors[f"{p}.{name}.bias"] = vector(out)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            tensors[f"{p}.{norm}.weight"] = vector(HIDDEN, offset=1.0)
            tensors[f"{p}.{norm}.bias"] = vector(HIDDEN)
    weights: dict[str, np.ndarray] = {
        prefix + k: np.asarray(v, np.float32) for k, v in tensors.items()
    }
    weights["classifier.weight"] = dense(num_labels, HIDDEN)
    weights["classifier.bias"] = vector(num_labels)
    # Real checkpoints carry this buffer too; the exporter must ignore it.
    weights[prefix + "embeddings.position_ids"] = np.arange(POSITIONS, dtype=np.int64)[None]
    save_file(weights, str(model_dir / "model.safetensors"))
    config = {
        "architectures": ["BertForSequenceClassification"],
        "model_type": "bert",
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": POSITIONS,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
        "id2label": {str(i): f"LABEL_{i}" for i in range(num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(num_labels)},
    }
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(model_dir / "tokenizer.json")
    return model_dir
