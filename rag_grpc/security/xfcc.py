"""The caller's identity as forwarded by our Envoy in ``x-forwarded-client-cert``.

Envoy terminates the client's mutual TLS and describes the client certificate in
the XFCC header (https://www.envoyproxy.io/docs/envoy/latest/configuration/http/
http_conn_man/headers#x-forwarded-client-cert). The header is only as trustworthy
as the hop that delivered it: anyone can send one, so it is believed only from a
configured proxy address over an authenticated hop, and only its last element,
the one that proxy appended.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote

from rag_grpc.errors import Unauthenticated
from rag_grpc.security.identity import Identity

# Envoy's key names are case-insensitive; these are their documented spellings.
_SINGLE_KEYS = {"by": "By", "hash": "Hash", "cert": "Cert", "chain": "Chain", "subject": "Subject"}
_REPEATED_KEYS = {"uri": "URI", "dns": "DNS"}
_KEY = re.compile(r"[A-Za-z0-9_-]+")
# Optional whitespace after an element's ',' (RFC 9110 list syntax, if a hop
# joined two header lines); nowhere else, where a space is part of a value.
_OWS = " \t"

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class XfccError(Unauthenticated):
    """A trusted hop sent a malformed x-forwarded-client-cert header; the whole
    header is refused rather than half-parsed, so the call is unauthenticated."""


@dataclass(frozen=True)
class XfccElement:
    """One proxy's description of the client certificate it saw. ``cert`` and
    ``chain`` stay URL-encoded PEM, as Envoy sends them."""

    by: str | None = None
    hash: str | None = None
    cert: str | None = None
    chain: str | None = None
    subject: str | None = None
    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()


def parse_xfcc(header: str) -> tuple[XfccElement, ...]:
    """Parse an XFCC header into its elements, in order; raise XfccError on any
    malformation (unterminated quote, key without '=', stray quote, repeated
    single-valued key, empty element). Unknown keys are ignored."""
    text = header.strip()
    if not text:
        raise XfccError("x-forwarded-client-cert is empty")
    elements: list[XfccElement] = []
    pairs: list[tuple[str, str]] = []
    i = 0
    while True:
        key, value, i = _pair(text, i)
        pairs.append((key, value))
        if i == len(text):
            elements.append(_element(pairs, i))
            return tuple(elements)
        separator = text[i]
        i += 1
        if separator == ",":
            elements.append(_element(pairs, i))
            pairs = []
            while i < len(text) and text[i] in _OWS:
                i += 1
        if i == len(text):
            raise _malformed(i, f"nothing follows the last '{separator}'")


def _pair(text: str, i: int) -> tuple[str, str, int]:
    """One key=value from position i; returns it and the position of the
    separator after it (or the end)."""
    equals = i
    while equals < len(text) and text[equals] not in "=,;":
        equals += 1
    key = text[i:equals]
    if not key:
        raise _malformed(i, "an empty element or key")
    if equals == len(text) or text[equals] != "=":
        raise _malformed(i, f"key {key!r} has no '='")
    if not _KEY.fullmatch(key):
        raise _malformed(i, f"{key!r} is not a key")
    i = equals + 1
    if i < len(text) and text[i] == '"':
        return key, *_quoted(text, i)
    end = i
    # '=' may appear bare (Envoy does not quote URIs); ',' and ';' end the value.
    while end < len(text) and text[end] not in ",;":
        if text[end] == '"':
            raise _malformed(end, "a quote inside an unquoted value")
        end += 1
    return key, text[i:end], end


def _quoted(text: str, i: int) -> tuple[str, int]:
    """The quoted value starting at text[i] == '"': inside it ',' ';' '=' are
    literal and only \\" is an escape (Envoy's documented rule, so a backslash
    before anything else is kept). After the closing quote only a separator or
    the end may follow: that is what stops a forged quote from swallowing the
    element a proxy appended after it."""
    start = i
    out: list[str] = []
    i += 1
    while i < len(text):
        char = text[i]
        if char == "\\" and text.startswith('"', i + 1):
            out.append('"')
            i += 2
        elif char == '"':
            i += 1
            if i < len(text) and text[i] not in ",;":
                raise _malformed(i, "text after a closing quote")
            return "".join(out), i
        else:
            out.append(char)
            i += 1
    raise _malformed(start, "unterminated quoted value")


def _element(pairs: list[tuple[str, str]], position: int) -> XfccElement:
    """Build one element; a single-valued key given twice is ambiguous (which
    one did the proxy write?) and refused."""
    single: dict[str, str] = {}
    repeated: dict[str, list[str]] = {"URI": [], "DNS": []}
    for key, value in pairs:
        lowered = key.lower()
        if lowered in _SINGLE_KEYS:
            name = _SINGLE_KEYS[lowered]
            if name in single:
                raise _malformed(position, f"{name} appears twice in one element")
            single[name] = value
        elif lowered in _REPEATED_KEYS:
            repeated[_REPEATED_KEYS[lowered]].append(value)
    return XfccElement(
        by=single.get("By"),
        hash=single.get("Hash"),
        cert=single.get("Cert"),
        chain=single.get("Chain"),
        subject=single.get("Subject"),
        uris=tuple(repeated["URI"]),
        dns=tuple(repeated["DNS"]),
    )


def _malformed(position: int, reason: str) -> XfccError:
    return XfccError(f"x-forwarded-client-cert is malformed at character {position}: {reason}")


class TrustedProxies:
    """The addresses whose x-forwarded-client-cert is believed: networks or
    single addresses ("10.0.0.0/8", "127.0.0.1", "::1"), and optionally any
    unix socket peer (a sidecar Envoy on the same host)."""

    def __init__(self, entries: Iterable[str] = (), *, trust_unix_socket: bool = False) -> None:
        """Parse every entry now so a typo fails at start, naming the entry."""
        networks: list[_Network] = []
        for entry in entries:
            try:
                # strict: "10.0.0.1/8" is more likely a typo than a wish for 10/8.
                networks.append(ipaddress.ip_network(entry.strip(), strict=True))
            except ValueError as exc:
                raise ValueError(
                    f"trusted proxy {entry!r} is not an IP address or network "
                    f"(like 10.0.0.0/8, 127.0.0.1 or ::1): {exc}"
                ) from exc
        self.networks: tuple[_Network, ...] = tuple(networks)
        self.trust_unix_socket = trust_unix_socket

    def __repr__(self) -> str:
        nets = ", ".join(str(n) for n in self.networks)
        return f"TrustedProxies([{nets}], trust_unix_socket={self.trust_unix_socket})"

    def contains(self, peer: str) -> bool:
        """Whether grpc's ``context.peer()`` ("ipv4:1.2.3.4:5678",
        "ipv6:[::1]:5678", "unix:/path") is one of the trusted proxies;
        anything unparseable is not."""
        if is_unix_peer(peer):
            return self.trust_unix_socket
        address = _peer_address(peer)
        if address is None:
            return False
        return any(address in network for network in self.networks)


def is_unix_peer(peer: str) -> bool:
    """Whether grpc's peer string names a unix domain socket."""
    return peer.startswith(("unix:", "unix-abstract:"))


