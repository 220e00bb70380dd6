"""
End-to-end encryption: the key directory on the server, and IMClient(e2ee=...) against the real hub.

Most tests run real IMClients against a real Hub over iosim's in-memory transports with a Clock
(as tests/test_client_conversations.py does); ``LoopbackTests`` runs the twistd service with
SQLite over real loopback TLS and reads the database file for plaintext.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import sys
import tempfile
from typing import Any

import attrs
import vodozemac
from twisted.internet import defer, reactor
from twisted.trial import unittest

from imkit import cli, e2ee
from imkit.client import ClientSettings, IMClient, Message, QueryFailed, SendTimeout, describe, development_ca, tls_endpoint
from imkit.client.e2ee import E2EEError, E2EEOptions, Undecryptable, default_key_file
from imkit.passwords import Passwords
from imkit.server import tap
from imkit.server.keys import MAX_ONE_TIME_KEYS
from imkit.store import SQLiteStore
from imkit.store import sqlite as sqlite_module
from imkit.wire import packets, schema
from imkit.wire.errors import ErrorCode
from test_client_conversations import AB, ConversationTestCase

CHEAP_KDF = dict(kdf_time_cost=1, kdf_memory_cost=8)


def stored_messages(store: Any) -> list[Message]:
    return [message for messages in store._messages.values() for message in messages]


class E2EETestCase(ConversationTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.directory = tempfile.mkdtemp(prefix="imkit-e2ee-")
        self.undecryptable: dict[str, list[Undecryptable]] = {}

    def tearDown(self) -> None:
        super().tearDown()  # stops the clients, which save their state files
        shutil.rmtree(self.directory, True)

    def key_file(self, user: str, device: str) -> str:
        return os.path.join(self.directory, f"{user}-{device}.keys")

    def secure(self, user: str, device: str = "phone", **kwargs: Any) -> IMClient:
        """A started client with end-to-end encryption whose keys are published."""
        kwargs.setdefault("e2ee", self.key_file(user, device))
        client = self.connect(user, device, start=False, **kwargs)
        # A restarted device must not repeat its predecessor's client message ids (deduplicated).
        self.started = getattr(self, "started", 0) + 1
        client._rng.seed(f"{user}/{device}/{self.started}")
        failures = self.undecryptable[f"{user}/{device}"] = []
        client.e2ee.on_undecryptable(failures.append)
        client.startService()
        self.pump()
        self.successResultOf(client.caughtUp())
        self.done(client.e2ee.ready())
        return client

    def texts(self, name: str, conversation: str | None = None) -> list[tuple[str, str]]:
        return [
            (event.sender, event.text)
            for event in self.heard[name]
            if event.kind == "message" and event.content_type != e2ee.UNDECRYPTABLE
            and (conversation is None or event.conversation == conversation)
        ]

    def assert_no_plaintext(self, *texts: bytes) -> None:
        for message in stored_messages(self.store):
            for text in texts:
                self.assertNotIn(text, message.body, f"{message.conversation}#{message.seq} is stored in the clear")


# The key directory ---------------------------------------------------------------------------------


class KeyDirectoryTests(E2EETestCase):
    def signed_keys(self, account: vodozemac.Account, user: str, device: str, one_time: int = 0) -> packets.DeviceKeys:
        identity, signing = account.curve25519_key.to_base64(), account.ed25519_key.to_base64()
        account.generate_one_time_keys(one_time) if one_time else None
        keys = tuple(
            packets.OneTimeKey(key_id, key.to_base64(), account.sign(e2ee.one_time_key_statement(user, device, key_id, key.to_base64())).to_base64())
            for key_id, key in sorted(account.one_time_keys.items())
        )
        signature = account.sign(e2ee.device_statement(user, device, identity, signing)).to_base64()
        return packets.DeviceKeys(user, device, identity, signing, signature, keys)

    def upload(self, client: IMClient, keys: packets.DeviceKeys) -> Any:
        asked = client._query(lambda rid: packets.KeysUpload(rid, keys), packets.KeysResult, lambda answer: answer.unclaimed)
        self.pump()
        return asked

    def test_a_device_publishes_only_its_own_keys(self) -> None:
        """alice cannot publish keys for bob's device, nor for another device of her own."""
        alice = self.connect("alice")
        bob = self.secure("bob")
        before = self.successResultOf(self.store.device_keys(["alice", "bob"]))
        self.assertEqual([(k.user, k.device) for k in before], [("bob", "phone")])
        mallory = vodozemac.Account()
        for user, device in (("bob", "phone"), ("bob", "laptop"), ("alice", "laptop")):
            error = self.failureResultOf(self.upload(alice, self.signed_keys(mallory, user, device, 3)), QueryFailed).value
            self.assertEqual(error.code, ErrorCode.NOT_ALLOWED)
            self.assertIn("alice/phone", error.reason)
        self.assertEqual(self.successResultOf(self.store.device_keys(["alice", "bob"])), before)
        # bob's one-time keys are still all there for alice to claim.
        self.assertEqual(self.successResultOf(self.upload(bob, self.signed_keys(bob.e2ee._account, "bob", "phone"))), 25)
        # Her own device's keys, signed: accepted.
        own = self.signed_keys(mallory, "alice", "phone", 2)
        self.assertEqual(self.successResultOf(self.upload(alice, own)), len(own.one_time_keys))

    def test_bad_signatures_and_keys_are_refused(self) -> None:
        alice = self.connect("alice")
        account = vodozemac.Account()
        good = self.signed_keys(account, "alice", "phone", 2)
        forged = attrs.evolve(good, signature=vodozemac.Account().sign(b"x").to_base64())
        other_device = self.signed_keys(account, "alice", "laptop")
        bad_otk = attrs.evolve(good, one_time_keys=(attrs.evolve(good.one_time_keys[0], key=good.one_time_keys[1].key),))
        for keys in (forged, attrs.evolve(good, signature=other_device.signature), bad_otk, attrs.evolve(good, identity_key="short")):
            error = self.failureResultOf(self.upload(alice, keys), QueryFailed).value
            self.assertEqual(error.code, ErrorCode.INVALID_OPERATION)
        self.assertEqual(self.successResultOf(self.store.device_keys(["alice"])), [])
        self.assertEqual(self.successResultOf(self.upload(alice, good)), 2)

    def test_query_and_claim(self) -> None:
        """Anyone may fetch a user's devices; each one-time key is claimed once; the device tops up."""
        alice, bob = self.connect("alice"), self.secure("bob")
        laptop = self.secure("bob", "laptop")

        def query(*requests: packets.KeyRequest) -> tuple[packets.DeviceKeys, ...]:
            asked = alice._query(lambda rid: packets.KeysQuery(rid, requests), packets.KeysResult, lambda answer: answer.devices)
            self.pump()
            return self.successResultOf(asked)

        found = query(packets.KeyRequest(False, "bob", ""), packets.KeyRequest(False, "nobody", ""))
        self.assertEqual([(k.user, k.device, k.one_time_keys) for k in found], [("bob", "laptop", ()), ("bob", "phone", ())])
        self.assertEqual(found[1].identity_key, bob.e2ee.identity_key)
        self.assertEqual(found[0].signing_key, laptop.e2ee.signing_key)
        claimed = query(packets.KeyRequest(True, "bob", "phone"))
        (one,) = claimed[0].one_time_keys
        statement = e2ee.one_time_key_statement("bob", "phone", one.key_id, one.key)
        self.assertTrue(e2ee.signature_valid(bob.e2ee.signing_key, one.signature, statement))
        again = query(packets.KeyRequest(True, "bob", ""))
        self.assertEqual(len({k.one_time_keys[0].key_id for k in again}), 2)
        self.assertNotEqual(again[1].one_time_keys[0].key_id, one.key_id)
        self.assertEqual(self.successResultOf(self.store.claim_one_time_keys([])), {})
        self.assertEqual(len(query(*[packets.KeyRequest(False, f"u{i}", "") for i in range(256)])), 0)
        asked = alice._query(
            lambda rid: packets.KeysQuery(rid, tuple(packets.KeyRequest(False, "bob", "") for _ in range(257))),
            packets.KeysResult, lambda answer: answer,
        )
        self.pump()
        error = self.failureResultOf(asked, QueryFailed).value
        self.assertEqual(error.code, ErrorCode.TOO_LARGE)

    def test_one_time_keys_are_topped_up_after_use(self) -> None:
        alice = self.secure("alice")
        self.secure("bob")
        carol, dave = self.secure("carol"), self.secure("dave")
        for sender in (alice, carol, dave):
            self.done(sender.send("bob", f"hello from {sender.user}"))
        self.pump()
        self.assertEqual([text for _, text in self.texts("bob/phone")], ["hello from alice", "hello from carol", "hello from dave"])
        held = self.successResultOf(self.store.publish_keys(self.successResultOf(self.store.device_keys(["bob"]))[0], MAX_ONE_TIME_KEYS))
        self.assertEqual(held, 25)


