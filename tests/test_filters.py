"""Filter validation (rag_grpc/filters.py): malformed filters, depth and size limits."""

from __future__ import annotations

import pytest

from rag_grpc.errors import InvalidArgument
from rag_grpc.filters import MAX_DEPTH, And, AnyOf, Equals, Or, Range, validate_filter


@pytest.mark.parametrize(
    "flt",
    [
        Equals("bad key", 1),
        AnyOf("k", ()),
        Range("k"),
        Range("k", gte=1, gt=2),
        Range("k", gte=3, lte=1),
        Range("k", lt=float("nan")),
        And(()),
        Or(()),
    ],
)
def test_malformed_filters_are_rejected(flt) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument):
        validate_filter(flt)


def test_filter_depth_and_size_limits() -> None:
    deep: Equals | And = Equals("k", 1)
    for _ in range(MAX_DEPTH):
        deep = And((deep,))
    with pytest.raises(InvalidArgument, match="deeper"):
        validate_filter(deep)
    with pytest.raises(InvalidArgument, match="conditions"):
        validate_filter(Or(tuple(Equals("k", i) for i in range(65))))
    validate_filter(Or(tuple(Equals("k", i) for i in range(64))))
