"""
The one narrow storage interface every backend implements.

Every method returns a Deferred, so a backend may do its I/O on a thread (SQLite), over the network
(PostgreSQL) or not at all (memory), and the server above cannot tell the difference.  The contract
test suite in ``tests/store_contract.py`` is the executable definition of what each method promises.
"""

from __future__ import annotations

from typing import NamedTuple

import attrs
from zope.interface import Attribute, Interface


class StoreError(Exception):
    """Base class for errors a store reports through its Deferreds."""


class UserExists(StoreError):
    """``add_user`` was asked to create a user name that is taken."""


class UnknownUser(StoreError):
    """The named user does not exist."""


class NotAMember(StoreError):
    """The user is not a member of the conversation it tried to use."""


class UnknownMessage(StoreError):
    """No stored message has the server id given (never stored, or pruned)."""


class ItemFlag(NamedTuple):
    """A content checker's mark on one item of a submission, stored with it by ``append``."""

    index: int
    """The item's position in the submission."""
    checker: str
    reason: str


@attrs.frozen
class Flag:
    """A stored message marked by a content checker (``imkit.content``): kept, but reported."""

    server_id: int
    conversation: str
    seq: int
    sender: str
    checker: str
    reason: str


class IStore(Interface):
    """Durable users, messages, sequences, dedupe records and delivery cursors."""

    description = Attribute("A short human-readable description, e.g. 'sqlite:/path/to/db'.")

    def open():
        """Make the store ready (create the schema, start threads). Deferred[None]."""

    def close():
        """Flush everything acknowledged so far and release resources. Deferred[None]."""

    # Users -------------------------------------------------------------------------------------

    def add_user(name, password_hash):
        """Create a user. Deferred[None]; fails with UserExists if the name is taken."""

    def password_hash(name):
        """Deferred[str | None]: the stored hash, or None if there is no such user."""

    def set_password_hash(name, password_hash):
        """Replace a user's hash. Deferred[None]; fails with UnknownUser."""

    def list_users():
        """Deferred[list[str]]: every user name, sorted."""

    def set_disabled(name, disabled):
        """
        Disable (``disabled`` true) or enable a user.  Disabling also forgets every resume token
        of the user, in the same transaction.  Deferred[int]: how many tokens were forgotten;
        fails with UnknownUser.  A disabled user keeps everything else (messages, memberships).
        """

    def is_disabled(name):
        """Deferred[bool]: whether the user is disabled (False for a user that does not exist)."""

    def disabled_users():
        """Deferred[list[str]]: every disabled user, sorted."""

    # Messages ----------------------------------------------------------------------------------

    def append(submission, policy, flags=()):
        """
        Judge a Submission by ``imkit.rules.decide`` with ``policy`` (an ``imkit.rules.Policy``)
        and store it atomically and durably with everything the decision changes (relations,
        group membership, recalls, retention). Deferred[Appended], whose ``audience`` is the
        decision's; fails with ``imkit.rules.Refused``, writing nothing, if the rules say no.

        All its items get consecutive sequence numbers in its conversation (one more than the
        conversation's head for the first), fresh unique server ids (consecutive within one submission: a client
        numbers its own bundle from the first id in its ack), the submission's sent_at and
        client_msg_id, and bundle_remaining counting down to 0.  The conversation is created and
        ``submission.members`` are made members if needed (direct conversations).  If a submission with the same
        (sender, sender_device, client_msg_id) was stored before — even before a restart — nothing
        is written and the originally stored messages come back with ``duplicate=True``.
        The Deferred fires only once the write is durable.  It fails with ValueError, writing
        nothing, if the submission has no items or its client_msg_id is not an unsigned 64-bit int.

        ``flags`` (ItemFlags) mark the stored messages of those items, in the same transaction:
        a refused submission writes none, and a duplicate none again.  A flag whose index is not
        an item's, or whose checker is not a non-empty str or reason not a str, makes the call
        fail with ValueError, writing nothing.
        """

    def append_many(submissions, policy):
        """
        Append several submissions, each as ``append(submission, policy)`` would, in the order
        given: Deferred[list], one outcome per submission, its Appended or the exception
        (``imkit.rules.Refused``, ValueError) that refused it alone.  The Deferred fails only if
        the store cannot work at all.

        It exists for speed: a server hands over every send one read from a connection brought in
        as one call, so the store and the reactor pay for one Deferred, not one per message.
        """

    def read(conversation, after_seq, limit):
        """
        Deferred[list[Message]]: messages of ``conversation`` with seq > after_seq in order, at
        most ``limit`` of them except that a bundle is never cut: if the last one has
        bundle_remaining > 0 the rest of its bundle is included too.
        """

    def flag(server_id, checker, reason):
        """
        Mark a stored message as ``checker`` found it (``reason``), replacing that checker's
        earlier mark on it.  Deferred[Flag]; fails with UnknownMessage if there is no such message.
        Marks go with their messages when retention prunes them.
        """

    def flags(conversation=None, limit=100):
        """
        Deferred[list[Flag]]: the marks on stored messages (of ``conversation`` only, if given),
        newest message first (by server id, then checker), at most ``limit`` of them.
        """

    def head(conversation):
        """Deferred[int]: the conversation's highest sequence number (0 if it has none)."""

    def members(conversation):
        """Deferred[tuple[str, ...]]: the conversation's current members, sorted (empty if unknown)."""

    def conversations(user):
        """Deferred[dict[str, int]]: every conversation the user is a member of -> its head seq."""

    def visible(user):
        """
        Deferred[dict[str, tuple[int, int]]]: every conversation the user may read (members now,
        and former group members up to the event that removed them) -> (floor, upto): the user
        may read sequences floor+1 .. upto.  The floor is raised by retention's pruning and, for
        a group member who joined late without history, sits just below their join.
        """

    def visibility(conversation, user):
        """Deferred[tuple[int, int] | None]: ``visible(user)[conversation]``, or None."""

    def group(conversation):
        """Deferred[imkit.rules.Group | None]: a group's owner, title and current members."""

    def contacts(user):
        """Deferred[dict[str, int]]: the user's relations (RELATION_CONTACT or RELATION_BLOCKED) by other user."""

    def prune(now, default_ttl):
        """
        Retention: delete each conversation's oldest messages sent more than its TTL (its own
        ``imkit/retention``, else ``default_ttl`` seconds; None keeps them) before ``now`` (ms),
        whole prefixes only, raising the conversation's floor to the last deleted sequence.
        Dedupe records of deleted messages go too.  Deferred[dict[str, int]]: new floor by
        conversation, for those that changed.
        """

    # Read marks ------------------------------------------------------------------------------

    def set_read(user, device, conversation, seq):
        """Record that ``device`` of ``user`` has read ``conversation`` up to ``seq`` (forward only). Deferred[None]."""

    def read_marks(conversation):
        """Deferred[dict[str, int]]: per user, the furthest any of its devices has read."""

    # Delivery cursors --------------------------------------------------------------------------

    def set_cursor(user, device, conversation, seq):
        """
        Record that ``device`` of ``user`` has acknowledged ``conversation`` up to ``seq``.
        Deferred[None].  Cursors only move forward: a lower seq than the stored one is ignored.
        """

    def set_cursors(cursors):
        """
        ``set_cursor`` for each ``(user, device, conversation, seq)`` in ``cursors``, in one
        write: Deferred[None].  A server gathers the acknowledgements of a reactor turn (in a
        group, every member acknowledges every message) into one call.
        """

    def cursors(user, device):
        """Deferred[dict[str, int]]: the device's acknowledged seq per conversation."""

    # Resume tokens ---------------------------------------------------------------------------

    def set_token(digest, user, device, expires_at):
        """
        Record the resume token of ``device`` of ``user`` (by its digest, never the token itself),
        valid until ``expires_at`` (ms since the epoch), replacing that device's previous token.
        Deferred[None].
        """

    def token_owner(digest):
        """Deferred[tuple[str, str, int] | None]: (user, device, expires_at) of a token digest."""

    def revoke_tokens(user, device=None):
        """Forget the tokens of one device of ``user``, or of all its devices. Deferred[int]: how many."""

    # Key directory (end-to-end encryption: imkit.server.keys) --------------------------------
    #
    # Only public keys, as ``imkit.wire.packets.DeviceKeys`` and ``OneTimeKey`` values; the server
    # has checked their signatures before they get here.

    def publish_keys(keys, limit):
        """
        Publish the identity keys of device ``keys.device`` of user ``keys.user`` (a DeviceKeys),
        replacing what it published before; if its identity key changed, its unclaimed one-time
        keys are dropped first (they belonged to the old identity).  ``keys.one_time_keys`` are
        added to its unclaimed ones, skipping key ids it already has, until it has ``limit``.
        All in one transaction.  Deferred[int]: how many unclaimed one-time keys it has now.
        """

    def device_keys(users):
        """
        Deferred[list[DeviceKeys]]: the published keys of every device of the named users, sorted
        by user and device, with no one-time keys.
        """

    def claim_one_time_keys(devices):
        """
        Hand out one unclaimed one-time key of each (user, device) in ``devices``, the oldest
        published, and forget it so that nobody gets it again.  Deferred[dict[tuple[str, str],
        OneTimeKey]]: by (user, device); devices with none left are missing.
        """

    def remove_device_keys(user, device=None):
        """Forget the published keys of one device of ``user``, or of all its devices. Deferred[int]: how many devices."""
