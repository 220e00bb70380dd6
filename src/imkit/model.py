"""
Value objects shared by the wire format, the sessions and the stores.

They are plain frozen records: the wire module turns them into bytes, the stores into rows, and
nothing else has to know how either is done.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Message:
    """
    One stored message as every reader sees it.

    ``seq`` is the conversation's server-assigned, gap-free sequence number; ``server_id`` is unique
    across the whole server (the seed's "SID").  ``bundle_remaining`` counts the messages that follow
    this one in the same atomic bundle, so a reader can hold a bundle back until it is whole.
    """

    server_id: int
    conversation: str
    seq: int
    sender: str
    sender_device: str
    client_msg_id: int
    sent_at: int
    content_type: str
    body: bytes
    bundle_remaining: int = 0


@attrs.frozen
class Item:
    """One message of a submission: what the client wrote, before the server numbers it."""

    content_type: str
    body: bytes


@attrs.frozen
class Submission:
    """
    What a client asked the server to store: one message, or an atomic bundle of several.

    ``(sender, sender_device, client_msg_id)`` identifies it for deduplication; ``members`` are the
    users that must belong to ``conversation`` (a direct conversation is created on first use).
    """

    sender: str
    sender_device: str
    client_msg_id: int
    conversation: str
    members: tuple[str, ...]
    sent_at: int
    items: tuple[Item, ...]


@attrs.frozen
class Appended:
    """The store's answer to a submission: the stored messages, and whether it had them already."""

    messages: tuple[Message, ...]
    duplicate: bool = False
    audience: tuple[str, ...] = ()
    """Who should have the messages pushed (empty for a duplicate: they had them already)."""


def direct_conversation(user_a: str, user_b: str) -> str:
    """The id of the one-to-one conversation between two users, the same whoever asks."""
    first, second = sorted((user_a, user_b))
    return f"dm:{first}:{second}"


def direct_members(conversation: str) -> tuple[str, ...] | None:
    """The two users of a direct conversation id, or None if it is not one."""
    if not conversation.startswith("dm:"):
        return None
    parts = conversation[3:].split(":")
    if len(parts) != 2 or not all(parts):
        return None
    return (parts[0], parts[1])
