"""Our torch-free ONNX export: fidelity against an independent numpy forward
pass, the export cache, user-provided encoders, and bad model files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from rag_grpc.config import ConfigError, load_settings
from rag_grpc.embed.encoder import EncoderSpec, OnnxEncoder
from rag_grpc.embed.export import (
    BertConfig,
    build_graph,
    export_model,
    list_exports,
    load_weights,
    source_hash,
    verify_export,
)
from rag_grpc.embed.loader import encoder_spec, load_encoder
from rag_grpc.embed.model_files import ModelFilesError
from tests.bert_reference import ReferenceEncoder
from tests.cli.command import cli
from tests.conftest import EXPORT_DIR, MODEL_DIR


def fresh_texts(count: int) -> tuple[int, list[str]]:
    """Random whole-word texts of 1 to 120 words, from a seed drawn now."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    vocab = json.loads((MODEL_DIR / "tokenizer.json").read_text())["model"]["vocab"]
    words = sorted(w for w in vocab if w.isalpha() and not w.startswith("##"))
    lengths = rng.integers(1, 120, count)
    return seed, [" ".join(rng.choice(words, n)) for n in lengths]


@pytest.fixture(scope="module")
def reference() -> tuple[int, list[str], np.ndarray]:
    seed, texts = fresh_texts(10)
    tokenizer = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=256)
    ref = ReferenceEncoder(MODEL_DIR)
    vectors = np.stack([ref.encode_one(e.ids) for e in tokenizer.encode_batch(texts)])
    return seed, texts, vectors


@pytest.mark.parametrize(("variant", "floor"), [("fp32", 0.9999), ("fp16", 0.999), ("int8", 0.99)])
def test_export_matches_the_numpy_reference(
    reference: tuple[int, list[str], np.ndarray], variant: str, floor: float
) -> None:
    seed, texts, expected = reference
    export = export_model(MODEL_DIR, EXPORT_DIR, variant)
    assert export.manifest["fusions"] == {
        "EmbedLayerNormalization": 1,
        "Attention": 6,
        "BiasGelu": 6,
        "SkipLayerNormalization": 12,
    }
    spec = EncoderSpec(export.path, MODEL_DIR / "tokenizer.json", "m", variant)
    got = OnnxEncoder(spec, batch_size=4).embed(texts).vectors  # padded, mixed-length batches
    cosine = np.sum(got * expected, axis=1) / np.linalg.norm(got, axis=1)
    assert cosine.min() >= floor, f"seed {seed}: worst cosine {cosine.min():.6f}"
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)


