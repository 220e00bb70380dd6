"""
The content pipeline: checkers that judge every item of a submission before it is stored.

The hub runs it (``hub.content``) after the submission checks of extensions and before
``store.append``, in the per-device queue that keeps a device's sends in order however long a
check takes.  Each checker is called as ``checker(context, item)`` and answers, now or through a
Deferred (or coroutine), with

* ``None`` or ``allow()``: nothing to say;
* ``flag(reason)``: store the message, marked (``IStore.flags``), and report it: a log event
  (``FLAGGED_FORMAT``) and every ``on_flagged`` observer;
* ``reject(reason)`` (or ``raise Rejected(reason)``): store nothing; the sender's ack carries
  ``REJECTED`` and the reason.

Checkers run one after another in the order they were added, each item in turn; the first
rejection ends the check (later checkers are not asked), flags add up.  So a rejection wins over
flags, and a flag over allow.  A checker that fails (raises, or its Deferred fails or outlasts
``timeout``) is logged and answered by ``on_error``: by default the sender is refused with
``INTERNAL_ERROR`` ("try again later"), so a broken checker never lets content through unseen.

Checkers run on the reactor thread: a sync one must be quick.  Wrap slow CPU or file work with
``threaded(checker)`` (a thread from the reactor's pool), or precompute, as ``PhishingChecker``
does with its blocklist.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, Callable, Iterable

import attrs
from twisted.internet import defer, threads
from twisted.internet.error import TimeoutError as _Timeout
from twisted.logger import Logger
from twisted.python.failure import Failure

from imkit.checks import ALLOW, Action, CheckContext, ContentChecker, Rejected, Verdict
from imkit.model import Appended, Message, Submission
from imkit.store.interface import Flag, ItemFlag
from imkit.wire.errors import ErrorCode

FLAGGED_FORMAT = (
    "content flagged: {checker} flagged message {server_id} (seq {seq} of {conversation})"
    " from {sender}/{device}: {reason}"
)
"""The log event of a stored, flagged message (its fields are also in the event, with ``imkit_content="flagged"``)."""

REJECTED_FORMAT = (
    "content rejected: {checker} rejected message {client_msg_id} to {conversation}"
    " from {sender}/{device}: {reason}"
)
"""The log event of a submission a checker refused (``imkit_content="rejected"``)."""

ERROR_REASON = "a content check failed; try again later"


class ContentCheckError(ValueError):
    """A checker that cannot be registered or loaded (the message is one line)."""


@attrs.frozen
class FlagReport:
    """What ``on_flagged`` observers get: the stored mark, the message and the device that sent it."""

    flag: Flag
    message: Message
    device: str

    def fields(self) -> dict[str, Any]:
        """The fields of ``FLAGGED_FORMAT``."""
        flag = self.flag
        return {
            "checker": flag.checker,
            "server_id": flag.server_id,
            "seq": flag.seq,
            "conversation": flag.conversation,
            "sender": flag.sender,
            "device": self.device,
            "reason": flag.reason,
        }

    def line(self) -> str:
        """The report as one line of text (the log event's), for forwarding."""
        return FLAGGED_FORMAT.format(**self.fields())


def checker_name(checker: Any) -> str:
    """A checker's ``name`` attribute, else its function or class name."""
    name = getattr(checker, "name", None)
    if isinstance(name, str) and name:
        return name
    name = getattr(checker, "__name__", None)
    if isinstance(name, str) and name:
        return name
    return type(checker).__name__


class ContentPipeline:
    """
    The content checkers of one hub, in order.

    ``clock`` bounds how long a checker may take (``timeout`` seconds, None for no limit);
    ``on_error`` (an ``Action``) is what a failing checker's verdict becomes.
    """

    log = Logger()

    def __init__(self, clock: Any = None, timeout: float | None = 30.0, on_error: Action = Action.REJECT) -> None:
        self.clock = clock
        self.timeout = timeout
        self.on_error = Action(on_error)
        self._checkers: list[tuple[str, ContentChecker]] = []
        self.on_flagged: list[Callable[[FlagReport], Any]] = []
        """Observers called with a FlagReport for every flag stored (errors are logged, not raised)."""

    def __bool__(self) -> bool:
        return bool(self._checkers)

    def __len__(self) -> int:
        return len(self._checkers)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._checkers]

    @property
    def checkers(self) -> list[tuple[str, ContentChecker]]:
        """(name, checker) pairs, in the order they run."""
        return list(self._checkers)

    def add(self, checker: ContentChecker, name: str | None = None) -> ContentChecker:
        """Run ``checker`` after those added before; its flags are stored under ``name`` (default: ``checker_name``)."""
        if not callable(checker):
            raise ContentCheckError(f"a content checker is callable as checker(context, item), not {checker!r}")
        name = checker_name(checker) if name is None else name
        if not name or not isinstance(name, str):
            raise ContentCheckError(f"a content checker's name is a non-empty str, not {name!r}")
        if name in self.names:
            raise ContentCheckError(f"a content checker named {name!r} is registered already")
        self._checkers.append((name, checker))
        return checker

    # Checking ----------------------------------------------------------------------------------

    def check(self, submission: Submission) -> defer.Deferred:
        """
        Judge every item.  Deferred[tuple[ItemFlag, ...]]: the flags for ``store.append``;
        fails with Rejected (code and reason for the sender's ack) if a checker rejects.
        """
        return defer.ensureDeferred(self._check(submission))

    async def _check(self, submission: Submission) -> tuple[ItemFlag, ...]:
        flags: list[ItemFlag] = []
        for index, item in enumerate(submission.items):
            context = CheckContext(submission, index)
            for name, checker in self._checkers:
                verdict = self._ask(name, checker, context, item)
                if isinstance(verdict, defer.Deferred):
                    verdict = await verdict
                action = verdict.action
                if action is Action.ALLOW:
                    continue
                if action is Action.FLAG:
                    flags.append(ItemFlag(index, name, verdict.reason))
                    continue
                self.log.warn(
                    REJECTED_FORMAT,
                    imkit_content="rejected",
                    checker=name,
                    client_msg_id=submission.client_msg_id,
                    conversation=submission.conversation,
                    sender=submission.sender,
                    device=submission.sender_device,
                    reason=verdict.reason,
                )
                raise Rejected(verdict.reason, verdict.code)
        return tuple(flags)

    def _ask(self, name: str, checker: ContentChecker, context: CheckContext, item: Any) -> Verdict | defer.Deferred:
        """The checker's verdict, or a Deferred of it that never fails."""
        try:
            result = checker(context, item)
        except Rejected as error:
            return Verdict(Action.REJECT, error.reason, error.code)
        except Exception:
            return self._failed(Failure(), name)
        if result is None:
            return ALLOW
        if type(result) is Verdict:
            return result
        if inspect.iscoroutine(result):
            result = defer.ensureDeferred(result)
        if not isinstance(result, defer.Deferred):
            return self._verdict(result, name)
        if self.timeout is not None and self.clock is not None:
            result.addTimeout(self.timeout, self.clock)
        return result.addCallbacks(self._verdict, self._failed, (name,), None, (name,))

    def _verdict(self, result: Any, name: str) -> Verdict:
        if result is None:
            return ALLOW
        if isinstance(result, Verdict):
            return result
        return self._failed(Failure(TypeError(f"returned {result!r}, not a Verdict or None")), name)

    def _failed(self, failure: Failure, name: str) -> Verdict:
        if failure.check(Rejected):
            return Verdict(Action.REJECT, failure.value.reason, failure.value.code)
        if failure.check(_Timeout, defer.TimeoutError):
            self.log.error("content check {checker} took more than {timeout} s", checker=name, timeout=self.timeout)
        elif failure.check(TypeError) and str(failure.value).startswith("returned "):
            self.log.error("content check {checker} {problem}", checker=name, problem=failure.getErrorMessage())
        else:
            self.log.failure("content check {checker} failed", failure, checker=name)
        if self.on_error is Action.REJECT:
            return Verdict(Action.REJECT, ERROR_REASON, ErrorCode.INTERNAL_ERROR)
        if self.on_error is Action.FLAG:
            return Verdict(Action.FLAG, f"check failed: {failure.getErrorMessage()}")
        return ALLOW

    # Reporting ---------------------------------------------------------------------------------

    def stored(self, appended: Appended, submission: Submission, flags: Iterable[ItemFlag]) -> Appended:
        """Report the flags of a submission the store has just stored (a callback: returns ``appended``)."""
        if appended.duplicate:
            return appended  # reported when it was first stored
        for index, checker, reason in flags:
            message = appended.messages[index]
            flag = Flag(message.server_id, message.conversation, message.seq, message.sender, checker, reason)
            self.report(FlagReport(flag, message, submission.sender_device))
        return appended

    def report(self, report: FlagReport) -> None:
        """Log a flag and tell every observer."""
        self.log.warn(FLAGGED_FORMAT, imkit_content="flagged", **report.fields())
        for observer in list(self.on_flagged):
            try:
                result = observer(report)
            except Exception:
                self.log.failure("flag observer {observer!r} failed", observer=observer)
                continue
            if isinstance(result, defer.Deferred):
                result.addErrback(lambda failure, o=observer: self.log.failure("flag observer {observer!r} failed", failure, observer=o))


