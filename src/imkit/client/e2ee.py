"""
End-to-end encryption in the client: ``IMClient(..., e2ee=...)`` (see docs/e2ee.rst).

Each device has an Olm account (vodozemac): a Curve25519 identity key, an Ed25519 signing key and
a supply of one-time keys, whose public halves it publishes in the server's key directory after
every login.  To send into a conversation a device keeps a Megolm session per conversation: the
message body (and its content type) is encrypted once with it, and each recipient device that
does not have the session yet gets its key in the same message, encrypted to that device with
Olm (opening an Olm session with one of its one-time keys the first time).  Recipients are every
device in the directory of every member, and the sender's own other devices.  The server stores
and forwards only the envelope (``imkit.e2ee.ENVELOPE``), with content type
``application/vnd.imkit.e2ee``.

A receiving device decrypts before the application sees anything: the application gets the same
``Message`` with its real content type and body.  What it cannot decrypt (malformed, not meant for
this device, a changed identity key) is logged, reported to ``on_undecryptable`` callbacks and
handed over in its place as a message of content type ``application/vnd.imkit.undecryptable``
whose body is the reason, so the order and the saved positions stay right.

The device's keys (account, Olm sessions, the Megolm sessions it can decrypt with, the identity
keys it has seen of other devices) persist in a key file, written atomically with mode 0600
whenever they change (a new session, a used one-time key), never per ordinary message; with a
passphrase the whole file is encrypted with AES-256-GCM under a key derived by argon2id.  The
Megolm sessions it sends with are not saved: a restarted device starts new ones, so a message
index is never used twice.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import tempfile
from typing import Any, Callable, Iterable

import attrs
import vodozemac
from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from imkit import e2ee, operations
from imkit.client.results import ClientStopped, IMClientError, QueryFailed, QueryUnanswered, Receipt, SendRejected, SendTimeout
from imkit.model import Item, Message, direct_conversation, direct_members
from imkit.wire import packets, schema
from imkit.wire.errors import DecodeError, ErrorCode

ENCRYPTED = e2ee.ENCRYPTED
UNDECRYPTABLE = e2ee.UNDECRYPTABLE

FORMAT = "imkit-e2ee-keys"
VERSION = 1

_PICKLE_KEY = b"imkit e2ee pickle key, version 1"
"""vodozemac pickles need a key; the key file's own encryption (or its mode) is the protection."""
assert len(_PICKLE_KEY) == 32
_AAD = b"imkit-e2ee-keys-v1"
_MAX_KEY_REQUESTS = 256
"""Users or devices per key query (the server's limit)."""
_MAX_OLM_SESSIONS = 8
"""Olm sessions kept per other device (the least recently used go)."""
_MAX_BATCH = 256
"""Encrypted sends prepared together (one key query serves them all)."""


class E2EEError(IMClientError):
    """The key file cannot be read or written (wrong passphrase, another device's file, damage)."""


@attrs.frozen
class E2EEOptions:
    """
    How a device keeps its keys.  ``IMClient(..., e2ee=True)`` keeps them in memory only (a new
    identity at every start: fine for tests, not for a bot that others should keep trusting);
    ``e2ee="alice-phone.keys"`` is ``E2EEOptions(key_file="alice-phone.keys")``.

    ``passphrase`` encrypts the key file (argon2id with ``kdf_time_cost`` passes over
    ``kdf_memory_cost`` KiB, then AES-256-GCM); without one the file is protected by its mode
    (0600) only.  ``one_time_keys``: how many the device keeps published (at most 50).
    ``rotate_after``: messages sent with one Megolm session before a new one is started.
    """

    key_file: str | None = None
    passphrase: str | None = attrs.field(default=None, repr=False)
    one_time_keys: int = 25
    rotate_after: int = 100
    kdf_time_cost: int = 3
    kdf_memory_cost: int = 65536

    @classmethod
    def of(cls, value: Any) -> E2EEOptions:
        if isinstance(value, E2EEOptions):
            return value
        if value is True:
            return cls()
        if isinstance(value, (str, os.PathLike)):
            return cls(key_file=os.fspath(value))
        raise TypeError(f"e2ee= takes True, a key file path or E2EEOptions, not {value!r}")


