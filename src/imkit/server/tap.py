"""
``twistd imkit``: the command-line options and ``makeService``.

Every option has a default, so ``twistd -n imkit`` alone serves TLS on port 14000 with the
development certificate and an SQLite database in the working directory.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.python import usage

from imkit.content import BlocklistError, BlocklistFile, ContentCheckError, ContentPipeline, PhishingChecker, load_checkers
from imkit.endpoints import EndpointStringError, server_endpoint
from imkit.extensions import ExtensionError, Extensions
from imkit.extensions import load as load_extensions
from imkit.passwords import Passwords
from imkit.rules import Policy
from imkit.tuning import tune_garbage_collector, tune_thread_switching
from imkit.server.service import IMServerService
from imkit.session.settings import ServerSettings
from imkit.store import StoreStringError, store_from_string
from imkit.tls import ServerTLS, TLSConfigError, TLSReloader, default_cert_paths

DEFAULT_LISTEN = "tls:14000"
DEFAULT_STORE = "sqlite:imkit.sqlite3"


def _seconds_or_zero(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise usage.UsageError(f"--tls-reload takes a number of seconds, not {text!r}") from None
    if not value >= 0:
        raise usage.UsageError(f"--tls-reload must be 0 (off) or more, not {text!r}")
    return value


def _at_least_zero(kind: type, name: str) -> Any:
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise usage.UsageError(f"--{name} takes a number, not {text!r}") from None
        if not value >= 0:
            raise usage.UsageError(f"--{name} must be 0 (no limit) or more, not {text!r}")
        return value

    return convert


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
        ["tls-client-ca", None, None, "PEM CA certificate(s): tls: listeners ask clients for a certificate it signed; "
         "a client presenting one may log in as its common name without a password (mutual TLS)"],
        ["tls-reload", None, 5.0, "seconds between checks of the TLS certificate, key and client CA files; changed "
         "files serve new connections (0: never; SIGHUP reloads them too under twistd)", _seconds_or_zero],
        ["store", None, DEFAULT_STORE, "where messages and users live: sqlite:PATH or memory:"],
        ["heartbeat", None, 30.0, "seconds between client pings on an idle connection", _positive(float, "heartbeat")],
        ["idle-timeout", None, 90.0, "close a connection silent for this many seconds", _positive(float, "idle-timeout")],
        ["login-timeout", None, 20.0, "seconds a new connection has to log in", _positive(float, "login-timeout")],
        ["stop-timeout", None, 10.0, "on stop, seconds the requests under way get to finish before the store closes", _positive(float, "stop-timeout")],
        ["ack-timeout", None, 5.0, "seconds before an unacknowledged delivery is resent (then doubling)", _positive(float, "ack-timeout")],
        ["max-unacked", None, 10000, "deliveries in flight per connection", _positive(int, "max-unacked")],
        ["max-frame", None, 1048576, "largest frame accepted, in bytes", _positive(int, "max-frame")],
        ["max-body", None, 262144, "largest message body accepted, in bytes", _positive(int, "max-body")],
        ["sync-page", None, 500, "messages per sync answer at most", _positive(int, "sync-page")],
        ["token-ttl", None, 7 * 24 * 3600.0, "seconds a resume token lets a device reconnect without its password", _positive(float, "token-ttl")],
        ["login-failures", None, 5, "failed password logins for one user name within --login-window after which its "
         "logins are refused unchecked for --login-backoff seconds (0: no per-name limit)", _at_least_zero(int, "login-failures")],
        ["login-failures-per-ip", None, 20, "the same for failed password logins from one IP address (0: no per-address limit)",
         _at_least_zero(int, "login-failures-per-ip")],
        ["login-window", None, 300.0, "seconds over which failed logins are counted", _positive(float, "login-window")],
        ["login-backoff", None, 30.0, "seconds of the first lockout; each further one doubles", _positive(float, "login-backoff")],
        ["login-backoff-max", None, 900.0, "seconds a lockout lasts at most", _positive(float, "login-backoff-max")],
        ["account-check-interval", None, 10.0, "seconds between looks for disabled users among those online, who are "
         "then logged out (0: only refuse them at login)", _at_least_zero(float, "account-check-interval")],
        ["policy", None, "open", "who may message whom: open (anyone, unless blocked) or contacts (only mutual contacts)"],
        ["recall-window", None, 120.0, "seconds during which a sender may recall a message", _positive(float, "recall-window")],
        ["edit-window", None, 900.0, "seconds during which a sender may edit a message", _positive(float, "edit-window")],
        ["max-group-members", None, 10000, "members of one group at most", _positive(int, "max-group-members")],
        ["max-devices", None, 10, "devices of one user logged in at once", _positive(int, "max-devices")],
        ["device-policy", None, "evict-oldest", "at the device limit a new login evict-oldest (logs the oldest device out) or refuse"],
        ["new-device-history", None, None, "messages per conversation a never-seen device gets on its first sync [default: all]", _positive(int, "new-device-history")],
        ["retention", None, None, "seconds messages are kept, server-wide [default: for ever]; conversations may set their own", _positive(float, "retention")],
        ["prune-interval", None, 3600.0, "seconds between retention passes", _positive(float, "prune-interval")],
        ["handshake-timeout", None, 10.0, "seconds a new connection has to finish its TLS handshake", _positive(float, "handshake-timeout")],
        ["max-outbound-buffer", None, 16 * 1024 * 1024, "bytes waiting for a client that does not read fast enough; "
         "past it the client is disconnected", _positive(int, "max-outbound-buffer")],
        ["max-connections-per-ip", None, 1000, "open connections from one IP address (0: no limit)", _at_least_zero(int, "max-connections-per-ip")],
        ["max-connections-per-user", None, 32, "connections logged in or logging in as one user (0: no limit)", _at_least_zero(int, "max-connections-per-user")],
        ["send-rate", None, 50.0, "messages per second one device may send, sustained; more are answered RATE_LIMITED "
         "with the time to resend (0: no limit)", _at_least_zero(float, "send-rate")],
        ["send-burst", None, 500, "messages one device may send in a burst above --send-rate", _positive(int, "send-burst")],
        ["sync-rate", None, 5.0, "syncs per second one device may ask for; more are answered late (0: no limit)", _at_least_zero(float, "sync-rate")],
        ["sync-burst", None, 50, "syncs one device may ask for in a burst above --sync-rate", _positive(int, "sync-burst")],
        ["lookup-rate", None, 5.0, "queries and receipt queries per second one device may ask; more are answered "
         "RATE_LIMITED (0: no limit)", _at_least_zero(float, "lookup-rate")],
        ["lookup-burst", None, 50, "lookups one device may make in a burst above --lookup-rate", _positive(int, "lookup-burst")],
        ["user-rate-factor", None, 3.0, "a user's devices together get this many times a device's rates (0: no per-user limit)",
         _at_least_zero(float, "user-rate-factor")],
        ["ip-rate-factor", None, 20.0, "everybody behind one IP address together get this many times a device's rates "
         "(0: no per-address limit)", _at_least_zero(float, "ip-rate-factor")],
        ["conversation-rate-factor", None, 10.0, "everybody in one conversation together get this many times a device's "
         "rates (0: no per-conversation limit)", _at_least_zero(float, "conversation-rate-factor")],
        ["probe-burst", None, 30, "different users or conversations a user may be refused as unknown or not theirs before "
         "being throttled as a crawler (0: no anti-crawler rule)", _at_least_zero(int, "probe-burst")],
        ["probe-interval", None, 10.0, "seconds per further such refusal a throttled user gets", _positive(float, "probe-interval")],
        ["blocklist", None, None, "phishing blocklist FILE: one domain (with its subdomains) or URL a line, # comments; "
         "messages linking to them are refused (see --blocklist-action); the file is reloaded when it changes"],
        ["blocklist-action", None, None, "what a message with a blocked link gets: reject (an error ack, nothing "
         "stored) or flag (stored, marked and reported) [default: reject]"],
        ["blocklist-interval", None, 5.0, "seconds between checks of --blocklist for changes", _positive(float, "blocklist-interval")],
    ]

    optFlags = [
        ["history-on-join", None, "members added to a group can read what was said before they joined"],
        ["tls-require-client-cert", None, "with --tls-client-ca: refuse TLS clients without a valid certificate"],
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
        self["content-checks"] = []

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

    def opt_content_check(self, reference: str) -> None:
        """Run the content checker(s) at MODULE:ATTRIBUTE (a callable checker(context, item) or a
        list of them; repeatable, in order) on every message before it is stored"""
        try:
            self["content-checks"].extend(load_checkers(reference))
        except ContentCheckError as error:
            raise usage.UsageError(str(error)) from None

    def _content(self) -> None:
        """The blocklist (read now: a bad file is a one-line error) and the content checkers, in order."""
        self.blocklist = None
        checkers = ContentPipeline()
        action = self["blocklist-action"]
        if action is not None and action not in ("reject", "flag"):
            raise usage.UsageError(f"--blocklist-action is reject or flag, not {action!r}")
        if self["blocklist"] is not None:
            self.blocklist = BlocklistFile(os.path.abspath(self["blocklist"]), interval=self["blocklist-interval"])
            try:
                self.blocklist.load()
            except BlocklistError as error:
                raise usage.UsageError(f"--blocklist: {error}") from None
            checkers.add(PhishingChecker(self.blocklist, action or "reject"))
        elif action is not None:
            raise usage.UsageError("--blocklist-action needs --blocklist FILE")
        try:
            for checker in self["content-checks"]:
                checkers.add(checker)
        except ContentCheckError as error:
            raise usage.UsageError(f"--content-check: {error}") from None
        self.content_checkers = checkers.checkers

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["tls-profile"] not in ("intermediate", "modern"):
            raise usage.UsageError(f"--tls-profile is intermediate or modern, not {self['tls-profile']!r}")
        if (self["tls-cert"] is None) != (self["tls-key"] is None):
            raise usage.UsageError("pass --tls-cert and --tls-key together (a certificate needs its key)")
        if self["tls-require-client-cert"] and self["tls-client-ca"] is None:
            raise usage.UsageError("--tls-require-client-cert needs --tls-client-ca FILE (the CA that signs client certificates)")
        if self["max-outbound-buffer"] < self["max-frame"]:
            raise usage.UsageError("--max-outbound-buffer must be at least --max-frame (one frame must fit)")
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
        self._content()
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
            stop_timeout=self["stop-timeout"],
            ack_timeout=self["ack-timeout"],
            max_unacked=self["max-unacked"],
            sync_page=self["sync-page"],
            max_body=self["max-body"],
            token_ttl=self["token-ttl"],
            login_failures=self["login-failures"],
            login_failures_per_ip=self["login-failures-per-ip"],
            login_window=self["login-window"],
            login_backoff=self["login-backoff"],
            login_backoff_max=self["login-backoff-max"],
            account_check_interval=self["account-check-interval"],
            max_devices=self["max-devices"],
            device_policy=self["device-policy"],
            new_device_history=self["new-device-history"],
            retention=self["retention"],
            prune_interval=self["prune-interval"],
            handshake_timeout=self["handshake-timeout"],
            max_outbound_buffer=self["max-outbound-buffer"],
            max_connections_per_ip=self["max-connections-per-ip"],
            max_connections_per_user=self["max-connections-per-user"],
            send_rate=self["send-rate"],
            send_burst=self["send-burst"],
            sync_rate=self["sync-rate"],
            sync_burst=self["sync-burst"],
            lookup_rate=self["lookup-rate"],
            lookup_burst=self["lookup-burst"],
            user_rate_factor=self["user-rate-factor"],
            ip_rate_factor=self["ip-rate-factor"],
            conversation_rate_factor=self["conversation-rate-factor"],
            probe_burst=self["probe-burst"],
            probe_interval=self["probe-interval"],
        )


def makeService(options: Options, reactor: Any = None, passwords: Passwords | None = None) -> IMServerService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    _, default_cert, default_key = default_cert_paths()
    cert = options["tls-cert"] or default_cert
    key = options["tls-key"] or default_key
    modern = options["tls-profile"] == "modern"
    tls_cache: list[ServerTLS] = []

    def tls_options() -> ServerTLS:
        if not tls_cache:
            tls_cache.append(
                ServerTLS(
                    cert,
                    key,
                    modern=modern,
                    client_ca_path=options["tls-client-ca"],
                    require_client_cert=bool(options["tls-require-client-cert"]),
                )
            )
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
    if service.stop_reactor_on_failure:
        # This process is ours: a server, from now until it stops.
        tune_garbage_collector()
        tune_thread_switching()
    if len(options["extensions"]):
        service.hub.checks.append(options["extensions"].server_check)
    for name, checker in getattr(options, "content_checkers", ()):
        service.hub.content.add(checker, name)
    if getattr(options, "blocklist", None) is not None:
        options.blocklist.clock = reactor
        options.blocklist.setServiceParent(service)  # polls the file while the server runs
    if tls_cache:
        # Replaced certificate files serve new connections without a restart (SIGHUP: under twistd).
        under_twistd = getattr(options, "parent", None) is not None
        reloader = TLSReloader(tls_cache[0], reactor, options["tls-reload"], sighup=under_twistd)
        reloader.setServiceParent(service)
    return service