# Conversations ------------------------------------------------------------------------------------


class EncryptedChatTests(E2EETestCase):
    def test_two_users_one_with_two_devices(self) -> None:
        alice = self.secure("alice")
        phone, laptop = self.secure("bob"), self.secure("bob", "laptop")
        receipt = self.done(alice.send("bob", "hello bob"))
        self.assertEqual((receipt.conversation, receipt.seq), (AB, 1))
        self.done(laptop.send("alice", "hi alice, from my laptop"))
        self.done(phone.send(conversation=AB, body="and from my phone"))
        self.done(alice.send("bob", "got all three"))
        expected = [("alice", "hello bob"), ("bob", "hi alice, from my laptop"), ("bob", "and from my phone"), ("alice", "got all three")]
        # Every device hears every message, its own too (decrypted with its own copy of the key).
        for name in ("alice/phone", "bob/phone", "bob/laptop"):
            self.assertEqual(self.texts(name), expected)
        event = [e for e in self.heard["bob/phone"] if e.kind == "message"][0]
        self.assertEqual(event.content_type, "text/plain; charset=utf-8")
        self.assertEqual(event.sender_device, "phone")
        stored = stored_messages(self.store)
        self.assertEqual({m.content_type for m in stored}, {e2ee.ENCRYPTED})
        self.assert_no_plaintext(b"hello bob", b"from my", b"got all three", b"text/plain")
        self.assertEqual(self.undecryptable, {"alice/phone": [], "bob/phone": [], "bob/laptop": []})

    def test_own_messages_come_back_decrypted_on_a_new_sync(self) -> None:
        alice = self.secure("alice")
        self.secure("bob")
        self.done(alice.send("bob", "one"))
        self.done(alice.send("bob", "two"))
        self.done(alice.stopService())
        again = self.secure("alice", "phone", state_path=os.path.join(self.directory, "positions.json"))
        self.assertEqual([(e.seq, e.sender, e.text) for e in self.heard["alice/phone"]], [(1, "alice", "one"), (2, "alice", "two")])
        self.done(again.send("bob", "three"))
        self.assertEqual(self.texts("bob/phone"), [("alice", "one"), ("alice", "two"), ("alice", "three")])

    def test_group_bundle_edit_and_rotation(self) -> None:
        alice, bob = self.secure("alice"), self.secure("bob")
        self.secure("carol")
        group = self.done(alice.create_group("secrets", ["bob", "carol"]))
        first = self.done(alice.send(group=group, body="the plan"))
        self.done(bob.send_bundle([("text/plain", "part one"), ("text/plain", "part two")], group=group))
        self.done(alice.edit(group, first.seq, "the real plan"))
        for name in ("bob/phone", "carol/phone"):
            self.assertIn(("alice", "the plan"), self.texts(name, group))
        self.assertEqual(self.texts("carol/phone", group)[-2:], [("bob", "part one"), ("bob", "part two")])
        edit = [e for e in self.heard["carol/phone"] if e.kind == "edit"][0]
        self.assertEqual((edit.target, edit.text, edit.content_type), (first.seq, "the real plan", "text/plain; charset=utf-8"))
        self.assert_no_plaintext(b"plan", b"part one")
        session = self.session_of(group, first.seq)
        # carol leaves: the next message starts a new Megolm session she never gets.
        self.done(alice.remove_members(group, ["carol"]))
        after = self.done(alice.send(group=group, body="without carol"))
        self.assertNotEqual(self.session_of(group, after.seq), session)
        self.assertEqual(self.texts("bob/phone", group)[-1], ("alice", "without carol"))
        self.assertNotIn(("alice", "without carol"), self.texts("carol/phone"))
        self.assertEqual(self.undecryptable["carol/phone"], [])

    def session_of(self, conversation: str, seq: int) -> str:
        (message,) = [m for m in stored_messages(self.store) if m.conversation == conversation and m.seq == seq]
        return e2ee.parse(e2ee.ENVELOPE, message.body).session_id

    def test_operations_keep_their_place_behind_encrypted_sends(self) -> None:
        alice = self.secure("alice")
        self.secure("bob")
        self.secure("dave")
        group = self.done(alice.create_group("order", ["bob"]))
        sent = [alice.send(group=group, body="before dave"), alice.add_members(group, ["dave"]), alice.send(group=group, body="with dave")]
        self.pump()
        self.assertEqual([self.successResultOf(d).seq for d in sent], [2, 3, 4])
        self.assertEqual([(e.seq, e.kind) for e in self.heard["bob/phone"] if e.conversation == group][1:], [(2, "message"), (3, "group.add"), (4, "message")])
        self.assertEqual(self.texts("dave/phone", group), [("alice", "with dave")])

    def test_sends_while_offline_wait_for_the_login(self) -> None:
        alice = self.secure("alice")
        self.secure("bob")
        self.drop(alice)
        sent = alice.send("bob", "written offline")
        self.assertNoResult(sent)
        self.wait(3)
        self.assertEqual(self.successResultOf(sent).seq, 1)
        self.assertEqual(self.texts("bob/phone"), [("alice", "written offline")])

    def test_a_send_waiting_for_keys_times_out(self) -> None:
        alice = self.secure("alice", settings=ClientSettings(send_timeout=5.0))
        self.secure("bob")

        async def ignore(conn: Any, packet: Any) -> None:
            return None

        self.hub.keys.handle = ignore  # type: ignore[method-assign]
        sent = alice.send("bob", "anyone?")
        self.wait(4)
        self.assertNoResult(sent)
        self.wait(1)
        self.failureResultOf(sent, SendTimeout)
        self.wait(10)  # the query in flight times out too, and nothing is left to retry
        del self.hub.keys.handle
        self.assertEqual(self.done(alice.send("bob", "now?")).seq, 1)

    def test_cancel_and_stop(self) -> None:
        alice = self.secure("alice")
        self.secure("bob")
        self.drop(alice)
        cancelled, stopped = alice.send("bob", "never mind"), alice.send("bob", "stopped")
        cancelled.cancel()
        self.failureResultOf(cancelled, defer.CancelledError)
        alice.stopService()
        self.pump()
        self.failureResultOf(stopped)
        self.assertEqual(stored_messages(self.store), [])


