"""
Conversation rules: who may put what into a conversation, and what it changes.

A store calls ``decide`` inside the transaction that will write the submission, with a ``View``
of its own state, and applies the ``Decision`` it gets in that same transaction (or fails the
append with ``Refused``).  The store is the one place submissions are put in order, so deciding
there is what makes "the removal applies after the goodbye" true even when two servers share a
database.  The rules themselves are plain functions of their inputs: every backend gets the same
answers, and the tests can ask them directly.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from imkit import operations
from imkit.model import Item, Message, Submission, direct_conversation, direct_members
from imkit.wire import schema
from imkit.wire.errors import DecodeError, ErrorCode


class Refused(Exception):
    """
    The rules forbid a submission: nothing of it is stored, and the sender's ack carries
    ``code`` and ``reason``.  Stores raise it through their ``append`` Deferred.
    """

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


@attrs.frozen
class Policy:
    """
    The server's choices: ``contacts_only`` is the ``contacts`` messaging policy (a direct message
    needs both users to have each other as contacts); ``history_on_join`` lets members added to
    a group read what was said before they joined; the windows are in seconds.
    """

    contacts_only: bool = False
    history_on_join: bool = False
    recall_window: float = 120.0
    edit_window: float = 900.0
    max_group_members: int = 10_000
    max_title: int = 200


@attrs.frozen
class Membership:
    """
    A user's place in a group: ``joined_seq`` is the event that made them a member and
    ``visible_from`` the first sequence they may read (1 with history on join).
    """

    user: str
    role: int
    joined_seq: int
    visible_from: int


@attrs.frozen
class Group:
    owner: str
    title: str
    members: dict[str, Membership]


class View(Protocol):
    """What the rules may ask a store, inside the transaction that will apply their decision."""

    def user_exists(self, user: str) -> bool: ...

    def relation(self, owner: str, other: str) -> int:
        """RELATION_* of ``owner`` towards ``other`` (RELATION_NONE if never set)."""

    def group(self, conversation: str) -> Group | None: ...

    def message(self, conversation: str, seq: int) -> Message | None: ...


@attrs.frozen
class Decision:
    """
    What a store writes besides the messages.  ``audience`` is everyone who should have them
    pushed: the members before the submission and after it (a removed member gets its removal).
    """

    audience: tuple[str, ...]
    relations: tuple[tuple[str, str, int], ...] = ()
    created: Group | None = None
    joins: tuple[Membership, ...] = ()
    leaves: tuple[tuple[str, int], ...] = ()
    owner: str | None = None
    recalls: tuple[int, ...] = ()
    retention: int | None = None


_CONTACT_OPERATIONS = (schema.CONTACT_ADD, schema.CONTACT_REMOVE, schema.CONTACT_BLOCK, schema.CONTACT_UNBLOCK)
_WHILE_BLOCKED = (schema.CONTACT_REMOVE, schema.CONTACT_BLOCK, schema.RECALL)
_MEMBERSHIP_OPERATIONS = (schema.GROUP_CREATE, schema.GROUP_ADD, schema.GROUP_REMOVE, schema.GROUP_LEAVE)


def is_group(conversation: str) -> bool:
    return conversation.startswith("g:")


def decide(view: View, policy: Policy, submission: Submission, head: int) -> Decision:
    """Judge a submission that will be stored at ``head + 1``...; raise Refused if it may not be."""
    conversation = submission.conversation
    pair = direct_members(conversation)
    if pair is not None:
        if pair[0] > pair[1]:
            # One conversation per pair of users: "dm:bob:alice" would be a second one.
            raise Refused(ErrorCode.INVALID_TARGET, f"{conversation!r} is not a conversation id: use {direct_conversation(*pair)!r}")
        return _direct(view, policy, submission, pair, head)
    if is_group(conversation):
        return _group(view, policy, submission, head)
    raise Refused(ErrorCode.INVALID_TARGET, f"{conversation!r} is not a conversation id")


def plain(items: tuple[Item, ...]) -> bool:
    """True when no item is an operation: the common case, with nothing to apply."""
    for item in items:
        if item.content_type.startswith(schema.OPERATION_PREFIX):
            return False
    return True


def _value(item: Item) -> object:
    try:
        return operations.decode(item.content_type, item.body)
    except DecodeError as error:
        raise Refused(ErrorCode.INVALID_OPERATION, error.reason) from None


# Direct conversations --------------------------------------------------------------------------


def _direct(view: View, policy: Policy, submission: Submission, pair: tuple[str, ...], head: int) -> Decision:
    sender = submission.sender
    if sender not in pair:
        raise Refused(ErrorCode.NOT_A_MEMBER, "you are not a member of that conversation")
    other = pair[0] if pair[1] == sender else pair[1]
    if head == 0 and other != sender and not view.user_exists(other):
        raise Refused(ErrorCode.UNKNOWN_RECIPIENT, f"no user named {other!r}")
    mine = view.relation(sender, other) if other != sender else schema.RELATION_CONTACT
    theirs = view.relation(other, sender) if other != sender else schema.RELATION_CONTACT
    changed = False
    recalls: list[int] = []
    retention = None
    for index, item in enumerate(submission.items):
        kind = item.content_type
        if not kind.startswith(schema.OPERATION_PREFIX):
            if mine == schema.RELATION_BLOCKED:
                raise Refused(ErrorCode.NOT_ALLOWED, f"you have blocked {other!r}; unblock them first")
            if theirs == schema.RELATION_BLOCKED or (
                policy.contacts_only and not (mine == schema.RELATION_CONTACT and theirs == schema.RELATION_CONTACT)
            ):
                # One answer for "blocked" and "not contacts": a block is not announced.
                raise Refused(ErrorCode.NOT_ALLOWED, f"you and {other!r} are not each other's contacts")
            continue
        value = _value(item)
        if theirs == schema.RELATION_BLOCKED and kind not in _WHILE_BLOCKED:
            # Every event lands in the blocker's view of the conversation: a blocked user may only
            # step further back (remove, block) or take back what they said (recall).
            raise Refused(ErrorCode.NOT_ALLOWED, f"you and {other!r} are not each other's contacts")
        if kind in _CONTACT_OPERATIONS:
            if other == sender:
                raise Refused(ErrorCode.INVALID_OPERATION, "you cannot be your own contact")
            if kind == schema.CONTACT_ADD:
                if theirs == schema.RELATION_BLOCKED:
                    raise Refused(ErrorCode.NOT_ALLOWED, f"you and {other!r} are not each other's contacts")
                mine = schema.RELATION_CONTACT
            elif kind == schema.CONTACT_REMOVE:
                if mine == schema.RELATION_CONTACT:
                    mine = schema.RELATION_NONE
            elif kind == schema.CONTACT_BLOCK:
                mine = schema.RELATION_BLOCKED
            elif mine == schema.RELATION_BLOCKED:
                mine = schema.RELATION_NONE
            changed = True
        elif kind in (schema.RECALL, schema.EDIT):
            recalls.extend(_own_message(view, policy, submission, value))  # type: ignore[arg-type]
        elif kind == schema.RETENTION:
            retention = value.seconds  # type: ignore[attr-defined]
        else:
            raise Refused(ErrorCode.INVALID_OPERATION, f"{kind} does not apply to a direct conversation")
    relations = ((sender, other, mine),) if changed else ()
    # A conversation with oneself has one member, pushed to once.
    audience = tuple(pair) if other != sender else (sender,)
    return Decision(audience=audience, relations=relations, recalls=tuple(recalls), retention=retention)


def _own_message(view: View, policy: Policy, submission: Submission, value: operations.Recall | operations.Edit) -> list[int]:
    """Recall and edit reach only the sender's own message, inside the window."""
    recalling = isinstance(value, operations.Recall)
    verb = "recall" if recalling else "edit"
    target = view.message(submission.conversation, value.seq)
    if (
        target is None
        or target.sender != submission.sender
        or target.content_type.startswith(schema.OPERATION_PREFIX)
    ):
        raise Refused(ErrorCode.INVALID_OPERATION, f"you can only {verb} your own messages")
    if isinstance(value, operations.Edit) and value.content_type.startswith(schema.OPERATION_PREFIX):
        raise Refused(ErrorCode.INVALID_OPERATION, "an edit cannot turn a message into an operation")
    window = policy.recall_window if recalling else policy.edit_window
    if submission.sent_at - target.sent_at > window * 1000:
        raise Refused(ErrorCode.INVALID_OPERATION, f"too late to {verb}: the window is {window:g} seconds")
    return [value.seq] if recalling else []


