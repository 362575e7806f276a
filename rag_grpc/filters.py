"""Typed metadata filters: conditions on one field combined with And / Or.

The store compiles a validated filter to SQL over its metadata index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeAlias

from rag_grpc.documents import MetadataScalar, validate_metadata_key
from rag_grpc.errors import InvalidArgument

MAX_DEPTH = 8
MAX_CONDITIONS = 64
MAX_ANY_OF = 1024


@dataclass(frozen=True)
class Equals:
    """The field equals the value (numbers compare numerically, int with float)."""

    key: str
    value: MetadataScalar


@dataclass(frozen=True)
class AnyOf:
    """The field equals one of the values."""

    key: str
    values: tuple[MetadataScalar, ...]


@dataclass(frozen=True)
class Range:
    """The field is a number within the bounds; at least one bound is set."""

    key: str
    gte: float | None = None
    gt: float | None = None
    lte: float | None = None
    lt: float | None = None


@dataclass(frozen=True)
class And:
    """Every nested filter matches."""

    filters: tuple[Filter, ...]


@dataclass(frozen=True)
class Or:
    """At least one nested filter matches."""

    filters: tuple[Filter, ...]


Filter: TypeAlias = Equals | AnyOf | Range | And | Or


def validate_filter(flt: Filter, max_values: int = 4 * MAX_ANY_OF) -> None:
    """Raise InvalidArgument naming the first malformed part of the filter;
    max_values bounds the values of all its any_of conditions together (the
    cost of matching it)."""
    count = _validate(flt, depth=1)
    if count > MAX_CONDITIONS:
        raise InvalidArgument(f"filter has {count} conditions; at most {MAX_CONDITIONS} allowed")
    values = _values(flt)
    if values > max_values:
        raise InvalidArgument(
            f"filter compares with {values} values in all; at most {max_values} "
            "(limits.max_filter_values)"
        )


def _values(flt: Filter) -> int:
    if isinstance(flt, And | Or):
        return sum(_values(inner) for inner in flt.filters)
    return len(flt.values) if isinstance(flt, AnyOf) else 1


def _validate(flt: Filter, depth: int) -> int:
    if depth > MAX_DEPTH:
        raise InvalidArgument(f"filter is nested deeper than {MAX_DEPTH} levels")
    if isinstance(flt, And | Or):
        kind = "all" if isinstance(flt, And) else "any"
        if not flt.filters:
            raise InvalidArgument(f"filter '{kind}' must contain at least one filter")
        return sum(_validate(inner, depth + 1) for inner in flt.filters)
    validate_metadata_key(flt.key)
    if isinstance(flt, Equals):
        _check_value(flt.key, flt.value)
    elif isinstance(flt, AnyOf):
        if not flt.values or len(flt.values) > MAX_ANY_OF:
            raise InvalidArgument(
                f"filter any_of on {flt.key!r} needs 1 to {MAX_ANY_OF} values, "
                f"got {len(flt.values)}"
            )
        for value in flt.values:
            _check_value(flt.key, value)
    else:
        bounds = [b for b in (flt.gte, flt.gt, flt.lte, flt.lt) if b is not None]
        if not bounds:
            raise InvalidArgument(f"filter range on {flt.key!r} needs at least one bound")
        if any(math.isnan(b) for b in bounds):
            raise InvalidArgument(f"filter range on {flt.key!r} has a NaN bound")
        if flt.gte is not None and flt.gt is not None:
            raise InvalidArgument(f"filter range on {flt.key!r}: set gte or gt, not both")
        if flt.lte is not None and flt.lt is not None:
            raise InvalidArgument(f"filter range on {flt.key!r}: set lte or lt, not both")
        low = flt.gte if flt.gte is not None else flt.gt
        high = flt.lte if flt.lte is not None else flt.lt
        if low is not None and high is not None and low > high:
            raise InvalidArgument(
                f"filter range on {flt.key!r} is empty: lower bound {low} > upper bound {high}"
            )
    return 1


def _check_value(key: str, value: MetadataScalar) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"filter on {key!r} compares with {value}; give a finite number")
    if isinstance(value, str) and len(value.encode("utf-8", errors="surrogatepass")) > 4096:
        raise InvalidArgument(f"filter on {key!r} compares with a value over 4096 bytes")