# Restarts and new devices ---------------------------------------------------------------------------


class DeviceLifeTests(E2EETestCase):
    def test_a_restarted_client_keeps_its_sessions(self) -> None:
        alice, bob = self.secure("alice"), self.secure("bob")
        self.done(alice.send("bob", "first"))
        self.done(bob.stopService())
        # Same Megolm session as "first": bob's restarted client must have kept its key.
        self.done(alice.send("bob", "while you were away"))
        self.assertEqual(self.undecryptable["bob/phone"], [])
        again = self.secure("bob")
        self.assertIsNot(again, bob)
        self.assertEqual(again.e2ee.identity_key, bob.e2ee.identity_key)
        self.assertEqual(self.texts("bob/phone"), [("alice", "while you were away")])
        self.done(again.send("alice", "back"))
        self.assertEqual(self.texts("alice/phone"), [("alice", "first"), ("alice", "while you were away"), ("bob", "back")])
        self.assertEqual(self.undecryptable["bob/phone"], [])

    def test_a_device_added_later_reads_new_messages(self) -> None:
        alice = self.secure("alice")
        self.secure("bob")
        self.done(alice.send("bob", "before the tablet"))
        tablet = self.secure("bob", "tablet")
        # The old message was not encrypted for it: reported, not fatal.
        (old,) = self.undecryptable["bob/tablet"]
        self.assertEqual(old.message.seq, 1)
        self.assertIn("not encrypted for this device", old.reason)
        (shown,) = [e for e in self.heard["bob/tablet"]]
        self.assertEqual((shown.content_type, shown.seq), (e2ee.UNDECRYPTABLE, 1))
        self.done(alice.send("bob", "hello tablet"))
        self.assertEqual(self.texts("bob/tablet"), [("alice", "hello tablet")])
        self.done(tablet.send("alice", "tablet here"))
        self.assertEqual(self.texts("alice/phone")[-1], ("bob", "tablet here"))
        self.assertEqual(self.texts("bob/phone"), [("alice", "before the tablet"), ("alice", "hello tablet"), ("bob", "tablet here")])

    def test_a_renewed_identity_is_refused_until_forgotten(self) -> None:
        alice, bob = self.secure("alice"), self.secure("bob")
        self.done(bob.send("alice", "old identity"))
        self.done(bob.stopService())
        os.unlink(self.key_file("bob", "phone"))
        renewed = self.secure("bob")
        self.done(renewed.send("alice", "new identity"))
        (refused,) = self.undecryptable["alice/phone"]
        self.assertIn("changed", refused.reason)
        # alice does not encrypt for the unknown key either, until she forgets the old one.
        self.done(alice.send("bob", "are you you?"))
        self.assertNotIn(("alice", "are you you?"), self.texts("bob/phone"))
        self.assertTrue(alice.e2ee.forget_device("bob", "phone"))
        self.done(alice.send("bob", "welcome back"))
        self.assertEqual(self.texts("bob/phone")[-1], ("alice", "welcome back"))

    def test_key_file_encrypted_with_a_passphrase(self) -> None:
        options = E2EEOptions(self.key_file("alice", "phone"), passphrase="correct horse", **CHEAP_KDF)
        alice = self.secure("alice", e2ee=options)
        self.secure("bob")
        self.done(alice.send("bob", "secret"))
        path = self.key_file("alice", "phone")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path, "rb") as file:
            raw = file.read()
        self.assertNotIn(b"pickle", raw)
        self.assertIn(b'"encrypted": true', raw)
        identity = alice.e2ee.identity_key
        self.done(alice.stopService())
        with self.assertRaises(E2EEError) as wrong:
            IMClient(self.endpoint, "alice", "alice-pw", "phone", reactor=self.reactor, e2ee=attrs.evolve(options, passphrase="wrong"))
        self.assertIn("wrong passphrase", str(wrong.exception))
        with self.assertRaises(E2EEError):
            IMClient(self.endpoint, "alice", "alice-pw", "phone", reactor=self.reactor, e2ee=path)
        with self.assertRaises(E2EEError) as other:
            IMClient(self.endpoint, "alice", "alice-pw", "laptop", reactor=self.reactor, e2ee=options)
        self.assertIn("alice/phone", str(other.exception))
        again = IMClient(self.endpoint, "alice", "alice-pw", "phone", reactor=self.reactor, e2ee=options)
        self.assertEqual(again.e2ee.identity_key, identity)

    def test_plain_key_file_is_private(self) -> None:
        self.secure("alice")
        self.assertEqual(stat.S_IMODE(os.stat(self.key_file("alice", "phone")).st_mode), 0o600)


