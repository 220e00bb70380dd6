"""
The in-memory store: the reference implementation of IStore.

Everything lives in the object itself, so a deterministic simulation can "restart the server" by
building a new server on the same MemoryStore and find every message, dedupe record, cursor and
user where it left them.  Every method answers with an already-fired Deferred.
"""

from __future__ import annotations

import hmac
from typing import Any, Callable

import attrs
from twisted.internet import defer
from zope.interface import implementer

from imkit import rules
from imkit.model import Appended, Message, Submission, direct_members
from imkit.rules import Decision, Policy
from imkit.store.interface import Flag, IStore, ItemFlag, UnknownMessage, UnknownUser, UserExists
from imkit.wire import schema
from imkit.wire.packets import DeviceKeys, OneTimeKey

DEFAULT_POLICY = Policy()

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


def check_flags(submission: Submission, flags: Any) -> tuple[ItemFlag, ...]:
    """
    The item flags an append was given, as ItemFlags (shared by every backend so they agree).

    Raises ValueError if one names no item of the submission or its checker or reason is not text.
    """
    checked = []
    for entry in flags:
        try:
            index, checker, reason = entry
        except (TypeError, ValueError):
            raise ValueError(f"a flag is (index, checker, reason), not {entry!r}") from None
        if not isinstance(index, int) or not 0 <= index < len(submission.items):
            raise ValueError(f"flag index {index!r} names no item of the submission")
        check_mark(checker, reason)
        checked.append(ItemFlag(index, checker, reason))
    return tuple(checked)


def check_mark(checker: Any, reason: Any) -> None:
    """Raise ValueError unless a flag's checker is a non-empty str and its reason a str."""
    if not isinstance(checker, str) or not checker or not isinstance(reason, str):
        raise ValueError(f"a flag's checker is a non-empty str and its reason a str, not {checker!r}, {reason!r}")


def _answer(function: Callable[..., Any], *args: Any) -> defer.Deferred:
    """Run ``function`` now and wrap its result or exception in a fired Deferred."""
    try:
        result = function(*args)
    except Exception:
        return defer.fail()
    return defer.succeed(result)


