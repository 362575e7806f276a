"""Metadata and filters in Milvus's terms (index/milvus_index.py): each
chunk's metadata as the collection's `meta` JSON, keys prefixed by their
value's kind (`s:`, `n:`, `b:`), and a validated filter as a boolean
expression over it with the payload index's semantics: a string never equals
a number, booleans are their own kind, int 3 equals float 3.0 (numbers are
stored as floats), ranges see numbers only, and a chunk whose document lacks
the key never matches. The counterpart of store/filter_sql.py."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

from rag_grpc.filters import And, AnyOf, Equals, Filter, Or, Range
from rag_grpc.index.payload import PayloadRow

_FLOAT_MAX = 1.7976931348623157e308


def metadata_by_label(rows: Iterable[PayloadRow]) -> dict[int, dict[str, Any]]:
    """Each chunk's metadata as the collection's `meta` JSON: keys prefixed
    with their value's kind, numbers as floats."""
    meta: dict[int, dict[str, Any]] = {}
    for label, key, value in rows:
        meta.setdefault(int(label), {})[_field(key, value)] = _stored(value)
    return meta


def _field(key: str, value: object) -> str:
    if isinstance(value, bool):
        return f"b:{key}"
    if isinstance(value, int | float):
        return f"n:{key}"
    return f"s:{key}"


def _stored(value: object) -> object:
    if isinstance(value, bool | str):
        return value
    return float(value)  # type: ignore[arg-type]


def filter_expression(flt: Filter) -> str:
    """A validated filter as a Milvus boolean expression over `meta`."""
    if isinstance(flt, And | Or):
        joiner = " and " if isinstance(flt, And) else " or "
        return joiner.join(f"({filter_expression(inner)})" for inner in flt.filters)
    if isinstance(flt, Equals):
        return _equals(flt.key, [flt.value])
    if isinstance(flt, AnyOf):
        return _equals(flt.key, list(flt.values))
    return _range(flt)


def _equals(key: str, values: Sequence[object]) -> str:
    """The field equals one of the values, each compared within its kind."""
    parts = []
    kinds: dict[str, list[str]] = {}
    for value in values:
        if isinstance(value, bool):
            kinds.setdefault("b", []).append("true" if value else "false")
        elif isinstance(value, int | float):
            kinds.setdefault("n", []).append(_number(float(value)))
        else:
            kinds.setdefault("s", []).append(literal(str(value)))
    for kind, literals in kinds.items():
        field = f"meta[{literal(f'{kind}:{key}')}]"
        unique = list(dict.fromkeys(literals))
        if len(unique) == 1:
            parts.append(f"{field} == {unique[0]}")
        else:
            parts.append(f"{field} in [{', '.join(unique)}]")
    return " or ".join(f"({p})" for p in parts) if len(parts) > 1 else parts[0]


def _range(flt: Range) -> str:
    field = f"meta[{literal(f'n:{flt.key}')}]"
    bounds = [(">=", flt.gte), (">", flt.gt), ("<=", flt.lte), ("<", flt.lt)]
    return " and ".join(f"{field} {op} {_number(v)}" for op, v in bounds if v is not None)


def _number(value: float) -> str:
    # Milvus's parser has no infinity: the largest finite float stands in
    # (stored values are finite, so the comparison's answer is the same).
    if math.isinf(value):
        value = math.copysign(_FLOAT_MAX, value)
    return repr(float(value))


def literal(text: str) -> str:
    """A string literal of Milvus's expression language (Go's quoted string:
    JSON's escapes, non-ASCII left as it is since Go rejects \\u surrogates)."""
    return json.dumps(text, ensure_ascii=False)