# What cannot be decrypted -----------------------------------------------------------------------------


class UndecryptableTests(E2EETestCase):
    def test_malformed_ciphertext_is_reported_never_fatal(self) -> None:
        alice, bob = self.secure("alice"), self.secure("bob")
        self.done(alice.send("bob", "a real one"))
        mallory = self.connect("carol")  # a client without encryption, sending garbage as ciphertext
        real = [m for m in stored_messages(self.store) if m.seq == 1][0].body
        envelope = e2ee.parse(e2ee.ENVELOPE, real)
        damaged = bytearray(envelope.ciphertext)
        damaged[len(damaged) // 2] ^= 0x40
        tampered = e2ee.ENVELOPE.build(dict(envelope, shares=[], ciphertext=bytes(damaged)))
        stranger = e2ee.ENVELOPE.build(dict(envelope, shares=[dict(user="bob", device="phone", type=0, ciphertext=b"junk")], session_id="nope"))
        for body in (b"", b"\x01garbage", real[:-3], stranger, real):
            self.done(mallory.send("bob", body, content_type=e2ee.ENCRYPTED))
        # Damaged in transit (or by the server), from the real sender: Megolm's MAC catches it.
        self.done(alice._submit(lambda: alice._core.send(schema.TARGET_USER, "bob", e2ee.ENCRYPTED, tampered)))
        reasons = [failure.reason for failure in self.undecryptable["bob/phone"]]
        self.assertEqual(len(reasons), 6)
        self.assertIn("malformed envelope", reasons[0])
        self.assertIn("malformed envelope", reasons[1])
        self.assertIn("malformed envelope", reasons[2])
        self.assertIn("key share", reasons[3])
        self.assertIn("another sender", reasons[4], "a replay under another name is refused")
        self.assertIn("Megolm", reasons[5])
        shown = [e for e in self.heard["bob/phone"] if e.content_type == e2ee.UNDECRYPTABLE]
        self.assertEqual([(e.sender, e.seq) for e in shown], [("carol", seq) for seq in range(1, 6)] + [("alice", 2)])
        self.assertEqual(shown[0].text, reasons[0])
        # bob is still fine.
        self.assertTrue(bob.logged_in)
        self.done(alice.send("bob", "still here?"))
        self.assertEqual(self.texts("bob/phone"), [("alice", "a real one"), ("alice", "still here?")])
        self.done(bob.send("alice", "yes"))
        self.assertEqual(self.texts("alice/phone")[-1], ("bob", "yes"))

    def test_an_encrypted_operation_is_refused(self) -> None:
        alice = self.secure("alice")
        self.secure("bob")
        # Encrypting content that claims to be an operation: the receiver does not believe it.
        self.done(alice.send("bob", b"", content_type="text/plain"))
        crypto = alice.e2ee
        outbound = crypto._outbound[AB]
        content = e2ee.CONTENT.build(dict(content_type=schema.CONTACT_BLOCK, body=b""))
        envelope = e2ee.ENVELOPE.build(
            dict(version=1, sender_key=crypto.identity_key, session_id=outbound.session.session_id, shares=[],
                 ciphertext=outbound.session.encrypt(content).to_bytes())
        )
        self.done(alice._submit(lambda: alice._core.send(schema.TARGET_USER, "bob", e2ee.ENCRYPTED, envelope)))
        (refused,) = self.undecryptable["bob/phone"]
        self.assertIn("operation", refused.reason)
        self.assertEqual(describe(refused.message).conversation, AB)


# The command line ------------------------------------------------------------------------------------


class CommandLineTests(unittest.SynchronousTestCase):
    def test_e2ee_option(self) -> None:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        parser = cli._build_parser()
        base = {k: v for k, v in os.environ.items() if not k.startswith("IMKIT_KEY")}
        for command in (["send", "--to", "bob", "hi"], ["listen"]):
            args = parser.parse_args(command + ["--user", "alice", "--password", "pw"])
            self.assertIsNone(cli._client(args).e2ee)
            args = parser.parse_args(command + ["--e2ee", "--user", "alice", "--password", "pw"])
            key_file = os.path.join(directory, command[0] + ".keys")
            self.patch(os, "environ", {**base, "IMKIT_KEY_FILE": key_file})
            client = cli._client(args)
            self.assertEqual(client.e2ee.options.key_file, key_file)
            self.assertIsNone(client.e2ee.options.passphrase)
            self.assertEqual(stat.S_IMODE(os.stat(key_file).st_mode), 0o600)
            self.patch(os, "environ", {**base, "IMKIT_KEY_FILE": key_file, "IMKIT_KEY_PASSPHRASE": "secret"})
            with self.assertRaises(cli.UsageError) as caught:
                cli._client(args)  # the file was written without a passphrase
            self.assertIn("not encrypted", str(caught.exception))

    def test_default_key_file(self) -> None:
        self.patch(os, "environ", {**os.environ, "XDG_DATA_HOME": "/data"})
        self.assertEqual(default_key_file("alice", "cli/send", "example.org:14000"), "/data/imkit/keys/alice@example.org_14000/cli_send.keys")


# The SQLite schema ------------------------------------------------------------------------------------


class MigrationTests(unittest.TestCase):
    async def test_version_5_database_gains_the_key_directory(self) -> None:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "old.db")
        connection = sqlite3.connect(path)
        for statement in sqlite_module._SCHEMA:
            if statement not in sqlite_module._KEY_TABLES:
                connection.execute(statement)
        connection.execute("INSERT INTO users (name, password_hash) VALUES ('alice', 'h')")
        connection.execute("PRAGMA user_version = 5")
        connection.commit()
        connection.close()
        store = SQLiteStore(path)
        await store.open()
        keys = packets.DeviceKeys("alice", "phone", "c", "e", "s", (packets.OneTimeKey("1", "k", "s"),))
        self.assertEqual(await store.publish_keys(keys, 10), 1)
        self.assertEqual(await store.password_hash("alice"), "h")
        await store.close()
        connection = sqlite3.connect(path)
        self.assertEqual(connection.execute("PRAGMA user_version").fetchone()[0], sqlite_module.SCHEMA_VERSION)
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        connection.close()
        self.assertLessEqual({"device_keys", "one_time_keys"}, tables)