def default_key_file(user: str, device: str, server: str) -> str:
    """Where ``imkit send|listen --e2ee`` keep a device's keys: one file per server, user and device."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    safe = "".join(c if c.isalnum() or c in "-._@" else "_" for c in f"{user}@{server}")
    return os.path.join(base, "imkit", "keys", safe, "".join(c if c.isalnum() or c in "-._" else "_" for c in device) + ".keys")


@attrs.frozen
class Undecryptable:
    """An encrypted message this device could not read: ``message`` as delivered, and why not."""

    message: Message
    reason: str


class _Unreadable(Exception):
    pass


@attrs.frozen
class _Device:
    user: str
    device: str
    identity_key: str
    signing_key: str

    @property
    def ident(self) -> tuple[str, str, str]:
        return (self.user, self.device, self.identity_key)


@attrs.define
class _Pin:
    """What this device has seen of another device's keys (trust on first use)."""

    identity_key: str
    signing_key: str = ""


@attrs.define(eq=False)
class _Inbound:
    session: vodozemac.InboundGroupSession
    sender: str
    device: str
    conversation: str


@attrs.define(eq=False)
class _Outbound:
    conversation: str
    session: vodozemac.GroupSession
    shared: set[tuple[str, str, str]] = attrs.Factory(set)
    """(user, device, identity key) of the devices given this session's key."""
    sent: int = 0


@attrs.define(eq=False)
class _Outgoing:
    """A send waiting its turn: items to encrypt, or (``queue``) a plain send kept in order behind them."""

    target_type: int
    target: str
    items: tuple[Item, ...]
    result: Deferred
    edit_of: int | None = None
    queue: Callable[[], int] | None = None
    inner: Deferred | None = None
    timer: Any = None


# The key file ------------------------------------------------------------------------------------


class KeyFile:
    """A JSON document written atomically (temporary file, fsync, rename) with mode 0600."""

    def __init__(self, path: str, options: E2EEOptions) -> None:
        self.path = os.path.abspath(path)
        self._options = options
        self._key: bytes | None = None
        self._kdf: dict[str, Any] | None = None

    def load(self) -> dict[str, Any] | None:
        try:
            with open(self.path, "rb") as file:
                raw = file.read()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise E2EEError(f"cannot read the key file {self.path}: {error.strerror}") from None
        try:
            document = json.loads(raw)
            if document.get("format") != FORMAT or document.get("version") != VERSION:
                raise ValueError("not an imkit key file of a version this imkit reads")
            if not document.get("encrypted"):
                if self._options.passphrase is not None:
                    raise E2EEError(f"the key file {self.path} is not encrypted, but a passphrase was given")
                return document["state"]
            if self._options.passphrase is None:
                raise E2EEError(f"the key file {self.path} is encrypted: give its passphrase")
            self._kdf = document["kdf"]
            key = self._derive()
            plain = AESGCM(key).decrypt(_unb64(document["nonce"]), _unb64(document["ciphertext"]), _AAD)
            return json.loads(plain)
        except E2EEError:
            raise
        except InvalidTag:
            raise E2EEError(f"cannot decrypt the key file {self.path}: wrong passphrase, or the file is damaged") from None
        except (ValueError, KeyError, TypeError) as error:
            raise E2EEError(f"the key file {self.path} is damaged or not a key file ({error})") from None

    def save(self, state: dict[str, Any]) -> None:
        if self._options.passphrase is None:
            document: dict[str, Any] = {"format": FORMAT, "version": VERSION, "encrypted": False, "state": state}
        else:
            if self._kdf is None:
                options = self._options
                self._kdf = {
                    "name": "argon2id", "salt": _b64(secrets.token_bytes(16)),
                    "time_cost": options.kdf_time_cost, "memory_cost": options.kdf_memory_cost, "parallelism": 1,
                }
            nonce = secrets.token_bytes(12)
            ciphertext = AESGCM(self._derive()).encrypt(nonce, json.dumps(state).encode("utf-8"), _AAD)
            document = {
                "format": FORMAT, "version": VERSION, "encrypted": True, "kdf": self._kdf,
                "nonce": _b64(nonce), "ciphertext": _b64(ciphertext),
            }
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            descriptor, temporary = tempfile.mkstemp(prefix=".keys-", dir=directory)  # mode 0600
            try:
                with os.fdopen(descriptor, "wb") as file:
                    file.write(json.dumps(document).encode("utf-8"))
                    file.flush()
                    os.fsync(file.fileno())
                os.chmod(temporary, 0o600)
                os.replace(temporary, self.path)
            except BaseException:
                try:
                    os.unlink(temporary)
                except OSError:
                    pass
                raise
        except OSError as error:
            raise E2EEError(f"cannot write the key file {self.path}: {error.strerror}") from None

    def _derive(self) -> bytes:
        if self._key is None:
            kdf = self._kdf
            assert kdf is not None and self._options.passphrase is not None
            if kdf.get("name") != "argon2id":
                raise ValueError(f"unknown key derivation {kdf.get('name')!r}")
            self._key = hash_secret_raw(
                self._options.passphrase.encode("utf-8"), _unb64(kdf["salt"]),
                time_cost=int(kdf["time_cost"]), memory_cost=int(kdf["memory_cost"]), parallelism=int(kdf["parallelism"]),
                hash_len=32, type=Type.ID,
            )
        return self._key


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


