"""Authorization: every method against every kind of caller, Delete's three
variants, fail-closed for methods without a rule, and open health checks.
The expected outcomes are written out by hand, not derived from RULES, so a
change to the table shows up here as a decision someone has to confirm."""

from __future__ import annotations

import pytest

from rag_grpc.errors import PermissionDenied, Unauthenticated
from rag_grpc.pb import SERVICE_FILES, common_pb2, retrieval_pb2
from rag_grpc.security.authz import OPEN_SCOPE, RULES, Rule, Scope, authorize, is_open
from rag_grpc.security.model import Grant, Role

CALLERS: dict[str, Grant | None] = {
    "reader": Grant("acme", Role.READER),
    "writer": Grant("acme", Role.WRITER),
    "admin": Grant("acme", Role.ADMIN),
    "operator": Grant(None, None, operator=True),
    # Writer rather than admin, so Delete shows the member role still counts.
    "operator+member": Grant("acme", Role.WRITER, operator=True),
    "unknown identity": Grant(None, None),
    "no identity": None,
}

# Outcomes, one letter per caller in CALLERS' order:
# T = allowed, scope = the caller's tenant; A = allowed, scope = all tenants;
# D = PermissionDenied; U = Unauthenticated.
READER = "TTTDTDU"
WRITER = "DTTDTDU"
ADMIN_OR_OPERATOR = "DDTAADU"
OPERATOR = "DDDAADU"

BY_IDS = retrieval_pb2.DeleteRequest(namespace="docs", ids=["a", "b"])
BY_FILTER = retrieval_pb2.DeleteRequest(
    namespace="docs",
    filter=common_pb2.Filter(
        field=common_pb2.FieldCondition(
            key="topic", equals=common_pb2.MetadataValue(string_value="geology")
        )
    ),
)
FORGET = retrieval_pb2.DeleteRequest(namespace="docs", ids=["a"], forget=True)

# (method, request, outcomes); the request matters to Delete alone.
MATRIX: list[tuple[str, object, str]] = [
    ("/rag.v1.RetrievalService/Search", retrieval_pb2.SearchRequest(), READER),
    ("/rag.v1.RetrievalService/SearchBatch", retrieval_pb2.SearchBatchRequest(), READER),
    ("/rag.v1.RetrievalService/Get", retrieval_pb2.GetRequest(), READER),
    ("/rag.v1.RagService/Ask", None, READER),
    ("/rag.v1.EmbeddingService/Embed", None, READER),
    ("/rag.v1.GenerationService/Generate", None, READER),
    ("/rag.v1.IngestionService/GetJob", None, READER),
    ("/rag.v1.IngestionService/WatchJob", None, READER),
    ("/rag.v1.RetrievalService/Upsert", retrieval_pb2.UpsertRequest(), WRITER),
    ("/rag.v1.IngestionService/Submit", None, WRITER),
    ("/rag.v1.RetrievalService/Delete", BY_IDS, WRITER),
    ("/rag.v1.RetrievalService/Delete", BY_FILTER, "DDTDDDU"),
    ("/rag.v1.RetrievalService/Delete", FORGET, "DDTDDDU"),
    # A request authz cannot read (not yet received, or of another type)
    # takes the stricter rule.
    ("/rag.v1.RetrievalService/Delete", None, "DDTDDDU"),
    ("/rag.v1.AdminService/Stats", None, ADMIN_OR_OPERATOR),
    ("/rag.v1.AdminService/Usage", None, ADMIN_OR_OPERATOR),
    ("/rag.v1.AdminService/Snapshot", None, OPERATOR),
    ("/rag.v1.AdminService/AuditExport", None, OPERATOR),
    # No rule: refused for everyone, operators and the unauthenticated too.
    ("/rag.v1.RetrievalService/Truncate", None, "DDDDDDD"),
    ("/rag.v1.NewService/Anything", None, "DDDDDDD"),
    ("/other.v1.Service/Call", None, "DDDDDDD"),
]


def _variant(request: object) -> str:
    return {id(BY_IDS): "by ids", id(BY_FILTER): "by filter", id(FORGET): "forget"}.get(
        id(request), type(request).__name__
    )


CASES = [
    pytest.param(method, request, caller, outcome, id=f"{method}-{_variant(request)}-{caller}")
    for method, request, outcomes in MATRIX
    for caller, outcome in zip(CALLERS, outcomes, strict=True)
]


@pytest.mark.parametrize(("method", "request_message", "caller", "outcome"), CASES)
def test_matrix(method: str, request_message: object, caller: str, outcome: str) -> None:
    grant = CALLERS[caller]
    if outcome in "DU":
        error = PermissionDenied if outcome == "D" else Unauthenticated
        with pytest.raises(error) as info:
            authorize(grant, method, request_message)
        # Either error tells the caller what it lacks, never an empty message.
        assert str(info.value)
        return
    assert grant is not None
    scope = authorize(grant, method, request_message)
    tenant = grant.tenant if outcome == "T" else None
    assert scope == Scope(tenant=tenant, role=grant.role, operator=grant.operator)


