"""
Resource and rate limits, as plain objects driven by a clock (anything with ``seconds()``; the
held syncs also need its ``callLater``).  Nothing here touches a socket or the store.

- ``TokenBucket`` and ``BucketSet``: the token buckets everything else is made of.
- ``RateLimits``: sends, syncs and lookups per device, user, IP address and conversation.
- ``ProbeGuard``: the anti-crawler rule.  A user refused for many *different* users or
  conversations (unknown recipients, conversations they are not in) is throttled and logged.
- ``ConnectionCount``: open connections per key (per IP address at the listener).
- ``OutboundBuffer``: what a connection holds while its transport says "stop" (a slow reader),
  with the limit past which the reader is dropped.
- ``Limits``: what the hub asks of all of the above, per server: may this send, sync, lookup or
  login go ahead, and if not, until when must it wait.

How the answers look on the wire:

- A send over its rate gets a ``SendAck`` with status ``RATE_LIMITED`` whose ``sent_at`` is the
  server time (ms) from which to send it again.  So that a device's messages are still stored in
  the order it sent them, its later sends are refused the same way until the refused one comes
  back; ``server_id`` names the send the server waits for.  The client pauses its outbox until
  then and resends that send first, then the others in order, a few at a time.
- A sync over its rate is answered late: it is held (in order, per connection) until the rate
  allows it.  A client that gives up waiting and asks again with the same cursors replaces the
  held request rather than adding one.
- A lookup (``Query``, ``ReceiptsQuery``) over its rate is answered at once with status
  ``RATE_LIMITED``; a ``QueryResult``'s reason names the server time (ms) to ask again.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from typing import Any, Callable, Hashable, Iterable

import attrs

from twisted.logger import Logger

from imkit.session.server import CLOSED, READY
from imkit.wire import schema

SEND = "send"
SYNC = "sync"
LOOKUP = "lookup"

ORDER_GRACE = 30.0
"""Seconds after its retry time a refused send holds back the device's later sends at most (a
client that cancelled it never sends it again)."""
MIN_RETRY = 0.05
"""Sends held back behind a refused one are told to come back no sooner than this."""
MAX_HELD_SYNCS = 8
"""Syncs one connection may have waiting for their rate; more are dropped (the client asks again)."""
SWEEP_INTERVAL = 60.0
"""How often idle (full) buckets are forgotten, so memory follows the active keys."""


def host_of(peer: str) -> str:
    """The address part of a ``host:port`` peer name (IPv6 hosts contain colons too)."""
    host, sep, _port = peer.rpartition(":")
    return host if sep else peer


def to_ms(seconds: float) -> int:
    """Server time in whole milliseconds, rounded up: "retry at" must not be early."""
    return int(math.ceil(seconds * 1000))


class TokenBucket:
    """``capacity`` tokens, one more every ``interval`` seconds: the plain rate limiter."""

    __slots__ = ("capacity", "interval", "tokens", "updated")

    def __init__(self, capacity: float, interval: float, now: float) -> None:
        self.capacity = capacity
        self.interval = interval
        self.tokens = float(capacity)
        self.updated = now

    def _refill(self, now: float) -> None:
        if self.interval > 0:
            if now > self.updated:
                self.tokens = min(self.capacity, self.tokens + (now - self.updated) / self.interval)
                self.updated = now
        else:
            self.tokens = self.capacity
            self.updated = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        self._refill(now)
        if self.tokens < cost:
            return False
        self.tokens -= cost
        return True

    def ready_at(self, now: float) -> float:
        """When a token will be there (``now`` if one is)."""
        self._refill(now)
        if self.tokens >= 1:
            return now
        return self.updated + (1 - self.tokens) * self.interval

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.capacity


class BucketSet:
    """
    One token bucket per key, all of one size, made on first use.  A full bucket is the same as
    no bucket, so full ones are forgotten every ``SWEEP_INTERVAL``: memory follows the keys
    that were active lately, not every key ever seen.
    """

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self.interval = 1.0 / rate
        self._buckets: dict[Hashable, TokenBucket] = {}
        self._next_sweep: float | None = None

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._buckets

    def ready_at(self, key: Hashable, now: float) -> float | None:
        """None if ``key`` may go now, else the time it may."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return None
        at = bucket.ready_at(now)
        return None if at <= now else at

    def take(self, key: Hashable, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.burst, self.interval, now)
            if self._next_sweep is None:
                self._next_sweep = now + SWEEP_INTERVAL
        taken = bucket.take(now)
        if self._next_sweep is not None and now >= self._next_sweep:
            self.sweep(now)
        return taken

    def sweep(self, now: float) -> None:
        self._buckets = {key: bucket for key, bucket in self._buckets.items() if not bucket.full(now)}
        self._next_sweep = now + SWEEP_INTERVAL if self._buckets else None


