"""
What a submission check may say: a message is refused with ``Rejected``; a content checker
answers with a ``Verdict`` (allow, flag or reject).

Checks run on the server before a message is stored (extension handlers, content filters); they
live here, below the hub and the extensions, so both can use them.  The content pipeline that
runs content checkers is ``imkit.content``.
"""

from __future__ import annotations

import enum
from typing import Any, Callable

import attrs

from imkit.model import Item, Submission
from imkit.wire.errors import ErrorCode


class Rejected(Exception):
    """Refuse a message: nothing is stored, and the sender's ack carries ``code`` and ``reason``."""

    def __init__(self, reason: str, code: ErrorCode = ErrorCode.REJECTED) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


SubmissionCheck = Callable[[str, str, str, Item], Any]
"""``check(sender, device, conversation, item)``: return None (or a Deferred) to allow; raise Rejected."""


# Content checkers ------------------------------------------------------------------------------


class Action(enum.IntEnum):
    """What a content checker decides; a larger value wins when verdicts are combined."""

    ALLOW = 0
    FLAG = 1
    """Store the message, mark it (``IStore.flags``) and report it."""
    REJECT = 2
    """Store nothing: the sender's ack carries the verdict's code (REJECTED) and reason."""


@attrs.frozen
class Verdict:
    """A content checker's answer about one item.  Make one with ``allow()``, ``flag()`` or ``reject()``."""

    action: Action
    reason: str = ""
    code: ErrorCode = ErrorCode.REJECTED
    """The ack's status for a rejection."""


ALLOW = Verdict(Action.ALLOW)


def allow() -> Verdict:
    return ALLOW


def flag(reason: str) -> Verdict:
    """Store the item, but mark it with ``reason`` and report it."""
    return Verdict(Action.FLAG, reason)


def reject(reason: str, code: ErrorCode = ErrorCode.REJECTED) -> Verdict:
    """Refuse the whole submission: the sender is told ``reason``, nothing is stored."""
    return Verdict(Action.REJECT, reason, code)


def worst(verdicts: Any) -> Verdict:
    """The verdict that wins: the first reject, else the first flag, else allow."""
    found = ALLOW
    for verdict in verdicts:
        if verdict.action > found.action:
            found = verdict
    return found


@attrs.frozen
class CheckContext:
    """What a content checker knows about the item it judges: its submission and its place in it."""

    submission: Submission
    index: int
    """The item's position in the submission (a bundle has several)."""

    @property
    def sender(self) -> str:
        return self.submission.sender

    @property
    def device(self) -> str:
        return self.submission.sender_device

    @property
    def conversation(self) -> str:
        return self.submission.conversation

    @property
    def client_msg_id(self) -> int:
        return self.submission.client_msg_id


ContentChecker = Callable[[CheckContext, Item], Any]
"""``checker(context, item)``: return None or a Verdict, or a Deferred (or coroutine) of one; may raise Rejected."""