def test_the_matrix_covers_every_rule() -> None:
    assert {method for method, _, _ in MATRIX if method in RULES} == set(RULES)


def test_every_rpc_in_the_protos_has_a_rule() -> None:
    # A new RPC added to proto/ without a rule would be refused for everyone;
    # this says so at test time rather than in production.
    methods = {
        f"/{service.full_name}/{method.name}"
        for module in SERVICE_FILES
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert methods
    assert methods - set(RULES) == set()


@pytest.mark.parametrize(
    "method",
    [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    ],
)
@pytest.mark.parametrize("caller", list(CALLERS))
def test_health_and_reflection_need_no_identity(method: str, caller: str) -> None:
    assert is_open(method)
    assert authorize(CALLERS[caller], method, None) == OPEN_SCOPE


def test_a_look_alike_of_an_open_method_is_not_open() -> None:
    # Prefix matching includes the service's trailing "/": a service whose
    # name merely starts with "Health" gets no free pass.
    assert not is_open("/grpc.health.v1.HealthAdmin/Reset")
    with pytest.raises(PermissionDenied):
        authorize(None, "/grpc.health.v1.HealthAdmin/Reset", None)


@pytest.mark.parametrize(
    ("grant", "method", "request_message", "error", "message"),
    [
        (
            Grant("acme", Role.READER),
            "/rag.v1.RetrievalService/Upsert",
            None,
            PermissionDenied,
            "role reader of tenant acme may not call Upsert; writer or above can",
        ),
        (
            Grant("acme", Role.WRITER),
            "/rag.v1.RetrievalService/Delete",
            FORGET,
            PermissionDenied,
            "role writer of tenant acme may not call Delete with a filter or forget=true;"
            " admin or above can",
        ),
        (
            Grant("acme", Role.READER),
            "/rag.v1.RetrievalService/Delete",
            BY_IDS,
            PermissionDenied,
            "role reader of tenant acme may not call Delete; writer or above can",
        ),
        (
            Grant("acme", Role.ADMIN),
            "/rag.v1.AdminService/Snapshot",
            None,
            PermissionDenied,
            "role admin of tenant acme may not call Snapshot; only operators can",
        ),
        (
            Grant(None, None, operator=True),
            "/rag.v1.RetrievalService/Search",
            None,
            PermissionDenied,
            "the caller is an operator but not a member of any tenant;"
            " Search needs the reader role in a tenant",
        ),
        (
            Grant(None, None),
            "/rag.v1.RetrievalService/Search",
            None,
            PermissionDenied,
            "the caller is not a member of any tenant, so it may not call Search",
        ),
        (
            None,
            "/rag.v1.RetrievalService/Search",
            None,
            Unauthenticated,
            "Search needs an identity; the call carries no credential",
        ),
        (
            Grant("acme", Role.ADMIN, operator=True),
            "/rag.v1.RetrievalService/Truncate",
            None,
            PermissionDenied,
            "/rag.v1.RetrievalService/Truncate has no authorization rule",
        ),
    ],
)
def test_messages_say_what_is_missing(
    grant: Grant | None,
    method: str,
    request_message: object,
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error) as info:
        authorize(grant, method, request_message)
    assert message in str(info.value)


def test_an_empty_filter_still_counts_as_a_filter() -> None:
    # The service applies request.filter whenever the field is present, so
    # authorization must read presence the same way, not "has conditions".
    request = retrieval_pb2.DeleteRequest(namespace="docs", filter=common_pb2.Filter())
    with pytest.raises(PermissionDenied):
        authorize(Grant("acme", Role.WRITER), "/rag.v1.RetrievalService/Delete", request)


def test_rules_read_as_words_for_the_docs() -> None:
    assert RULES["/rag.v1.RetrievalService/Search"].describe() == "reader or above in their tenant"
    assert RULES["/rag.v1.RetrievalService/Delete"].describe() == (
        "writer or above in their tenant; admin or above with a filter or forget=true"
    )
    assert RULES["/rag.v1.AdminService/Stats"].describe() == (
        "admin or above in their tenant; operators for all tenants"
    )
    assert RULES["/rag.v1.AdminService/Snapshot"].describe() == "operators only"
    assert all(isinstance(rule, Rule) and rule.describe() for rule in RULES.values())


def test_the_table_cannot_be_changed_at_run_time() -> None:
    with pytest.raises(TypeError):
        RULES["/rag.v1.RetrievalService/Truncate"] = Rule(Role.READER)  # type: ignore[index]
