"""
The key directory of end-to-end encryption: devices publish their public keys, others fetch them.

A logged-in device publishes its identity keys and a batch of one-time keys (``KeysUpload``),
signed with its own Ed25519 key; the server checks that the keys are the session's own device's
and that the signatures hold, and stores them.  Any logged-in user may fetch the keys of other
users' devices (``KeysQuery``), claiming one one-time key per device to open an Olm session with
it; each one-time key is handed out once.  Only public keys ever reach the server.

Neither is sequenced: a query is answered now or not at all, like the other requests
(``imkit.server.requests``), and counts against the same lookup rate limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from imkit import e2ee
from imkit.session.server import READY, ServerConnection
from imkit.wire import packets
from imkit.wire.errors import ErrorCode

if TYPE_CHECKING:  # pragma: no cover
    from imkit.server.hub import Hub

MAX_ONE_TIME_KEYS = 100
"""Unclaimed one-time keys the server keeps per device (more in an upload are skipped)."""
MAX_UPLOAD = 100
"""One-time keys in one upload."""
MAX_REQUESTS = 256
"""Users or devices asked about in one query."""
MAX_DEVICES = 1000
"""Devices in one answer (the rest are left out: ask for fewer users at a time)."""
_MAX_KEY_ID = 64

KEY_PACKETS = (packets.KeysUpload, packets.KeysQuery)
"""The request packets this module answers (the hub passes them here)."""


class KeyDirectory:
    log = Logger()

    def __init__(self, hub: "Hub") -> None:
        self.hub = hub

    async def handle(self, conn: ServerConnection, packet: Any) -> None:
        kind = type(packet)
        retry = self.hub.limits.lookup(conn, None)
        if retry is not None:
            self._answer(conn, packet, ErrorCode.RATE_LIMITED, f"too many key requests; ask again from server time {retry} ms")
        elif kind is packets.KeysUpload:
            await self._upload(conn, packet)
        elif kind is packets.KeysQuery:
            await self._query(conn, packet)

    # Publishing --------------------------------------------------------------------------------

    async def _upload(self, conn: ServerConnection, upload: packets.KeysUpload) -> None:
        keys = upload.keys
        if (keys.user, keys.device) != (conn.user, conn.device):
            self.log.warn(
                "{user}/{device} tried to publish keys for {other_user}/{other_device}",
                user=conn.user, device=conn.device, other_user=keys.user, other_device=keys.device,
            )
            reason = f"a device publishes only its own keys: you are logged in as {conn.user}/{conn.device}"
            self._answer(conn, upload, ErrorCode.NOT_ALLOWED, reason)
            return
        problem = _check(keys)
        if problem is not None:
            self._answer(conn, upload, ErrorCode.INVALID_OPERATION, problem)
            return
        store = self.hub.store
        known = {old.device: old for old in await store.device_keys([keys.user])}.get(keys.device)
        if known is not None and known.identity_key != keys.identity_key:
            self.log.info("{user}/{device} published new identity keys", user=keys.user, device=keys.device)
        unclaimed = await store.publish_keys(keys, MAX_ONE_TIME_KEYS)
        self._answer(conn, upload, ErrorCode.OK, "", unclaimed=unclaimed)

    # Fetching ----------------------------------------------------------------------------------

    async def _query(self, conn: ServerConnection, query: packets.KeysQuery) -> None:
        requests = query.requests
        if len(requests) > MAX_REQUESTS:
            self._answer(conn, query, ErrorCode.TOO_LARGE, f"ask about at most {MAX_REQUESTS} users or devices at a time")
            return
        store = self.hub.store
        published = await store.device_keys(sorted({request.user for request in requests}))
        by_user: dict[str, list[packets.DeviceKeys]] = {}
        for keys in published:
            by_user.setdefault(keys.user, []).append(keys)
        answered: dict[tuple[str, str], packets.DeviceKeys] = {}
        claims: list[tuple[str, str]] = []
        for request in requests:
            for keys in by_user.get(request.user, ()):
                if request.device and keys.device != request.device:
                    continue
                key = (keys.user, keys.device)
                answered.setdefault(key, keys)
                if request.claim and key not in claims:
                    claims.append(key)
        if len(answered) > MAX_DEVICES:
            answered = dict(sorted(answered.items())[:MAX_DEVICES])
            claims = [key for key in claims if key in answered]
        claimed = await store.claim_one_time_keys(claims) if claims else {}
        devices = tuple(
            packets.DeviceKeys(keys.user, keys.device, keys.identity_key, keys.signing_key, keys.signature, (claimed[key],) if key in claimed else ())
            for key, keys in sorted(answered.items())
        )
        self._answer(conn, query, ErrorCode.OK, "", devices)

    def _answer(
        self, conn: ServerConnection, request: Any, code: ErrorCode, reason: str, devices: tuple = (), unclaimed: int = 0
    ) -> None:
        if conn.state == READY:
            conn.send_packet(packets.KeysResult(request.request_id, int(code), unclaimed, reason, devices))


def _check(keys: packets.DeviceKeys) -> str | None:
    """Why a device's upload is refused, or None: every key well formed and signed by the device."""
    if not e2ee.is_key(keys.identity_key) or not e2ee.is_key(keys.signing_key):
        return "identity and signing keys are 32-byte keys in base64"
    statement = e2ee.device_statement(keys.user, keys.device, keys.identity_key, keys.signing_key)
    if not e2ee.signature_valid(keys.signing_key, keys.signature, statement):
        return "the device's signature of its keys does not verify"
    if len(keys.one_time_keys) > MAX_UPLOAD:
        return f"upload at most {MAX_UPLOAD} one-time keys at a time"
    for one in keys.one_time_keys:
        if not 0 < len(one.key_id) <= _MAX_KEY_ID or not e2ee.is_key(one.key):
            return f"one-time key {one.key_id[:_MAX_KEY_ID]!r} is not a 32-byte key in base64 with a 1-{_MAX_KEY_ID} character id"
        statement = e2ee.one_time_key_statement(keys.user, keys.device, one.key_id, one.key)
        if not e2ee.signature_valid(keys.signing_key, one.signature, statement):
            return f"the signature of one-time key {one.key_id!r} does not verify"
    return None
