"""x-forwarded-client-cert: parsing per Envoy's documented format, refusing
malformed and forged headers whole, and believing a header only from a trusted,
authenticated hop."""

from __future__ import annotations

import re

import pytest

from rag_grpc.security.identity import Identity
from rag_grpc.security.xfcc import (
    TrustedProxies,
    XfccElement,
    XfccError,
    forwarded_identity,
    parse_xfcc,
    subject_common_name,
)

HASH1 = "468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688"
HASH2 = "9ba61d6425303443c0748a02dd8de688468ed33be74eee6556d90c0149c1309e"
DOC_SUBJECT = "/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client"

PARSED = [
    # Envoy's documentation: one certificate with a URI SAN.
    (
        f'By=http://frontend.lyft.com;Hash={HASH1};Subject="{DOC_SUBJECT}";'
        "URI=http://testclient.lyft.com",
        [
            XfccElement(
                by="http://frontend.lyft.com",
                hash=HASH1,
                subject=DOC_SUBJECT,
                uris=("http://testclient.lyft.com",),
            )
        ],
    ),
    # Envoy's documentation: two proxies, each appended its element.
    (
        f"By=http://frontend.lyft.com;Hash={HASH1};URI=http://testclient.lyft.com,"
        f"By=http://backend.lyft.com;Hash={HASH2};URI=http://frontend.lyft.com",
        [
            XfccElement(
                by="http://frontend.lyft.com", hash=HASH1, uris=("http://testclient.lyft.com",)
            ),
            XfccElement(
                by="http://backend.lyft.com", hash=HASH2, uris=("http://frontend.lyft.com",)
            ),
        ],
    ),
    # Envoy's documentation: URI and DNS SANs, DNS repeated.
    (
        f'By=http://frontend.lyft.com;Hash={HASH1};Subject="{DOC_SUBJECT}";'
        "URI=http://testclient.lyft.com;DNS=lyft.com;DNS=www.lyft.com",
        [
            XfccElement(
                by="http://frontend.lyft.com",
                hash=HASH1,
                subject=DOC_SUBJECT,
                uris=("http://testclient.lyft.com",),
                dns=("lyft.com", "www.lyft.com"),
            )
        ],
    ),
    # Cert and Chain are URL-encoded PEM, kept as sent.
    (
        'Cert="-----BEGIN%20CERTIFICATE-----%0AMIIB%3D%0A";Chain=abc%2C',
        [XfccElement(cert="-----BEGIN%20CERTIFICATE-----%0AMIIB%3D%0A", chain="abc%2C")],
    ),
    # Inside quotes ',' ';' '=' are literal.
    ('Subject="CN=a, b;c=d,O=x"', [XfccElement(subject="CN=a, b;c=d,O=x")]),
    # \" is an escaped quote; any other backslash is kept for the DN parser.
    (r'Subject="CN=say \"hi\""', [XfccElement(subject='CN=say "hi"')]),
    (r'Subject="CN=a\,b"', [XfccElement(subject=r"CN=a\,b")]),
    ('Subject=""', [XfccElement(subject="")]),
    # Keys are case-insensitive; unknown keys are ignored.
    ("by=p;uRi=u;Dns=d;Foo=bar", [XfccElement(by="p", uris=("u",), dns=("d",))]),
    # '=' in an unquoted value (Envoy does not quote URIs).
    ("URI=spiffe://a/b=c", [XfccElement(uris=("spiffe://a/b=c",))]),
    # URIs repeat, in order; an empty value is a value.
    ("URI=a;URI=;URI=b", [XfccElement(uris=("a", "", "b"))]),
    # Whitespace after an element's ',' (two header lines joined).
    ("URI=a, URI=b", [XfccElement(uris=("a",)), XfccElement(uris=("b",))]),
]


@pytest.mark.parametrize(("header", "elements"), PARSED)
def test_parse(header: str, elements: list[XfccElement]) -> None:
    assert parse_xfcc(header) == tuple(elements)


