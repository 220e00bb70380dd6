"""
The usual way to reach an imkit server: ``HOST:PORT`` over TLS, the certificate checked.

Libraries take endpoint objects (tests pass in-memory ones); this builds the real one from the
strings an application is configured with.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IStreamClientEndpoint

from imkit.endpoints import client_endpoint, parse_host_port
from imkit.tls import client_tls_options, default_cert_paths


def tls_endpoint(
    reactor: Any,
    server: str,
    ca_path: str | None = None,
    *,
    client_cert: str | None = None,
    client_key: str | None = None,
) -> IStreamClientEndpoint:
    """
    An endpoint for ``HOST:PORT`` (``[ADDR]:PORT`` for IPv6) over TLS.

    The server's certificate must name HOST and chain to a CA in the PEM file ``ca_path`` (the
    system's trust store when None).  ``client_cert`` and ``client_key`` (PEM files, together)
    are a client certificate to present to a server that asks for one (``--tls-client-ca``); with
    it, ``IMClient(endpoint, user, None)`` logs in as the certificate's common name without a
    password.  Raises ``imkit.endpoints.EndpointStringError`` for a malformed address and
    ``imkit.tls.TLSConfigError`` for an unusable CA, certificate or key file, both ValueErrors
    whose one-line message says what to fix.
    """
    host, _port = parse_host_port(server)
    creator = client_tls_options(host, ca_path, client_cert=client_cert, client_key=client_key)
    return client_endpoint(reactor, server, creator)


def development_ca() -> str:
    """The path of the development CA that signs the development server certificate (tests, demos)."""
    return default_cert_paths()[0]
