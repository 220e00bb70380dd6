"""TLS configuration for imkit servers and clients.

One place decides the protocol versions and cipher suites so that every
listener and every client agrees: TLS 1.2 and 1.3 only, forward-secret AEAD
suites only.  Certificates and keys are PEM files; anything wrong with them is
reported at start-up as a one-line L{TLSConfigError} naming the file and the
fix, rather than as an OpenSSL traceback on the first connection.

Key exchange uses X25519, P-256 or P-384 only (P-256 alone where pyOpenSSL
cannot set the list: L{key_exchange_groups}), as Mozilla's "intermediate" and
"modern" profiles want (tests/test_tls_profiles.py checks both with sslyze),
and client-initiated renegotiation is refused.

Servers may also ask for client certificates (mutual TLS): with a client CA,
a client presenting a certificate that CA signed may log in without a
password as the user its subject common name names
(L{client_certificate_user}).  L{ServerTLS} rebuilds the whole configuration
when the files change, and L{TLSReloader} drives it (a poll, and SIGHUP).
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from zope.interface import implementer

__all__ = [
    "TLSConfigError",
    "TLS12_CIPHERS",
    "TLS_GROUPS",
    "key_exchange_groups",
    "server_tls_options",
    "client_tls_options",
    "client_certificate_user",
    "certificate_user",
    "ServerTLS",
    "TLSReloader",
    "default_cert_paths",
]

log = Logger()

#: OpenSSL cipher string for TLS 1.2: ECDHE key exchange (forward secrecy)
#: with AES-GCM or ChaCha20-Poly1305 (AEAD) only; ECDSA and RSA certificates
#: both work.  TLS 1.3 suites are configured separately by OpenSSL and are all
#: AEAD with (EC)DHE; OpenSSL's default TLS 1.3 set (AES-GCM, ChaCha20) is used.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!PSK:!SRP:!DSS"

#: Key-exchange groups, most preferred first: Mozilla's profiles allow exactly
#: these.  OpenSSL 3 would also offer X448, P-521 and the FFDHE groups.  See
#: L{key_exchange_groups} for the ones actually set.
TLS_GROUPS = "X25519:P-256:P-384"

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


def _load_key(path: str | os.PathLike[str], flag: str = "--tls-key"):
    what = "a PEM private key"
    data = _read(path, flag, what)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography raises TypeError when a password would be needed.
        raise TLSConfigError(
            f"cannot use {flag} {os.fspath(path)}: the key is encrypted; "
            f"decrypt it (openssl pkey -in KEY -out PLAIN) and pass {flag} PATH "
            f"to the unencrypted PEM key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSConfigError(
            f"cannot use {flag} {os.fspath(path)}: not a PEM private key; "
            f"pass {flag} PATH to {what}"
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


def _ca_certificates(path: str | os.PathLike[str], flag: str, what: str) -> list[Certificate]:
    return [
        Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
        for c in _load_certs(path, flag, what)
    ]


def _set_groups_call() -> Any:
    """OpenSSL's SSL_CTX_set1_curves_list, or None where this pyOpenSSL cannot reach it.

    pyOpenSSL has no public call for the group list; the cffi binding it uses
    (from cryptography) exposes SSL_CTX_set1_curves_list (set1_groups_list
    under its older name) in recent releases only.
    """
    try:
        from OpenSSL._util import lib

        return lib.SSL_CTX_set1_curves_list
    except (ImportError, AttributeError):
        return None


def key_exchange_groups() -> tuple[str, ...]:
    """The key-exchange groups servers offer, most preferred first.

    L{TLS_GROUPS} where OpenSSL's group list can be set through pyOpenSSL;
    otherwise P-256 alone (through pyOpenSSL's C{set_tmp_ecdh}), which keeps
    both Mozilla profiles but loses X25519.
    """
    return tuple(TLS_GROUPS.split(":")) if _set_groups_call() is not None else ("P-256",)


def _restrict_groups(context: SSL.Context) -> None:
    """Offer only L{key_exchange_groups} for the (EC)DHE key exchange."""
    set_groups = _set_groups_call()
    if set_groups is None or set_groups(context._context, TLS_GROUPS.encode("ascii")) != 1:
        try:
            context.set_tmp_ecdh(ec.SECP256R1())
        except TypeError:  # pyOpenSSL before 24.3 wants its own curve objects
            from OpenSSL import crypto

            context.set_tmp_ecdh(crypto.get_elliptic_curve("prime256v1"))


class _ClientCertificateLogin:
    """Marks (as app data) a context that verifies client certificates against the client CA."""

    def __repr__(self) -> str:
        return "<imkit: client certificates verified against --tls-client-ca>"


_VERIFIES_CLIENTS = _ClientCertificateLogin()


def server_tls_options(
    cert_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    *,
    modern: bool = False,
    chain_paths: Iterable[str | os.PathLike[str]] = (),
    client_ca_path: str | os.PathLike[str] | None = None,
    require_client_cert: bool = False,
) -> CertificateOptions:
    """Build the server's TLS configuration from PEM files.

    C{cert_path} holds the server certificate, optionally followed by its
    intermediates (a "fullchain.pem" works as is); C{chain_paths} are further
    PEM files of intermediates to send.  The root CA need not be sent.

    TLS 1.2 and 1.3 are allowed, or only TLS 1.3 when C{modern} is true; TLS
    1.2 uses only L{TLS12_CIPHERS}, key exchange only L{TLS_GROUPS}, and
    client-initiated renegotiation is refused.  Session caching and tickets
    stay off (Twisted's default), so every connection does a full handshake
    with fresh ephemeral keys.

    With C{client_ca_path} (a PEM file of CA certificates), clients are asked
    for a certificate: one they present must chain to those CAs and allow
    client authentication, or the handshake fails; a client presenting none
    is still served (it may log in with a password) unless
    C{require_client_cert}.  See L{client_certificate_user}.

    @raise TLSConfigError: a file is missing, unreadable, not PEM, encrypted,
        or the key does not belong to the certificate.
    """
    cert_file, key_file = os.fspath(cert_path), os.fspath(key_path)
    if require_client_cert and client_ca_path is None:
        raise TLSConfigError(
            "--tls-require-client-cert needs --tls-client-ca FILE, the PEM certificate "
            "of the CA that signs client certificates"
        )
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
    client_cas = None
    if client_ca_path is not None:
        client_cas = _ca_certificates(
            client_ca_path,
            "--tls-client-ca",
            "the PEM certificate(s) of the CA that signs client certificates",
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
        # (trustRoot= would always require a certificate; caCerts= lets us choose.)
        verify=client_cas is not None,
        caCerts=[c.original for c in client_cas] if client_cas is not None else None,
        requireCertificate=require_client_cert,
    )
    try:
        # Build the context now, so OpenSSL's own objections (a key too weak
        # for its security level, say) surface at start-up.  The options keep
        # this context and hand it out for every connection.
        context = options.getContext()
    except SSL.Error as e:
        raise TLSConfigError(
            f"OpenSSL refuses --tls-cert {cert_file} with --tls-key {key_file}: "
            f"{_openssl_reason(e)}; pass a certificate and key it accepts "
            f"(EC P-256 or RSA >= 2048 bits)"
        ) from None
    _restrict_groups(context)
    context.set_options(getattr(SSL, "OP_NO_RENEGOTIATION", 0))
    if client_cas is not None:
        context.set_app_data(_VERIFIES_CLIENTS)
    return options


def certificate_user(cert: x509.Certificate) -> str | None:
    """The user a client certificate names: its subject's one common name (None if not exactly one)."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        return None
    return names[0].value


def client_certificate_user(transport: Any) -> str | None:
    """The user whom a connection's verified TLS client certificate names, or None.

    Only connections accepted with a configuration built with a client CA
    (L{server_tls_options} C{client_ca_path}) count: there OpenSSL has
    verified the client's chain against that CA, and that the certificate
    allows client authentication, during the handshake, or refused the
    connection.  Plain TCP, other TLS configurations and clients that sent no
    certificate give None.  The user is L{certificate_user}: the subject's
    common name.
    """
    get_handle = getattr(transport, "getHandle", None)
    connection = get_handle() if get_handle is not None else None
    if not isinstance(connection, SSL.Connection):
        return None
    if connection.get_context().get_app_data() is not _VERIFIES_CLIENTS:
        return None
    try:
        cert = connection.get_peer_certificate(as_cryptography=True)
    except TypeError:  # pyOpenSSL before 24.3
        peer = connection.get_peer_certificate()
        cert = peer.to_cryptography() if peer is not None else None
    return certificate_user(cert) if cert is not None else None


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ServerTLS:
    """A server's TLS configuration that can be rebuilt from its files while serving.

    It takes the arguments of L{server_tls_options}, and builds the first
    configuration at once, raising L{TLSConfigError} for unusable files (a
    server should not start with them).  Listeners hand out
    L{serverConnectionForTLS}, which uses whatever configuration is current:
    after L{reload}, new connections get the new certificate while open ones
    keep the one they started with.  A reload that finds an unusable file
    logs one line and keeps the previous configuration.
    """

    def __init__(
        self,
        cert_path: str | os.PathLike[str],
        key_path: str | os.PathLike[str],
        *,
        modern: bool = False,
        chain_paths: Iterable[str | os.PathLike[str]] = (),
        client_ca_path: str | os.PathLike[str] | None = None,
        require_client_cert: bool = False,
    ) -> None:
        self.cert_path = os.fspath(cert_path)
        self.key_path = os.fspath(key_path)
        self.chain_paths = tuple(os.fspath(p) for p in chain_paths)
        self.client_ca_path = None if client_ca_path is None else os.fspath(client_ca_path)
        self.modern = modern
        self.require_client_cert = require_client_cert
        self._stamps = self._file_stamps()
        self.options = self._build()

    @property
    def paths(self) -> tuple[str, ...]:
        """Every file the configuration is built from."""
        ca = () if self.client_ca_path is None else (self.client_ca_path,)
        return (self.cert_path, self.key_path, *self.chain_paths, *ca)

    def _build(self) -> CertificateOptions:
        return server_tls_options(
            self.cert_path,
            self.key_path,
            modern=self.modern,
            chain_paths=self.chain_paths,
            client_ca_path=self.client_ca_path,
            require_client_cert=self.require_client_cert,
        )

    def _file_stamps(self) -> tuple[tuple[int, ...] | None, ...]:
        stamps: list[tuple[int, ...] | None] = []
        for path in self.paths:
            try:
                st = os.stat(path)
            except OSError:
                stamps.append(None)
            else:
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev))
        return tuple(stamps)

    def getContext(self) -> SSL.Context:
        """The current configuration's context (L{IOpenSSLContextFactory})."""
        return self.options.getContext()

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """A connection using the current configuration (L{IOpenSSLServerConnectionCreator})."""
        return SSL.Connection(self.getContext(), None)

    def reload(self) -> bool:
        """Rebuild from the files now.

        @return: True if new connections now use the files' contents; False
            if a file is unusable (logged in one line), in which case the
            previous configuration stays in use.
        """
        self._stamps = self._file_stamps()
        try:
            options = self._build()
        except TLSConfigError as error:
            log.error(
                "TLS files not reloaded, still serving the previous certificate: {error}",
                error=str(error),
            )
            return False
        except Exception:
            log.failure("TLS files not reloaded, still serving the previous certificate")
            return False
        self.options = options
        log.info("TLS certificate reloaded from {cert}", cert=self.cert_path)
        return True

    def reload_if_changed(self) -> bool:
        """L{reload} if any file's modification time, size or inode changed since the last look.

        @return: True if new connections now use changed files.
        """
        if self._file_stamps() == self._stamps:
            return False
        return self.reload()


