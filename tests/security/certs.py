"""Test certificates made with ``cryptography``: a CA, and server or client
certificates it signs, with URI / DNS / IP subject alternative names.

    ca = make_ca()
    server = issue(ca, "localhost", dns=["localhost"], ips=["127.0.0.1"], usage="server")
    client = issue(ca, "app", uris=["spiffe://example.org/acme/app"], usage="client")
    cert_path, key_path = client.write(tmp_path, "client")   # client.pem, client.key
    ca.write(tmp_path, "ca")

EC P-256 keys: generating one takes microseconds, so every test can have fresh ones.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Usage = Literal["server", "client", "any"]


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """Write ``<stem>.pem`` and ``<stem>.key`` into directory; return both paths."""
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert_path.write_bytes(self.cert_pem)
        key_path.write_bytes(self.key_pem)
        return cert_path, key_path


def make_ca(common_name: str = "rag-grpc test CA", *, expired: bool = False) -> Issued:
    """A self-signed CA (basicConstraints CA:TRUE, keyCertSign)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = _dated(x509.CertificateBuilder(), expired).subject_name(name).issuer_name(name)
    builder = (
        builder.public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return Issued(builder.sign(key, hashes.SHA256()), key)


def issue(
    ca: Issued,
    common_name: str | None = None,
    *,
    uris: Sequence[str] = (),
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    usage: Usage = "any",
    expired: bool = False,
) -> Issued:
    """A leaf certificate signed by ca: subject CN=common_name (empty subject
    when None), SANs in the order DNS names, URIs, IPs (DNS first, as
    many real certificates have it, so code that takes grpc's untyped first SAN
    is caught), and an
    extendedKeyUsage of serverAuth, clientAuth or both ("any")."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name is not None else []
    )
    builder = (
        _dated(x509.CertificateBuilder(), expired)
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                {
                    "server": [ExtendedKeyUsageOID.SERVER_AUTH],
                    "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
                    "any": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                }[usage]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if names:
        # RFC 5280: the SAN is critical when the subject is empty.
        builder = builder.add_extension(
            x509.SubjectAlternativeName(names), critical=common_name is None
        )
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _dated(builder: x509.CertificateBuilder, expired: bool) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    if expired:
        return builder.not_valid_before(now - datetime.timedelta(days=30)).not_valid_after(
            now - datetime.timedelta(days=1)
        )
    # An hour back so a slightly slow clock elsewhere does not see a future certificate.
    return builder.not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(
        now + datetime.timedelta(days=2)
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