class _MemoryView:
    """The rules' questions, answered from the store's dicts."""

    def __init__(self, store: "MemoryStore") -> None:
        self._store = store

    def user_exists(self, user: str) -> bool:
        return user in self._store._users

    def relation(self, owner: str, other: str) -> int:
        return self._store._relations.get((owner, other), schema.RELATION_NONE)

    def group(self, conversation: str) -> rules.Group | None:
        return self._store._groups.get(conversation)

    def message(self, conversation: str, seq: int) -> Message | None:
        found = self._store._between(conversation, seq, seq)
        return found[0] if found else None


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
        self._dedupe: dict[tuple[str, str, int], tuple[str, int, int]] = {}
        self._groups: dict[str, rules.Group] = {}
        self._former: dict[str, dict[str, tuple[int, int]]] = {}
        """Former group members: conversation -> user -> (visible_from, seq of their leaving)."""
        self._relations: dict[tuple[str, str], int] = {}
        self._floors: dict[str, int] = {}
        self._retention: dict[str, int] = {}
        self._reads: dict[str, dict[tuple[str, str], int]] = {}
        self._view = _MemoryView(self)
        self._cursors: dict[tuple[str, str], dict[str, int]] = {}
        self._next_server_id = 1
        self._tokens: dict[tuple[str, str], tuple[str, int]] = {}
        self._disabled: set[str] = set()
        self._flags: dict[tuple[int, str], Flag] = {}
        """(server_id, checker) -> the mark that checker left on that message."""
        self._device_keys: dict[tuple[str, str], DeviceKeys] = {}
        self._one_time_keys: dict[tuple[str, str], dict[str, OneTimeKey]] = {}
        """(user, device) -> its unclaimed one-time keys by key id, oldest first."""

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

    def set_disabled(self, name: str, disabled: bool) -> defer.Deferred:
        return _answer(self._set_disabled, name, disabled)

    def _set_disabled(self, name: str, disabled: bool) -> int:
        if name not in self._users:
            raise UnknownUser(name)
        if not disabled:
            self._disabled.discard(name)
            return 0
        self._disabled.add(name)
        doomed = [key for key in self._tokens if key[0] == name]
        for key in doomed:
            del self._tokens[key]
        return len(doomed)

    def is_disabled(self, name: str) -> defer.Deferred:
        return defer.succeed(name in self._disabled)

    def disabled_users(self) -> defer.Deferred:
        return defer.succeed(sorted(self._disabled))

    # Messages ----------------------------------------------------------------------------------

    def append(self, submission: Submission, policy: Policy = DEFAULT_POLICY, flags: Any = ()) -> defer.Deferred:
        if flags:
            return _answer(self._append_flagged, submission, policy, flags)
        return _answer(self._append, submission, policy)

    def append_many(self, submissions: Any, policy: Policy = DEFAULT_POLICY) -> defer.Deferred:
        outcomes: list[Any] = []
        for submission in submissions:
            try:
                outcomes.append(self._append(submission, policy))
            except Exception as error:
                outcomes.append(error)
        return defer.succeed(outcomes)

    def _append_flagged(self, submission: Submission, policy: Policy, flags: Any) -> Appended:
        check_submission(submission)
        marks = check_flags(submission, flags)
        appended = self._append(submission, policy)
        if not appended.duplicate:
            for index, checker, reason in marks:
                message = appended.messages[index]
                self._flags[(message.server_id, checker)] = _flag_of(message, checker, reason)
        return appended

    def flag(self, server_id: int, checker: str, reason: str) -> defer.Deferred:
        return _answer(self._flag, server_id, checker, reason)

    def _flag(self, server_id: int, checker: str, reason: str) -> Flag:
        check_mark(checker, reason)
        for stored in self._messages.values():
            for message in stored:
                if message.server_id == server_id:
                    found = self._flags[(server_id, checker)] = _flag_of(message, checker, reason)
                    return found
        raise UnknownMessage(f"no stored message has server id {server_id!r}")

    def flags(self, conversation: str | None = None, limit: int = 100) -> defer.Deferred:
        found = sorted(
            (flag for flag in self._flags.values() if conversation is None or flag.conversation == conversation),
            key=lambda flag: (-flag.server_id, flag.checker),
        )
        return defer.succeed(found[: max(limit, 0)])

    def _append(self, submission: Submission, policy: Policy) -> Appended:
        check_submission(submission)
        key = (submission.sender, submission.sender_device, submission.client_msg_id)
        original = self._dedupe.get(key)
        if original is not None:
            conversation, first, count = original
            return Appended(messages=tuple(self._between(conversation, first, first + count - 1)), duplicate=True)
        conversation = submission.conversation
        head = self._head(conversation)
        decision = rules.decide(self._view, policy, submission, head)
        stored = self._messages.setdefault(conversation, [])
        if direct_members(conversation) is not None:
            self._members.setdefault(conversation, set()).update(submission.members)
        count = len(submission.items)
        messages = []
        for index, item in enumerate(submission.items):
            messages.append(
                Message(
                    server_id=self._next_server_id,
                    conversation=conversation,
                    seq=head + 1 + index,
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
        self._apply(conversation, decision)
        self._dedupe[key] = (conversation, head + 1, count)
        return Appended(messages=tuple(messages), audience=decision.audience)

    def _apply(self, conversation: str, decision: Decision) -> None:
        for owner, other, relation in decision.relations:
            if relation == schema.RELATION_NONE:
                self._relations.pop((owner, other), None)
            else:
                self._relations[(owner, other)] = relation
        if decision.created is not None:
            self._groups[conversation] = decision.created
        group = self._groups.get(conversation)
        if group is not None:
            members = dict(group.members)
            former = self._former.setdefault(conversation, {})
            for membership in decision.joins:
                members[membership.user] = membership
                former.pop(membership.user, None)
            for user, seq in decision.leaves:
                left = members.pop(user)
                former[user] = (left.visible_from, seq)
            owner = decision.owner or group.owner
            if owner in members and members[owner].role != schema.ROLE_OWNER:
                members[owner] = attrs.evolve(members[owner], role=schema.ROLE_OWNER)
            self._groups[conversation] = rules.Group(owner, group.title, members)
            self._members[conversation] = set(members)
        for seq in decision.recalls:
            stored = self._messages[conversation]
            index = seq - self._floors.get(conversation, 0) - 1
            if 0 <= index < len(stored):
                stored[index] = attrs.evolve(stored[index], content_type=schema.RECALLED, body=b"")
        if decision.retention is not None:
            self._retention[conversation] = decision.retention

    def _head(self, conversation: str) -> int:
        return self._floors.get(conversation, 0) + len(self._messages.get(conversation, ()))

    def _between(self, conversation: str, first: int, last: int) -> list[Message]:
        floor = self._floors.get(conversation, 0)
        stored = self._messages.get(conversation, [])
        return stored[max(first - floor - 1, 0) : max(last - floor, 0)]

    def read(self, conversation: str, after_seq: int, limit: int) -> defer.Deferred:
        stored = self._messages.get(conversation, [])
        if limit <= 0:
            return defer.succeed([])
        # seq n lives at index n - floor - 1, so the slice starts right after after_seq.
        start = max(after_seq - self._floors.get(conversation, 0), 0)
        result = stored[start : start + limit]
        if result and result[-1].bundle_remaining:
            end = start + len(result)
            result += stored[end : end + result[-1].bundle_remaining]
        return defer.succeed(result)

    def head(self, conversation: str) -> defer.Deferred:
        return defer.succeed(self._head(conversation))

    def members(self, conversation: str) -> defer.Deferred:
        return defer.succeed(tuple(sorted(self._members.get(conversation, ()))))

    def conversations(self, user: str) -> defer.Deferred:
        return defer.succeed(
            {
                conversation: self._head(conversation)
                for conversation, members in self._members.items()
                if user in members
            }
        )

    def visible(self, user: str) -> defer.Deferred:
        return defer.succeed(self._visible(user))

    def _visible(self, user: str) -> dict[str, tuple[int, int]]:
        found = {}
        for conversation, members in self._members.items():
            span = self._span(conversation, user) if user in members else None
            if span is not None:
                found[conversation] = span
        for conversation, former in self._former.items():
            if user in former and conversation not in found:
                span = self._span(conversation, user)
                if span is not None:
                    found[conversation] = span
        return found

    def _span(self, conversation: str, user: str) -> tuple[int, int] | None:
        floor = self._floors.get(conversation, 0)
        head = self._head(conversation)
        group = self._groups.get(conversation)
        if group is None:
            members = self._members.get(conversation, ())
            return (floor, head) if user in members else None
        membership = group.members.get(user)
        if membership is not None:
            return (max(floor, membership.visible_from - 1), head)
        former = self._former.get(conversation, {}).get(user)
        if former is None:
            return None
        visible_from, left = former
        return (min(max(floor, visible_from - 1), left), left)

    def visibility(self, conversation: str, user: str) -> defer.Deferred:
        return defer.succeed(self._span(conversation, user))

    def group(self, conversation: str) -> defer.Deferred:
        return defer.succeed(self._groups.get(conversation))

    def contacts(self, user: str) -> defer.Deferred:
        return defer.succeed({other: relation for (owner, other), relation in self._relations.items() if owner == user})

    def prune(self, now: int, default_ttl: float | None) -> defer.Deferred:
        changed = {}
        for conversation, stored in self._messages.items():
            ttl = self._retention.get(conversation) or default_ttl
            if not ttl or not stored:
                continue
            cutoff = now - ttl * 1000
            count = 0
            while count < len(stored) and stored[count].sent_at < cutoff:
                count += 1
            if count:
                floor = stored[count - 1].seq
                del stored[:count]
                self._floors[conversation] = floor
                changed[conversation] = floor
        if changed:
            for key, (conversation, first, _count) in list(self._dedupe.items()):
                if first <= changed.get(conversation, 0):
                    del self._dedupe[key]
            for key, flag in list(self._flags.items()):
                if flag.seq <= changed.get(flag.conversation, 0):
                    del self._flags[key]
        return defer.succeed(changed)

    # Read marks --------------------------------------------------------------------------------

    def set_read(self, user: str, device: str, conversation: str, seq: int) -> defer.Deferred:
        marks = self._reads.setdefault(conversation, {})
        if seq > marks.get((user, device), 0):
            marks[(user, device)] = seq
        return defer.succeed(None)

    def read_marks(self, conversation: str) -> defer.Deferred:
        found: dict[str, int] = {}
        for (user, _device), seq in self._reads.get(conversation, {}).items():
            if seq > found.get(user, 0):
                found[user] = seq
        return defer.succeed(found)

    # Delivery cursors --------------------------------------------------------------------------

    def set_cursor(self, user: str, device: str, conversation: str, seq: int) -> defer.Deferred:
        cursors = self._cursors.setdefault((user, device), {})
        if conversation not in cursors or seq > cursors[conversation]:
            cursors[conversation] = seq
        return defer.succeed(None)

    def set_cursors(self, cursors: Any) -> defer.Deferred:
        for user, device, conversation, seq in cursors:
            self.set_cursor(user, device, conversation, seq)
        return defer.succeed(None)

    def cursors(self, user: str, device: str) -> defer.Deferred:
        return defer.succeed(dict(self._cursors.get((user, device), {})))

    # Resume tokens -----------------------------------------------------------------------------

    def set_token(self, digest: str, user: str, device: str, expires_at: int) -> defer.Deferred:
        self._tokens[(user, device)] = (digest, expires_at)
        return defer.succeed(None)

    def token_owner(self, digest: str) -> defer.Deferred:
        for (user, device), (known, expires_at) in self._tokens.items():
            if hmac.compare_digest(known.encode(), digest.encode()):
                return defer.succeed((user, device, expires_at))
        return defer.succeed(None)

    def revoke_tokens(self, user: str, device: str | None = None) -> defer.Deferred:
        doomed = [key for key in self._tokens if key[0] == user and (device is None or key[1] == device)]
        for key in doomed:
            del self._tokens[key]
        return defer.succeed(len(doomed))

    # Key directory -----------------------------------------------------------------------------

    def publish_keys(self, keys: DeviceKeys, limit: int) -> defer.Deferred:
        key = (keys.user, keys.device)
        old = self._device_keys.get(key)
        unclaimed = self._one_time_keys.setdefault(key, {})
        if old is not None and old.identity_key != keys.identity_key:
            unclaimed.clear()
        self._device_keys[key] = attrs.evolve(keys, one_time_keys=())
        for one in keys.one_time_keys:
            if len(unclaimed) >= limit:
                break
            unclaimed.setdefault(one.key_id, one)
        return defer.succeed(len(unclaimed))

    def device_keys(self, users: Any) -> defer.Deferred:
        wanted = set(users)
        return defer.succeed([keys for key, keys in sorted(self._device_keys.items()) if key[0] in wanted])

    def claim_one_time_keys(self, devices: Any) -> defer.Deferred:
        claimed = {}
        for key in devices:
            key = tuple(key)
            unclaimed = self._one_time_keys.get(key)
            if key not in claimed and unclaimed:
                claimed[key] = unclaimed.pop(next(iter(unclaimed)))
        return defer.succeed(claimed)

    def remove_device_keys(self, user: str, device: str | None = None) -> defer.Deferred:
        doomed = [key for key in self._device_keys if key[0] == user and (device is None or key[1] == device)]
        for key in doomed:
            del self._device_keys[key]
            self._one_time_keys.pop(key, None)
        return defer.succeed(len(doomed))


def _flag_of(message: Message, checker: str, reason: str) -> Flag:
    return Flag(message.server_id, message.conversation, message.seq, message.sender, checker, reason)