# Groups ----------------------------------------------------------------------------------------


def _group(view: View, policy: Policy, submission: Submission, head: int) -> Decision:
    sender = submission.sender
    items = submission.items
    group = view.group(submission.conversation)
    creating = items[0].content_type == schema.GROUP_CREATE
    if group is None and not creating:
        # The same answer whether or not the group exists: nothing leaks to non-members.
        raise Refused(ErrorCode.NOT_A_MEMBER, "you are not a member of that conversation")
    if group is not None and sender not in group.members:
        raise Refused(ErrorCode.NOT_A_MEMBER, "you are not a member of that conversation")
    members = dict(group.members) if group is not None else {}
    owner = group.owner if group is not None else sender
    before = set(members)
    created = None
    joins: list[Membership] = []
    leaves: list[tuple[str, int]] = []
    recalls: list[int] = []
    retention = None
    last = len(items) - 1
    for index, item in enumerate(items):
        seq = head + 1 + index
        kind = item.content_type
        if sender not in members and not (creating and index == 0):
            raise Refused(ErrorCode.INVALID_OPERATION, "you left the group earlier in this bundle")
        if not kind.startswith(schema.OPERATION_PREFIX):
            continue
        value = _value(item)
        if kind == schema.GROUP_CREATE:
            if index != 0 or group is not None:
                raise Refused(ErrorCode.INVALID_OPERATION, "a group is created by the first item sent to a new group")
            title = value.title  # type: ignore[attr-defined]
            if len(title) > policy.max_title:
                raise Refused(ErrorCode.INVALID_OPERATION, f"a group title is at most {policy.max_title} characters")
            members[sender] = Membership(sender, schema.ROLE_OWNER, seq, 1)
            joins.append(members[sender])
            for user in _new_users(view, policy, value.users, members):  # type: ignore[attr-defined]
                members[user] = Membership(user, schema.ROLE_MEMBER, seq, 1)
                joins.append(members[user])
            created = Group(sender, title, {})
        elif kind == schema.GROUP_ADD:
            if index != 0:
                raise Refused(ErrorCode.INVALID_OPERATION, "an add must be the first item of its bundle")
            start = 1 if policy.history_on_join else seq
            for user in _new_users(view, policy, value.users, members):  # type: ignore[attr-defined]
                members[user] = Membership(user, schema.ROLE_MEMBER, seq, start)
                joins.append(members[user])
        elif kind == schema.GROUP_REMOVE:
            if index != last:
                raise Refused(ErrorCode.INVALID_OPERATION, "a removal must be the last item of its bundle")
            if sender != owner:
                raise Refused(ErrorCode.INVALID_OPERATION, "only the group's owner removes members")
            for user in value.users:  # type: ignore[attr-defined]
                if user == sender:
                    raise Refused(ErrorCode.INVALID_OPERATION, "to remove yourself, leave the group")
                if user not in members:
                    raise Refused(ErrorCode.INVALID_OPERATION, f"{user!r} is not a member")
                del members[user]
                leaves.append((user, seq))
        elif kind == schema.GROUP_LEAVE:
            if index != last:
                raise Refused(ErrorCode.INVALID_OPERATION, "leaving must be the last item of its bundle")
            del members[sender]
            leaves.append((sender, seq))
            if owner == sender and members:
                # The longest-standing member takes over; ties go by name, the same everywhere.
                owner = min(members.values(), key=lambda m: (m.joined_seq, m.user)).user
        elif kind in (schema.RECALL, schema.EDIT):
            recalls.extend(_own_message(view, policy, submission, value))  # type: ignore[arg-type]
        elif kind == schema.RETENTION:
            if sender != owner:
                raise Refused(ErrorCode.INVALID_OPERATION, "only the group's owner sets its retention")
            retention = value.seconds  # type: ignore[attr-defined]
        else:
            raise Refused(ErrorCode.INVALID_OPERATION, f"{kind} does not apply to a group")
    if created is not None:
        created = Group(owner, created.title, members)
    new_owner = owner if group is not None and owner != group.owner else None
    return Decision(
        audience=tuple(sorted(before | set(members) | {user for user, _ in leaves})),
        created=created,
        joins=tuple(joins),
        leaves=tuple(leaves),
        owner=new_owner,
        recalls=tuple(recalls),
        retention=retention,
    )


def _new_users(view: View, policy: Policy, users: tuple[str, ...], members: dict[str, Membership]) -> list[str]:
    """The users to make members: each must exist; those already in are skipped; the size is capped."""
    fresh = []
    for user in users:
        if user in members or user in fresh:
            continue
        if not view.user_exists(user):
            raise Refused(ErrorCode.UNKNOWN_RECIPIENT, f"no user named {user!r}")
        fresh.append(user)
    if len(members) + len(fresh) > policy.max_group_members:
        raise Refused(ErrorCode.INVALID_OPERATION, f"a group has at most {policy.max_group_members} members")
    return fresh