class TLSReloader(Service):
    """Keeps a L{ServerTLS} current while the server runs.

    Every C{interval} seconds (none when 0) it reloads changed files
    (L{ServerTLS.reload_if_changed}); with C{sighup} it also reloads them on
    SIGHUP (twistd sets nothing else on that signal), restoring the previous
    handler when stopped.
    """

    name = "imkit-tls-reloader"

    def __init__(self, tls: ServerTLS, reactor: Any, interval: float = 5.0, sighup: bool = False) -> None:
        self.tls = tls
        self.reactor = reactor
        self.interval = interval
        self.sighup = sighup
        self._poll = task.LoopingCall(tls.reload_if_changed)
        self._poll.clock = reactor
        self._previous_handler: Any = None
        self._handling_sighup = False

    def startService(self) -> None:
        super().startService()
        if self.interval > 0:
            self._poll.start(self.interval, now=False)
        if (
            self.sighup
            and hasattr(signal, "SIGHUP")
            and threading.current_thread() is threading.main_thread()
        ):
            self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)
            self._handling_sighup = True

    def stopService(self) -> Any:
        if self._poll.running:
            self._poll.stop()
        if self._handling_sighup:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._handling_sighup = False
        return super().stopService()

    def _on_sighup(self, signum: int, frame: Any) -> None:
        # A signal handler may run between any two bytecodes: do the work
        # from the reactor's loop instead.
        self.reactor.callFromThread(self._reload_for_signal)

    def _reload_for_signal(self) -> None:
        log.info("SIGHUP: reloading the TLS certificate, key and client CA")
        self.tls.reload()


