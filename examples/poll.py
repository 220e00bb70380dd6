"""
A custom packet type in about 30 lines: a vote, checked by the server, tallied by the client.

Server:  twistd -n imkit --extension examples.poll:POLL_TYPES
Client:  see examples/poll_bot.py (Tally counts votes; send_packet casts one).

A vote travels like any message (stored, acknowledged, resent, deduplicated, in order), so a
tally built from ``on_packet`` counts every vote exactly once, even across reconnects.
"""

from construct import Int8ub, Int32ub, PascalString, Struct

from imkit.checks import Rejected
from imkit.extensions import PacketType

CHOICES = 4

VOTE = PacketType(0x8001, "vote", Struct("poll" / Int32ub, "choice" / Int8ub, "comment" / PascalString(Int8ub, "utf8")))


@VOTE.on_server
def check_vote(context, vote):
    """Runs on the server before the vote is stored: a refused vote gets an error ack, nothing else."""
    if vote.choice >= CHOICES:
        raise Rejected(f"choice {vote.choice} is not one of 0-{CHOICES - 1}")


POLL_TYPES = [VOTE]


class Tally:
    """The client side: votes per poll, counted as they are delivered."""

    def __init__(self, client):
        self.counts: dict[int, list[int]] = {}
        client.on_packet(VOTE, self.count)

    def count(self, message, vote):
        self.counts.setdefault(vote.poll, [0] * CHOICES)[vote.choice] += 1