MALFORMED = [
    ("", "empty"),
    ("   ", "empty"),
    ('By=x;URI="spiffe://evil', "unterminated quoted value"),
    ("By;URI=x", "key 'By' has no '='"),
    ("By=x;URI", "key 'URI' has no '='"),
    ('Subject="a"b', "text after a closing quote"),
    ('URI=a"b"', "a quote inside an unquoted value"),
    ("URI=a,,URI=b", "an empty element or key"),
    (";URI=a", "an empty element or key"),
    ("URI=a,", "nothing follows the last ','"),
    ("URI=a;", "nothing follows the last ';'"),
    ("By=a;URI=u;By=b", "By appears twice in one element"),
    ("subject=a;Subject=b", "Subject appears twice"),
    ("B y=x", "'B y' is not a key"),
]


@pytest.mark.parametrize(("header", "reason"), MALFORMED)
def test_a_malformed_header_is_refused_whole(header: str, reason: str) -> None:
    with pytest.raises(XfccError, match="x-forwarded-client-cert is") as info:
        parse_xfcc(header)
    assert reason in str(info.value)


ENVOY = "spiffe://example.org/envoy"
TRUSTED = TrustedProxies(["10.0.0.0/8", "127.0.0.1", "::1"])
PROXY = "ipv4:10.1.2.3:40000"


def believed(header: str, proxy_identity: str | None = None) -> Identity | None:
    """What a trusted proxy over mutual TLS gets believed for header."""
    return forwarded_identity(header, PROXY, TRUSTED, True, proxy_identity)


def appended(client_header: str, ours: str = f"By={ENVOY};URI=spiffe://example.org/real") -> str:
    """The header as our Envoy forwards it in APPEND_FORWARD mode: the client's
    own (forged) header, then the element Envoy adds for the real certificate."""
    return f"{client_header},{ours}"


def test_the_last_element_is_the_identity() -> None:
    header = appended("By=spiffe://elsewhere;URI=spiffe://example.org/admin")
    assert believed(header) == Identity("spiffe://example.org/real", "xfcc")
    # Even when our element has no URI, the earlier element's URI is not used.
    header = appended("URI=spiffe://example.org/admin", f'By={ENVOY};Subject="CN=real,O=acme"')
    assert believed(header) == Identity("real", "xfcc")


FORGED = [
    # A quoted URI that hides ',URI=' text: one element, one odd URI.
    (r'By=x;URI="a\",URI=spiffe://admin"', 'a",URI=spiffe://admin'),
    # A quote closed inside the forgery: the real element still stands apart.
    (
        appended('URI="spiffe://evil,By=spiffe://example.org/envoy;URI=spiffe://admin"'),
        "spiffe://example.org/real",
    ),
    # An opened quote that would swallow the real element: refused whole.
    (appended('URI="spiffe://evil'), XfccError),
    (appended(r'URI="spiffe://evil\"'), XfccError),
    # A quote left open so that the real element's own quoted Subject closes it.
    (
        appended('URI=spiffe://admin;X="', f'By={ENVOY};Subject="CN=real";URI=spiffe://real'),
        XfccError,
    ),
    (appended('URI=spiffe://admin;X="', f'By={ENVOY};Subject="";URI=spiffe://real'), XfccError),
    # A forged last element without a separator: refused, not merged.
    (appended('URI="spiffe://admin"x'), XfccError),
]


@pytest.mark.parametrize(("header", "expected"), FORGED)
def test_a_forged_header_never_yields_the_injected_identity(
    header: str, expected: str | type[XfccError]
) -> None:
    if isinstance(expected, str):
        identity = believed(header)
        assert identity == Identity(expected, "xfcc")
        assert identity.principal not in ("spiffe://admin", "spiffe://evil")
    else:
        with pytest.raises(expected):
            believed(header)


def test_only_a_trusted_authenticated_hop_is_believed() -> None:
    header = "By=p;URI=spiffe://example.org/app"
    app = Identity("spiffe://example.org/app", "xfcc")
    assert forwarded_identity(header, PROXY, TRUSTED, True) == app
    # An address outside the trusted networks: ignored, even when malformed.
    for peer in ("ipv4:192.168.1.5:40000", "ipv6:[2001:db8::1]:1", "unix:/run/envoy.sock"):
        assert forwarded_identity(header, peer, TRUSTED, True) is None
        assert forwarded_identity('URI="open', peer, TRUSTED, True) is None
    # A trusted address without mutual TLS: anyone there could pose as the proxy.
    assert forwarded_identity(header, PROXY, TRUSTED, False) is None
    # A unix socket counts only when configured, and needs no TLS then.
    sidecar = TrustedProxies([], trust_unix_socket=True)
    assert forwarded_identity(header, "unix:/run/envoy.sock", sidecar, False) == app
    assert forwarded_identity(header, "unix:", sidecar, False) == app
    assert forwarded_identity(header, PROXY, sidecar, True) is None
    # No header, no identity.
    assert forwarded_identity(None, PROXY, TRUSTED, True) is None
    assert forwarded_identity("", PROXY, TRUSTED, True) is None


