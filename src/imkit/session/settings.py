"""Tunable timings and limits of the sessions, with defaults that suit a chat service."""

from __future__ import annotations

import attrs

from imkit.wire.schema import DEFAULT_MAX_FRAME


@attrs.frozen
class ServerSettings:
    """Per-connection limits and timers of the server side."""

    max_frame: int = DEFAULT_MAX_FRAME
    heartbeat: float = 30.0
    """How often clients should ping when otherwise idle (told to them in HelloOk)."""
    idle_timeout: float = 90.0
    """A connection that sends nothing for this long is closed."""
    login_timeout: float = 20.0
    """Hello and login must be done within this long of connecting."""
    stop_timeout: float = 10.0
    """On stop, logins, syncs and requests under way get this long to finish before the store closes."""
    ack_timeout: float = 5.0
    """First resend of an unacknowledged delivery after this long; doubles up to ack_timeout_max."""
    ack_timeout_max: float = 60.0
    max_unacked: int = 10_000
    """Deliveries in flight per connection; past it, the client is told to sync instead."""
    sync_page: int = 500
    """Messages per sync answer at most (pages are also kept under the frame size)."""
    max_body: int = 256 * 1024
    token_ttl: float = 7 * 24 * 3600.0
    """How long a resume token (issued at every login, replacing the device's previous one) lets a
    device reconnect without its password."""
    # Failed logins and disabled accounts (imkit.server.logins) ---------------------------------
    login_failures: int = 5
    """Failed password logins for one user name within ``login_window`` after which its next
    attempts are refused (RATE_LIMITED, unchecked) for ``login_backoff`` seconds, doubling at each
    further lockout up to ``login_backoff_max`` (0: no per-account limit).  Names that do not exist
    are counted the same way, so a refusal tells nothing about whether an account exists."""
    login_failures_per_ip: int = 20
    """The same, for failed password logins from one IP address (0: no per-address limit)."""
    login_window: float = 300.0
    login_backoff: float = 30.0
    login_backoff_max: float = 900.0
    account_check_interval: float = 10.0
    """How often the server looks for disabled users among those online and logs them out (they
    are also refused at every login); 0: only at login."""
    agent: str = "imkit"
    max_devices: int = 10
    """Devices of one user logged in at once."""
    device_policy: str = "evict-oldest"
    """At the device limit, a new login ``evict-oldest`` (closes the longest-connected device) or is ``refuse``d."""
    new_device_history: int | None = None
    """Messages per conversation a device with no cursors gets on its first sync (None: all)."""
    retention: float | None = None
    """Server-wide message TTL in seconds (None: keep for ever); conversations may set their own."""
    prune_interval: float = 3600.0
    fan_out_slice: int = 500
    """Members served per reactor turn when a message goes to a large group."""
    small_group: int = 100
    """Up to this many members, receipt answers list every reader, not just counts."""
    typing_interval: float = 1.0
    """A device may send one typing or presence packet per this many seconds; more are dropped."""
    presence_grace: float = 1.0
    """
    A user's first device to log in is announced online to their contacts this long after the
    login, unless it states its presence first: a client that reconnects invisible (it says so
    right after its login) is then never seen online.  0: at once.
    """
    # Resource and rate limits (imkit.server.limits) --------------------------------------------
    handshake_timeout: float = 10.0
    """A TLS connection whose handshake is not done this long after connecting is dropped."""
    max_outbound_buffer: int = 16 * 1024 * 1024
    """Bytes one connection may have waiting while its reader does not keep up; past it, dropped."""
    max_connections_per_ip: int = 1000
    """Open connections from one IP address (0: no limit); more are refused with TOO_MANY_CONNECTIONS."""
    max_connections_per_user: int = 32
    """Connections logged in or logging in as one user (0: no limit); a device logging in again
    replaces its old connection and does not count twice."""
    send_rate: float = 0.0
    """Sends (or bundles) per second one device may make, sustained (0: no rate limits on sends)."""
    send_burst: int = 100
    sync_rate: float = 0.0
    """Syncs per second one device may ask for (0: no limit); more are answered when the rate allows."""
    sync_burst: int = 50
    lookup_rate: float = 0.0
    """Queries and receipt queries per second one device may ask (0: no limit); more get RATE_LIMITED."""
    lookup_burst: int = 50
    user_rate_factor: float = 3.0
    """A user's devices together get this many times a device's rate and burst (0: no per-user limit)."""
    ip_rate_factor: float = 20.0
    """Everybody behind one IP address together get this many times a device's (0: no per-address limit)."""
    conversation_rate_factor: float = 10.0
    """Everybody in one conversation together get this many times a device's (0: no per-conversation limit)."""
    probe_burst: int = 30
    """Different users or conversations a user may be refused as unknown or not theirs before being
    throttled as a crawler (0: no anti-crawler rule) ..."""
    probe_interval: float = 10.0
    """... and then one more every this many seconds."""


@attrs.frozen
class ClientSettings:
    """Timers of the client side."""

    max_frame: int = DEFAULT_MAX_FRAME
    resend_initial: float = 2.0
    """First resend of an unacknowledged send after this long; then backoff with jitter."""
    resend_max: float = 30.0
    resend_jitter: float = 0.2
    send_timeout: float | None = 300.0
    """A send not acknowledged within this long fails (None: keep trying for ever)."""
    request_timeout: float = 10.0
    """A sync answer not received within this long is asked for again."""
    idle_factor: float = 3.0
    """The connection is considered dead after this many heartbeat intervals of silence."""
    sync_page: int = 500
    agent: str = "imkit-client"
    ack_delay: float = 0.05
    """
    Delivery acks wait up to this long (0: none; they go out at the end of every read), unless
    something else is written first, ``ack_every`` deliveries are waiting, or the client says
    goodbye.  A member of a busy group gets one message a read: waiting a little lets one
    cumulative ack cover several, and spares the server a read for each (a quarter of its CPU
    per delivered copy in ``bench_group.py``).  The sender's own ack never waits for these.
    """
    ack_every: int = 64
    """With ack_delay, this many deliveries waiting are acknowledged at once."""
