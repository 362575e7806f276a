"""From the [rerank] config to a loaded cross-encoder: check the files (present,
parseable, hashes as configured), then a user's own ONNX graph, or our export
of the model directory (made once and cached beside the embedder's)."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from rag_grpc.config import RerankConfig
from rag_grpc.embed.export import BertConfig
from rag_grpc.embed.loader import resolve_variant
from rag_grpc.embed.model_files import ModelFilesError, sha256_file
from rag_grpc.rerank.export import SOURCE_FILES, ClassifierHead, export_cross_encoder
from rag_grpc.rerank.reranker import Reranker, RerankerSpec

_HOW_TO_GET = "see docs/reranking.md for the files a cross-encoder needs"


def export_root(data_dir: Path) -> Path:
    """Where cross-encoder exports are cached: <data dir>/models, as the
    embedder's default (RerankConfig has no export_dir of its own)."""
    return data_dir / "models"


def reranker_spec(cfg: RerankConfig, data_dir: Path) -> RerankerSpec:
    """Check the configured model files and return what to load (exporting if needed)."""
    if not cfg.configured:
        raise ModelFilesError("no re-ranking model is configured; set rerank.model_dir")
    _check_providers(cfg.providers)
    if cfg.onnx_path is not None:
        assert cfg.tokenizer_path is not None  # the config validator insists
        for path in (cfg.onnx_path, cfg.tokenizer_path):
            if not path.is_file():
                raise ModelFilesError(f"re-ranking model file {path} does not exist; {_HOW_TO_GET}")
        _check_hashes(cfg, _user_file_paths(cfg))
        return RerankerSpec(
            graph=cfg.onnx_path,
            tokenizer=cfg.tokenizer_path,
            model_id=cfg.model_id or cfg.onnx_path.stem,
            variant="user",
            max_sequence_length=cfg.max_sequence_length,
            providers=cfg.providers,
        )
    assert cfg.model_dir is not None
    model_dir = cfg.model_dir
    if not model_dir.is_dir():
        raise ModelFilesError(f"rerank.model_dir {model_dir} is not a directory; {_HOW_TO_GET}")
    for name in SOURCE_FILES:
        if not (model_dir / name).is_file():
            hint = (
                "; only safetensors weights are read: download model.safetensors as well"
                if name == "model.safetensors" and (model_dir / "pytorch_model.bin").is_file()
                else ""
            )
            raise ModelFilesError(
                f"re-ranking model file {model_dir / name} is missing{hint}; {_HOW_TO_GET}"
            )
    _check_hashes(cfg, {name: model_dir / name for name in cfg.sha256})
    # Read the config now, so a wrong model fails at start even when an export is cached.
    config = BertConfig.from_file(model_dir / "config.json")
    ClassifierHead.from_file(model_dir / "config.json")
    if cfg.max_sequence_length > config.max_position_embeddings:
        raise ModelFilesError(
            f"rerank.max_sequence_length {cfg.max_sequence_length} exceeds the "
            f"{config.max_position_embeddings} positions of {model_dir}"
        )
    variant = resolve_variant(cfg)
    export = export_cross_encoder(model_dir, export_root(data_dir), variant)
    return RerankerSpec(
        graph=export.path,
        tokenizer=model_dir / "tokenizer.json",
        model_id=cfg.model_id or model_dir.name,
        variant=variant,
        max_sequence_length=cfg.max_sequence_length,
        providers=cfg.providers,
    )


def load_reranker(cfg: RerankConfig, data_dir: Path) -> Reranker:
    """The cross-encoder the config describes, ready to score; ModelFilesError
    (saying which file and what to do) when its files are missing or wrong."""
    return Reranker(
        reranker_spec(cfg, data_dir),
        batch_size=cfg.batch_size,
        intra_op_threads=cfg.intra_op_threads,
    )


def _user_file_paths(cfg: RerankConfig) -> dict[str, Path]:
    """rerank.sha256 names for a user's model: the tokenizer's file name, else
    a file beside the graph (the graph itself, or its external data)."""
    assert cfg.onnx_path is not None and cfg.tokenizer_path is not None
    return {
        name: cfg.tokenizer_path if name == cfg.tokenizer_path.name else cfg.onnx_path.parent / name
        for name in cfg.sha256
    }


def _check_hashes(cfg: RerankConfig, paths: dict[str, Path]) -> None:
    for name, path in paths.items():
        expected = cfg.sha256[name].strip().lower()
        if not path.is_file():
            raise ModelFilesError(
                f"rerank.sha256 lists {name}, but {path} does not exist; "
                "add the file or drop it from rerank.sha256"
            )
        actual = sha256_file(path)
        if actual != expected:
            raise ModelFilesError(
                f"re-ranking model file {path} has sha256 {actual}, not {expected} as "
                "rerank.sha256 expects; download the file again from the model's source, "
                "or correct the hash if the model was meant to change"
            )


def _check_providers(requested: tuple[str, ...]) -> None:
    # pick_providers would refuse too, but naming the embedding section.
    missing = [p for p in requested if p not in ort.get_available_providers()]
    if missing:
        raise ModelFilesError(
            f"ONNX Runtime here offers {ort.get_available_providers()}, not {missing}; "
            "install rag-grpc[gpu] for CUDA/TensorRT or change rerank.providers"
        )
