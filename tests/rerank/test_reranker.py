"""The cross-encoder re-ranker: our export of a BERT sequence-classification
model against an independent numpy forward pass, a user's own ONNX graph,
clear start-up errors for bad model files, and the caller's deadline."""

from __future__ import annotations

import contextvars
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer

from rag_grpc import deadlines
from rag_grpc.config import RerankConfig
from rag_grpc.embed.model_files import ModelFilesError, sha256_file
from rag_grpc.errors import DeadlineExceeded
from rag_grpc.rerank.export import export_cross_encoder
from rag_grpc.rerank.loader import export_root, load_reranker
from rag_grpc.rerank.reranker import Reranker
from tests.bert_reference import ReferenceCrossEncoder
from tests.rerank.cross_encoder import LAYERS, WINDOW, WORDS, write_cross_encoder


def fresh_pairs(count: int) -> tuple[int, str, list[str]]:
    """A query and passages of 1 to 60 words (some past the window), from a seed drawn now."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    query = " ".join(rng.choice(WORDS, 5))
    passages = [" ".join(rng.choice(WORDS, n)) for n in rng.integers(1, 60, count)]
    passages[0] = query + " " + passages[0]  # one that shares the query's words
    return seed, query, passages


def reference_scores(model_dir: Path, query: str, passages: list[str]) -> np.ndarray:
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=WINDOW, strategy="only_second")
    reference = ReferenceCrossEncoder(model_dir)
    return np.array(
        [
            reference.score_one(e.ids, e.type_ids)
            for e in tokenizer.encode_batch([(query, p) for p in passages])
        ]
    )


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cross-encoders")
    write_cross_encoder(root / "one-label", num_labels=1, seed=1)
    # No "bert." prefix: checkpoints saved from the bare BertModel look like this.
    write_cross_encoder(root / "two-labels", num_labels=2, prefix="", seed=2)
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


def rerank_config(**fields: Any) -> RerankConfig:
    return RerankConfig(max_sequence_length=WINDOW, batch_size=3, **fields)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


@pytest.mark.parametrize(
    ("model", "variant"),
    [("one-label", "fp32"), ("two-labels", "fp32"), ("one-label", "fp16"), ("one-label", "int8")],
)
def test_export_scores_match_the_numpy_reference(
    models_dir: Path, data_dir: Path, model: str, variant: str
) -> None:
    model_dir = models_dir / model
    reranker = load_reranker(rerank_config(model_dir=model_dir, variant=variant), data_dir)
    assert reranker.model_id == model and reranker.variant == variant
    export = export_cross_encoder(model_dir, export_root(data_dir), variant)  # the cached one
    fusions = export.manifest["fusions"]
    assert isinstance(fusions, dict) and fusions["Attention"] == LAYERS  # BERT was recognised
    seed, query, passages = fresh_pairs(40)
    expected = reference_scores(model_dir, query, passages)
    got = reranker.score(query, passages)  # padded, length-sorted batches of 3
    assert got.dtype == np.float32 and got.shape == (len(passages),)
    error = float(np.abs(got - expected).max())
    spread = float(expected.std())
    if variant == "fp32":
        assert error < 1e-4, f"seed {seed}: worst error {error:.2e}"
    else:
        # Measured over 60 seeds (int8): error up to 0.23 of the scores' spread
        # (which random weights keep small), Spearman at least 0.990, and the
        # best pair always in the top 3.
        worst = f"seed {seed}: worst error {error:.3f}, spread {spread:.3f}"
        assert error < 0.4 * spread, worst
        assert spearman(got, expected) > 0.97, f"seed {seed}"
        assert np.argmax(expected) in np.argsort(got)[-3:], f"seed {seed}"


def test_long_queries_and_passages_fit_the_window(models_dir: Path, data_dir: Path) -> None:
    model_dir = models_dir / "one-label"
    reranker = load_reranker(rerank_config(model_dir=model_dir, variant="fp32"), data_dir)
    long_query = " ".join(WORDS[:100])  # past the whole window: cut to half of it
    passages = [" ".join(WORDS[100:140]), "kaka", " ".join(WORDS)]
    clipped = " ".join(WORDS[: WINDOW // 2])
    expected = reference_scores(model_dir, clipped, passages)
    got = reranker.score(long_query, passages)
    assert np.abs(got - expected).max() < 1e-4
    assert reranker.score("kaka", []).shape == (0,)


def test_a_user_onnx_cross_encoder_with_logits_output(
    models_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    import onnx
    from onnx import TensorProto, helper

    model_dir = models_dir / "two-labels"
    ours = load_reranker(rerank_config(model_dir=model_dir, variant="fp32"), data_dir)
    # Make it look like a Hugging Face export: logits [batch, 1].
    graph = onnx.load(str(export_cross_encoder(model_dir, export_root(data_dir), "fp32").path))
    axes = helper.make_tensor("unsqueeze_axes", TensorProto.INT64, [1], [1])
    graph.graph.initializer.append(axes)
    graph.graph.node.append(
        helper.make_node("Unsqueeze", ["score", "unsqueeze_axes"], ["logits"], name="to_logits")
    )
    del graph.graph.output[:]
    graph.graph.output.append(
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1])
    )
    onnx.save(graph, str(tmp_path / "cross.onnx"))
    tokenizer = tmp_path / "tokenizer.json"
    shutil.copy(model_dir / "tokenizer.json", tokenizer)
    hashes = {name: sha256_file(tmp_path / name) for name in ("cross.onnx", "tokenizer.json")}
    user_cfg = rerank_config(onnx_path=tmp_path / "cross.onnx", tokenizer_path=tokenizer)
    user = load_reranker(user_cfg.model_copy(update={"sha256": hashes}), data_dir)
    assert user.model_id == "cross" and user.variant == "user"
    _, query, passages = fresh_pairs(7)
    assert np.abs(user.score(query, passages) - ours.score(query, passages)).max() < 1e-5

    wrong = {**hashes, "tokenizer.json": "0" * 64}
    with pytest.raises(ModelFilesError, match=r"tokenizer\.json has sha256 .* rerank\.sha256"):
        load_reranker(user_cfg.model_copy(update={"sha256": wrong}), data_dir)
    missing = user_cfg.model_copy(update={"onnx_path": tmp_path / "nope.onnx"})
    with pytest.raises(ModelFilesError, match=r"nope\.onnx does not exist"):
        load_reranker(missing, data_dir)
    graph.graph.node.append(
        helper.make_node("Concat", ["logits"] * 3, ["three_logits"], name="three", axis=1)
    )
    del graph.graph.output[:]
    graph.graph.output.append(
        helper.make_tensor_value_info("three_logits", TensorProto.FLOAT, ["batch", 3])
    )
    onnx.save(graph, str(tmp_path / "three.onnx"))
    three = user_cfg.model_copy(update={"onnx_path": tmp_path / "three.onnx"})
    with pytest.raises(ModelFilesError, match="one score per pair"):
        load_reranker(three, data_dir)


def _break_config(**changes: Any) -> Callable[[Path], None]:
    def apply(model_dir: Path) -> None:
        config = json.loads((model_dir / "config.json").read_text())
        (model_dir / "config.json").write_text(json.dumps({**config, **changes}))

    return apply


def _drop_weights_keep_bin(model_dir: Path) -> None:
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")


def _write(name: str, text: str) -> Callable[[Path], None]:
    def apply(model_dir: Path) -> None:
        (model_dir / name).write_text(text)

    return apply


@pytest.mark.parametrize(
    ("damage", "sha256", "message"),
    [
        (lambda d: (d / "tokenizer.json").unlink(), {}, r"tokenizer\.json is missing"),
        (_drop_weights_keep_bin, {}, r"model\.safetensors is missing; only safetensors"),
        (None, {"model.safetensors": "ab" * 32}, r"model\.safetensors has sha256 [0-9a-f]{64}"),
        (None, {"vocab.txt": "ab" * 32}, r"rerank\.sha256 lists vocab\.txt, but .* not exist"),
        (_write("config.json", "{not json"), {}, r"config\.json is unreadable"),
        (_break_config(id2label={"0": "a", "1": "b", "2": "c"}), {}, "num_labels 3"),
        (_break_config(model_type="roberta"), {}, "not a BERT sequence-classification"),
        (_break_config(architectures=["BertForMaskedLM"]), {}, "not a BERT sequence-class"),
        (_break_config(id2label={"0": "a", "1": "b"}), {}, r"classifier\.weight is \[1, 128\]"),
        (_break_config(max_position_embeddings=32), {}, "exceeds the 32 positions"),
    ],
)
def test_bad_model_files_fail_at_start_with_a_clear_error(
    models_dir: Path,
    tmp_path: Path,
    damage: Callable[[Path], None] | None,
    sha256: dict[str, str],
    message: str,
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(models_dir / "one-label", model_dir)
    if damage is not None:
        damage(model_dir)
    cfg = rerank_config(model_dir=model_dir, variant="fp32", sha256=sha256)
    with pytest.raises(ModelFilesError, match=message):
        load_reranker(cfg, tmp_path / "data")
    # Nothing half-made is left in the cache.
    assert not list((tmp_path / "data").glob("models/*/*/export.json"))


def test_the_right_hashes_pass(models_dir: Path, data_dir: Path) -> None:
    model_dir = models_dir / "one-label"
    hashes = {name: sha256_file(model_dir / name).upper() for name in ("config.json",)}
    hashes["model.safetensors"] = sha256_file(model_dir / "model.safetensors")
    cfg = rerank_config(model_dir=model_dir, variant="fp32", sha256=hashes, model_id="tiny")
    assert load_reranker(cfg, data_dir).model_id == "tiny"


class _SessionThatTakesTime:
    """Wraps a session: the caller's deadline passes during each model call."""

    def __init__(self, session: Any) -> None:
        self.session, self.calls = session, 0

    def run(self, *args: Any) -> Any:
        self.calls += 1
        scope = deadlines.current()
        assert scope is not None
        scope.deadline = 0.0  # long past on the monotonic clock
        return self.session.run(*args)


def test_an_expired_deadline_stops_scoring(models_dir: Path, data_dir: Path) -> None:
    cfg = rerank_config(model_dir=models_dir / "one-label", variant="fp32")
    reranker: Reranker = load_reranker(cfg, data_dir)
    _, query, passages = fresh_pairs(7)

    def expired() -> None:
        deadlines.enter_call(0.0)
        reranker.score(query, passages)

    with pytest.raises(DeadlineExceeded, match="re-ranking"):
        contextvars.copy_context().run(expired)  # the scope stays out of other tests

    slow = _SessionThatTakesTime(reranker.session)
    reranker.session = slow

    def passes_during_the_first_batch() -> None:
        deadlines.enter_call(60.0)
        reranker.score(query, passages)

    with pytest.raises(DeadlineExceeded):
        contextvars.copy_context().run(passes_during_the_first_batch)
    assert slow.calls == 1  # of the three batches, only the first ran
