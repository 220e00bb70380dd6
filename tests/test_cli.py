"""
The imkit command line: one-line usage errors, the user commands on a real SQLite store, where a
new password comes from, how send and listen print what the client library tells them, and the
contact and group commands (with send --group and listen) against a real server.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

import test_client_protocol as fakes
from imkit import cli
from imkit.client import ClientSettings, IMClient, LoginFailed, describe
from imkit.model import Message
from imkit.passwords import Passwords
from imkit.store import SQLiteStore
from imkit.wire import packets
from imkit.wire.errors import ErrorCode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ScratchDirectory:
    def scratch(self) -> str:
        if not hasattr(self, "_scratch"):
            self._scratch = tempfile.mkdtemp(prefix="imkit-cli-")
            self.addCleanup(shutil.rmtree, self._scratch, True)
        return self._scratch


class UsageErrorTests(ScratchDirectory, SynchronousTestCase):
    def setUp(self) -> None:
        for name in ("IMKIT_USER", "IMKIT_PASSWORD"):
            if name in os.environ:
                self.patch(os, "environ", {k: v for k, v in os.environ.items() if k not in ("IMKIT_USER", "IMKIT_PASSWORD")})
                break

    def usage_error(self, *argv: str) -> str:
        """Run ``imkit ARGV``; it must exit 2 with exactly one line on standard error."""
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        self.patch(sys, "stdout", io.StringIO())
        with self.assertRaises(SystemExit) as caught:
            cli.main(list(argv))
        self.assertEqual(caught.exception.code, 2)
        lines = stderr.getvalue().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertNotIn("Traceback", lines[0])
        return lines[0]

    def test_no_command(self) -> None:
        self.assertEqual(self.usage_error(), "imkit: name a command: user, contact, group, send or listen (see imkit --help)")
        self.assertEqual(self.usage_error("user"), "imkit user: name a command: add, passwd, revoke, disable, enable or list (see imkit user --help)")
        self.assertEqual(
            self.usage_error("contact"), "imkit contact: name a command: add, remove, block, unblock or list (see imkit contact --help)"
        )
        self.assertEqual(
            self.usage_error("group"), "imkit group: name a command: create, add, remove, leave, members or list (see imkit group --help)"
        )

    def test_unknown_option(self) -> None:
        self.assertIn("--frobnicate", self.usage_error("listen", "--frobnicate"))

    def test_send_needs_exactly_one_target(self) -> None:
        self.assertIn("--to --conversation --group is required", self.usage_error("send", "hi"))
        self.assertIn("not allowed with", self.usage_error("send", "--to", "bob", "--conversation", "c", "hi"))
        self.assertIn("argument --group: not allowed with argument --to", self.usage_error("send", "--to", "bob", "--group", "g:x", "hi"))

    def test_group_ids_and_user_names(self) -> None:
        """Group ids start with g:, user names are valid ones, and each command has its arguments."""
        self.assertEqual(
            self.usage_error("group", "members", "dm:alice:bob"),
            "imkit group members: argument GROUP: 'dm:alice:bob' is not a group id: group ids start with g:; "
            "imkit group list shows yours (see imkit group members --help)",
        )
        self.assertIn("'lunch' is not a group id", self.usage_error("send", "--group", "lunch", "hi"))
        self.assertIn("'a b' is not a user name", self.usage_error("contact", "add", "a b"))
        self.assertIn("'x:y' is not a user name", self.usage_error("group", "create", "lunch", "--member", "x:y"))
        self.assertIn("the following arguments are required: NAME", self.usage_error("group", "add", "g:abc"))
        self.assertIn("the following arguments are required: NAME", self.usage_error("contact", "block"))
        self.assertIn("unrecognized arguments: bob", self.usage_error("group", "leave", "g:abc", "bob"))
        self.assertIn("'-5' is not a positive number of seconds", self.usage_error("contact", "list", "--timeout", "-5"))
        self.assertEqual(self.usage_error("group", "list"), "imkit group list: no user name: pass --user NAME or set IMKIT_USER")

    def test_numbers_must_be_positive(self) -> None:
        self.assertIn("'0' is not a positive number", self.usage_error("listen", "--count", "0"))
        self.assertIn("'-1' is not a positive number of seconds", self.usage_error("listen", "--idle-exit", "-1"))
        self.assertIn("'soon' is not a number of seconds", self.usage_error("send", "--to", "b", "--timeout", "soon"))

    def test_user_and_password_are_required(self) -> None:
        self.assertEqual(self.usage_error("send", "--to", "bob", "hi"), "imkit send: no user name: pass --user NAME or set IMKIT_USER")
        self.assertEqual(
            self.usage_error("listen", "--user", "bob"), "imkit listen: no password: set IMKIT_PASSWORD or pass --password"
        )

    def test_bad_server_address(self) -> None:
        line = self.usage_error("send", "--to", "bob", "--user", "a", "--password", "p", "--server", "localhost", "hi")
        self.assertIn("use HOST:PORT", line)

    def test_unusable_ca_file_names_our_option(self) -> None:
        missing = os.path.join(self.scratch(), "missing.pem")
        line = self.usage_error("listen", "--user", "a", "--password", "p", "--ca", missing)
        self.assertIn(f"--ca {missing}", line)
        self.assertNotIn("--tls-ca", line)

    def test_bad_store_string(self) -> None:
        self.assertEqual(
            self.usage_error("user", "list", "--store", "postgres:db"),
            "imkit user list: unknown store 'postgres:db': use sqlite:PATH or memory:",
        )
        self.assertIn("use sqlite:PATH", self.usage_error("user", "add", "bob", "--password", "p", "--store", "sqlite:"))

    def test_bad_user_name(self) -> None:
        self.assertIn("not a valid user name", self.usage_error("user", "add", "a:b", "--password", "p", "--store", "memory:"))

    def test_one_password_source(self) -> None:
        self.assertIn("not allowed with", self.usage_error("user", "add", "bob", "--password", "p", "--password-file", "f"))


class PasswordInputTests(ScratchDirectory, SynchronousTestCase):
    def args(self, *argv: str) -> Any:
        return cli._build_parser().parse_args(["user", "add", "bob", *argv])

    def prompter(self, *answers: str) -> Any:
        asked: list[str] = []
        replies = list(answers)

        def prompt(question: str) -> str:
            asked.append(question)
            reply = replies.pop(0)
            if isinstance(reply, BaseException):
                raise reply
            return reply

        prompt.asked = asked  # type: ignore[attr-defined]
        return prompt

    def test_from_the_option(self) -> None:
        self.assertEqual(cli.read_new_password(self.args("--password", "s3cret")), "s3cret")

    def test_from_the_first_line_of_a_file(self) -> None:
        path = os.path.join(self.scratch(), "password")
        with open(path, "w", newline="") as f:
            f.write("pässwort\r\nsecond line\n")
        self.assertEqual(cli.read_new_password(self.args("--password-file", path)), "pässwort")

    def test_unreadable_or_empty_file(self) -> None:
        missing = os.path.join(self.scratch(), "missing")
        with self.assertRaises(cli.UsageError) as caught:
            cli.read_new_password(self.args("--password-file", missing))
        self.assertIn(f"cannot read --password-file {missing}", str(caught.exception))
        empty = os.path.join(self.scratch(), "empty")
        open(empty, "w").close()
        self.assertRaises(cli.UsageError, cli.read_new_password, self.args("--password-file", empty))

    def test_prompted_twice(self) -> None:
        prompt = self.prompter("hunter2", "hunter2")
        self.assertEqual(cli.read_new_password(self.args(), prompt), "hunter2")
        self.assertEqual(prompt.asked, ["Password for bob: ", "Repeat the password: "])

    def test_prompted_passwords_must_match(self) -> None:
        with self.assertRaises(cli.UsageError) as caught:
            cli.read_new_password(self.args(), self.prompter("hunter2", "hunter3"))
        self.assertIn("do not match", str(caught.exception))

    def test_empty_or_no_answer(self) -> None:
        self.assertRaises(cli.UsageError, cli.read_new_password, self.args(), self.prompter(""))
        with self.assertRaises(cli.UsageError) as caught:
            cli.read_new_password(self.args(), self.prompter(EOFError()))
        self.assertIn("--password-file", str(caught.exception))


class UserCommandTests(ScratchDirectory, TestCase):
    """`imkit user add` and `imkit user list` on a SQLite file, run in this process's reactor."""

    def store_string(self) -> str:
        return "sqlite:" + os.path.join(self.scratch(), "imkit.sqlite3")

    async def run_command(self, *argv: str) -> str:
        args = cli._build_parser().parse_args(list(argv))
        job = args.prepare(args)
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        try:
            await job(None)
        finally:
            self.patch(sys, "stdout", sys.__stdout__)
        return out.getvalue()

    @defer.inlineCallbacks
    def test_add_then_list(self) -> Any:
        store = self.store_string()
        output = yield defer.ensureDeferred(self.run_command("user", "add", "bob", "--password", "bob-pw", "--store", store))
        self.assertEqual(output, f"added user bob to {store}\n")
        yield defer.ensureDeferred(self.run_command("user", "add", "alice", "--password", "alice-pw", "--store", store))
        output = yield defer.ensureDeferred(self.run_command("user", "list", "--store", store))
        self.assertEqual(output, "alice\nbob\n")
        sqlite = SQLiteStore(store[len("sqlite:") :])
        yield sqlite.open()
        try:
            password_hash = yield sqlite.password_hash("bob")
        finally:
            yield sqlite.close()
        self.assertTrue(password_hash.startswith("$argon2id$"))
        self.assertTrue((yield Passwords().verify(password_hash, "bob-pw")))

    @defer.inlineCallbacks
    def test_passwd_and_revoke(self) -> Any:
        """passwd replaces the hash and revokes every token; revoke takes one device or all."""
        store = self.store_string()
        yield defer.ensureDeferred(self.run_command("user", "add", "bob", "--password", "old", "--store", store))
        sqlite = SQLiteStore(store[len("sqlite:") :])
        yield sqlite.open()
        try:
            yield sqlite.set_token("d1", "bob", "phone", 2**40)
            yield sqlite.set_token("d2", "bob", "laptop", 2**40)
        finally:
            yield sqlite.close()
        output = yield defer.ensureDeferred(self.run_command("user", "revoke", "bob", "--device", "phone", "--store", store))
        self.assertEqual(output, "revoked 1 resume token(s) of device phone of bob\n")
        output = yield defer.ensureDeferred(self.run_command("user", "passwd", "bob", "--password", "new", "--store", store))
        self.assertEqual(output, "changed the password of bob; revoked 1 resume token(s)\n")
        reopened = SQLiteStore(store[len("sqlite:") :])
        yield reopened.open()
        try:
            password_hash = yield reopened.password_hash("bob")
            self.assertIsNone((yield reopened.token_owner("d2")))
        finally:
            yield reopened.close()
        self.assertTrue((yield Passwords().verify(password_hash, "new")))
        for argv in (("user", "passwd", "nobody", "--password", "x"), ("user", "revoke", "nobody")):
            with self.assertRaises(cli.CommandFailed) as caught:
                yield defer.ensureDeferred(self.run_command(*argv, "--store", store))
            self.assertIn("no user 'nobody'", str(caught.exception))

    @defer.inlineCallbacks
    def test_add_an_existing_user(self) -> Any:
        store = self.store_string()
        yield defer.ensureDeferred(self.run_command("user", "add", "bob", "--password", "x", "--store", store))
        with self.assertRaises(cli.CommandFailed) as caught:
            yield defer.ensureDeferred(self.run_command("user", "add", "bob", "--password", "y", "--store", store))
        self.assertIn("user 'bob' exists already", str(caught.exception))

    @defer.inlineCallbacks
    def test_store_that_cannot_be_opened(self) -> Any:
        store = "sqlite:" + os.path.join(self.scratch(), "no", "such", "directory", "imkit.sqlite3")
        with self.assertRaises(cli.CommandFailed) as caught:
            yield defer.ensureDeferred(self.run_command("user", "list", "--store", store))
        self.assertIn("cannot open the store", str(caught.exception))
        self.flushLoggedErrors()


