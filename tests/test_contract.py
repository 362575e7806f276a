"""The generated code matches proto/, and the contract is what it says."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2

from rag_grpc import protogen
from rag_grpc.pb import SERVICE_FILES, common_pb2, retrieval_pb2
from tests.conftest import ROOT

GEN_DIR = ROOT / "rag_grpc" / "_gen"


def test_generated_code_is_not_stale() -> None:
    fresh = protogen.generate(ROOT / "proto")
    # Only source files: an ordinary machine also writes __pycache__/*.pyc
    # next to them, which are bytecode, not part of what protoc generates.
    installed = {
        p.relative_to(GEN_DIR).as_posix(): p.read_text()
        for p in GEN_DIR.rglob("*")
        if p.suffix in (".py", ".pyi") and "__pycache__" not in p.parts
    }
    stale = sorted(name for name, text in fresh.items() if installed.get(name) != text)
    extra = sorted(set(installed) - set(fresh))
    assert not stale and not extra, (
        f"rag_grpc/_gen is stale against proto/ (rebuild with `make install`): "
        f"changed {stale}, left over {extra}"
    )


def test_every_service_and_rpc_is_defined() -> None:
    rpcs = {
        service.full_name: sorted(m.name for m in service.methods)
        for module in SERVICE_FILES
        for service in module.DESCRIPTOR.services_by_name.values()
    }
    assert rpcs == {
        "rag.v1.RetrievalService": ["Delete", "Get", "Search", "SearchBatch", "Upsert"],
        "rag.v1.EmbeddingService": ["Embed"],
        "rag.v1.GenerationService": ["Generate"],
        "rag.v1.RagService": ["Ask"],
        "rag.v1.IngestionService": ["GetJob", "Submit", "WatchJob"],
        "rag.v1.AdminService": ["AuditExport", "Snapshot", "Stats", "Usage"],
    }


def test_request_and_response_messages_reserve_room_for_growth() -> None:
    for message in (common_pb2.Document, retrieval_pb2.SearchRequest, retrieval_pb2.Hit):
        file_proto = descriptor_pb2.FileDescriptorProto()
        message.DESCRIPTOR.file.CopyToProto(file_proto)
        (declared,) = [m for m in file_proto.message_type if m.name == message.DESCRIPTOR.name]
        assert [(r.start, r.end) for r in declared.reserved_range] == [(100, 200)]


def test_each_proto_file_documents_itself() -> None:
    for path in sorted((ROOT / "proto" / "rag" / "v1").glob("*.proto")):
        text = Path(path).read_text()
        assert text.startswith("//"), f"{path.name} has no header comment"
        assert "package rag.v1;" in text
