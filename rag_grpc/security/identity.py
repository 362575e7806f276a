"""Who is calling: the identity every authentication source produces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

IdentitySource = Literal["mtls", "xfcc", "jwt", "api_key", "token", "local"]


@dataclass(frozen=True)
class Identity:
    """Who is calling, as authenticated: principal is a SPIFFE URI, a certificate CN,
    a JWT subject or "apikey:<name>"; tenant is set only when the credential itself
    names one (a JWT claim, an API key's entry); the policy decides otherwise."""

    principal: str
    source: IdentitySource
    tenant: str | None = None