@attrs.frozen
class Who:
    """Whom a request counts against."""

    user: str
    device: str
    ip: str


class RateLimits:
    """
    Token buckets for sends, syncs and lookups, each per device, per user (all their devices),
    per IP address (all users behind it) and per conversation (all its senders).

    A device gets ``<action>_rate`` per second with bursts of ``<action>_burst``; a user, an
    address and a conversation get that many times ``user_rate_factor``, ``ip_rate_factor`` and
    ``conversation_rate_factor`` (0 turns a scope off; a rate of 0 turns the action's limits
    off).  A request takes a token from every bucket it counts against, or from none: one it
    cannot have is not spent elsewhere.
    """

    def __init__(self, settings: Any) -> None:
        self.scopes: dict[str, list[tuple[str, BucketSet]]] = {}
        factors = (
            ("device", 1.0),
            ("user", settings.user_rate_factor),
            ("ip", settings.ip_rate_factor),
            ("conversation", settings.conversation_rate_factor),
        )
        for action, rate, burst in (
            (SEND, settings.send_rate, settings.send_burst),
            (SYNC, settings.sync_rate, settings.sync_burst),
            (LOOKUP, settings.lookup_rate, settings.lookup_burst),
        ):
            scopes: list[tuple[str, BucketSet]] = []
            if rate > 0:
                for scope, factor in factors:
                    if factor > 0:
                        scopes.append((scope, BucketSet(rate * factor, burst * factor)))
            self.scopes[action] = scopes

    def enabled(self, action: str) -> bool:
        return bool(self.scopes[action])

    def check(self, action: str, who: Who, conversations: Iterable[str], now: float) -> float | None:
        """None (and the tokens taken) if the request may go now; else when it may."""
        scopes = self.scopes[action]
        if not scopes:
            return None
        keyed = {"device": ((who.user, who.device),), "user": (who.user,), "ip": (who.ip,), "conversation": tuple(conversations)}
        latest: float | None = None
        plan: list[tuple[BucketSet, Hashable]] = []
        for scope, buckets in scopes:
            for key in keyed[scope]:
                at = buckets.ready_at(key, now)
                if at is not None and (latest is None or at > latest):
                    latest = at
                plan.append((buckets, key))
        if latest is not None:
            return latest
        for buckets, key in plan:
            buckets.take(key, now)
        return None


