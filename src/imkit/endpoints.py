"""Turn imkit's listen and connect strings into Twisted endpoints.

``tls:PORT[:interface=ADDR][:backlog=N]`` listens with imkit's own TLS
configuration (L{imkit.tls.server_tls_options}); any other Twisted server
endpoint string (``tcp:...``, ``ssl:...``, ``unix:...``) is handed to
L{serverFromString} unchanged, so plain TCP for tests and Twisted's own
options remain available.  Clients connect to ``HOST:PORT`` (``[ADDR]:PORT``
for IPv6) with L{HostnameEndpoint}, wrapped in TLS when asked to.

Mistakes are reported as a one-line L{EndpointStringError} that says what to
write instead.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import NamedTuple

from OpenSSL import SSL, crypto
from twisted.internet.endpoints import (
    HostnameEndpoint,
    SSL4ServerEndpoint,
    serverFromString,
    wrapClientTLS,
)
from twisted.internet.error import VerifyError
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)

__all__ = [
    "EndpointStringError",
    "TLSListenAddress",
    "parse_tls_listen",
    "parse_host_port",
    "server_endpoint",
    "client_endpoint",
]

_LISTEN_HINT = (
    "use tls:PORT[:interface=ADDR] (write ':' in an IPv6 ADDR as '\\:') or a "
    "Twisted endpoint string such as tcp:PORT:interface=127.0.0.1"
)
_CONNECT_HINT = "use HOST:PORT, e.g. localhost:14000, or [ADDR]:PORT for IPv6"
_TLS_KEYS = ("port", "interface", "backlog")


class EndpointStringError(ValueError):
    """A listen or connect string is malformed; the message says how to write it."""


class TLSListenAddress(NamedTuple):
    """Where a C{tls:} listener binds; C{interface} "" means all IPv4 addresses."""

    port: int
    interface: str = ""
    backlog: int = 50


def _listen_error(description: str, reason: str) -> EndpointStringError:
    return EndpointStringError(
        f"bad listen endpoint {description!r}: {reason}; {_LISTEN_HINT}"
    )


def _split_escaped(description: str, text: str) -> list[str]:
    """Split on ':' honouring Twisted's '\\' escapes (needed for IPv6 addresses)."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise _listen_error(description, "it ends with a lone '\\'")
            current.append(escaped)
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _port_number(text: str, *, allow_zero: bool) -> int | None:
    """Return the port as an int, or None when it is not a valid port."""
    if not text.isascii() or not text.isdigit():
        return None
    port = int(text)
    low = 0 if allow_zero else 1
    return port if low <= port <= 65535 else None


def _is_tls(description: str) -> bool:
    return description.split(":", 1)[0].lower() == "tls"


def parse_tls_listen(description: str) -> TLSListenAddress:
    """Parse C{tls:PORT[:interface=ADDR][:backlog=N]} (or C{tls:port=PORT:...}).

    PORT 0 asks the system for a free port.  ADDR must be an IP address
    literal, as the listening socket binds to it directly.

    @raise EndpointStringError: the string is not a well-formed C{tls:} string.
    """
    if not _is_tls(description):
        raise _listen_error(description, "it does not start with 'tls:'")
    _, _, rest = description.partition(":")
    if not rest:
        raise _listen_error(description, "no port given")
    positional: list[str] = []
    options: dict[str, str] = {}
    for part in _split_escaped(description, rest):
        key, sep, value = part.partition("=")
        if not sep:
            positional.append(part)
            continue
        if key not in _TLS_KEYS:
            raise _listen_error(
                description, f"unknown option {key!r} (known: {', '.join(_TLS_KEYS)})"
            )
        if key in options:
            raise _listen_error(description, f"{key} given twice")
        options[key] = value
    if len(positional) > 1:
        raise _listen_error(
            description, "only the port may be given without a name; name the rest"
        )
    if positional:
        if "port" in options:
            raise _listen_error(description, "port given twice")
        options["port"] = positional[0]
    if "port" not in options:
        raise _listen_error(description, "no port given")
    port = _port_number(options["port"], allow_zero=True)
    if port is None:
        raise _listen_error(
            description, f"port {options['port']!r} is not a number from 0 to 65535"
        )
    interface = options.get("interface", "")
    if interface:
        try:
            interface = str(ipaddress.ip_address(interface))
        except ValueError:
            raise _listen_error(
                description, f"interface {interface!r} is not an IP address"
            ) from None
    backlog_text = options.get("backlog", "50")
    backlog = int(backlog_text) if backlog_text.isascii() and backlog_text.isdigit() else 0
    if backlog < 1:
        raise _listen_error(
            description, f"backlog {backlog_text!r} is not a positive number"
        )
    return TLSListenAddress(port, interface, backlog)


