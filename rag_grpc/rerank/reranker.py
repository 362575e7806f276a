"""The ONNX Runtime cross-encoder: tokenise (query, passage) pairs, run the
graph in length-sorted batches, one relevance score per passage. The caller's
deadline is checked before every batch, since each costs a full model pass."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rag_grpc import deadlines
from rag_grpc.embed.encoder import load_tokenizer, open_session
from rag_grpc.embed.model_files import ModelFilesError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RerankerSpec:
    """Everything needed to load one cross-encoder: graph, tokenizer, limits."""

    graph: Path
    tokenizer: Path
    model_id: str
    variant: str
    max_sequence_length: int = 512
    providers: tuple[str, ...] = ()


class Reranker:
    """A cross-encoder in ONNX with its Hugging Face tokenizer: higher score, more relevant."""

    def __init__(self, spec: RerankerSpec, *, batch_size: int = 16, intra_op_threads: int = 0):
        self.spec = spec
        self.model_id = spec.model_id
        self.variant = spec.variant
        self.batch_size = batch_size
        self.max_sequence_length = spec.max_sequence_length
        # The query keeps at most half the window; passages are cut to fit the rest.
        self.max_query_tokens = spec.max_sequence_length // 2
        self.tokenizer = load_tokenizer(spec.tokenizer)
        # A second copy, never truncating, to measure and cut the query:
        # "only_second" truncation refuses a lone sequence that overflows.
        self._query_tokenizer = load_tokenizer(spec.tokenizer)
        self._query_tokenizer.no_padding()
        self._query_tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(
            max_length=spec.max_sequence_length, strategy="only_second"
        )
        self.session = open_session(spec.graph, spec.providers, intra_op_threads)
        self.provider = self.session.get_providers()[0]
        self._input_names = {i.name for i in self.session.get_inputs()}
        unknown = self._input_names - {"input_ids", "attention_mask", "token_type_ids"}
        if unknown:
            raise ModelFilesError(f"{spec.graph} needs inputs we cannot give: {sorted(unknown)}")
        output = self.session.get_outputs()[0]
        # Ours gives [batch]; Hugging Face exports give logits [batch, labels].
        shape = output.shape
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] in (1, 2))):
            raise ModelFilesError(
                f"{spec.graph} outputs {output.name} of shape {shape}; a cross-encoder "
                "gives one score per pair ([batch] or [batch, 1]) or two logits ([batch, 2])"
            )
        # Tokenizer objects hold truncation state; one tokenisation at a time.
        self._tokenize_lock = threading.Lock()
        log.info("re-ranking model %s (%s) on %s", self.model_id, self.variant, self.provider)

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        """Relevance of each passage to the query: float32 [len(passages)], higher is better."""
        scores = np.empty(len(passages), dtype=np.float32)
        if not passages:
            return scores
        with self._tokenize_lock:
            query = self._clip_query(query)
            encodings = self.tokenizer.encode_batch([(query, p) for p in passages])
        lengths = np.array([len(e.ids) for e in encodings])
        # Length-sorted batches pad little.
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(order), self.batch_size):
            deadlines.check("re-ranking")
            batch = order[start : start + self.batch_size]
            width = int(lengths[batch].max())
            ids = np.zeros((len(batch), width), dtype=np.int64)
            types = np.zeros((len(batch), width), dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            for row, i in enumerate(batch):
                n = lengths[i]
                ids[row, :n] = encodings[i].ids
                types[row, :n] = encodings[i].type_ids
                mask[row, :n] = 1
            feeds = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self._input_names:
                feeds["token_type_ids"] = types
            scores[batch] = scores_from_logits(self.session.run(None, feeds)[0])
        return scores

    def _clip_query(self, query: str) -> str:
        """The query cut to max_query_tokens tokens, so truncating only the
        passage always fits the pair (tokenizers refuses a pair it cannot fit)."""
        encoding = self._query_tokenizer.encode(query, add_special_tokens=False)
        if len(encoding.ids) <= self.max_query_tokens:
            return query
        return query[: encoding.offsets[self.max_query_tokens - 1][1]]


def scores_from_logits(logits: np.ndarray) -> np.ndarray:
    """One score per pair: [batch] as is, [batch, 1] squeezed, [batch, 2] as
    logit[1] - logit[0] (the log-odds of label 1, "relevant")."""
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim == 2 and logits.shape[1] == 2:
        return logits[:, 1] - logits[:, 0]
    return logits.reshape(len(logits))
