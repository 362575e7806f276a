"""Our exporter for cross-encoders: a BERT sequence-classification directory
(config.json, model.safetensors, tokenizer.json) becomes one ONNX graph that
maps a batch of (query, passage) token ids to one relevance score per pair.

The encoder body, the optimiser, the fp16/int8 variants and the export cache
are the sentence encoder's (rag_grpc.embed.export); only the head differs:
BERT's pooler (tanh over the [CLS] state) and the classifier.

Scores: with one label the score is its logit (ms-marco cross-encoders are
trained that way). With two labels it is logit[1] - logit[0], the log-odds
of label 1, which orders pairs exactly as softmax(logits)[1] does without
squashing large margins; label 1 is taken to mean "relevant", as in the
binary classifiers Hugging Face fine-tunes. Any other label count is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rag_grpc.embed.export import (
    BertConfig,
    BuiltGraph,
    Export,
    GraphBuilder,
    cached_export,
    load_weights,
    write_encoder,
)
from rag_grpc.embed.model_files import ModelFilesError, read_json

# What a cross-encoder source directory must hold; the cache key covers them all.
SOURCE_FILES = ("config.json", "model.safetensors", "tokenizer.json")
# Keeps these exports' cache keys apart from sentence encoders'; bump the
# number when the head this module writes changes.
HEAD_SALT = "cross-encoder head 1"
SCORE_OUTPUT = "score"


@dataclass(frozen=True)
class ClassifierHead:
    """What config.json says about the sequence-classification head."""

    num_labels: int

    @classmethod
    def from_file(cls, path: Path) -> ClassifierHead:
        """Read and check the head: a BERT ForSequenceClassification with 1 or 2 labels."""
        raw = read_json(path)
        if not isinstance(raw, dict):
            raise ModelFilesError(f"{path} is not a JSON object")
        # RoBERTa-style heads (dense + out_proj on <s>, no pooler) differ.
        model_type = raw.get("model_type", "bert")
        architectures = raw.get("architectures") or []
        if model_type != "bert" or (
            architectures
            and not any(str(a).endswith("ForSequenceClassification") for a in architectures)
        ):
            raise ModelFilesError(
                f"{path}: {model_type!r} {architectures} is not a BERT sequence-classification "
                "model this exporter knows; export it to ONNX yourself and set "
                "rerank.onnx_path and rerank.tokenizer_path"
            )
        # Hugging Face writes id2label, from which it derives num_labels
        # (default 2); a bare num_labels is honoured too.
        id2label = raw.get("id2label")
        num_labels = len(id2label) if isinstance(id2label, dict) else raw.get("num_labels", 2)
        if num_labels not in (1, 2):
            raise ModelFilesError(
                f"{path}: num_labels {num_labels!r} is not supported; a re-ranker needs one "
                "relevance logit (1 label) or a relevant/irrelevant pair (2 labels)"
            )
        return cls(int(num_labels))


def build_cross_encoder_graph(
    config: BertConfig, weights: dict[str, np.ndarray], head: ClassifierHead
) -> object:
    """The fp32 ONNX model: (input_ids, attention_mask, token_type_ids) -> score [batch]."""
    g = GraphBuilder(weights)
    x = write_encoder(g, config)
    cls_state = g.op("Gather", [x, g.const(np.array(0, np.int64))], axis=1)
    pooled = g.op("Tanh", [g.linear(cls_state, "pooler.dense")])
    classifier = g.weight("classifier.weight")
    if classifier.shape != (head.num_labels, config.hidden_size):
        raise ModelFilesError(
            f"model.safetensors: classifier.weight is {list(classifier.shape)}, but config.json "
            f"says {head.num_labels} label(s) over {config.hidden_size} features"
        )
    row, bias = classifier, g.weight("classifier.bias")
    if head.num_labels == 2:
        # logit[1] - logit[0] is linear in the pooled state: fold it into one row.
        row, bias = row[1:2] - row[0:1], bias[1:2] - bias[0:1]
    product = g.op("MatMul", [pooled, g.const(row.T.copy(), "weight")], node_name="classifier")
    logit = g.op("Add", [product, g.const(bias, "bias")])  # [batch, 1]
    score = g.op("Squeeze", [logit, g.const(np.array([1], np.int64))])
    return g.finish("cross_encoder", score, SCORE_OUTPUT, ["batch"])


def export_cross_encoder(
    source: Path, cache_root: Path, variant: str, *, force: bool = False
) -> Export:
    """Export cross-encoder ``source`` as ``variant`` into the cache (or reuse it)."""

    def build() -> BuiltGraph:
        config = BertConfig.from_file(source / "config.json")
        head = ClassifierHead.from_file(source / "config.json")
        weights = load_weights(source / "model.safetensors")
        model = build_cross_encoder_graph(config, weights, head)
        facts: dict[str, object] = {"kind": "cross-encoder", "num_labels": head.num_labels}
        return BuiltGraph(model, config, facts)

    return cached_export(
        source, cache_root, variant, SOURCE_FILES, build, salt=HEAD_SALT, force=force
    )