def test_the_proxy_identity_must_match_by() -> None:
    header = f"By={ENVOY};URI=spiffe://example.org/app"
    assert believed(header, proxy_identity=ENVOY) == Identity("spiffe://example.org/app", "xfcc")
    assert believed(header, proxy_identity="spiffe://example.org/other-envoy") is None
    assert believed("URI=spiffe://example.org/app", proxy_identity=ENVOY) is None


def test_principal_is_the_first_uri_else_the_subject_cn() -> None:
    assert believed('URI=spiffe://a;URI=spiffe://b;Subject="CN=c"') == Identity(
        "spiffe://a", "xfcc"
    )
    # Old Envoy versions wrote an empty URI= for a certificate without one.
    assert believed('URI=;Subject="CN=batch,O=acme"') == Identity("batch", "xfcc")
    assert believed(r'Subject="CN=a\,b,O=acme"') == Identity("a,b", "xfcc")
    assert believed("By=p;Hash=h;DNS=only.dns") is None
    assert believed('Subject="O=acme"') is None
    # The documentation's old OpenSSL form is not guessed at.
    assert believed(f'Subject="{DOC_SUBJECT}"') is None


@pytest.mark.parametrize(
    ("subject", "common_name"),
    [
        ("CN=Test Client,OU=Lyft,L=San Francisco,ST=CA,C=US", "Test Client"),
        ("emailAddress=a@b.example,CN=x,O=y", "x"),
        (r"CN=a\,b,O=x", "a,b"),
        (r"CN=a\+b\;c\=d\\e", "a+b;c=d\\e"),
        ('CN="a, b",O=x', "a, b"),
        (r'CN="say \"hi\"",O=x', 'say "hi"'),
        (r"CN=caf\C3\A9", "café"),
        ("cn=lower", "lower"),
        ("2.5.4.3=by-oid", "by-oid"),
        ("CN=a+UID=b,O=c", "a"),
        ("O=x", None),
        ("CN=x,CN=y", None),
        ("CN=", None),
        ("CN=#0403616263", None),
        (DOC_SUBJECT, None),
        ("CN=a,", None),
        ('CN="open', None),
        ('CN="a"b', None),
        ("", None),
        (r"CN=\FF", None),
    ],
)
def test_subject_common_name(subject: str, common_name: str | None) -> None:
    assert subject_common_name(subject) == common_name


def test_trusted_proxies_match_grpc_peer_strings() -> None:
    trusted = TrustedProxies(["10.0.0.0/8", "127.0.0.1", "::1", "fe80::/10"])
    for peer in (
        "ipv4:10.1.2.3:5678",
        "ipv4:127.0.0.1:1",
        "ipv6:[::1]:5678",
        "ipv6:%5B::1%5D:5678",  # as grpc 1.85 writes it
        "ipv6:[::ffff:10.0.0.1]:1",  # an IPv4 client of a dual-stack listener
        "ipv6:[fe80::1%25eth0]:1",
    ):
        assert trusted.contains(peer), peer
    for peer in (
        "ipv4:127.0.0.2:1",
        "ipv4:11.0.0.1:1",
        "ipv6:[::2]:1",
        "unix:/run/envoy.sock",
        "10.1.2.3:5678",
        "ipv4:not-an-ip:1",
        "ipv6:[::1:1",
        "",
    ):
        assert not trusted.contains(peer), peer
    assert TrustedProxies(trust_unix_socket=True).contains("unix-abstract:envoy")


@pytest.mark.parametrize("entry", ["10.0.0.1/8", "not-an-ip", "10.0.0.0/33", "", "::1/129"])
def test_an_invalid_trusted_proxy_is_named(entry: str) -> None:
    with pytest.raises(
        ValueError, match=re.escape(f"trusted proxy {entry!r} is not an IP address")
    ):
        TrustedProxies(["127.0.0.1", entry])
