"""The one table between core errors and gRPC status codes reads both ways."""

from __future__ import annotations

import grpc

from rag_grpc import errors
from rag_grpc.client import RpcError
from rag_grpc.services.status import ERROR_OF, STATUS_OF, status_of


def test_every_core_error_has_a_status_and_comes_back_as_itself() -> None:
    core = {cls for cls in vars(errors).values() if isinstance(cls, type)} - {errors.RagError}
    assert core <= set(STATUS_OF)
    assert len(set(STATUS_OF.values())) == len(STATUS_OF)  # one class per code
    for cls, code in STATUS_OF.items():
        assert ERROR_OF[code] is cls
        assert status_of(cls("x")) is code
    # The reverse the remote backends once wrote by hand lacked these two.
    assert ERROR_OF[grpc.StatusCode.CANCELLED] is errors.Cancelled
    assert ERROR_OF[grpc.StatusCode.UNAUTHENTICATED] is errors.Unauthenticated


def test_an_error_outside_the_table_is_unknown_and_subclasses_map_as_their_base() -> None:
    class Full(errors.ResourceExhausted):
        pass

    assert status_of(Full("queue full")) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(errors.RagError("?")) is grpc.StatusCode.UNKNOWN


def test_a_client_error_names_its_core_error() -> None:
    assert RpcError("NOT_FOUND", "no namespace 'x'").error is errors.NotFound
    assert RpcError("CANCELLED", "").error is errors.Cancelled
    assert RpcError("INTERNAL", "see the server log").error is None
    assert RpcError("UNKNOWN", "").error is None