def server_endpoint(
    reactor,
    description: str,
    tls_options_factory: Callable[[], IOpenSSLServerConnectionCreator],
) -> IStreamServerEndpoint:
    """Build the server endpoint a listen string describes.

    For C{tls:} strings the result is an L{SSL4ServerEndpoint} using the TLS
    options from C{tls_options_factory()} (an L{imkit.tls.ServerTLS} lets a
    running listener pick up a replaced certificate).  The factory is called only for
    C{tls:} strings, and then right away, so that certificate problems
    (L{imkit.tls.TLSConfigError}) surface at start-up rather than at
    C{listen()}; other strings never load imkit's certificates.

    @raise EndpointStringError: the string is malformed.
    """
    if not description:
        raise _listen_error(description, "it is empty")
    if _is_tls(description):
        address = parse_tls_listen(description)
        return SSL4ServerEndpoint(
            reactor,
            address.port,
            tls_options_factory(),
            backlog=address.backlog,
            interface=address.interface,
        )
    try:
        return serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise _listen_error(description, str(e) or type(e).__name__) from None
    except OSError as e:
        # e.g. ssl:...:privateKey=FILE naming a file that cannot be read.
        raise _listen_error(
            description, f"{e.filename or 'a file it names'}: {e.strerror or e}"
        ) from None
    except (SSL.Error, crypto.Error, VerifyError) as e:
        # ssl:... whose certKey/privateKey files are not a usable PEM pair.
        raise _listen_error(description, f"unusable certificate or key: {e}") from None


def parse_host_port(server: str) -> tuple[str, int]:
    """Split C{HOST:PORT} or C{[IPv6]:PORT} into C{(host, port)}.

    @raise EndpointStringError: the string is not of that form.
    """

    def error(reason: str) -> EndpointStringError:
        return EndpointStringError(
            f"bad server address {server!r}: {reason}; {_CONNECT_HINT}"
        )

    if not server:
        raise error("it is empty")
    if server.startswith("["):
        host, sep, port_text = server[1:].partition("]:")
        if not sep:
            raise error("an IPv6 address must be written [ADDR]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise error(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = server.rpartition(":")
        if not sep:
            raise error("no port given")
        if ":" in host:
            raise error("an IPv6 address must be in brackets")
    if not host:
        raise error("no host given")
    if any(ch.isspace() or ch in "/@[]" for ch in host):
        raise error(f"{host!r} is not a host name")
    port = _port_number(port_text, allow_zero=False)
    if port is None:
        raise error(f"port {port_text!r} is not a number from 1 to 65535")
    return host, port


def client_endpoint(
    reactor,
    server: str,
    tls_creator: IOpenSSLClientConnectionCreator | None,
) -> IStreamClientEndpoint:
    """Build a client endpoint for C{HOST:PORT}, over TLS unless C{tls_creator} is None.

    L{HostnameEndpoint} resolves the name and races IPv4 and IPv6 addresses.
    C{tls_creator} should come from L{imkit.tls.client_tls_options} for the
    same host (L{parse_host_port} gives it), as that is the name verified
    against the server's certificate.

    @raise EndpointStringError: C{server} is malformed.
    """
    host, port = parse_host_port(server)
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host, port)
    if tls_creator is not None:
        endpoint = wrapClientTLS(tls_creator, endpoint)
    return endpoint
