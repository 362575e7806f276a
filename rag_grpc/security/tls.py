"""TLS for the gRPC transport: server and channel credentials built from PEM
files checked at start, and the caller's identity from its client certificate.

The files are checked with ``cryptography`` before grpc sees them because grpc
only fails at the first handshake, with an OpenSSL error that does not name the
file; a person fixing a deployment needs to know which file and what to change.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Iterable, Mapping
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rag_grpc.security.identity import Identity


class TlsConfigError(ValueError):
    """A certificate, key or CA file cannot be used; the message names the file
    and what is wrong with it."""


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """Credentials for a TLS server from its certificate chain and key; with
    ``client_ca``, every client must present a certificate that CA signed
    (mutual TLS). Raises TlsConfigError when a file is missing, unreadable, not
    PEM, expired, the key does not match, or the CA is not a CA."""
    cert_pem, key_pem = _checked_pair(cert, key, "server", ExtendedKeyUsageOID.SERVER_AUTH)
    if client_ca is None:
        return grpc.ssl_server_credentials([(key_pem, cert_pem)])
    ca_pem = _read(client_ca, "client CA")
    for index, ca in enumerate(_certificates(client_ca, ca_pem, "client CA"), start=1):
        _check_dates(client_ca, "client CA", ca, index)
        _check_is_ca(client_ca, ca, index)
    # require_client_auth=True makes grpc request AND verify the client's
    # certificate; peer_identity relies on that (with False grpc does not ask).
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True
    )


def certificate_expiry(cert: Path) -> float:
    """When the first (leaf) certificate of a PEM chain expires, as Unix time:
    what the server exports for the certificate-expiry alert."""
    leaf = _certificates(cert, _read(cert, "server certificate"), "server certificate")[0]
    return leaf.not_valid_after_utc.timestamp()


def channel_credentials(
    ca: Path | None, cert: Path | None, key: Path | None
) -> grpc.ChannelCredentials:
    """Credentials for a client channel: ``ca`` verifies the server (None: the
    system's roots); ``cert`` and ``key``, given together, are the client's
    certificate for mutual TLS. Raises TlsConfigError like server_credentials."""
    if (cert is None) != (key is None):
        raise TlsConfigError(
            "a client certificate and its key go together: got "
            + (
                f"certificate {cert} without a key"
                if key is None
                else f"key {key} without a certificate"
            )
        )
    ca_pem = None
    if ca is not None:
        ca_pem = _read(ca, "CA")
        # Not required to be a CA: a client may pin a self-signed server certificate.
        for index, root in enumerate(_certificates(ca, ca_pem, "CA"), start=1):
            _check_dates(ca, "CA", root, index)
    cert_pem = key_pem = None
    if cert is not None and key is not None:
        cert_pem, key_pem = _checked_pair(cert, key, "client", ExtendedKeyUsageOID.CLIENT_AUTH)
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )


def peer_identity(auth_context: Mapping[str, Iterable[bytes]]) -> Identity | None:
    """The identity in the verified client certificate of a TLS call, from
    ``context.auth_context()``: the certificate's first URI SAN (a SPIFFE ID),
    else its subject's single CN. None without a client certificate or when it
    names nobody or cannot be parsed.

    grpc's own ``x509_subject_alternative_name`` list mixes DNS, URI and IP
    entries without their types, so the PEM certificate is parsed instead."""
    pem = next(iter(auth_context.get("x509_pem_cert", ())), None)
    if pem is None:
        return None
    principal = _pem_principal(bytes(pem))
    if principal is None:
        return None
    return Identity(principal=principal, source="mtls")


def has_client_certificate(auth_context: Mapping[str, Iterable[bytes]]) -> bool:
    """Whether the call's hop was mutual TLS (the peer presented a certificate
    our CA verified), even if that certificate names no usable principal."""
    return next(iter(auth_context.get("x509_pem_cert", ())), None) is not None


# Parsing a certificate costs ~14 us, every call; a connection's calls all carry
# the same PEM, and the answer depends on its bytes alone.
@functools.lru_cache(maxsize=1024)
def _pem_principal(pem: bytes) -> str | None:
    try:
        return _certificate_principal(x509.load_pem_x509_certificate(pem))
    except ValueError:
        # grpc verified it, yet we cannot read it: no identity rather than a
        # guess (a CN when an unparseable SAN should have won).
        return None


def _certificate_principal(certificate: x509.Certificate) -> str | None:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        uris: list[str] = []
    else:
        uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    if uris:
        return uris[0]
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    # Two CNs would make the identity depend on which one we pick.
    if len(names) != 1:
        return None
    value = names[0].value
    common_name = value if isinstance(value, str) else value.decode("utf-8", "replace")
    return common_name or None


def _checked_pair(
    cert: Path, key: Path, role: str, usage: x509.ObjectIdentifier
) -> tuple[bytes, bytes]:
    """Read and check a certificate chain and its key; returns both PEMs."""
    what = f"{role} certificate"
    cert_pem = _read(cert, what)
    key_pem = _read(key, f"{role} key")
    chain = _certificates(cert, cert_pem, what)
    for index, certificate in enumerate(chain, start=1):
        _check_dates(cert, what, certificate, index)
    private_key = _private_key(key, key_pem, role)
    if _public_der(private_key.public_key()) != _public_der(chain[0].public_key()):
        raise TlsConfigError(
            f"{role} key {key} does not match certificate {cert} "
            f"({_subject(chain[0])}); use the key the certificate was issued for"
        )
    _check_usage(cert, what, chain[0], usage)
    return cert_pem, key_pem


def _read(path: Path, what: str) -> bytes:
    if not path.exists():
        raise TlsConfigError(f"{what} file {path} does not exist")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"cannot read {what} file {path}: {exc.strerror or exc}") from exc


def _certificates(path: Path, pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        hint = (
            " (it holds a private key; certificate and key paths may be swapped)"
            if b"PRIVATE KEY-----" in pem
            else " (a DER file converts with: openssl x509 -inform der -in FILE -out FILE.pem)"
            if not pem.lstrip().startswith(b"-----")
            else ""
        )
        raise TlsConfigError(
            f"{what} file {path} is not a PEM certificate: expected "
            f"'-----BEGIN CERTIFICATE-----'{hint}"
        ) from exc
    return certificates


def _private_key(path: Path, pem: bytes, role: str) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError as exc:  # cryptography's way of saying "it is encrypted"
        raise TlsConfigError(
            f"{role} key {path} is encrypted; gRPC needs it unencrypted "
            f"(openssl pkey -in {path} -out KEY.pem)"
        ) from exc
    except ValueError as exc:
        raise TlsConfigError(
            f"{role} key {path} is not a PEM private key: expected "
            f"'-----BEGIN PRIVATE KEY-----' or a similar PEM key block ({exc})"
        ) from exc
    except UnsupportedAlgorithm as exc:
        raise TlsConfigError(f"{role} key {path} cannot be loaded: {exc}") from exc


def _check_dates(path: Path, what: str, certificate: x509.Certificate, index: int) -> None:
    now = datetime.datetime.now(datetime.UTC)
    which = "" if index == 1 else f" (certificate {index} in the file)"
    if certificate.not_valid_after_utc < now:
        raise TlsConfigError(
            f"{what} {path}{which} ({_subject(certificate)}) expired on "
            f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC; issue a new one"
        )
    if certificate.not_valid_before_utc > now:
        raise TlsConfigError(
            f"{what} {path}{which} ({_subject(certificate)}) is not valid before "
            f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC; "
            "check this machine's clock or the certificate's dates"
        )


def _check_is_ca(path: Path, certificate: x509.Certificate, index: int) -> None:
    """A client CA must be allowed to sign certificates; a leaf given here by
    mistake would make every client handshake fail."""
    which = "" if index == 1 else f" (certificate {index} in the file)"
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        is_ca = constraints.value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        is_ca = is_ca and usage.key_cert_sign
    except x509.ExtensionNotFound:
        pass
    if not is_ca:
        raise TlsConfigError(
            f"client CA {path}{which} ({_subject(certificate)}) is not a CA certificate "
            "(it lacks basicConstraints CA:TRUE or keyCertSign); give the CA that "
            "signed the client certificates, not a client certificate"
        )


def _check_usage(
    path: Path, what: str, certificate: x509.Certificate, usage: x509.ObjectIdentifier
) -> None:
    """When a certificate limits its extended key usage, it must allow ours:
    a client certificate used as the server's would fail every handshake."""
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    if usage not in usages and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in usages:
        wanted = "serverAuth" if usage == ExtendedKeyUsageOID.SERVER_AUTH else "clientAuth"
        raise TlsConfigError(
            f"{what} {path} ({_subject(certificate)}) is not for {wanted} "
            "(its extendedKeyUsage leaves it out); issue one that allows it"
        )


def _public_der(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _subject(certificate: x509.Certificate) -> str:
    return certificate.subject.rfc4514_string() or "empty subject"