class LineReaderTests(TestCase):
    @defer.inlineCallbacks
    def test_lines_without_their_newlines(self) -> Any:
        """Every line is one message: LF and CRLF are dropped, a last line without a newline counts."""
        from twisted.internet import reactor

        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        os.write(write_end, b"one\ntwo\r\n\nthree")
        os.close(write_end)
        reader = cli.LineReader(reactor, read_end)
        lines: list[bytes] = []
        while True:
            chunk = yield defer.ensureDeferred(reader.next_lines())
            if chunk is None:
                break
            lines.extend(chunk)
        self.assertEqual(lines, [b"one", b"two", b"", b"three"])

    @defer.inlineCallbacks
    def test_endless_line(self) -> Any:
        from twisted.internet import reactor

        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        os.write(write_end, b"x" * 2000)
        os.close(write_end)
        with self.assertRaises(cli.CommandFailed) as caught:
            yield defer.ensureDeferred(cli.LineReader(reactor, read_end, max_line=1000).next_lines())
        self.assertIn("longer than the largest message (1000 bytes)", str(caught.exception))


class MainProcessTests(ScratchDirectory, SynchronousTestCase):
    """The console script end to end, in a child process (react() exits the process)."""

    def imkit(self, *argv: str, stdin: str = "") -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
        return subprocess.run(
            [sys.executable, "-c", "from imkit.cli import main; main()", *argv],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=self.scratch(),
            env=env,
            timeout=120,
        )

    def test_user_add_list_and_exit_statuses(self) -> None:
        store = "sqlite:" + os.path.join(self.scratch(), "users.sqlite3")
        password_file = os.path.join(self.scratch(), "pw")
        with open(password_file, "w") as f:
            f.write("carol-pw\n")
        added = self.imkit("user", "add", "carol", "--password-file", password_file, "--store", store)
        self.assertEqual((added.returncode, added.stderr), (0, ""))
        again = self.imkit("user", "add", "carol", "--password", "x", "--store", store)
        self.assertEqual(again.returncode, 1)
        self.assertEqual(again.stderr.splitlines(), [f"imkit user add: user 'carol' exists already in {store}; pick another name"])
        listed = self.imkit("user", "list", "--store", store)
        self.assertEqual((listed.returncode, listed.stdout), (0, "carol\n"))

    def test_examples_show_their_help(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
        for example in ("echo_bot.py", "two_bots.py", "group_bot.py"):
            shown = subprocess.run(
                [sys.executable, os.path.join(ROOT, "examples", example), "--help"],
                capture_output=True, text=True, cwd=self.scratch(), env=env, timeout=120,
            )
            self.assertEqual((shown.returncode, shown.stderr), (0, ""), example)
            self.assertIn("--server HOST:PORT", shown.stdout)

    def test_default_store_is_in_the_working_directory(self) -> None:
        self.assertEqual(self.imkit("user", "add", "dave", "--password", "d").returncode, 0)
        self.assertTrue(os.path.exists(os.path.join(self.scratch(), "imkit.sqlite3")))


# send and listen over the scripted server of test_client_protocol --------------------------------


class CommandReactor(fakes.FakeReactor):
    """A FakeReactor with the system event triggers the commands register for Ctrl-C."""

    def __init__(self) -> None:
        super().__init__()
        self.triggers: dict[int, Any] = {}

    def addSystemEventTrigger(self, phase: str, event: str, function: Any, *args: Any) -> int:
        handle = len(self.triggers) + 1
        self.triggers[handle] = (phase, event, function)
        return handle

    def removeSystemEventTrigger(self, handle: int) -> None:
        del self.triggers[handle]


class Lines:
    """A line source whose lines the test hands out in chunks."""

    def __init__(self) -> None:
        self.waiting: defer.Deferred | None = None

    async def next_lines(self) -> list[bytes] | None:
        self.waiting = defer.Deferred()
        return await self.waiting

    def give(self, lines: list[bytes] | None) -> None:
        waiting, self.waiting = self.waiting, None
        assert waiting is not None
        waiting.callback(lines)


TEXT = {"kind": "message", "sender_device": "laptop", "content_type": "text/plain; charset=utf-8"}
"""What listen prints for a message of test_client_protocol besides the original keys."""


class SendAndListenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = CommandReactor()
        self.endpoint = fakes.ScriptedEndpoint(self.reactor)
        self.out = io.StringIO()

    def client(self, **kwargs: Any) -> IMClient:
        return IMClient(
            self.endpoint, "alice", "pw", "cli", reactor=self.reactor, rng=random.Random(1), settings=ClientSettings(resend_jitter=0), **kwargs
        )

    def close_links(self) -> None:
        for link in self.endpoint.links:
            if link.transport.disconnecting:
                link.close()

    def printed(self) -> list[Any]:
        return [json.loads(line) for line in self.out.getvalue().splitlines()]

    def ack(self, link: fakes.Link, send: packets.Send, seq: int) -> None:
        link.server.ack(packets.SendAck(send.client_msg_id, 0, 100 + seq, seq, 0, 1, "dm:alice:bob", ""))

    def test_send_is_pipelined_bounded_and_printed_in_order(self) -> None:
        client = self.client()
        lines = Lines()
        done = defer.ensureDeferred(cli.send_all(self.reactor, client, lines, to="bob", conversation=None, out=self.out, max_in_flight=2))
        link = self.endpoint.link
        link.catch_up()
        lines.give([b"one", b"two", b"three"])
        self.reactor.advance(0)
        link.pull()
        first, second = link.packets_of(packets.Send)  # at most two unacknowledged
        self.ack(link, second, 2)
        link.push()
        self.assertEqual(self.out.getvalue(), "")  # the second is printed after the first
        self.reactor.advance(0)
        link.pull()
        third = link.packets_of(packets.Send)[2]  # the second's ack made room for the third
        self.assertEqual(third.body, b"three")
        self.ack(link, first, 1)
        link.push()
        self.assertEqual(self.printed(), [{"id": 101, "conversation": "dm:alice:bob", "seq": 1}, {"id": 102, "conversation": "dm:alice:bob", "seq": 2}])
        lines.give(None)
        self.ack(link, third, 3)
        link.push()
        self.close_links()
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual([line["seq"] for line in self.printed()], [1, 2, 3])
        self.assertEqual(self.reactor.triggers, {})
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_send_stops_at_the_first_refusal(self) -> None:
        client = self.client()
        lines = Lines()
        done = defer.ensureDeferred(cli.send_all(self.reactor, client, lines, to="bob", conversation=None, out=self.out))
        link = self.endpoint.link
        link.catch_up()
        lines.give([b"one", b"two"])
        self.reactor.advance(0)
        link.pull()
        first, second = link.packets_of(packets.Send)
        link.server.ack(packets.SendAck(first.client_msg_id, ErrorCode.TOO_LARGE, 0, 0, 0, 0, "", "too big"))
        link.push()
        self.close_links()
        self.assertEqual(self.failureResultOf(done).value.code, ErrorCode.TOO_LARGE)
        self.assertEqual(self.out.getvalue(), "")
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_send_with_a_wrong_password(self) -> None:
        client = self.client()
        lines = Lines()
        done = defer.ensureDeferred(cli.send_all(self.reactor, client, lines, to="bob", conversation=None, out=self.out))
        lines.give([b"one"])
        link = self.endpoint.link
        link.pull()
        link.push()
        link.pull()
        link.server.reject_login(ErrorCode.AUTH_FAILED, "wrong user name or password")
        link.push()
        self.close_links()
        self.assertEqual(self.failureResultOf(done, LoginFailed).value.code, ErrorCode.AUTH_FAILED)

    def test_send_timeout_before_any_login(self) -> None:
        self.endpoint.refuse = True
        client = IMClient(self.endpoint, "alice", "pw", reactor=self.reactor, settings=ClientSettings(send_timeout=5.0))
        done = defer.ensureDeferred(cli.send_all(self.reactor, client, cli._OneLine(b"hi"), to="bob", conversation=None, out=self.out))
        self.reactor.advance(5.0)
        error = self.failureResultOf(done, cli.CommandFailed).value
        self.assertIn("could not log in within 5 seconds", str(error))

    def test_listen_prints_json_and_stops_after_count(self) -> None:
        client = self.client()
        done = defer.ensureDeferred(cli.listen_until(self.reactor, client, self.out, count=2))
        link = self.endpoint.link
        own = fakes.message("dm:alice:bob", 2, body="müde".encode(), sender="alice")
        link.catch_up(
            ranges=(packets.Range("dm:alice:bob", 0, 3),),
            messages=(fakes.message("dm:alice:bob", 1, body=b"\xff"), own, fakes.message("dm:alice:bob", 3)),
        )
        self.close_links()
        self.successResultOf(done)
        self.assertEqual(
            self.printed(),
            [
                {"conversation": "dm:alice:bob", "seq": 1, "id": 1001, "sender": "bob", "body": "\ufffd", "sent_at": 1700000000001, **TEXT},
                {"conversation": "dm:alice:bob", "seq": 2, "id": 1002, "sender": "alice", "body": "müde", "sent_at": 1700000000002, **TEXT},
            ],
        )
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_listen_idle_exit_counts_from_the_catch_up(self) -> None:
        client = self.client()
        done = defer.ensureDeferred(cli.listen_until(self.reactor, client, self.out, idle_exit=5.0))
        link = self.endpoint.link
        self.reactor.advance(10)  # not counted: the catch-up has not even begun
        request = link.login()
        self.assertNoResult(done)
        link.push(packets.SyncResult(request.packet.request_id, False, (packets.Range("c", 0, 0),), ()))
        self.reactor.advance(4)
        link.push(packets.Deliver(fakes.message("c", 1)))
        self.reactor.advance(4)
        self.assertNoResult(done)
        self.reactor.advance(1)
        self.close_links()
        self.successResultOf(done)
        self.assertEqual([line["seq"] for line in self.printed()], [1])

    def test_listen_with_a_wrong_password(self) -> None:
        client = self.client()
        done = defer.ensureDeferred(cli.listen_until(self.reactor, client, self.out))
        link = self.endpoint.link
        link.pull()
        link.push()
        link.pull()
        link.server.reject_login(ErrorCode.AUTH_FAILED, "wrong user name or password")
        link.push()
        self.close_links()
        self.failureResultOf(done, LoginFailed)


# contact, group, send --group and listen against a real server ------------------------------------

PASSWORDS = Passwords.fast_for_tests()


class ServerCommandTests(TestCase):
    """
    The commands run as ``main`` runs them (``_run``: exit status and one-line errors), minus the
    process exit, in this process against a real server: the twistd plugin's service over TLS on
    loopback, with a memory store.
    """

    timeout = 60
    policy = "open"

    def setUp(self) -> defer.Deferred:
        return defer.ensureDeferred(self.start_server())

    async def start_server(self) -> None:
        from twisted.internet import reactor

        from imkit.server import tap

        options = tap.Options()
        options.parseOptions(["--listen", "tls:0:interface=127.0.0.1", "--store", "memory:", "--policy", self.policy])
        service = tap.makeService(options, reactor=reactor, passwords=PASSWORDS)
        service.startService()
        self.addCleanup(service.stopService)
        (listening,) = await service.whenListening()
        self.port = listening.getHost().port
        for name in ("alice", "bob", "carol", "dave"):
            await service.store.add_user(name, await PASSWORDS.hash(f"{name}-pw"))

    async def imkit(self, *argv: str, user: str = "alice", password: str | None = None) -> tuple[int, str, str]:
        """``imkit ARGV`` as ``user``: (exit status, standard output, standard error)."""
        from twisted.internet import reactor

        args = cli._build_parser().parse_args(
            [*argv, "--server", f"localhost:{self.port}", "--user", user, "--password", password or f"{user}-pw"]
        )
        job = args.prepare(args)
        out, err = io.StringIO(), io.StringIO()
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        try:
            await cli._run(reactor, job, args.prog)
            status = 0
        except SystemExit as exit:
            status = exit.code
        finally:
            sys.stdout, sys.stderr = saved
        return status, out.getvalue(), err.getvalue()

    async def ok(self, *argv: str, user: str = "alice") -> list[Any]:
        """Run a command that must succeed: exit 0, nothing on standard error; its JSON lines."""
        status, out, err = await self.imkit(*argv, user=user)
        self.assertEqual((status, err), (0, ""), argv)
        return [json.loads(line) for line in out.splitlines()]

    async def fails(self, *argv: str, user: str = "alice", password: str | None = None) -> str:
        """Run a command that must fail: exit 1, exactly one line on standard error (returned)."""
        status, out, err = await self.imkit(*argv, user=user, password=password)
        self.assertEqual(status, 1, (argv, out, err))
        lines = err.splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertNotIn("Traceback", lines[0])
        return lines[0]

    async def heard(self, user: str, count: int) -> list[dict[str, Any]]:
        """What ``imkit listen --count COUNT`` prints for ``user`` (from the start: a new device)."""
        return await self.ok("listen", "--count", str(count), user=user)


class ContactCommandTests(ServerCommandTests):
    policy = "contacts"

    @defer.inlineCallbacks
    def test_contacts(self) -> Any:
        """Under --policy contacts: add each other, block and unblock, list, remove with a goodbye."""
        line = yield defer.ensureDeferred(self.fails("send", "--to", "bob", "hi"))
        self.assertEqual(
            line,
            "imkit send: send refused (NOT_ALLOWED): you and 'bob' are not each other's contacts; "
            "neither of you may block the other, and with --policy contacts both must imkit contact add the other",
        )
        added = yield defer.ensureDeferred(self.ok("contact", "add", "bob"))
        self.assertEqual([(r["conversation"], r["seq"]) for r in added], [("dm:alice:bob", 1)])
        self.assertIsInstance(added[0]["id"], int)
        yield defer.ensureDeferred(self.ok("contact", "add", "alice", user="bob"))
        sent = yield defer.ensureDeferred(self.ok("send", "--to", "bob", "hi"))
        self.assertEqual(sent[0]["seq"], 3)
        yield defer.ensureDeferred(self.ok("contact", "block", "carol"))
        listed = yield defer.ensureDeferred(self.ok("contact", "list"))
        self.assertEqual(listed, [{"user": "bob", "state": "contact"}, {"user": "carol", "state": "blocked"}])
        yield defer.ensureDeferred(self.ok("contact", "unblock", "carol"))
        removed = yield defer.ensureDeferred(self.ok("contact", "remove", "bob", "--goodbye", "bye now"))
        self.assertEqual([(r["conversation"], r["seq"]) for r in removed], [("dm:alice:bob", 4)])
        self.assertEqual((yield defer.ensureDeferred(self.ok("contact", "list"))), [])
        heard = yield defer.ensureDeferred(self.heard("bob", 5))
        self.assertEqual(
            [(e["seq"], e["kind"], e["sender"], e.get("body")) for e in heard],
            [(1, "contact.add", "alice", None), (2, "contact.add", "bob", None), (3, "message", "alice", "hi"),
             (4, "message", "alice", "bye now"), (5, "contact.remove", "alice", None)],
        )
        self.assertEqual(heard[4]["sender_device"], "cli-contact")

    @defer.inlineCallbacks
    def test_refusals(self) -> Any:
        yield defer.ensureDeferred(self.ok("contact", "block", "alice", user="carol"))
        self.assertEqual(
            (yield defer.ensureDeferred(self.fails("contact", "add", "carol"))),
            "imkit contact add: refused (NOT_ALLOWED): you and 'carol' are not each other's contacts; "
            "neither of you may block the other, and with --policy contacts both must imkit contact add the other",
        )
        for command in ("remove", "unblock"):
            self.assertEqual(
                (yield defer.ensureDeferred(self.fails("contact", command, "zed"))),
                f"imkit contact {command}: refused (UNKNOWN_RECIPIENT): no user named 'zed'; check the user name",
            )
        self.assertEqual(
            (yield defer.ensureDeferred(self.fails("contact", "block", "alice"))),
            "imkit contact block: refused (INVALID_OPERATION): you cannot be your own contact",
        )
        self.assertEqual(
            (yield defer.ensureDeferred(self.fails("contact", "list", password="wrong"))),
            "imkit contact list: login refused (AUTH_FAILED): wrong user name or password",
        )

    @defer.inlineCallbacks
    def test_no_server(self) -> Any:
        """Nothing listening: the login is given up after --timeout, with a hint."""
        import socket

        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            self.port = unused.getsockname()[1]
        line = yield defer.ensureDeferred(self.fails("contact", "list", "--timeout", "0.2"))
        self.assertEqual(line, "imkit contact list: could not log in within 0.2 seconds; is the server running, and is --server right?")


class GroupCommandTests(ServerCommandTests):
    @defer.inlineCallbacks
    def test_group_life(self) -> Any:
        """create, send --group, add, members, list, remove, leave; a member's listen shows the events."""
        (created,) = yield defer.ensureDeferred(self.ok("group", "create", "lunch", "--member", "bob"))
        group = created["group"]
        self.assertTrue(group.startswith("g:"), group)
        sent = yield defer.ensureDeferred(self.ok("send", "--group", group, "noon?"))
        self.assertEqual([(r["conversation"], r["seq"]) for r in sent], [(group, 2)])
        added = yield defer.ensureDeferred(self.ok("group", "add", group, "carol", "dave", user="bob"))
        self.assertEqual([(r["conversation"], r["seq"]) for r in added], [(group, 3)])
        members = yield defer.ensureDeferred(self.ok("group", "members", group, user="carol"))
        self.assertEqual(
            members,
            [
                {"user": "alice", "role": "owner", "joined_seq": 1},
                {"user": "bob", "role": "member", "joined_seq": 1},
                {"user": "carol", "role": "member", "joined_seq": 3},
                {"user": "dave", "role": "member", "joined_seq": 3},
            ],
        )
        listed = yield defer.ensureDeferred(self.ok("group", "list"))
        self.assertEqual(listed, [{"conversation": group, "title": "lunch", "head": 3, "role": "owner"}])
        yield defer.ensureDeferred(self.ok("group", "remove", group, "bob"))
        left = yield defer.ensureDeferred(self.ok("group", "leave", group, user="carol"))
        self.assertEqual(left[0]["seq"], 5)
        self.assertEqual([m["user"] for m in (yield defer.ensureDeferred(self.ok("group", "members", group)))], ["alice", "dave"])
        self.assertEqual((yield defer.ensureDeferred(self.ok("group", "list", user="bob"))), [])
        heard = yield defer.ensureDeferred(self.heard("bob", 4))
        for event in heard:
            del event["id"], event["sent_at"]
        self.assertEqual(
            heard,
            [
                {"kind": "group.create", "conversation": group, "seq": 1, "sender": "alice", "sender_device": "cli-group",
                 "users": ["bob"], "title": "lunch"},
                {"kind": "message", "conversation": group, "seq": 2, "sender": "alice", "sender_device": "cli-send",
                 "content_type": "text/plain; charset=utf-8", "body": "noon?"},
                {"kind": "group.add", "conversation": group, "seq": 3, "sender": "bob", "sender_device": "cli-group",
                 "users": ["carol", "dave"]},
                {"kind": "group.remove", "conversation": group, "seq": 4, "sender": "alice", "sender_device": "cli-group",
                 "users": ["bob"]},
            ],
        )

    @defer.inlineCallbacks
    def test_refusals(self) -> Any:
        (created,) = yield defer.ensureDeferred(self.ok("group", "create", "lunch", "--member", "bob"))
        group = created["group"]
        not_a_member = "refused (NOT_A_MEMBER): you are not a member of that {}; check the group or conversation id: imkit group list shows the groups you are in"
        self.assertEqual(
            (yield defer.ensureDeferred(self.fails("group", "create", "tea", "--member", "zed"))),
            "imkit group create: refused (UNKNOWN_RECIPIENT): no user named 'zed'; check the user name",
        )
        self.assertEqual(
            (yield defer.ensureDeferred(self.fails("group", "add", group, "dave", user="carol"))),
            "imkit group add: " + not_a_member.format("conversation"),
        )
        self.assertEqual(
            (yield defer.ensureDeferred(self.fails("group", "remove", group, "alice", user="bob"))),
            "imkit group remove: refused (INVALID_OPERATION): only the group's owner removes members; "
            "imkit group members GROUP shows who is in the group and who owns it",
        )
        self.assertEqual(
            (yield defer.ensureDeferred(self.fails("group", "leave", "g:nosuchgroup"))),
            "imkit group leave: " + not_a_member.format("conversation"),
        )
        self.assertEqual(
            (yield defer.ensureDeferred(self.fails("group", "members", group, user="carol"))),
            "imkit group members: " + not_a_member.format("group"),
        )
        self.assertEqual(
            (yield defer.ensureDeferred(self.fails("send", "--group", group, "hi", user="carol"))),
            "imkit send: send " + not_a_member.format("conversation"),
        )
        self.assertEqual(
            (yield defer.ensureDeferred(self.fails("group", "list", password="wrong"))),
            "imkit group list: login refused (AUTH_FAILED): wrong user name or password",
        )

    @defer.inlineCallbacks
    def test_console_script(self) -> Any:
        """
        The real entry point in a child process: JSON on success and exit 0, one line and exit 1 on a
        refusal.  The two run at once, so they log in as two devices (a device's second login
        replaces its first connection).
        """
        from twisted.internet import reactor, utils

        env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), IMKIT_USER="alice", IMKIT_PASSWORD="alice-pw")
        server = ("--server", f"localhost:{self.port}")

        def imkit(*argv: str) -> defer.Deferred:
            return utils.getProcessOutputAndValue(
                sys.executable, ["-c", "from imkit.cli import main; main()", *argv, *server], env=env, reactor=reactor
            )

        created, refused = yield defer.gatherResults([imkit("group", "create", "lunch"), imkit("group", "members", "g:nosuchgroup", "--device", "cli-group-2")])
        out, err, status = created
        self.assertEqual((status, err), (0, b""))
        self.assertTrue(json.loads(out)["group"].startswith("g:"))
        out, err, status = refused
        self.assertEqual((status, out), (1, b""))
        self.assertEqual(err.decode().splitlines(), [
            "imkit group members: refused (NOT_A_MEMBER): you are not a member of that group; "
            "check the group or conversation id: imkit group list shows the groups you are in"
        ])


@given(
    body=st.binary(max_size=40),
    content_type=st.sampled_from(["text/plain; charset=utf-8", "application/octet-stream", "imkitx/plain"]),
)
def test_listen_lines_of_ordinary_messages_are_what_describe_says(body: bytes, content_type: str) -> None:
    """``imkit listen`` spells out the common case for speed; it must say exactly what describe() does."""
    message = Message(7, "dm:alice:bob", 3, "alice", "phone", 99, 1_700_000_000_000, content_type, body, 0)
    assert json.loads(cli.message_json(message)) == describe(message).to_json()
