"""TLS configuration for imkit servers and clients.

One place decides the protocol versions and cipher suites so that every
listener and every client agrees: TLS 1.2 and 1.3 only, forward-secret AEAD
suites only.  Certificates and keys are PEM files; anything wrong with them is
reported at start-up as a one-line L{TLSConfigError} naming the file and the
fix, rather than as an OpenSSL traceback on the first connection.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.logger import Logger

__all__ = [
    "TLSConfigError",
    "TLS12_CIPHERS",
    "server_tls_options",
    "client_tls_options",
    "default_cert_paths",
]

log = Logger()

#: OpenSSL cipher string for TLS 1.2: ECDHE key exchange (forward secrecy)
#: with AES-GCM or ChaCha20-Poly1305 (AEAD) only; ECDSA and RSA certificates
#: both work.  TLS 1.3 suites are configured separately by OpenSSL and are all
#: AEAD with (EC)DHE; OpenSSL's default TLS 1.3 set (AES-GCM, ChaCha20) is used.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!PSK:!SRP:!DSS"

_DEVCERTS_DIR = Path(__file__).resolve().parent / "_devcerts"


class TLSConfigError(ValueError):
    """A certificate, key or CA file cannot be used; the message says how to fix it."""


def _read(path: str | os.PathLike[str], flag: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        reason = e.strerror or str(e)
        raise TLSConfigError(
            f"cannot read {flag} {os.fspath(path)}: {reason}; pass {flag} PATH to {what}"
        ) from None


def _load_certs(
    path: str | os.PathLike[str], flag: str, what: str
) -> list[x509.Certificate]:
    data = _read(path, flag, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise TLSConfigError(
            f"cannot use {flag} {os.fspath(path)}: no PEM certificate in it; "
            f"pass {flag} PATH to {what}"
        )
    return certs


def _load_key(path: str | os.PathLike[str]):
    flag, what = "--tls-key", "a PEM private key"
    data = _read(path, flag, what)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography raises TypeError when a password would be needed.
        raise TLSConfigError(
            f"cannot use --tls-key {os.fspath(path)}: the key is encrypted; "
            f"decrypt it (openssl pkey -in KEY -out PLAIN) and pass --tls-key PATH "
            f"to the unencrypted PEM key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSConfigError(
            f"cannot use --tls-key {os.fspath(path)}: not a PEM private key; "
            f"pass --tls-key PATH to {what}"
        ) from None


def _spki(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _openssl_reason(error: Exception) -> str:
    """Squash pyOpenSSL's list of (lib, func, reason) tuples into a phrase."""
    args = error.args[0] if error.args else None
    if isinstance(args, list) and args:
        return ", ".join(str(entry[-1]) for entry in args if entry)
    return str(error) or type(error).__name__


def _warn_if_not_current(cert: x509.Certificate, path: str) -> None:
    """Clients will refuse an out-of-date certificate; say so at start-up."""
    now = datetime.datetime.now(datetime.timezone.utc)
    if now > cert.not_valid_after_utc:
        log.warn(
            "TLS certificate {path} expired on {date}; clients will refuse it",
            path=path,
            date=cert.not_valid_after_utc.isoformat(),
        )
    elif now < cert.not_valid_before_utc:
        log.warn(
            "TLS certificate {path} is not valid before {date}; clients will refuse it",
            path=path,
            date=cert.not_valid_before_utc.isoformat(),
        )


def _cipher_options() -> AcceptableCiphers:
    return AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS)


