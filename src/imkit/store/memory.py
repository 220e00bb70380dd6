"""
The in-memory store: the reference implementation of IStore.

Everything lives in the object itself, so a deterministic simulation can "restart the server" by
building a new server on the same MemoryStore and find every message, dedupe record, cursor and
user where it left them.  Every method answers with an already-fired Deferred.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from zope.interface import implementer

from imkit.model import Appended, Message, Submission
from imkit.store.interface import IStore, UnknownUser, UserExists

U64_LIMIT = 2**64


def check_submission(submission: Submission) -> None:
    """
    Reject a submission no backend may store (shared by every backend so they agree).

    Raises ValueError if it has no items or its client_msg_id is not an unsigned 64-bit int.
    """
    if not submission.items:
        raise ValueError("a submission needs at least one item")
    client_msg_id = submission.client_msg_id
    if not isinstance(client_msg_id, int) or not 0 <= client_msg_id < U64_LIMIT:
        raise ValueError(f"client_msg_id {client_msg_id!r} is not an unsigned 64-bit integer")


def _answer(function: Callable[..., Any], *args: Any) -> defer.Deferred:
    """Run ``function`` now and wrap its result or exception in a fired Deferred."""
    try:
        result = function(*args)
    except Exception:
        return defer.fail()
    return defer.succeed(result)


@implementer(IStore)
class MemoryStore:
    """
    IStore in plain dicts.

    ``open`` and ``close`` change nothing and methods keep working after ``close``, because a
    simulated restart closes the old server's view of the store and opens the same object again.
    """

    description = "memory:"

    def __init__(self) -> None:
        self._users: dict[str, str] = {}
        self._messages: dict[str, list[Message]] = {}
        self._members: dict[str, set[str]] = {}
        self._dedupe: dict[tuple[str, str, int], tuple[Message, ...]] = {}
        self._cursors: dict[tuple[str, str], dict[str, int]] = {}
        self._next_server_id = 1
        self._tokens: dict[tuple[str, str], tuple[str, int]] = {}

    def open(self) -> defer.Deferred:
        return defer.succeed(None)

    def close(self) -> defer.Deferred:
        return defer.succeed(None)

    # Users -------------------------------------------------------------------------------------

    def add_user(self, name: str, password_hash: str) -> defer.Deferred:
        return _answer(self._add_user, name, password_hash)

    def _add_user(self, name: str, password_hash: str) -> None:
        if name in self._users:
            raise UserExists(name)
        self._users[name] = password_hash

    def password_hash(self, name: str) -> defer.Deferred:
        return defer.succeed(self._users.get(name))

    def set_password_hash(self, name: str, password_hash: str) -> defer.Deferred:
        return _answer(self._set_password_hash, name, password_hash)

    def _set_password_hash(self, name: str, password_hash: str) -> None:
        if name not in self._users:
            raise UnknownUser(name)
        self._users[name] = password_hash

    def list_users(self) -> defer.Deferred:
        return defer.succeed(sorted(self._users))

    # Messages ----------------------------------------------------------------------------------

    def append(self, submission: Submission) -> defer.Deferred:
        return _answer(self._append, submission)

    def _append(self, submission: Submission) -> Appended:
        check_submission(submission)
        key = (submission.sender, submission.sender_device, submission.client_msg_id)
        original = self._dedupe.get(key)
        if original is not None:
            return Appended(messages=original, duplicate=True)
        stored = self._messages.setdefault(submission.conversation, [])
        self._members.setdefault(submission.conversation, set()).update(submission.members)
        count = len(submission.items)
        messages = []
        for index, item in enumerate(submission.items):
            messages.append(
                Message(
                    server_id=self._next_server_id,
                    conversation=submission.conversation,
                    seq=len(stored) + 1,
                    sender=submission.sender,
                    sender_device=submission.sender_device,
                    client_msg_id=submission.client_msg_id,
                    sent_at=submission.sent_at,
                    content_type=item.content_type,
                    body=bytes(item.body),
                    bundle_remaining=count - 1 - index,
                )
            )
            self._next_server_id += 1
            stored.append(messages[-1])
        self._dedupe[key] = tuple(messages)
        return Appended(messages=tuple(messages))

    def read(self, conversation: str, after_seq: int, limit: int) -> defer.Deferred:
        stored = self._messages.get(conversation, [])
        if limit <= 0:
            return defer.succeed([])
        # seq n lives at index n - 1, so the slice starts right after after_seq.
        start = max(after_seq, 0)
        result = stored[start : start + limit]
        if result and result[-1].bundle_remaining:
            end = start + len(result)
            result += stored[end : end + result[-1].bundle_remaining]
        return defer.succeed(result)

    def head(self, conversation: str) -> defer.Deferred:
        return defer.succeed(len(self._messages.get(conversation, ())))

    def members(self, conversation: str) -> defer.Deferred:
        return defer.succeed(tuple(sorted(self._members.get(conversation, ()))))

    def conversations(self, user: str) -> defer.Deferred:
        return defer.succeed(
            {
                conversation: len(self._messages.get(conversation, ()))
                for conversation, members in self._members.items()
                if user in members
            }
        )

    # Delivery cursors --------------------------------------------------------------------------

    def set_cursor(self, user: str, device: str, conversation: str, seq: int) -> defer.Deferred:
        cursors = self._cursors.setdefault((user, device), {})
        if conversation not in cursors or seq > cursors[conversation]:
            cursors[conversation] = seq
        return defer.succeed(None)

    def cursors(self, user: str, device: str) -> defer.Deferred:
        return defer.succeed(dict(self._cursors.get((user, device), {})))

    # Resume tokens -----------------------------------------------------------------------------

    def set_token(self, digest: str, user: str, device: str, expires_at: int) -> defer.Deferred:
        self._tokens[(user, device)] = (digest, expires_at)
        return defer.succeed(None)

    def token_owner(self, digest: str) -> defer.Deferred:
        for (user, device), (known, expires_at) in self._tokens.items():
            if known == digest:
                return defer.succeed((user, device, expires_at))
        return defer.succeed(None)

    def revoke_tokens(self, user: str, device: str | None = None) -> defer.Deferred:
        doomed = [key for key in self._tokens if key[0] == user and (device is None or key[1] == device)]
        for key in doomed:
            del self._tokens[key]
        return defer.succeed(len(doomed))
