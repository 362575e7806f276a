"""The [flags.<name>] tables: one feature flag's rollout (rag_grpc/flags.py
names the flags and decides them per request)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rag_grpc.config.base import Section


class FlagConfig(Section):
    """One feature flag, a ``[flags.<name>]`` table (names in rag_grpc/flags.py).

    On for a request when enabled, its key is not in ``deny``, and the key is
    in ``allow`` or falls in the first ``percentage`` of the stable hash
    buckets (sha256 of flag name and key, so each flag splits keys on its own
    and a key keeps its bucket across restarts and replicas)."""

    # Off: off for everyone, allow list included (the kill switch).
    enabled: bool = True
    # Share of keys the flag is on for, 0-100 (fractions allowed: 0.5).
    percentage: float = Field(100.0, ge=0.0, le=100.0)
    # What is hashed and listed: the request's tenant ("" on a single-tenant
    # server) or its namespace as stored ("acme~docs" under a policy).
    key: Literal["tenant", "namespace"] = "namespace"
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _lists_apart(self) -> FlagConfig:
        both = sorted(set(self.allow) & set(self.deny))
        if both:
            raise ValueError(f"{', '.join(both)} both allowed and denied; keep one")
        return self
