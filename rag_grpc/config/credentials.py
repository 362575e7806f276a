"""Credentials in configuration values: user:password@ in URLs (redacted for
logs and printed configs, split off for clients that take them apart, refused
in gRPC targets) and secrets read from owner-only files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any


def redact_url(url: str) -> str:
    """A URL (or comma-separated URLs) with any user:password@ replaced by
    ***@, so credentials never reach a log line, a printed config or a
    client's error message."""
    return ",".join(_CREDENTIALS_RE.sub(r"\1***@", part) for part in url.split(","))


def split_url_credentials(url: str) -> tuple[str, str | None]:
    """The URL without its user:password@, and that user:password (None
    when it has none), for clients that take credentials separately."""
    match = _CREDENTIALS_RE.match(url)
    if match is None:
        return url, None
    scheme = match.group(1) or ""
    return scheme + url[match.end() :], url[len(scheme) : match.end() - 1]


# The user info runs to the last @ before the path: a password may itself
# contain an unescaped @ (greedy match), never a / (that starts the path).
_CREDENTIALS_RE = re.compile(r"^(\s*[A-Za-z][A-Za-z0-9+.-]*://)?[^/\s]+@")


def read_secret_file(path: Path, what: str) -> str:
    """A token from a file readable by its owner only (trailing newline
    dropped); ValueError with what to do when it is missing, open to others
    or empty."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {path} cannot be read: {exc}") from None
    if mode & 0o077:
        raise ValueError(
            f"{what} {path} is readable or writable by other users (mode "
            f"{mode & 0o777:04o}); restrict it with `chmod 600 {path}`"
        )
    token = text.strip()
    if not token:
        raise ValueError(f"{what} {path} is empty")
    return token


def secret_from_file(data: Any, field: str, section: str) -> Any:
    """A section's raw values with `field` read from the file named by
    `<field>_file` (read_secret_file), for a model validator (mode="before");
    ValueError when both are given."""
    file_field = f"{field}_file"
    if isinstance(data, dict) and data.get(file_field):
        if data.get(field):
            raise ValueError(f"set {section}.{field} or {section}.{file_field}, not both")
        path = Path(data[file_field])
        data = {**data, field: read_secret_file(path, f"{section}.{file_field}")}
    return data


def grpc_target(value: str, what: str, instead: str) -> str:
    """Refuse user:password@ in a gRPC target: gRPC has no credentials in
    its targets (it fails to resolve such a name) and would echo the whole
    target, password included, in its errors to our callers and logs."""
    if split_url_credentials(value)[1] is not None:
        raise ValueError(
            f"{what} {redact_url(value)!r} must not contain user:password@ (gRPC targets "
            f"carry no credentials); use HOST:PORT and {instead} instead"
        )
    return value