class ProbeGuard:
    """
    The anti-crawler rule.  Every refusal that tells a user "no such user" or "not yours"
    (a send to an unknown name, a sync, query or send for a conversation they are not in) is a
    *miss*.  Misses for a target missed lately are free (a typo retried, a stale sync); each new
    one takes a token from the user's bucket of ``burst``, one more every ``interval``
    seconds.  A user whose bucket is empty (after ``burst`` misses in a row) is throttled: every
    send, sync and lookup of theirs waits until it has a token again, so a crawler gets one more
    probe per ``interval``.

    Counted per user, not per device: device names are the client's choice.
    """

    def __init__(self, burst: int, interval: float) -> None:
        self.burst = burst
        self.interval = interval
        self.enabled = burst > 0 and interval > 0
        self._buckets = BucketSet(1.0 / interval, burst) if self.enabled else None
        self._recent: dict[str, OrderedDict[str, None]] = {}
        self._blocked: dict[str, float] = {}
        self._latest = 0.0

    def missed(self, user: str, target: str, now: float) -> bool:
        """Count a miss; True if it throttles the user (who was not throttled just before)."""
        if self._buckets is None:
            return False
        recent = self._recent.get(user)
        if recent is None:
            if len(self._recent) > 2 * len(self._buckets) + 1024:
                # Users whose bucket was forgotten (full again) lose their recent list too.
                self._recent = {name: seen for name, seen in self._recent.items() if name in self._buckets}
            recent = self._recent[user] = OrderedDict()
        if target in recent:
            recent.move_to_end(target)
            return False
        recent[target] = None
        if len(recent) > 2 * self.burst:
            recent.popitem(last=False)
        self._buckets.take(user, now)
        until = self._buckets.ready_at(user, now)
        if until is None:
            return False  # tokens left
        newly = user not in self._blocked
        self._blocked[user] = until
        self._latest = max(self._latest, until)
        return newly

    def throttling(self, now: float) -> bool:
        """Is anyone throttled now?"""
        if self._blocked and now >= self._latest:
            self._blocked.clear()
        return bool(self._blocked)

    def blocked(self, user: str, now: float) -> float | None:
        """None, or when a throttled user may act again."""
        if not self._blocked:
            return None
        until = self._blocked.get(user)
        if until is None:
            return None
        if now >= until:
            del self._blocked[user]
            return None
        return until


class ConnectionCount:
    """Open connections per key (an IP address); ``limit`` 0 means no limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[Hashable, int] = {}

    def __getitem__(self, key: Hashable) -> int:
        return self._open.get(key, 0)

    def add(self, key: Hashable) -> int:
        """Count one more; returns how many there are now."""
        count = self._open.get(key, 0) + 1
        self._open[key] = count
        return count

    def remove(self, key: Hashable) -> None:
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)

    def over(self, count: int) -> bool:
        return 0 < self.limit < count


class OutboundBuffer:
    """
    Bytes a connection has written while its transport asked it to pause (the peer is not
    reading fast enough): held here, at most ``limit`` of them, and written when the transport
    resumes.  ``hold`` says False once the limit would be passed: drop the reader.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.paused = False
        self.size = 0
        self.peak = 0
        self._chunks: list[bytes] = []

    def hold(self, data: bytes) -> bool:
        if self.limit > 0 and self.size + len(data) > self.limit:
            return False
        self._chunks.append(data)
        self.size += len(data)
        if self.size > self.peak:
            self.peak = self.size
        return True

    def take(self) -> bytes:
        chunks, self._chunks = self._chunks, []
        self.size = 0
        return b"".join(chunks)

    def clear(self) -> None:
        self._chunks = []
        self.size = 0


class LogThrottle:
    """At most one log line per key per ``interval`` (a flood must not flood the log too)."""

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._last: dict[Hashable, float] = {}
        self.suppressed: dict[Hashable, int] = {}

    def allow(self, key: Hashable, now: float) -> bool:
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            return False
        if len(self._last) > 10_000:
            self._last = {k: t for k, t in self._last.items() if now - t < self.interval}
        self._last[key] = now
        return True

    def take_suppressed(self, key: Hashable) -> int:
        return self.suppressed.pop(key, 0)