def threaded(checker: Callable[[CheckContext, Any], Any], in_thread: Callable[..., defer.Deferred] | None = None) -> ContentChecker:
    """
    A checker that runs the sync ``checker`` in a thread of the reactor's pool (``in_thread``:
    ``deferToThread`` unless given), for CPU-heavy or blocking work.  It keeps the checker's name.
    """
    run = in_thread or threads.deferToThread

    def in_a_thread(context: CheckContext, item: Any) -> defer.Deferred:
        return run(checker, context, item)

    in_a_thread.name = checker_name(checker)  # type: ignore[attr-defined]
    return in_a_thread


def load_checkers(reference: str, option: str = "--content-check") -> list[ContentChecker]:
    """
    Import the checkers named ``MODULE:ATTRIBUTE``: a callable, or a list or tuple of them.
    Raises ContentCheckError with a one-line message for anything else.
    """
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ContentCheckError(f"{option} takes MODULE:ATTRIBUTE, not {reference!r}")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # as for --extension: twistd leaves the working directory out
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ContentCheckError(f"cannot import {module_name!r} for {option} {reference}: {problem}") from None
    try:
        found = getattr(module, attribute)
    except AttributeError:
        raise ContentCheckError(f"{module_name!r} has no attribute {attribute!r} for {option} {reference}") from None
    checkers = list(found) if isinstance(found, (list, tuple)) else [found]
    if not checkers or not all(callable(checker) for checker in checkers):
        raise ContentCheckError(f"{option} {reference} names neither a checker (a callable) nor a list of them")
    return checkers