# Over loopback TLS with SQLite ------------------------------------------------------------------------

PASSWORDS = Passwords.fast_for_tests()


class LoopbackTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="imkit-e2ee-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.database = os.path.join(self.directory, "imkit.sqlite3")
        self.clients: list[IMClient] = []

    async def start_server(self) -> int:
        options = tap.Options()
        options.parseOptions(["--listen", "tls:0:interface=127.0.0.1", "--store", f"sqlite:{self.database}"])
        self.service = tap.makeService(options, reactor=reactor, passwords=PASSWORDS)
        self.service.startService()
        (listening,) = await self.service.whenListening()
        for name in ("alice", "bob"):
            await self.service.store.add_user(name, await PASSWORDS.hash(f"{name}-pw"))
        return listening.getHost().port

    def client(self, port: int, user: str, device: str) -> IMClient:
        endpoint = tls_endpoint(reactor, f"localhost:{port}", development_ca())
        key_file = os.path.join(self.directory, f"{user}-{device}.keys")
        client = IMClient(endpoint, user, f"{user}-pw", device, reactor=reactor, e2ee=key_file)
        client.startService()
        self.clients.append(client)
        return client

    async def tearDownAsync(self) -> None:
        for client in self.clients:
            if client.running:
                await client.stopService()
        await self.service.stopService()

    def tearDown(self) -> defer.Deferred:
        return defer.ensureDeferred(self.tearDownAsync())

    def test_sqlite_holds_no_plaintext(self) -> defer.Deferred:
        async def scenario() -> None:
            port = await self.start_server()
            alice, phone, laptop = self.client(port, "alice", "phone"), self.client(port, "bob", "phone"), self.client(port, "bob", "laptop")
            heard: dict[str, list[tuple[str, bytes]]] = {}
            arrived = defer.Deferred()

            def listen(name: str, client: IMClient) -> None:
                got = heard[name] = []

                def on_message(message: Message) -> None:
                    got.append((message.sender, message.body))
                    if sum(len(v) for v in heard.values()) == 9 and not arrived.called:
                        arrived.callback(None)

                client.on_message(on_message)

            for name, client in (("alice", alice), ("phone", phone), ("laptop", laptop)):
                listen(name, client)
            await defer.gatherResults([c.e2ee.ready() for c in (alice, phone, laptop)])
            await alice.send(to="bob", body="Attack at dawn")
            await laptop.send(to="alice", body="Bring the blue folder")
            await phone.send(to="alice", body="Ack from the phone")
            await arrived
            expected = [("alice", b"Attack at dawn"), ("bob", b"Bring the blue folder"), ("bob", b"Ack from the phone")]
            self.assertEqual(heard, {"alice": expected, "phone": expected, "laptop": expected})
            await self.service.stopService()
            with open(self.database, "rb") as file:
                raw = file.read()
            for name in os.listdir(self.directory):
                if name.startswith("imkit.sqlite3-"):  # the WAL, if anything is left in it
                    with open(os.path.join(self.directory, name), "rb") as file:
                        raw += file.read()
            self.assertIn(e2ee.ENCRYPTED.encode(), raw, "the messages are in the file")
            for text in (b"Attack at dawn", b"blue folder", b"Ack from the phone", b"text/plain"):
                self.assertNotIn(text, raw)
            connection = sqlite3.connect(self.database)
            self.addCleanup(connection.close)
            rows = connection.execute("SELECT content_type, body FROM messages").fetchall()
            self.assertEqual(len(rows), 3)
            self.assertEqual({row[0] for row in rows}, {e2ee.ENCRYPTED})
            self.assertEqual(connection.execute("SELECT count(*) FROM device_keys").fetchone()[0], 3)
            self.service.startService()  # for tearDown

        return defer.ensureDeferred(scenario())

    def test_the_example_bots(self) -> defer.Deferred:
        """examples/encrypted_bots.py over the real stack, twice: the second run reuses the keys."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        sys.path.insert(0, root)
        self.addCleanup(sys.path.remove, root)
        from examples import encrypted_bots

        async def scenario() -> None:
            port = await self.start_server()
            keys = os.path.join(self.directory, "keys")
            for _ in range(2):
                args = encrypted_bots.parse_args(["--server", f"localhost:{port}", "--rounds", "2", "--keys", keys, "--timeout", "20"])
                answers = await encrypted_bots.run(reactor, args)
                self.assertEqual([answer.split(": ")[1] for answer in answers], ["1", "4"])
            self.assertEqual(sorted(os.listdir(keys)), ["alice-encrypted-bot.keys", "bob-encrypted-bot.keys"])
            connection = sqlite3.connect(self.database)
            self.addCleanup(connection.close)
            bodies = [row[0] for row in connection.execute("SELECT body FROM messages")]
            self.assertEqual(len(bodies), 8)
            self.assertFalse([body for body in bodies if b"squared" in body or b"answer" in body])

        return defer.ensureDeferred(scenario())