def _peer_address(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    scheme, _, rest = peer.partition(":")
    if scheme not in ("ipv4", "ipv6"):
        return None
    # grpc percent-encodes the brackets in some versions ("ipv6:%5B::1%5D:5678").
    rest = unquote(rest)
    if rest.startswith("["):
        host, bracket, _ = rest[1:].partition("]")
        if not bracket:
            return None
    else:
        host = rest.rpartition(":")[0]
    host = host.partition("%")[0]  # a link-local zone id is not part of the address
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d; compare them
    # as the IPv4 addresses they are, so "10.0.0.0/8" matches them.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def forwarded_identity(
    header: str | None,
    peer: str,
    trusted: TrustedProxies,
    peer_authenticated: bool,
    proxy_identity: str | None = None,
) -> Identity | None:
    """The identity our proxy forwarded, or None when the header is absent or not
    to be believed: the peer is not a trusted proxy, or the hop was neither
    mutual TLS (``peer_authenticated``) nor a trusted unix socket, or the last
    element's By is not ``proxy_identity`` (when given), or it names nobody.
    Principal: the last element's first URI, else the CN of its Subject.
    Raises XfccError when a believed hop sent a malformed header, so a garbled
    assertion is refused instead of falling back to a weaker credential."""
    if not header or not header.strip():
        return None
    if not trusted.contains(peer):
        return None
    # Without mutual TLS anyone who can reach the port from a trusted network
    # could claim to be the proxy; a unix socket is guarded by file permissions.
    if not (peer_authenticated or is_unix_peer(peer)):
        return None
    last = parse_xfcc(header)[-1]  # the one our proxy appended
    if proxy_identity is not None and last.by != proxy_identity:
        return None
    # Old Envoy versions sent an empty "URI=" when the certificate had none.
    principal = next((uri for uri in last.uris if uri), None)
    if principal is None and last.subject is not None:
        principal = subject_common_name(last.subject)
    if not principal:
        return None
    return Identity(principal=principal, source="xfcc")


