"""
The failed-login limiter: a plain object driven by a clock (anything with ``seconds()``).

Password logins are counted per user name and per IP address.  After ``login_failures`` failed
attempts for one name (``login_failures_per_ip`` from one address) within ``login_window``
seconds, that name (address) is locked for ``login_backoff`` seconds: its attempts are refused
with ``RATE_LIMITED`` and a reason saying when to try again, *without* checking the password, so
a guesser learns nothing more and costs the server no hashing.  Each further lockout doubles the
time, up to ``login_backoff_max``; a name or address left alone that long starts afresh.  A
successful login clears its name's record (not its address's: one user who knows their password
must not reset the count of a guesser behind the same address).

An attempt counts from the moment it starts: the limit covers ``failures + in flight``, so a
guesser cannot slip a hundred attempts past it by sending them at once while the first ones are
still being hashed.

Nothing depends on whether the account exists: a name that does not exist fails, is counted and
is locked exactly like one that does, and a refusal looks the same for both.

Only password logins are counted.  A resume token is 32 random bytes (nothing to guess) and a
certificate login is proven by TLS; counting them would let anyone who knows a user's name lock
that user's devices out of reconnecting.  While a name is locked its devices still reconnect with
their resume tokens.

Memory follows the names and addresses that failed lately: records no longer needed are forgotten
every ``SWEEP_INTERVAL``.  Records are only made by attempts that reached the password check, so
their number is bounded by the hashing the server can do in ``login_window``.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Hashable, Iterator

import attrs
from twisted.logger import Logger

from imkit.server.limits import LogThrottle

SWEEP_INTERVAL = 60.0
IN_FLIGHT_RETRY = 1.0
"""Seconds to wait when the limit is reached by attempts still being checked (they finish soon)."""


@attrs.frozen
class Refusal:
    """Why an attempt is refused unchecked, and from when (clock seconds) to try again."""

    retry_at: float
    reason: str


class _Record:
    __slots__ = ("failures", "pending", "strikes", "locked_until", "last")

    def __init__(self) -> None:
        self.failures: deque[float] = deque()
        """When the failures within the window happened, oldest first."""
        self.pending = 0
        """Attempts started and not finished yet."""
        self.strikes = 0
        """Lockouts so far (each doubles the next one's length)."""
        self.locked_until = 0.0
        self.last = 0.0
        """The latest failure."""

    def expire(self, now: float, window: float) -> None:
        failures = self.failures
        while failures and failures[0] <= now - window:
            failures.popleft()


class LoginLimiter:
    """
    ``begin(user, ip)`` before checking a password (a Refusal, or None and the attempt counted as
    in flight), then exactly one of ``succeeded``, ``failed`` or ``abandoned`` (no verdict: a
    store error) with the same arguments.
    """

    log = Logger()

    def __init__(self, settings: Any, clock: Any) -> None:
        self.clock = clock
        self.per_user = max(0, settings.login_failures)
        self.per_ip = max(0, settings.login_failures_per_ip)
        self.window = settings.login_window
        self.backoff = settings.login_backoff
        self.backoff_max = max(settings.login_backoff_max, settings.login_backoff)
        self.forget_after = max(self.window, self.backoff_max)
        self.enabled = (self.per_user > 0 or self.per_ip > 0) and self.window > 0 and self.backoff > 0
        self._records: dict[Hashable, _Record] = {}
        self._next_sweep: float | None = None
        self._log_throttle = LogThrottle()
        self.refused = 0
        """Attempts refused unchecked so far, for the curious (tests, benchmarks)."""
        self.lockouts = 0

    def __len__(self) -> int:
        return len(self._records)

    def _keys(self, user: str, ip: str) -> Iterator[tuple[Hashable, int, str]]:
        if self.per_user:
            yield ("user", user), self.per_user, "for this user name"
        if self.per_ip:
            yield ("ip", ip), self.per_ip, "from this address"

    # The hub's calls ---------------------------------------------------------------------------

    def begin(self, user: str, ip: str) -> Refusal | None:
        if not self.enabled:
            return None
        now = self.clock.seconds()
        if self._next_sweep is not None and now >= self._next_sweep:
            self.sweep(now)
        refusal: Refusal | None = None
        for key, limit, where in self._keys(user, ip):
            record = self._records.get(key)
            if record is None:
                continue
            self._refresh(record, now)
            if record.locked_until > now:
                retry_at = record.locked_until
                reason = f"too many failed logins {where}; try again in {math.ceil(retry_at - now)} s"
            elif len(record.failures) + record.pending >= limit:
                retry_at = now + IN_FLIGHT_RETRY
                reason = f"too many logins under way {where}; try again in {math.ceil(IN_FLIGHT_RETRY)} s"
            else:
                continue
            if refusal is None or retry_at > refusal.retry_at:
                refusal = Refusal(retry_at, reason)
        if refusal is not None:
            self.refused += 1
            return refusal
        for key, _limit, _where in self._keys(user, ip):
            record = self._records.get(key)
            if record is None:
                record = self._records[key] = _Record()
                if self._next_sweep is None:
                    self._next_sweep = now + SWEEP_INTERVAL
            record.pending += 1
        return None

    def failed(self, user: str, ip: str) -> None:
        if not self.enabled:
            return
        now = self.clock.seconds()
        for key, limit, where in self._keys(user, ip):
            record = self._records.get(key)
            if record is None:
                record = self._records[key] = _Record()
            else:
                record.pending = max(0, record.pending - 1)
                self._refresh(record, now)
            record.failures.append(now)
            record.last = now
            if len(record.failures) >= limit:
                record.strikes += 1
                length = min(self.backoff * 2 ** min(record.strikes - 1, 32), self.backoff_max)
                record.locked_until = now + length
                record.failures.clear()
                self.lockouts += 1
                if self._log_throttle.allow(key, now):
                    self.log.warn(
                        "{count} failed logins {where} ({what} {name!r}) within {window:g} s: refusing its logins for {length:g} s",
                        count=limit, where=where, what=key[0], name=key[1], window=self.window, length=length,
                    )
        if self._next_sweep is None:
            self._next_sweep = now + SWEEP_INTERVAL

    def succeeded(self, user: str, ip: str) -> None:
        if not self.enabled:
            return
        self._records.pop(("user", user), None)
        record = self._records.get(("ip", ip))
        if record is not None:
            record.pending = max(0, record.pending - 1)

    def abandoned(self, user: str, ip: str) -> None:
        if not self.enabled:
            return
        for key, _limit, _where in self._keys(user, ip):
            record = self._records.get(key)
            if record is not None:
                record.pending = max(0, record.pending - 1)

    # Housekeeping ------------------------------------------------------------------------------

    def _refresh(self, record: _Record, now: float) -> None:
        record.expire(now, self.window)
        if record.strikes and now - max(record.last, record.locked_until) >= self.forget_after:
            record.strikes = 0  # left alone long enough: the next lockout is a first one again

    def sweep(self, now: float) -> None:
        """Forget the records that no longer limit anything."""
        keep = {}
        for key, record in self._records.items():
            if record.pending or now - max(record.last, record.locked_until) < self.forget_after:
                keep[key] = record
        self._records = keep
        self._next_sweep = now + SWEEP_INTERVAL if keep else None
