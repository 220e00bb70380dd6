"""The receiving side's dedupe and reorder buffer: exactly once, in sequence order."""

from __future__ import annotations

from imkit.model import Message


class Inbound:
    """
    Per conversation, the highest sequence delivered to the application and the messages that
    arrived ahead of a gap.

    A message at or below the delivered sequence is a duplicate.  A message just above it is
    released, together with every buffered one that follows without a gap; a bundle is released
    only when all its messages are here, so the application never sees half of one.
    """

    def __init__(self, delivered: dict[str, int] | None = None) -> None:
        self.delivered: dict[str, int] = dict(delivered or {})
        self.pending: dict[str, dict[int, Message]] = {}
        self.ack_due: set[str] = set()

    def knows(self, conversation: str) -> bool:
        return conversation in self.delivered

    def start(self, conversation: str, seq: int) -> list[Message]:
        """Learn where an unknown conversation starts for us; release what was waiting for it."""
        if conversation in self.delivered:
            return []
        self.delivered[conversation] = seq
        return self._release(conversation)

    def skip_to(self, conversation: str, seq: int) -> list[Message]:
        """
        The server says nothing up to ``seq`` will ever come (pruned, or before we could see it):
        move past it and release what was waiting behind the hole.
        """
        if self.delivered.get(conversation, 0) >= seq:
            return []
        self.delivered[conversation] = seq
        self.ack_due.add(conversation)
        return self._release(conversation)

    def offer(self, message: Message) -> list[Message]:
        """Take one received message; return those now deliverable, in order."""
        conversation = message.conversation
        base = self.delivered.get(conversation)
        if base is not None and message.seq <= base:
            self.ack_due.add(conversation)
            return []
        waiting = self.pending.get(conversation)
        if waiting is None:
            if base is not None and message.seq == base + 1 and not message.bundle_remaining:
                self.delivered[conversation] = message.seq
                self.ack_due.add(conversation)
                return [message]
            waiting = self.pending[conversation] = {}
        waiting[message.seq] = message
        if base is None:
            return []
        return self._release(conversation)

    def _release(self, conversation: str) -> list[Message]:
        waiting = self.pending.get(conversation)
        if not waiting:
            self.pending.pop(conversation, None)
            return []
        base = self.delivered[conversation]
        for seq in [seq for seq in waiting if seq <= base]:
            del waiting[seq]
        released: list[Message] = []
        while base + 1 in waiting:
            first = waiting[base + 1]
            rest = first.bundle_remaining
            if rest and not all(base + 1 + i in waiting for i in range(1, rest + 1)):
                break
            for seq in range(base + 1, base + 2 + rest):
                released.append(waiting.pop(seq))
            base += 1 + rest
        if released:
            self.delivered[conversation] = base
            self.ack_due.add(conversation)
        if not waiting:
            del self.pending[conversation]
        return released

    def gaps(self) -> dict[str, int]:
        """Conversations with messages waiting behind a gap -> the sequence delivered so far."""
        return {c: self.delivered[c] for c in self.pending if c in self.delivered}

    def unknown_waiting(self) -> list[str]:
        return [c for c in self.pending if c not in self.delivered]

    def take_acks(self) -> list[tuple[str, int]]:
        due, self.ack_due = self.ack_due, set()
        return [(c, self.delivered[c]) for c in sorted(due)]
