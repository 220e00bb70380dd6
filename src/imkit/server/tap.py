"""
``twistd imkit``: the command-line options and ``makeService``.

Every option has a default, so ``twistd -n imkit`` alone serves TLS on port 14000 with the
development certificate and an SQLite database in the working directory.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.python import usage

from imkit.endpoints import EndpointStringError, server_endpoint
from imkit.extensions import ExtensionError, Extensions
from imkit.extensions import load as load_extensions
from imkit.passwords import Passwords
from imkit.rules import Policy
from imkit.server.service import IMServerService
from imkit.session.settings import ServerSettings
from imkit.store import StoreStringError, store_from_string
from imkit.tls import TLSConfigError, default_cert_paths, server_tls_options

DEFAULT_LISTEN = "tls:14000"
DEFAULT_STORE = "sqlite:imkit.sqlite3"


def _positive(kind: type, name: str) -> Any:
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise usage.UsageError(f"--{name} takes a number, not {text!r}") from None
        if value <= 0:
            raise usage.UsageError(f"--{name} must be greater than 0, not {text!r}")
        return value

    return convert


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "An imkit instant-messaging server: a binary protocol over TLS with exactly-once, in-order "
        "delivery. With no options it listens with TLS on port 14000 using the development "
        "certificate in ./certs (never use it in production) and stores everything in "
        "./imkit.sqlite3."
    )

    optParameters = [
        ["tls-cert", None, None, "PEM certificate (chain) for tls: listeners [default: the development certificate]"],
        ["tls-key", None, None, "PEM private key of --tls-cert [default: the development key]"],
        ["tls-profile", None, "intermediate", "intermediate (TLS 1.2 and 1.3) or modern (TLS 1.3 only)"],
        ["store", None, DEFAULT_STORE, "where messages and users live: sqlite:PATH or memory:"],
        ["heartbeat", None, 30.0, "seconds between client pings on an idle connection", _positive(float, "heartbeat")],
        ["idle-timeout", None, 90.0, "close a connection silent for this many seconds", _positive(float, "idle-timeout")],
        ["login-timeout", None, 20.0, "seconds a new connection has to log in", _positive(float, "login-timeout")],
        ["ack-timeout", None, 5.0, "seconds before an unacknowledged delivery is resent (then doubling)", _positive(float, "ack-timeout")],
        ["max-unacked", None, 10000, "deliveries in flight per connection", _positive(int, "max-unacked")],
        ["max-frame", None, 1048576, "largest frame accepted, in bytes", _positive(int, "max-frame")],
        ["max-body", None, 262144, "largest message body accepted, in bytes", _positive(int, "max-body")],
        ["sync-page", None, 500, "messages per sync answer at most", _positive(int, "sync-page")],
        ["token-ttl", None, 7 * 24 * 3600.0, "seconds a resume token lets a device reconnect without its password", _positive(float, "token-ttl")],
        ["policy", None, "open", "who may message whom: open (anyone, unless blocked) or contacts (only mutual contacts)"],
        ["recall-window", None, 120.0, "seconds during which a sender may recall a message", _positive(float, "recall-window")],
        ["edit-window", None, 900.0, "seconds during which a sender may edit a message", _positive(float, "edit-window")],
        ["max-group-members", None, 10000, "members of one group at most", _positive(int, "max-group-members")],
        ["max-devices", None, 10, "devices of one user logged in at once", _positive(int, "max-devices")],
        ["device-policy", None, "evict-oldest", "at the device limit a new login evict-oldest (logs the oldest device out) or refuse"],
        ["new-device-history", None, None, "messages per conversation a never-seen device gets on its first sync [default: all]", _positive(int, "new-device-history")],
        ["retention", None, None, "seconds messages are kept, server-wide [default: for ever]; conversations may set their own", _positive(float, "retention")],
        ["prune-interval", None, 3600.0, "seconds between retention passes", _positive(float, "prune-interval")],
    ]

    optFlags = [
        ["history-on-join", None, "members added to a group can read what was said before they joined"],
    ]

    def parseOptions(self, options: Any = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as error:
            if getattr(self, "parent", None) is not None:
                # Under twistd, which would print its whole usage text first: just the one line.
                raise SystemExit(f"twistd imkit: {error}") from None
            raise

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["extensions"] = Extensions()

    def opt_listen(self, description: str) -> None:
        """Listen on ENDPOINT (repeatable): tls:PORT[:interface=ADDR] uses imkit's TLS settings;
        any other Twisted endpoint string (tcp:, ssl:, unix:) is used as it is [default: tls:14000]"""
        self["listen"].append(description)

    def opt_extension(self, reference: str) -> None:
        """Load custom packet types from MODULE:ATTRIBUTE (a PacketType or a list of them;
        repeatable), so their server handlers check them before they are stored"""
        try:
            for packet_type in load_extensions(reference):
                self["extensions"].register(packet_type)
        except ExtensionError as error:
            raise usage.UsageError(str(error)) from None

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["tls-profile"] not in ("intermediate", "modern"):
            raise usage.UsageError(f"--tls-profile is intermediate or modern, not {self['tls-profile']!r}")
        if (self["tls-cert"] is None) != (self["tls-key"] is None):
            raise usage.UsageError("pass --tls-cert and --tls-key together (a certificate needs its key)")
        if self["max-body"] + 4096 > self["max-frame"] // 2:
            raise usage.UsageError("--max-body must be at most half of --max-frame minus 4096 bytes; raise --max-frame")
        try:
            self.store = store_from_string(self["store"])
        except StoreStringError as error:
            raise usage.UsageError(str(error)) from None
        if self["policy"] not in ("open", "contacts"):
            raise usage.UsageError(f"--policy is open or contacts, not {self['policy']!r}")
        if self["device-policy"] not in ("evict-oldest", "refuse"):
            raise usage.UsageError(f"--device-policy is evict-oldest or refuse, not {self['device-policy']!r}")
        self.policy = Policy(
            contacts_only=self["policy"] == "contacts",
            history_on_join=bool(self["history-on-join"]),
            recall_window=self["recall-window"],
            edit_window=self["edit-window"],
            max_group_members=self["max-group-members"],
        )
        path = getattr(self.store, "path", None)
        if path is not None:
            directory = os.path.dirname(path) or "."
            if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
                raise usage.UsageError(
                    f"cannot create the store in {directory}: no such writable directory; pass --store sqlite:PATH in one"
                )
        self.settings = ServerSettings(
            max_frame=self["max-frame"],
            heartbeat=self["heartbeat"],
            idle_timeout=self["idle-timeout"],
            login_timeout=self["login-timeout"],
            ack_timeout=self["ack-timeout"],
            max_unacked=self["max-unacked"],
            sync_page=self["sync-page"],
            max_body=self["max-body"],
            token_ttl=self["token-ttl"],
            max_devices=self["max-devices"],
            device_policy=self["device-policy"],
            new_device_history=self["new-device-history"],
            retention=self["retention"],
            prune_interval=self["prune-interval"],
        )


def makeService(options: Options, reactor: Any = None, passwords: Passwords | None = None) -> IMServerService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    _, default_cert, default_key = default_cert_paths()
    cert = options["tls-cert"] or default_cert
    key = options["tls-key"] or default_key
    modern = options["tls-profile"] == "modern"
    tls_cache: list[Any] = []

    def tls_options() -> Any:
        if not tls_cache:
            tls_cache.append(server_tls_options(cert, key, modern=modern))
        return tls_cache[0]

    try:
        endpoints = [server_endpoint(reactor, description, tls_options) for description in options["listen"]]
    except (EndpointStringError, TLSConfigError) as error:
        if getattr(options, "parent", None) is not None:
            # twistd calls us after its own option handling: one line, not a traceback.
            raise SystemExit(f"twistd imkit: {error}") from None
        raise usage.UsageError(str(error)) from None
    store = getattr(options, "store", None) or store_from_string(options["store"])
    service = IMServerService(store, passwords or Passwords(), endpoints, reactor, options.settings, options.policy)
    service.stop_reactor_on_failure = getattr(options, "parent", None) is not None  # run by twistd
    if len(options["extensions"]):
        service.hub.checks.append(options["extensions"].server_check)
    return service