class Limits:
    """
    The limits one hub enforces: rates, the anti-crawler rule, connections per user, and the
    order of a device's sends around a refusal.  The hub calls ``send``, ``sync_requested``,
    ``lookup``, ``missed``, ``login_requested`` and ``connection_lost``.
    """

    log = Logger()

    def __init__(self, settings: Any, clock: Any) -> None:
        self.settings = settings
        self.clock = clock
        self.rates = RateLimits(settings)
        self.probes = ProbeGuard(settings.probe_burst, settings.probe_interval)
        self._order: dict[tuple[str, str], tuple[int, float, float]] = {}
        """(user, device) -> (refused send, its retry time, when the hold lapses)."""
        self._claims: dict[str, dict[Any, None]] = {}
        """user -> connections logged in or logging in as them."""
        self._claimed: dict[Any, str] = {}
        self._held: dict[Any, deque] = {}
        """connection -> syncs waiting for their rate, oldest first."""
        self._calls: dict[Any, Any] = {}
        self._log_throttle = LogThrottle()
        self.refused = {SEND: 0, SYNC: 0, LOOKUP: 0, "connections": 0}
        """What was held back so far, for the curious (tests, benchmarks)."""

    def _throttling(self) -> bool:
        return bool(self.probes._blocked) and self.probes.throttling(self.clock.seconds())

    # Sends -------------------------------------------------------------------------------------

    def send(self, conn: Any, client_msg_id: int, conversation: str) -> tuple[int, int] | None:
        """
        None if the send may be stored now.  Else when to send it again (server time, ms) and
        the send the server waits for first: this one, or an earlier one of the device that was
        refused and has not come back yet.
        """
        if not self.rates.scopes[SEND] and not self._order and not self._throttling():
            return None  # nothing limited: the common case costs this test
        now = self.clock.seconds()
        key = (conn.user, conn.device)
        held = self._order.get(key)
        if held is not None:
            held_id, retry_at, lapses = held
            if now < lapses and client_msg_id != held_id:
                # An earlier send of this device is waiting: this one must not overtake it.  (If
                # that one is late, the client may have given up on it: do not have it spin.)
                self.refused[SEND] += 1
                return to_ms(max(retry_at, now + (MIN_RETRY if now < retry_at + 1.0 else 1.0))), held_id
            del self._order[key]
        who = Who(conn.user, conn.device, host_of(conn.peer))
        retry = self.probes.blocked(who.user, now)
        if retry is None:
            retry = self.rates.check(SEND, who, (conversation,), now)
        if retry is None:
            return None
        self.refused[SEND] += 1
        if len(self._order) > 10_000:
            self._order = {k: v for k, v in self._order.items() if v[2] > now}
        self._order[key] = (client_msg_id, retry, max(retry, now) + ORDER_GRACE)
        return to_ms(retry), client_msg_id

    # Syncs -------------------------------------------------------------------------------------

    def sync_requested(self, conn: Any, packet: Any, run: Callable[[Any, Any], None]) -> None:
        """Run ``run(conn, packet)`` now if the rates allow, else hold it until they do."""
        held = self._held.get(conn)
        if held is None:
            if not self.rates.scopes[SYNC] and not self._throttling():
                run(conn, packet)
                return
            retry = self._sync_retry(conn, packet)
            if retry is None:
                run(conn, packet)
                return
            self.refused[SYNC] += 1
            self._held[conn] = deque([packet])
            self._calls[conn] = self.clock.callLater(max(0.0, retry - self.clock.seconds()), self._release, conn, run)
            return
        self.refused[SYNC] += 1
        same = (packet.flags, packet.limit, packet.cursors)
        for index, waiting in enumerate(held):
            if (waiting.flags, waiting.limit, waiting.cursors) == same:
                # Asked again (the client gave up waiting): answer the new request id instead.
                held[index] = packet
                return
        if len(held) >= MAX_HELD_SYNCS:
            if self._log_throttle.allow(("syncs", conn.user), self.clock.seconds()):
                self.log.warn("dropping syncs of {user} ({peer}): too many waiting for their rate", user=conn.user, peer=conn.peer)
            return
        held.append(packet)

    def _sync_retry(self, conn: Any, packet: Any) -> float | None:
        now = self.clock.seconds()
        who = Who(conn.user, conn.device, host_of(conn.peer))
        retry = self.probes.blocked(who.user, now)
        if retry is not None:
            return retry
        conversations = sorted({cursor.conversation for cursor in packet.cursors})[:8] if packet.flags & schema.SYNC_ONLY_LISTED else ()
        return self.rates.check(SYNC, who, conversations, now)

    def _release(self, conn: Any, run: Callable[[Any, Any], None]) -> None:
        self._calls.pop(conn, None)
        held = self._held.get(conn)
        if held is None:
            return
        while held:
            if conn.state == CLOSED:
                break
            retry = self._sync_retry(conn, held[0])
            if retry is not None:
                self._calls[conn] = self.clock.callLater(max(0.0, retry - self.clock.seconds()), self._release, conn, run)
                return
            run(conn, held.popleft())
        self._held.pop(conn, None)

    def held_syncs(self, conn: Any) -> int:
        return len(self._held.get(conn, ()))

    # Lookups -----------------------------------------------------------------------------------

    def lookup(self, conn: Any, conversation: str | None) -> int | None:
        """None if a query may be answered now, else the server time (ms) to ask again."""
        if not self.rates.scopes[LOOKUP] and not self._throttling():
            return None
        now = self.clock.seconds()
        who = Who(conn.user, conn.device, host_of(conn.peer))
        retry = self.probes.blocked(who.user, now)
        if retry is None:
            retry = self.rates.check(LOOKUP, who, (conversation,) if conversation else (), now)
        if retry is None:
            return None
        self.refused[LOOKUP] += 1
        return to_ms(retry)

    # Anti-crawler ------------------------------------------------------------------------------

    def missed(self, conn: Any, target: str, what: str = "conversation") -> None:
        """``conn``'s user was refused ``target`` (a user or a conversation it may not see)."""
        user = conn.user
        if user is None or not self.probes.enabled:
            return
        now = self.clock.seconds()
        if self.probes.missed(user, target, now) and self._log_throttle.allow(("crawler", user), now):
            self.log.warn(
                "throttling {user} (device {device}, {peer}): refused more than {burst} different users or "
                "conversations lately, the last a {what} {target!r}; probable crawler",
                user=user, device=conn.device, peer=conn.peer, burst=self.probes.burst, what=what, target=target[:80],
            )

    # Connections per user ----------------------------------------------------------------------

    def login_requested(self, conn: Any, user: str, device: str) -> str | None:
        """None if ``conn`` may try to log in as ``user``, else why not (TOO_MANY_CONNECTIONS)."""
        limit = self.settings.max_connections_per_user
        if limit <= 0:
            return None
        claims = self._claims.setdefault(user, {})
        for other in [other for other in claims if other.state == CLOSED]:
            del claims[other]
            self._claimed.pop(other, None)
        # A device logging in again replaces its old connection: that one does not count.
        others = sum(1 for other in claims if other is not conn and (other.state != READY or other.device != device))
        if others >= limit:
            self.refused["connections"] += 1
            if self._log_throttle.allow(("user", user), self.clock.seconds()):
                self.log.warn("refusing a login of {user} from {peer}: {count} connections already", user=user, peer=conn.peer, count=others)
            return f"{user} already has {others} connections, the most allowed; close one or try again later"
        previous = self._claimed.get(conn)
        if previous is not None and previous != user:
            self._claims.get(previous, {}).pop(conn, None)
        claims[conn] = None
        self._claimed[conn] = user
        return None

    def connection_lost(self, conn: Any) -> None:
        call = self._calls.pop(conn, None)
        if call is not None and call.active():
            call.cancel()
        self._held.pop(conn, None)
        user = self._claimed.pop(conn, None)
        if user is not None:
            claims = self._claims.get(user)
            if claims is not None:
                claims.pop(conn, None)
                if not claims:
                    del self._claims[user]

    def stop(self) -> None:
        """Cancel every held sync (the server is stopping)."""
        for call in self._calls.values():
            if call.active():
                call.cancel()
        self._calls.clear()
        self._held.clear()