def client_tls_options(
    hostname: str,
    ca_path: str | os.PathLike[str] | None = None,
    *,
    client_cert: str | os.PathLike[str] | None = None,
    client_key: str | os.PathLike[str] | None = None,
) -> IOpenSSLClientConnectionCreator:
    """Build a client's TLS configuration for a server called C{hostname}.

    The server's chain is verified against the CA certificates in the PEM file
    C{ca_path} (or the platform's trust store when it is L{None}), and its
    certificate must name C{hostname} (a DNS name or an IP address), checked
    by service-identity.  TLS 1.2 minimum, same AEAD suites as the server.

    C{client_cert} and C{client_key} (PEM files, given together) are the
    client certificate to present when the server asks for one (mutual TLS);
    C{client_cert} may hold intermediates after the certificate.

    @raise TLSConfigError: C{hostname} is empty, or a file cannot be used.
    """
    if not hostname:
        raise TLSConfigError(
            "empty TLS host name; pass the server's host name as in its certificate"
        )
    if (client_cert is None) != (client_key is None):
        raise TLSConfigError(
            "pass a client certificate and its key together (client_cert and client_key)"
        )
    if ca_path is None:
        trust_root = None  # optionsForClientTLS then uses platformTrust().
    else:
        trust_root = trustRootFromCertificates(
            _ca_certificates(ca_path, "--tls-ca", "a PEM file of CA certificates")
        )
    extra: dict[str, Any] = {
        "raiseMinimumTo": TLSVersion.TLSv1_2,
        "acceptableCiphers": _cipher_options(),
    }
    if client_cert is not None and client_key is not None:
        cert_file, key_file = os.fspath(client_cert), os.fspath(client_key)
        certs = _load_certs(
            cert_file,
            "--tls-client-cert",
            "a PEM client certificate (then any intermediates)",
        )
        key = _load_key(key_file, "--tls-client-key")
        if _spki(certs[0].public_key()) != _spki(key.public_key()):
            raise TLSConfigError(
                f"--tls-client-key {key_file} does not belong to the client certificate "
                f"{cert_file}; pass the key that certificate was issued for"
            )
        _warn_if_not_current(certs[0], cert_file)
        # As for the server: pyOpenSSL takes cryptography objects directly.
        extra.update(privateKey=key, certificate=certs[0])
        if len(certs) > 1:
            extra["extraCertChain"] = certs[1:]
    return optionsForClientTLS(hostname, trustRoot=trust_root, extraCertificateOptions=extra)


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