def test_fp16_export_stores_half_precision_weights() -> None:
    import onnx

    sizes = {
        v: export_model(MODEL_DIR, EXPORT_DIR, v).path.stat().st_size for v in ("fp32", "fp16")
    }
    assert sizes["fp16"] < 0.6 * sizes["fp32"]
    model = onnx.load(str(export_model(MODEL_DIR, EXPORT_DIR, "fp16").path))
    types = {t.data_type for t in model.graph.initializer if len(t.dims) == 2}
    assert onnx.TensorProto.FLOAT16 in types and onnx.TensorProto.FLOAT not in types
    # keep_io_types: callers still get float32 out.
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_exports_are_cached_by_source_hash_and_checked(tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(MODEL_DIR, source)
    cache = tmp_path / "cache"
    first = export_model(source, cache, "fp32")
    stamp = first.path.stat().st_mtime_ns
    assert export_model(source, cache, "fp32").path.stat().st_mtime_ns == stamp  # reused
    # A changed source file is a different model: a new export beside the old one.
    config = json.loads((source / "config.json").read_text())
    config["layer_norm_eps"] = 1e-6
    (source / "config.json").write_text(json.dumps(config))
    second = export_model(source, cache, "fp32")
    assert second.source_hash == source_hash(source) != first.source_hash
    assert second.path.parent.parent != first.path.parent.parent and first.path.exists()
    # A damaged export is caught and made again.
    with open(second.path, "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00" * 16)
    with pytest.raises(ModelFilesError, match="does not match its sha256"):
        verify_export(second.path.parent)
    states = {state for _, _, state in list_exports(cache)}
    assert states == {"ok", f"{second.path} is missing or does not match its sha256"}
    remade = export_model(source, cache, "fp32")
    assert verify_export(remade.path.parent).source_hash == second.source_hash


def test_bad_sources_are_refused_clearly(tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(MODEL_DIR, source)
    (source / "model.safetensors").unlink()
    with pytest.raises(ModelFilesError, match=r"has no model\.safetensors"):
        export_model(source, tmp_path / "cache", "fp32")
    with pytest.raises(ModelFilesError, match="unknown model variant"):
        export_model(MODEL_DIR, tmp_path / "cache", "int4")
    config = json.loads((MODEL_DIR / "config.json").read_text())
    (tmp_path / "gpt.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ModelFilesError, match="not a BERT-family encoder"):
        BertConfig.from_file(tmp_path / "gpt.json")
    (source / "model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ModelFilesError, match="not a readable safetensors file"):
        export_model(source, tmp_path / "cache", "fp32")
    assert not list(list_exports(tmp_path / "cache"))  # nothing half-written


def test_a_user_onnx_encoder_with_token_states_is_pooled_by_us(tmp_path: Path) -> None:
    import onnx

    config = BertConfig.from_file(MODEL_DIR / "config.json")
    graph = build_graph(config, load_weights(MODEL_DIR / "model.safetensors"), None)
    onnx.save(graph, str(tmp_path / "encoder.onnx"))  # type: ignore[arg-type]
    settings = load_settings(
        None,
        data_dir=tmp_path / "data",
        embedding={
            "onnx_path": tmp_path / "encoder.onnx",
            "tokenizer_path": MODEL_DIR / "tokenizer.json",
            "model_id": "my-encoder",
            "pooling": "mean",
        },
    )
    user = load_encoder(settings.embedding, settings.data_dir)
    ours = OnnxEncoder(
        EncoderSpec(
            export_model(MODEL_DIR, EXPORT_DIR, "fp32").path,
            MODEL_DIR / "tokenizer.json",
            "m",
            "fp32",
        )
    )
    _, texts = fresh_texts(6)
    a, b = user.embed(texts).vectors, ours.embed(texts).vectors
    assert user.model_id == "my-encoder" and user.variant == "user"
    assert np.sum(a * b, axis=1).min() >= 0.9999
    # The wrong pooling for the graph's output is caught at load.
    wrong = settings.embedding.model_copy(update={"pooling": "none"})
    with pytest.raises(ModelFilesError, match="rank 3"):
        load_encoder(wrong, settings.data_dir)
    missing = settings.embedding.model_copy(update={"onnx_path": tmp_path / "nope.onnx"})
    with pytest.raises(ModelFilesError, match="does not exist"):
        encoder_spec(missing, settings.data_dir)
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x01garbage")
    garbage = settings.embedding.model_copy(update={"onnx_path": tmp_path / "garbage.onnx"})
    with pytest.raises(ModelFilesError, match="ONNX Runtime cannot load"):
        load_encoder(garbage, settings.data_dir)


def test_auto_variant_is_int8_without_a_gpu(tmp_path: Path) -> None:
    settings = load_settings(
        None, data_dir=tmp_path, embedding={"model_dir": MODEL_DIR, "export_dir": EXPORT_DIR}
    )
    spec = encoder_spec(settings.embedding, settings.data_dir)
    assert spec.variant == "int8" and spec.graph.parent.name == "int8"
    with pytest.raises(ConfigError, match=r"needs embedding\.tokenizer_path"):
        load_settings(None, embedding={"onnx_path": tmp_path / "x.onnx"})
    with pytest.raises(ModelFilesError, match="CUDAExecutionProvider"):
        load_encoder(
            settings.embedding.model_copy(update={"providers": ("CUDAExecutionProvider",)}),
            tmp_path,
        )


def test_model_cli_exports_lists_and_verifies(tmp_path: Path) -> None:
    cache = tmp_path / "exports"
    made = cli(
        "model",
        "export",
        "--variant",
        "fp32",
        "--export-dir",
        str(cache),
        "--model-dir",
        str(MODEL_DIR),
    )
    assert made.returncode == 0, made.stderr
    assert "fp32:" in made.stdout and "Attention 6" in made.stdout
    listed = cli("model", "list", "--json", "--export-dir", str(cache))
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert row["variant"] == "fp32" and row["state"] == "ok" and row["bytes"] > 50e6
    ok = cli("model", "verify", "--model-dir", str(MODEL_DIR), "--export-dir", str(cache))
    assert ok.returncode == 0 and "verified" in ok.stdout
    with open(Path(row["path"]) / "model.onnx", "ab") as fh:
        fh.write(b"x")
    bad = cli("model", "verify", "--model-dir", str(MODEL_DIR), "--export-dir", str(cache))
    assert bad.returncode == 2 and "failed verification" in bad.stderr
