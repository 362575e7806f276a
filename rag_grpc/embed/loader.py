"""From the embedding config to a loaded encoder: a user's own ONNX graph, or
our export of the prepared source model (made once and cached)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import onnxruntime as ort

from rag_grpc.config import EmbeddingConfig, RerankConfig
from rag_grpc.embed.encoder import EncoderSpec, OnnxEncoder, pick_providers
from rag_grpc.embed.export import export_model
from rag_grpc.embed.model_files import ModelFilesError, verify_model_dir

log = logging.getLogger(__name__)

_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def export_root(cfg: EmbeddingConfig, data_dir: Path) -> Path:
    """Where exports are cached: embedding.export_dir, else <data dir>/models."""
    return cfg.export_dir if cfg.export_dir is not None else data_dir / "models"


def gpu_usable(providers: list[str]) -> bool:
    """Whether a GPU provider is offered and actually takes a session here.

    onnxruntime-gpu lists CUDA even on a machine without a GPU (it then falls
    back to CPU), so a one-node graph is loaded to find out.
    """
    wanted = [p for p in providers if p in _GPU_PROVIDERS]
    if not wanted:
        return False
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=wanted)
    except Exception:  # no device, or driver/library mismatch
        return False
    return session.get_providers()[0] in _GPU_PROVIDERS


def resolve_variant(cfg: EmbeddingConfig | RerankConfig) -> str:
    """The variant to serve (the embedder's or the cross-encoder's): as
    configured, or fp16 with a usable GPU, else int8."""
    if cfg.variant != "auto":
        return cfg.variant
    return "fp16" if gpu_usable(pick_providers(cfg.providers)) else "int8"


def encoder_spec(cfg: EmbeddingConfig, data_dir: Path) -> EncoderSpec:
    """Check the configured model files and return what to load (exporting if needed)."""
    if cfg.onnx_path is not None:
        assert cfg.tokenizer_path is not None  # the config validator insists
        for path in (cfg.onnx_path, cfg.tokenizer_path):
            if not path.is_file():
                raise ModelFilesError(f"embedding model file {path} does not exist")
        return EncoderSpec(
            graph=cfg.onnx_path,
            tokenizer=cfg.tokenizer_path,
            model_id=cfg.model_id or cfg.onnx_path.stem,
            variant="user",
            pooling=cfg.pooling,
            normalize=cfg.normalize,
            max_sequence_length=cfg.max_sequence_length,
            providers=cfg.providers,
        )
    manifest = verify_model_dir(cfg.model_dir)
    limit = _position_limit(cfg.model_dir / "config.json")
    if cfg.max_sequence_length > limit:
        raise ModelFilesError(
            f"embedding.max_sequence_length {cfg.max_sequence_length} exceeds the "
            f"{limit} positions of {cfg.model_dir}"
        )
    variant = resolve_variant(cfg)
    export = export_model(cfg.model_dir, export_root(cfg, data_dir), variant)
    return EncoderSpec(
        graph=export.path,
        tokenizer=cfg.model_dir / "tokenizer.json",
        model_id=cfg.model_id or str(manifest["model_id"]),
        variant=variant,
        pooling="none",  # pooling and normalisation are inside our graph
        normalize=False,
        max_sequence_length=cfg.max_sequence_length,
        providers=cfg.providers,
    )


def load_encoder(
    cfg: EmbeddingConfig, data_dir: Path, *, batch_size: int | None = None
) -> OnnxEncoder:
    """The encoder the config describes, ready to embed."""
    return OnnxEncoder(
        encoder_spec(cfg, data_dir),
        batch_size=batch_size or cfg.batch_size,
        intra_op_threads=cfg.intra_op_threads,
        intra_op_spinning=cfg.intra_op_spinning,
    )


def _position_limit(config_path: Path) -> int:
    try:
        return int(json.loads(config_path.read_text()).get("max_position_embeddings", 512))
    except (OSError, ValueError, TypeError) as exc:
        raise ModelFilesError(f"{config_path} is unreadable: {exc}") from None
