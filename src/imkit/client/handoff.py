"""
Handing delivered messages to the application: callbacks and async iterators, in order.

The client saves its positions only for messages the application has actually taken, so that a
restarted bot neither loses nor repeats one.  A callback takes a message when it is called with
it; an iterator takes a message when it yields it (a message waiting in an iterator's queue when
the client stops is not taken, and comes again after a restart).
"""

from __future__ import annotations

import weakref
from collections import deque
from typing import Any, Callable, Iterable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from imkit.model import Message

MessageCallback = Callable[[Message], Any]


class Handoff:
    """
    Passes each message to every callback and every open stream, and reports to ``taken`` each
    message once every consumer has it, in delivery order.
    """

    log = Logger()

    def __init__(self, taken: Callable[[Message], None]) -> None:
        self._taken = taken
        self._callbacks: list[MessageCallback] = []
        self._streams: list[weakref.ref[MessageStream]] = []
        # Messages given to streams that some stream has not yielded yet, oldest first.  A stream
        # receives every message after it was opened, so the longest stream queue says how many
        # of these are still not taken by everyone.
        self._untaken: deque[Message] = deque()
        self.open = True

    def add_callback(self, callback: MessageCallback) -> None:
        self._callbacks.append(callback)

    def remove_callback(self, callback: MessageCallback) -> None:
        self._callbacks.remove(callback)

    def stream(self) -> MessageStream:
        stream = MessageStream(self)
        if not self.open:
            stream._finish(StopAsyncIteration())
            return stream
        self._streams.append(weakref.ref(stream, self._stream_dropped))
        return stream

    def deliver(self, messages: Iterable[Message]) -> None:
        for message in messages:
            if not self.open:
                return  # stopped from inside a callback: the rest is not taken, so it comes again
            for callback in list(self._callbacks):
                try:
                    callback(message)
                except Exception:
                    self.log.failure("message callback {callback!r} failed", callback=callback)
            streams = self._live_streams()
            if not streams:
                self._taken(message)
                continue
            self._untaken.append(message)
            # Queue it everywhere before waking anyone: a woken consumer runs at once, and the
            # message must not count as taken before every stream holds it.
            for stream in streams:
                stream._queue.append(message)
            for stream in streams:
                stream._wake()

    def close(self, error: BaseException | None = None) -> None:
        """
        The client stopped (or failed for good, with ``error``): end every stream now.  Messages
        still queued are not taken.
        """
        self.open = False
        self._untaken.clear()
        streams = self._live_streams()
        self._streams.clear()
        for stream in streams:
            stream._finish(error if error is not None else StopAsyncIteration())

    def reopen(self) -> None:
        self.open = True

    def _live_streams(self) -> list[MessageStream]:
        return [stream for stream in (ref() for ref in self._streams) if stream is not None]

    def _forget(self, stream: MessageStream) -> None:
        self._streams = [ref for ref in self._streams if ref() is not None and ref() is not stream]
        self._advance()

    def _stream_dropped(self, ref: weakref.ref[MessageStream]) -> None:
        """The application let go of a stream without closing it: stop waiting for it."""
        self._streams = [other for other in self._streams if other is not ref]
        self._advance()

    def _advance(self) -> None:
        still_queued = max((len(stream._queue) for stream in self._live_streams()), default=0)
        while len(self._untaken) > still_queued:
            self._taken(self._untaken.popleft())


class MessageStream:
    """
    An async iterator over delivered messages, from the moment it was opened::

        async for message in client.messages():
            ...

    It ends (StopAsyncIteration) when the client stops, and raises the client's error (LoginFailed)
    if it fails for good.  ``close()`` it, or just drop it, when done.
    """

    def __init__(self, handoff: Handoff) -> None:
        self._handoff = handoff
        self._queue: deque[Message] = deque()
        self._waiting: Deferred[None] | None = None
        self._end: BaseException | None = None

    def __aiter__(self) -> MessageStream:
        return self

    async def __anext__(self) -> Message:
        while not self._queue and self._end is None:
            self._waiting = Deferred()
            await self._waiting
        if self._queue:
            message = self._queue.popleft()
            self._handoff._advance()
            return message
        if isinstance(self._end, StopAsyncIteration):
            raise StopAsyncIteration
        raise self._end  # type: ignore[misc]

    def close(self) -> None:
        """Stop receiving; the messages still queued here count as taken by this stream."""
        if self._end is None:
            self._finish(StopAsyncIteration())
            self._handoff._forget(self)

    def _finish(self, end: BaseException) -> None:
        self._queue.clear()
        self._end = end
        self._wake()

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None and not waiting.called:
            waiting.callback(None)
