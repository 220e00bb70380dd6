"""
What a submission check may say: a message is refused with ``Rejected``.

Checks run on the server before a message is stored (extension handlers, content filters); they
live here, below the hub and the extensions, so both can use them.
"""

from __future__ import annotations

from typing import Any, Callable

from imkit.model import Item
from imkit.wire.errors import ErrorCode


class Rejected(Exception):
    """Refuse a message: nothing is stored, and the sender's ack carries ``code`` and ``reason``."""

    def __init__(self, reason: str, code: ErrorCode = ErrorCode.REJECTED) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


SubmissionCheck = Callable[[str, str, str, Item], Any]
"""``check(sender, device, conversation, item)``: return None (or a Deferred) to allow; raise Rejected."""