def subject_common_name(subject: str) -> str | None:
    """The CN of an RFC 4514 / RFC 2253 subject ("CN=a\\,b,O=x" or
    'CN="a, b",O=x'), as Envoy writes it; None when there is no single CN or the
    subject cannot be parsed (including OpenSSL's "/C=US/CN=x" form), since a
    guessed CN would be a guessed identity."""
    attributes = _dn_attributes(subject)
    if attributes is None:
        return None
    names = [value for name, value in attributes if name.upper() in ("CN", "2.5.4.3")]
    if len(names) != 1 or names[0] is None or not names[0]:
        return None
    return names[0]


_ATTRIBUTE_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9-]*|[0-9]+(\.[0-9]+)*")
_HEX = set("0123456789abcdefABCDEF")


def _dn_attributes(dn: str) -> list[tuple[str, str | None]] | None:
    """The (type, value) pairs of a distinguished name, RDN separators ',' '+'
    ';' alike; None when malformed. A value in BER form ("#04..") is None.
    Written here because cryptography's parser refuses attribute names it does
    not know (OpenSSL writes "emailAddress=") and so would lose the CN."""
    attributes: list[tuple[str, str | None]] = []
    i, n = 0, len(dn)
    while i < n:
        equals = dn.find("=", i)
        if equals < 0:
            return None
        attribute_type = dn[i:equals].strip()
        if not _ATTRIBUTE_TYPE.fullmatch(attribute_type):
            return None
        i = equals + 1
        value: str | None
        if i < n and dn[i] == '"':  # RFC 2253's quoted form
            end = i + 1
            chars: list[str] = []
            while end < n and dn[end] != '"':
                if dn[end] == "\\" and end + 1 < n:
                    end += 1
                chars.append(dn[end])
                end += 1
            if end == n:
                return None
            value, i = "".join(chars), end + 1
        else:
            ber = i < n and dn[i] == "#"
            raw = bytearray()
            while i < n and dn[i] not in ",+;":
                if dn[i] == "\\":
                    pair = dn[i + 1 : i + 3]
                    if len(pair) == 2 and set(pair) <= _HEX:
                        raw += bytes.fromhex(pair)
                        i += 3
                        continue
                    if i + 1 == n:
                        return None
                    i += 1
                raw += dn[i].encode()
                i += 1
            try:
                value = None if ber else raw.decode("utf-8")
            except UnicodeDecodeError:
                return None
        attributes.append((attribute_type, value))
        if i < n:
            if dn[i] not in ",+;":
                return None
            i += 1
            if i == n:
                return None
    return attributes
