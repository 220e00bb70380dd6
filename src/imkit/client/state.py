"""
The client's state file: the last sequence the application took in each conversation.

A bot that saves these and passes them back after a restart resumes exactly where it stopped,
whatever the server's per-device cursors say.  The file is small JSON, written atomically (a
temporary file, fsync, rename) on the reactor's thread pool, never on the reactor thread; writes
are coalesced so at most one is in flight and the latest positions win.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from imkit.client.results import StateFileError

FORMAT = "imkit-client-state"
VERSION = 1


class StateFile:
    """
    ``snapshot()`` gives the positions to save (called on the reactor thread when a write
    starts); ``changed()`` says they moved; ``flush()`` waits until the latest are on disk.
    """

    log = Logger()

    def __init__(self, path: str, user: str, reactor: Any, snapshot: Callable[[], dict[str, int]]) -> None:
        self.path = os.path.abspath(path)
        self.user = user
        self._reactor = reactor
        self._snapshot = snapshot
        self._writing = False
        self._dirty = False
        self._idle_waiters: list[Deferred[None]] = []
        self._error: StateFileError | None = None

    def _in_thread(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        reactor = self._reactor
        return deferToThreadPool(reactor, reactor.getThreadPool(), function, *args)

    # Loading -----------------------------------------------------------------------------------

    def load(self) -> Deferred[dict[str, int]]:
        """Deferred[dict]: the saved positions; {} if there is no file yet (start from the beginning)."""
        return self._in_thread(_read, self.path, self.user)

    # Saving ------------------------------------------------------------------------------------

    def changed(self) -> None:
        self._dirty = True
        if not self._writing:
            self._write_next()

    def flush(self) -> Deferred[None]:
        """Fires once everything changed so far is written; fails with StateFileError if the last write failed."""
        if not self._writing and not self._dirty:
            return fail(self._error) if self._error is not None else succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def _write_next(self) -> None:
        if not self._dirty:
            self._writing = False
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if self._error is not None:
                    waiter.errback(self._error)
                else:
                    waiter.callback(None)
            return
        self._dirty = False
        self._writing = True
        content = _encode(self.user, self._snapshot())
        written = self._in_thread(_write_atomically, self.path, content)
        written.addCallbacks(self._written, self._not_written)
        written.addCallback(lambda _: self._write_next())

    def _written(self, _: None) -> None:
        self._error = None

    def _not_written(self, failure: Failure) -> None:
        reason = failure.value.strerror if isinstance(failure.value, OSError) else failure.getErrorMessage()
        self._error = StateFileError(
            f"cannot write the state file {self.path}: {reason}; make its directory writable or pass another state file"
        )
        self.log.error("{error}", error=self._error)


def _encode(user: str, delivered: dict[str, int]) -> bytes:
    document = {"format": FORMAT, "version": VERSION, "user": user, "delivered": dict(sorted(delivered.items()))}
    return (json.dumps(document, indent=1) + "\n").encode("utf-8")


def _read(path: str, user: str) -> dict[str, int]:
    """Runs in a thread: parse and check the state file."""

    def unusable(why: str) -> StateFileError:
        return StateFileError(
            f"cannot use the state file {path}: {why}; "
            "delete it to start from the beginning of every conversation, or pass another state file"
        )

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return {}
    except OSError as error:
        raise unusable(error.strerror or str(error)) from None
    try:
        document = json.loads(raw)
    except ValueError:
        raise unusable("it is not JSON") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise unusable("it is not an imkit client state file")
    if document.get("version") != VERSION:
        raise unusable(f"it has version {document.get('version')!r}, this imkit reads version {VERSION}")
    if document.get("user") != user:
        raise unusable(f"it belongs to user {document.get('user')!r}, not {user!r}")
    delivered = document.get("delivered")
    if not isinstance(delivered, dict) or not all(
        isinstance(conversation, str) and type(seq) is int and seq >= 0 for conversation, seq in delivered.items()
    ):
        raise unusable("its positions are not a map of conversation to sequence number")
    return delivered


def _write_atomically(path: str, content: bytes) -> None:
    """Runs in a thread: readers see the old file or the new one, never half of one."""
    directory = os.path.dirname(path)
    fd, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    # The rename itself must survive a crash too.
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
