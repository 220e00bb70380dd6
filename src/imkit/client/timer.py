"""
One DelayedCall kept at or before a sans-IO core's next deadline.

A core's deadlines move all the time (every write pushes the heartbeat back, every ack removes a
resend); rescheduling a DelayedCall on each change would cost more than the work it schedules.  So
the call is re-armed lazily: only when the new deadline is earlier than the armed call.  A call
that fires early finds nothing due in the core, and its owner simply arms it again.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from twisted.internet.interfaces import IDelayedCall


class DeadlineTimer:
    """
    ``next_deadline()`` gives the core's earliest deadline (or None); ``fire()`` is called when it
    may have passed.  The owner calls ``arm()`` after anything that may have moved the deadline,
    including after ``fire()``.
    """

    def __init__(self, clock: Any, next_deadline: Callable[[], float | None], fire: Callable[[], None]) -> None:
        self._clock = clock
        self._next_deadline = next_deadline
        self._fire = fire
        self._call: IDelayedCall | None = None

    @property
    def armed(self) -> bool:
        return self._call is not None

    def arm(self) -> None:
        deadline = self._next_deadline()
        if deadline is None:
            self.cancel()
            return
        call = self._call
        if call is not None and call.getTime() <= deadline:
            return
        now = self._clock.seconds()
        delay = max(0.0, deadline - now)
        # now + (deadline - now) can round to just below deadline; the call must not fire before
        # the core considers the deadline due, or a simulated clock would spin on it.
        while now + delay < deadline:
            delay = math.nextafter(delay, math.inf)
        if call is not None:
            call.reset(delay)
        else:
            self._call = self._clock.callLater(delay, self._fired)

    def cancel(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _fired(self) -> None:
        self._call = None
        self._fire()