def server_tls_options(
    cert_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    *,
    modern: bool = False,
    chain_paths: Iterable[str | os.PathLike[str]] = (),
) -> CertificateOptions:
    """Build the server's TLS configuration from PEM files.

    C{cert_path} holds the server certificate, optionally followed by its
    intermediates (a "fullchain.pem" works as is); C{chain_paths} are further
    PEM files of intermediates to send.  The root CA need not be sent.

    TLS 1.2 and 1.3 are allowed, or only TLS 1.3 when C{modern} is true; TLS
    1.2 uses only L{TLS12_CIPHERS}.  Session caching and tickets stay off
    (Twisted's default), so every connection does a full handshake with fresh
    ephemeral keys.

    @raise TLSConfigError: a file is missing, unreadable, not PEM, encrypted,
        or the key does not belong to the certificate.
    """
    cert_file, key_file = os.fspath(cert_path), os.fspath(key_path)
    certs = _load_certs(
        cert_file,
        "--tls-cert",
        "a PEM certificate (server certificate first, then any intermediates)",
    )
    leaf, chain = certs[0], certs[1:]
    for chain_path in chain_paths:
        chain.extend(
            _load_certs(chain_path, "chain file", "PEM intermediate certificates")
        )
    key = _load_key(key_file)
    if _spki(leaf.public_key()) != _spki(key.public_key()):
        raise TLSConfigError(
            f"--tls-key {key_file} does not belong to the certificate in --tls-cert "
            f"{cert_file}; pass --tls-key PATH to the key that certificate was issued for"
        )
    _warn_if_not_current(leaf, cert_file)

    # pyOpenSSL takes cryptography objects directly (its own X509/PKey
    # wrappers are deprecated); Twisted passes these through unchanged.
    options = CertificateOptions(
        privateKey=key,
        certificate=leaf,
        extraCertChain=chain or None,
        raiseMinimumTo=TLSVersion.TLSv1_3 if modern else TLSVersion.TLSv1_2,
        acceptableCiphers=_cipher_options(),
    )
    try:
        # Build the context now, so OpenSSL's own objections (a key too weak
        # for its security level, say) surface at start-up.
        options.getContext()
    except SSL.Error as e:
        raise TLSConfigError(
            f"OpenSSL refuses --tls-cert {cert_file} with --tls-key {key_file}: "
            f"{_openssl_reason(e)}; pass a certificate and key it accepts "
            f"(EC P-256 or RSA >= 2048 bits)"
        ) from None
    return options


def client_tls_options(
    hostname: str, ca_path: str | os.PathLike[str] | None = None
) -> IOpenSSLClientConnectionCreator:
    """Build a client's TLS configuration for a server called C{hostname}.

    The server's chain is verified against the CA certificates in the PEM file
    C{ca_path} (or the platform's trust store when it is L{None}), and its
    certificate must name C{hostname} (a DNS name or an IP address), checked
    by service-identity.  TLS 1.2 minimum, same AEAD suites as the server.

    @raise TLSConfigError: C{hostname} is empty, or the CA file cannot be used.
    """
    if not hostname:
        raise TLSConfigError(
            "empty TLS host name; pass the server's host name as in its certificate"
        )
    if ca_path is None:
        trust_root = None  # optionsForClientTLS then uses platformTrust().
    else:
        cas = _load_certs(ca_path, "--tls-ca", "a PEM file of CA certificates")
        trust_root = trustRootFromCertificates(
            [
                Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
                for c in cas
            ]
        )
    return optionsForClientTLS(
        hostname,
        trustRoot=trust_root,
        extraCertificateOptions={
            "raiseMinimumTo": TLSVersion.TLSv1_2,
            "acceptableCiphers": _cipher_options(),
        },
    )


def default_cert_paths() -> tuple[str, str, str]:
    """Return absolute C{(ca, cert, key)} paths of the development certificates.

    C{./certs/} of the current directory wins when it has all three files (the
    server is started as C{twistd -n imkit} from the repository root, and a
    regenerated set there should be used); otherwise the copies shipped
    inside the package.  These are for development and tests only.
    """
    names = ("ca.pem", "server.pem", "server.key")
    chosen = [Path.cwd() / "certs" / name for name in names]
    if not all(p.is_file() for p in chosen):
        # Missing packaged files are reported by whoever loads them.
        chosen = [_DEVCERTS_DIR / name for name in names]
    ca, cert, key = (str(p.resolve()) for p in chosen)
    return ca, cert, key