# The device's crypto -------------------------------------------------------------------------------


class DeviceCrypto:
    """
    ``IMClient.e2ee``: one device's keys and sessions, between the client and the server.

    The client hands it what to send (``send``) and what was delivered (``decrypt``); the
    application may wait for ``ready()``, listen with ``on_undecryptable`` and, when a device it
    knows really did start over with new keys, accept them with ``forget_device``.
    """

    log = Logger()

    def __init__(self, client: Any, options: Any) -> None:
        self._client = client
        self.user: str = client.user
        self.device: str = client.device
        self.options = options = E2EEOptions.of(options)
        if not 0 < options.one_time_keys <= 50:
            raise ValueError("one_time_keys is 1 to 50")
        self._file = KeyFile(options.key_file, options) if options.key_file else None
        self._olm: dict[str, list[vodozemac.Session]] = {}
        """Olm sessions by the other device's identity key, the most recently used first."""
        self._inbound: dict[tuple[str, str], _Inbound] = {}
        """Megolm sessions this device decrypts with, by (sender identity key, session id)."""
        self._pins: dict[tuple[str, str], _Pin] = {}
        self._outbound: dict[str, _Outbound] = {}
        self._queue: list[_Outgoing] = []
        self._pumping = False
        self._publishing = False
        self._publish_again = False
        self._published = False
        self._ready_waiters: list[Deferred[None]] = []
        self._undecryptable_callbacks: list[Callable[[Undecryptable], Any]] = []
        self._warned: set[Any] = set()
        self._dirty = False
        state = self._file.load() if self._file is not None else None
        if state is None:
            self._account = vodozemac.Account()
            if self._file is None:
                self.log.warn(
                    "{user}/{device}: end-to-end keys in memory only; a restart makes a new identity "
                    "that devices which saw the old one refuse (give a key file)",
                    user=self.user, device=self.device,
                )
            self._dirty = True
            self._save()
        else:
            self._restore(state)
        self._identity_key = self._account.curve25519_key.to_base64()
        self._signing_key = self._account.ed25519_key.to_base64()

    # Public ------------------------------------------------------------------------------------

    @property
    def identity_key(self) -> str:
        """This device's Curve25519 identity key (base64)."""
        return self._identity_key

    @property
    def signing_key(self) -> str:
        """This device's Ed25519 signing key (base64): its fingerprint, to compare out of band."""
        return self._signing_key

    def ready(self) -> Deferred[None]:
        """Fires once this device's keys are published (after the first login): others can now write to it."""
        if self._published:
            return succeed(None)
        waiter: Deferred[None] = Deferred(lambda d: self._ready_waiters.remove(d))
        self._ready_waiters.append(waiter)
        return waiter

    def on_undecryptable(self, callback: Callable[[Undecryptable], Any]) -> None:
        """Call ``callback(Undecryptable)`` for every encrypted message this device cannot read."""
        self._undecryptable_callbacks.append(callback)

    def known_devices(self) -> dict[tuple[str, str], str]:
        """The other devices this one has seen: (user, device) -> signing key ("" if not yet fetched)."""
        return {key: pin.signing_key for key, pin in sorted(self._pins.items())}

    def forget_device(self, user: str, device: str) -> bool:
        """
        Forget the keys seen for ``device`` of ``user``, so that new ones are trusted on first
        use again (after that device lost its key file, say).  True if it was known.
        """
        pin = self._pins.pop((user, device), None)
        if pin is None:
            return False
        self._dirty = True
        self._save()
        return True

    # Keys on the server ------------------------------------------------------------------------

    def logged_in(self) -> None:
        """The client logged in: publish our keys (and top up the one-time keys)."""
        self._publish()

    def _publish(self) -> None:
        if self._publishing:
            self._publish_again = True
            return
        self._publishing = True
        d = ensureDeferred(self._publish_all())
        d.addErrback(lambda failure: self.log.failure("could not publish the device's keys", failure))

    async def _publish_all(self) -> None:
        try:
            while True:
                self._publish_again = False
                unclaimed = await self._upload()
                wanted = self.options.one_time_keys
                if unclaimed < wanted:
                    self._account.generate_one_time_keys(wanted - unclaimed)
                    self._dirty = True
                    self._save()  # the private halves are safe before the public ones go out
                    unclaimed = await self._upload()
                if not self._publish_again:
                    break
        except QueryFailed as error:
            self.log.error("the server refused this device's keys: {error}", error=error)
            return
        except IMClientError:
            return  # disconnected or stopped: the next login publishes them
        finally:
            self._publishing = False
        if not self._published:
            self.log.info("{user}/{device} published its end-to-end keys", user=self.user, device=self.device)
        self._published = True
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    async def _upload(self) -> int:
        account = self._account
        user, device = self.user, self.device
        identity, signing = self.identity_key, self.signing_key
        fresh = []
        for key_id, key in sorted(account.one_time_keys.items()):
            public = key.to_base64()
            signature = account.sign(e2ee.one_time_key_statement(user, device, key_id, public)).to_base64()
            fresh.append(packets.OneTimeKey(key_id, public, signature))
        signature = account.sign(e2ee.device_statement(user, device, identity, signing)).to_base64()
        keys = packets.DeviceKeys(user, device, identity, signing, signature, tuple(fresh))
        unclaimed = await self._client._query(
            lambda rid: packets.KeysUpload(rid, keys), packets.KeysResult, lambda answer: answer.unclaimed
        )
        if fresh:
            account.mark_keys_as_published()
            self._dirty = True
            self._save()
        return unclaimed

    async def _fetch(self, requests: list[packets.KeyRequest]) -> list[packets.DeviceKeys]:
        found: list[packets.DeviceKeys] = []
        for start in range(0, len(requests), _MAX_KEY_REQUESTS):
            chunk = tuple(requests[start : start + _MAX_KEY_REQUESTS])
            query = self._client._query
            found.extend(
                await self._patiently(lambda: query(lambda rid: packets.KeysQuery(rid, chunk), packets.KeysResult, lambda answer: answer.devices))
            )
        return found

    async def _patiently(self, ask: Callable[[], Deferred[Any]]) -> Any:
        """Ask, and again (after a pause) while the server says RATE_LIMITED."""
        pause = 0.5
        while True:
            try:
                return await ask()
            except QueryFailed as error:
                if error.code != ErrorCode.RATE_LIMITED or pause > 30:
                    raise
            await deferLater(self._client._reactor, pause, lambda: None)
            pause *= 2

    def _accept(self, keys: packets.DeviceKeys) -> _Device | None:
        """A device from the directory, if its keys are signed and are the ones seen before."""
        name = (keys.user, keys.device)
        if name == (self.user, self.device):
            if keys.identity_key != self.identity_key:
                self._warn_once(name, keys.identity_key, "the server lists other keys for this very device ({user}/{device})")
            return None
        statement = e2ee.device_statement(keys.user, keys.device, keys.identity_key, keys.signing_key)
        if not e2ee.signature_valid(keys.signing_key, keys.signature, statement):
            self._warn_once(name, keys.signature, "not encrypting for {user}/{device}: its keys are not signed by it")
            return None
        pin = self._pins.get(name)
        if pin is None:
            self._pins[name] = _Pin(keys.identity_key, keys.signing_key)
            self._dirty = True
        elif pin.identity_key != keys.identity_key or pin.signing_key not in ("", keys.signing_key):
            self._warn_once(
                name, keys.identity_key,
                "not encrypting for {user}/{device}: its keys changed since this device first saw them "
                "(forget_device() accepts the new ones)",
            )
            return None
        elif not pin.signing_key:
            pin.signing_key = keys.signing_key
            self._dirty = True
        return _Device(keys.user, keys.device, keys.identity_key, keys.signing_key)

    def _warn_once(self, name: tuple[str, str], what: str, text: str) -> None:
        if (name, what) not in self._warned:
            self._warned.add((name, what))
            self.log.warn(text, user=name[0], device=name[1])

    # Sending -----------------------------------------------------------------------------------

    @property
    def sending(self) -> bool:
        """Sends are waiting to be encrypted (plain ones must queue behind them)."""
        return bool(self._queue)

    def send(self, target_type: int, target: str, items: tuple[Item, ...], edit_of: int | None = None) -> Deferred[Receipt]:
        """Encrypt the items that are not operations, then send; Deferred[Receipt], as ``IMClient.send``."""
        if edit_of is None and all(operations.is_operation(item.content_type) for item in items):
            return self._client._submit(lambda: self._queue_plain(target_type, target, items))
        if target_type == schema.TARGET_NEW_GROUP:
            raise ValueError("a new group's first item is its creation; send encrypted messages to the group once created")
        return self._enqueue(_Outgoing(target_type, target, tuple(items), Deferred(), edit_of))

    def in_order(self, queue: Callable[[], int]) -> Deferred[Receipt]:
        """A plain send (an operation) that must not overtake the encrypted sends before it."""
        return self._enqueue(_Outgoing(0, "", (), Deferred(), queue=queue))

    def _enqueue(self, outgoing: _Outgoing) -> Deferred[Receipt]:
        client = self._client
        if client._failure is not None:
            return fail(client._failure)
        if client._stopped:
            return fail(ClientStopped("the client is stopped; start it before sending"))
        outgoing.result = Deferred(lambda _: self._cancel(outgoing))
        timeout = client.settings.send_timeout
        if timeout is not None:
            # Waiting here (for a login, or for keys) counts against the send's timeout, as it would in the core.
            outgoing.timer = client._reactor.callLater(timeout, self._expire, outgoing, timeout)
        self._queue.append(outgoing)
        self._pump()
        return outgoing.result

    def _expire(self, outgoing: _Outgoing, timeout: float) -> None:
        outgoing.timer = None
        if outgoing in self._queue:
            self._queue.remove(outgoing)
            _settle(outgoing.result, Failure(SendTimeout(0, timeout)))

    def _queue_plain(self, target_type: int, target: str, items: tuple[Item, ...]) -> int:
        core = self._client._core
        if len(items) == 1:
            return core.send(target_type, target, items[0].content_type, items[0].body)
        return core.send_bundle(target_type, target, items)

    def _cancel(self, outgoing: _Outgoing) -> None:
        _stop_timer(outgoing)
        if outgoing in self._queue:
            self._queue.remove(outgoing)
        elif outgoing.inner is not None and not outgoing.inner.called:
            outgoing.inner.cancel()

    def fail_pending(self, error: IMClientError) -> None:
        waiting, self._queue = self._queue, []
        for outgoing in waiting:
            _stop_timer(outgoing)
            _settle(outgoing.result, Failure(error))

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        d = ensureDeferred(self._drain())
        d.addErrback(lambda failure: self.log.failure("encrypting sends failed", failure))

    async def _drain(self) -> None:
        client = self._client
        try:
            while self._queue:
                if client._stopped or client._failure is not None:
                    self.fail_pending(client._failure or ClientStopped())
                    return
                head = self._queue[0]
                if head.queue is not None:
                    self._queue.pop(0)
                    self._submit(head, head.queue)
                    continue
                if not client.logged_in:
                    try:
                        await client.loggedIn()
                    except IMClientError as error:
                        self.fail_pending(error)
                        return
                    continue
                batch = []
                for outgoing in self._queue:
                    if outgoing.queue is not None or len(batch) >= _MAX_BATCH:
                        break
                    batch.append(outgoing)
                try:
                    await self._send_batch(batch)
                except QueryUnanswered:
                    continue  # disconnected, or no answer: try again (after the next login)
                except QueryFailed as error:
                    for outgoing in batch:
                        if outgoing in self._queue:
                            self._queue.remove(outgoing)
                            _settle(outgoing.result, Failure(SendRejected(0, error.code, error.reason)))
                except IMClientError as error:
                    self.fail_pending(error)
                    return
        finally:
            self._pumping = False

    async def _send_batch(self, batch: list[_Outgoing]) -> None:
        plans: dict[tuple[int, str], tuple[str, list[_Device]] | QueryFailed] = {}
        for outgoing in batch:
            key = (outgoing.target_type, outgoing.target)
            if key not in plans:
                try:
                    plans[key] = await self._plan(*key)
                except QueryFailed as error:
                    plans[key] = error
        prepared: set[str] = set()
        for plan in plans.values():
            if not isinstance(plan, QueryFailed) and plan[0] not in prepared:
                await self._prepare(*plan)
                prepared.add(plan[0])
        for outgoing in batch:
            if outgoing not in self._queue:
                continue  # cancelled meanwhile
            self._queue.remove(outgoing)
            plan = plans[(outgoing.target_type, outgoing.target)]
            if isinstance(plan, QueryFailed):
                _settle(outgoing.result, Failure(SendRejected(0, plan.code, plan.reason)))
                continue
            conversation, devices = plan
            try:
                items, shared = self._seal(outgoing, conversation, devices)
                self._save()
            except Exception as error:
                self.log.failure("could not encrypt a message for {conversation}", conversation=conversation)
                _settle(outgoing.result, Failure(error if isinstance(error, IMClientError) else E2EEError(str(error))))
                continue
            self._submit(outgoing, lambda: self._queue_plain(outgoing.target_type, outgoing.target, items), shared)

    def _submit(self, outgoing: _Outgoing, queue: Callable[[], int], shared: tuple[Any, ...] = ()) -> None:
        _stop_timer(outgoing)  # the core keeps the send's timeout from here (counted afresh: a little longer in all)
        inner = outgoing.inner = self._client._submit(queue, in_order=False)

        def settled(result: Any) -> None:
            if isinstance(result, Failure) and shared:
                # The keys it carried never arrived: give them again with the next message.
                outbound, idents = shared
                outbound.shared.difference_update(idents)
            _settle(outgoing.result, result)

        inner.addBoth(settled)

    async def _plan(self, target_type: int, target: str) -> tuple[str, list[_Device]]:
        """The conversation a send goes to, and the devices to encrypt for (not this one)."""
        if target_type == schema.TARGET_USER:
            conversation, users = direct_conversation(self.user, target), {self.user, target}
        else:
            conversation = target
            pair = direct_members(target)
            if pair is not None:
                users = set(pair)
            else:
                users = {member.user for member in await self._patiently(lambda: self._client.members(target))} | {self.user}
        found = await self._fetch([packets.KeyRequest(False, user, "") for user in sorted(users)])
        devices = [device for device in (self._accept(keys) for keys in found if keys.user in users) if device is not None]
        return conversation, devices

    async def _prepare(self, conversation: str, devices: list[_Device]) -> None:
        """The conversation's Megolm session (a new one if due), and Olm sessions with whoever needs its key."""
        outbound = self._outbound.get(conversation)
        current = {device.ident for device in devices}
        if outbound is None or outbound.sent >= self.options.rotate_after or outbound.shared - current:
            outbound = self._new_outbound(conversation)
        missing = [d for d in devices if d.ident not in outbound.shared and not self._olm.get(d.identity_key)]
        if not missing:
            return
        claimed = {(keys.user, keys.device): keys for keys in await self._fetch([packets.KeyRequest(True, d.user, d.device) for d in missing])}
        for device in missing:
            session = self._open_olm(device, claimed.get((device.user, device.device)))
            if session is None:
                self.log.warn(
                    "cannot encrypt for {user}/{device} now: no usable one-time key (it has to come online and publish more)",
                    user=device.user, device=device.device,
                )
            else:
                self._olm[device.identity_key] = [session]
                self._dirty = True

    def _open_olm(self, device: _Device, keys: packets.DeviceKeys | None) -> vodozemac.Session | None:
        """An Olm session to ``device`` with the one-time key claimed for it, if that key is its own."""
        if keys is None or keys.identity_key != device.identity_key or not keys.one_time_keys:
            return None
        one = keys.one_time_keys[0]
        statement = e2ee.one_time_key_statement(device.user, device.device, one.key_id, one.key)
        if not e2ee.signature_valid(device.signing_key, one.signature, statement):
            return None
        try:
            return self._account.create_outbound_session(
                vodozemac.Curve25519PublicKey.from_base64(device.identity_key), vodozemac.Curve25519PublicKey.from_base64(one.key)
            )
        except ValueError:
            return None

    def _new_outbound(self, conversation: str) -> _Outbound:
        session = vodozemac.GroupSession()
        outbound = self._outbound[conversation] = _Outbound(conversation, session)
        # Our own copy, so this device reads its own messages when they come back (a sync).
        inbound = vodozemac.InboundGroupSession(session.session_key)
        self._inbound[(self.identity_key, session.session_id)] = _Inbound(inbound, self.user, self.device, conversation)
        self._dirty = True
        return outbound

    def _seal(self, outgoing: _Outgoing, conversation: str, devices: list[_Device]) -> tuple[tuple[Item, ...], tuple[Any, ...]]:
        """The items to send, the content ones encrypted, and what key shares they carry."""
        outbound = self._outbound[conversation]
        sealed = []
        given: list[tuple[str, str, str]] = []
        for item in outgoing.items:
            if operations.is_operation(item.content_type) and outgoing.edit_of is None:
                sealed.append(item)
                continue
            shares = []
            for device in devices:
                sessions = self._olm.get(device.identity_key)
                if device.ident in outbound.shared or not sessions:
                    continue
                payload = e2ee.SESSION_KEY.build(
                    dict(
                        sender=self.user, sender_device=self.device, recipient=device.user, recipient_device=device.device,
                        recipient_key=device.identity_key, conversation=conversation,
                        session_id=outbound.session.session_id, session_key=outbound.session.session_key.to_base64(),
                    )
                )
                kind, ciphertext = sessions[0].encrypt(payload).to_parts()
                shares.append(dict(user=device.user, device=device.device, type=kind, ciphertext=ciphertext))
                outbound.shared.add(device.ident)
                given.append(device.ident)
                self._dirty = True
            content = e2ee.CONTENT.build(dict(content_type=item.content_type, body=item.body))
            envelope = e2ee.ENVELOPE.build(
                dict(
                    version=e2ee.ENVELOPE_VERSION, sender_key=self.identity_key, session_id=outbound.session.session_id,
                    shares=shares, ciphertext=outbound.session.encrypt(content).to_bytes(),
                )
            )
            outbound.sent += 1
            if outgoing.edit_of is not None:
                sealed.append(operations.edit(outgoing.edit_of, ENCRYPTED, envelope))
            else:
                sealed.append(Item(ENCRYPTED, envelope))
        return tuple(sealed), ((outbound, tuple(given)) if given else ())

    # Receiving ---------------------------------------------------------------------------------

    def decrypt(self, messages: Iterable[Message]) -> list[Message]:
        """The delivered messages as the application sees them: decrypted, or marked undecryptable."""
        shown = []
        for message in messages:
            content_type = message.content_type
            if content_type == ENCRYPTED:
                try:
                    inner_type, body = self._open(message, message.body)
                    shown.append(attrs.evolve(message, content_type=inner_type, body=body))
                except _Unreadable as error:
                    shown.append(attrs.evolve(message, content_type=UNDECRYPTABLE, body=self._unreadable(message, str(error))))
            elif content_type == schema.EDIT:
                shown.append(self._open_edit(message))
            else:
                shown.append(message)
        if self._dirty:
            try:
                self._save()
            except E2EEError:
                self.log.failure("could not save the device's keys")
        if self._used_one_time_key:
            self._used_one_time_key = False
            if self._client.logged_in:
                self._publish()  # top the one-time keys up again
        return shown

    _used_one_time_key = False

    def _open_edit(self, message: Message) -> Message:
        try:
            edit = operations.decode(schema.EDIT, message.body)
        except DecodeError:
            return message
        if edit.content_type != ENCRYPTED:
            return message
        try:
            inner_type, body = self._open(message, edit.body)
        except _Unreadable as error:
            inner_type, body = UNDECRYPTABLE, self._unreadable(message, str(error))
        return attrs.evolve(message, body=operations.edit(edit.seq, inner_type, body).body)

    def _unreadable(self, message: Message, reason: str) -> bytes:
        self.log.warn(
            "cannot decrypt {conversation}#{seq} from {sender}/{device}: {reason}",
            conversation=message.conversation, seq=message.seq, sender=message.sender, device=message.sender_device, reason=reason,
        )
        event = Undecryptable(message, reason)
        for callback in list(self._undecryptable_callbacks):
            try:
                callback(event)
            except Exception:
                self.log.failure("undecryptable callback {callback!r} failed", callback=callback)
        return reason.encode("utf-8")

    def _open(self, message: Message, body: bytes) -> tuple[str, bytes]:
        try:
            envelope = e2ee.parse(e2ee.ENVELOPE, body)
        except e2ee.EnvelopeError as error:
            raise _Unreadable(str(error)) from None
        if envelope.version != e2ee.ENVELOPE_VERSION:
            raise _Unreadable(f"envelope version {envelope.version} is not one this imkit reads")
        sender_key = envelope.sender_key
        name = (message.sender, message.sender_device)
        if name == (self.user, self.device):
            if sender_key != self.identity_key:
                raise _Unreadable("sent from this device under another identity key (before its keys were renewed?)")
        else:
            pin = self._pins.get(name)
            if pin is not None and pin.identity_key != sender_key:
                raise _Unreadable(
                    f"the identity key of {message.sender}/{message.sender_device} changed since this device first "
                    "saw it (forget_device() accepts the new one)"
                )
        inbound = self._inbound.get((sender_key, envelope.session_id))
        if inbound is None:
            share = next((s for s in envelope.shares if s.user == self.user and s.device == self.device), None)
            if share is None:
                raise _Unreadable("not encrypted for this device (it was not a recipient when this was sent)")
            inbound = self._accept_share(message, envelope, share)
        if (inbound.sender, inbound.device, inbound.conversation) != (message.sender, message.sender_device, message.conversation):
            raise _Unreadable("its key was given for another sender or conversation")
        try:
            plaintext = inbound.session.decrypt(vodozemac.MegolmMessage.from_bytes(envelope.ciphertext)).plaintext
        except ValueError as error:
            raise _Unreadable(f"Megolm: {error}") from None
        try:
            content = e2ee.parse(e2ee.CONTENT, plaintext)
        except e2ee.EnvelopeError as error:
            raise _Unreadable(str(error)) from None
        if operations.is_operation(content.content_type):
            raise _Unreadable("an encrypted message cannot be an operation")
        return content.content_type, bytes(content.body)

    def _accept_share(self, message: Message, envelope: Any, share: Any) -> _Inbound:
        sender_key = envelope.sender_key
        try:
            curve = vodozemac.Curve25519PublicKey.from_base64(sender_key)
            olm = vodozemac.AnyOlmMessage.from_parts(share.type, bytes(share.ciphertext))
        except ValueError as error:
            raise _Unreadable(f"malformed key share: {error}") from None
        sessions = self._olm.get(sender_key, [])
        plaintext = None
        used = None
        for session in sessions:
            try:
                if share.type == 0 and not session.session_matches(olm.to_pre_key()):
                    continue
                plaintext = session.decrypt(olm)
            except ValueError:
                continue
            used = session
            break
        if plaintext is None:
            if share.type != 0:
                raise _Unreadable("no Olm session with the sending device can decrypt its key share")
            try:
                used, plaintext = self._account.create_inbound_session(curve, olm.to_pre_key())
            except ValueError as error:
                raise _Unreadable(f"cannot open an Olm session with the sending device: {error}") from None
            self._used_one_time_key = True
        self._olm[sender_key] = ([used] + [session for session in sessions if session is not used])[:_MAX_OLM_SESSIONS]
        self._dirty = True
        try:
            payload = e2ee.parse(e2ee.SESSION_KEY, plaintext)
        except e2ee.EnvelopeError as error:
            raise _Unreadable(str(error)) from None
        expected = (
            message.sender, message.sender_device, self.user, self.device, self.identity_key, message.conversation, envelope.session_id,
        )
        found = (
            payload.sender, payload.sender_device, payload.recipient, payload.recipient_device, payload.recipient_key,
            payload.conversation, payload.session_id,
        )
        if found != expected:
            raise _Unreadable("its key share names another sender, recipient, conversation or session")
        try:
            session = vodozemac.InboundGroupSession(vodozemac.SessionKey(payload.session_key))
        except ValueError as error:
            raise _Unreadable(f"malformed session key: {error}") from None
        if session.session_id != envelope.session_id:
            raise _Unreadable("its session key is not the key of its session")
        inbound = self._inbound[(sender_key, envelope.session_id)] = _Inbound(
            session, message.sender, message.sender_device, message.conversation
        )
        name = (message.sender, message.sender_device)
        if name not in self._pins:
            self._pins[name] = _Pin(sender_key)  # trust on first use
        return inbound

    # Persistence -------------------------------------------------------------------------------

    def _save(self) -> None:
        if not self._dirty:
            return
        if self._file is not None:
            self._file.save(self._snapshot())
        self._dirty = False

    def _snapshot(self) -> dict[str, Any]:
        key = _PICKLE_KEY
        return {
            "user": self.user,
            "device": self.device,
            "account": self._account.pickle(key),
            "olm": {peer: [session.pickle(key) for session in sessions] for peer, sessions in self._olm.items()},
            "inbound": [
                {
                    "sender_key": sender_key, "session_id": session_id, "sender": inbound.sender, "device": inbound.device,
                    "conversation": inbound.conversation, "pickle": inbound.session.pickle(key),
                }
                for (sender_key, session_id), inbound in self._inbound.items()
            ],
            "pins": [
                {"user": user, "device": device, "identity_key": pin.identity_key, "signing_key": pin.signing_key}
                for (user, device), pin in self._pins.items()
            ],
        }

    def _restore(self, state: dict[str, Any]) -> None:
        path = self._file.path if self._file is not None else "?"
        if (state.get("user"), state.get("device")) != (self.user, self.device):
            raise E2EEError(
                f"the key file {path} holds the keys of {state.get('user')}/{state.get('device')}, not of {self.user}/{self.device}"
            )
        key = _PICKLE_KEY
        try:
            self._account = vodozemac.Account.from_pickle(state["account"], key)
            self._olm = {peer: [vodozemac.Session.from_pickle(p, key) for p in pickles] for peer, pickles in state["olm"].items()}
            for entry in state["inbound"]:
                session = vodozemac.InboundGroupSession.from_pickle(entry["pickle"], key)
                self._inbound[(entry["sender_key"], entry["session_id"])] = _Inbound(
                    session, entry["sender"], entry["device"], entry["conversation"]
                )
            for entry in state["pins"]:
                self._pins[(entry["user"], entry["device"])] = _Pin(entry["identity_key"], entry["signing_key"])
        except (KeyError, TypeError, ValueError) as error:
            raise E2EEError(f"the key file {path} is damaged ({error})") from None


def _stop_timer(outgoing: _Outgoing) -> None:
    if outgoing.timer is not None:
        if outgoing.timer.active():
            outgoing.timer.cancel()
        outgoing.timer = None


def _settle(result: Deferred, outcome: Any) -> None:
    if result.called:
        return
    if isinstance(outcome, Failure):
        if outcome.check(CancelledError):
            return
        result.errback(outcome)
    else:
        result.callback(outcome)
