"""The twistd plugin: discoverable, options validated with one-line errors, a service that starts and stops cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from twisted.internet import defer, reactor, task
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imkit.passwords import Passwords
from imkit.server import tap
from imkit.server.service import IMServerService
from imkit.store import MemoryStore, SQLiteStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(*argv: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


class PluginTests(SynchronousTestCase):
    def test_twistd_lists_imkit(self) -> None:
        """`twistd --help` names the imkit plugin (the installed twisted/plugins/imkit_plugin.py)."""
        env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
        with tempfile.TemporaryDirectory() as scratch:
            result = subprocess.run(
                [os.path.join(os.path.dirname(sys.executable), "twistd"), "--help"],
                capture_output=True,
                text=True,
                cwd=scratch,
                env=env,
                timeout=120,
            )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"\n\s+imkit\s")

    def test_help_documents_every_option(self) -> None:
        text = str(tap.Options())
        for option in (
            "--listen", "--tls-cert", "--tls-key", "--store", "--heartbeat", "--idle-timeout",
            "--login-timeout", "--ack-timeout", "--max-unacked", "--max-frame", "--max-body", "--extension",
            "--policy", "--history-on-join", "--recall-window", "--edit-window", "--max-group-members",
            "--max-devices", "--device-policy", "--new-device-history", "--retention", "--prune-interval",
            "--handshake-timeout", "--max-outbound-buffer", "--max-connections-per-ip", "--max-connections-per-user",
            "--send-rate", "--send-burst", "--sync-rate", "--sync-burst", "--lookup-rate", "--lookup-burst",
            "--user-rate-factor", "--ip-rate-factor", "--conversation-rate-factor", "--probe-burst", "--probe-interval",
        ):
            self.assertIn(option, text)


class OptionsTests(SynchronousTestCase):
    def test_conversation_options(self) -> None:
        """The messaging policy and the conversation limits reach the rules and the hub's settings."""
        options = parse(
            "--store", "memory:", "--policy", "contacts", "--history-on-join", "--recall-window", "60",
            "--edit-window", "300", "--max-group-members", "50", "--max-devices", "2", "--device-policy", "refuse",
            "--new-device-history", "20", "--retention", "86400", "--prune-interval", "600",
        )
        policy = options.policy
        self.assertEqual(
            (policy.contacts_only, policy.history_on_join, policy.recall_window, policy.edit_window, policy.max_group_members),
            (True, True, 60.0, 300.0, 50),
        )
        settings = options.settings
        self.assertEqual(
            (settings.max_devices, settings.device_policy, settings.new_device_history, settings.retention, settings.prune_interval),
            (2, "refuse", 20, 86400.0, 600.0),
        )
        service = tap.makeService(options, reactor=reactor, passwords=Passwords.fast_for_tests())
        self.assertIs(service.hub.policy, policy)
        defaults = parse("--store", "memory:")
        self.assertFalse(defaults.policy.contacts_only)
        self.assertIsNone(defaults.settings.retention)

    def test_bad_conversation_options_are_one_line(self) -> None:
        for argv, fix in (
            (("--policy", "friends"), "--policy is open or contacts"),
            (("--device-policy", "kick"), "--device-policy is evict-oldest or refuse"),
            (("--max-devices", "0"), "--max-devices must be greater than 0"),
        ):
            with self.assertRaises(usage.UsageError) as raised:
                parse("--store", "memory:", *argv)
            self.assertIn(fix, str(raised.exception))
            self.assertNotIn("\n", str(raised.exception))

    def test_defaults(self) -> None:
        options = parse()
        self.assertEqual(options["listen"], ["tls:14000"])
        self.assertIsInstance(options.store, SQLiteStore)
        self.assertEqual(options.store.path, os.path.abspath("imkit.sqlite3"))
        self.assertEqual(options.settings.stop_timeout, 10.0)
        self.assertEqual(parse("--stop-timeout", "2.5").settings.stop_timeout, 2.5)

    def test_forms_scripts_rely_on(self) -> None:
        options = parse("--listen", "tls:0:interface=127.0.0.1", "--listen", "tcp:0:interface=127.0.0.1", "--store", "memory:")
        self.assertEqual(options["listen"], ["tls:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"])
        self.assertIsInstance(options.store, MemoryStore)

    def test_bad_values_name_the_fix(self) -> None:
        cases = {
            ("--store", "redis:x"): "use sqlite:PATH or memory:",
            ("--heartbeat", "soon"): "--heartbeat takes a number",
            ("--max-unacked", "0"): "greater than 0",
            ("--stop-timeout", "-1"): "greater than 0",
            ("--tls-cert", "a.pem"): "pass --tls-cert and --tls-key together",
            ("--tls-profile", "old"): "intermediate or modern",
            ("--extension", "nope"): "MODULE:ATTRIBUTE",
            ("--store", "sqlite:/nonexistent/dir/imkit.sqlite3"): "no such writable directory",
        }
        for argv, fix in cases.items():
            with self.assertRaises(usage.UsageError) as caught:
                parse(*argv)
            message = str(caught.exception)
            self.assertIn(fix, message)
            self.assertNotIn("\n", message)

    def test_bad_listen_string_and_missing_certificate(self) -> None:
        for argv, fix in (
            (("--listen", "tls:notaport"), "tls:"),
            (("--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"), "--tls-cert"),
        ):
            with self.assertRaises(usage.UsageError) as caught:
                tap.makeService(parse("--store", "memory:", *argv), reactor=reactor)
            self.assertIn(fix, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))

    def test_twistd_reports_bad_options_in_one_line(self) -> None:
        """Under twistd too, a bad option or listen string or certificate is one line on stderr."""
        env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
        cases = {
            ("--store", "nope:"): "twistd imkit: unknown store 'nope:': use sqlite:PATH or memory:",
            ("--listen", "tls:nope"): "twistd imkit: bad listen endpoint 'tls:nope'",
            ("--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"): "twistd imkit: cannot",
        }
        for argv, start in cases.items():
            with tempfile.TemporaryDirectory() as scratch:
                result = subprocess.run(
                    [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "imkit", "--store", "memory:", *argv],
                    capture_output=True, text=True, cwd=scratch, env=env, timeout=120,
                )
            self.assertEqual(result.returncode, 1)
            self.assertEqual(result.stdout, "")
            self.assertTrue(result.stderr.startswith(start), result.stderr)
            self.assertEqual(result.stderr.count("\n"), 1, result.stderr)


    def test_twistd_ends_with_one_line_when_the_port_is_taken(self) -> None:
        """A listener that cannot listen ends the server with one error line, not an idle process."""
        import socket

        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
        with tempfile.TemporaryDirectory() as scratch:
            result = subprocess.run(
                [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "imkit", "--store", "memory:",
                 "--listen", f"tcp:{port}:interface=127.0.0.1"],
                capture_output=True, text=True, cwd=scratch, env=env, timeout=120,
            )
        self.assertIn("imkit could not start: Couldn't listen on 127.0.0.1", result.stdout)
        self.assertNotIn("Traceback", result.stdout + result.stderr)


class ServiceTests(TestCase):
    @defer.inlineCallbacks
    def test_starts_listens_and_stops_closing_the_store(self) -> None:
        """The service opens the store, listens on 127.0.0.1, and on stop closes the store."""
        path = os.path.join(tempfile.mkdtemp(), "imkit.sqlite3")
        options = parse("--listen", "tls:0:interface=127.0.0.1", "--store", f"sqlite:{path}")
        service = tap.makeService(options, reactor=reactor, passwords=Passwords.fast_for_tests())
        self.assertIsInstance(service, IMServerService)
        service.startService()
        (port,) = yield service.whenListening()
        self.assertEqual(port.getHost().host, "127.0.0.1")
        self.assertNotEqual(port.getHost().port, 0)
        yield service.stopService()
        self.assertTrue(os.path.exists(path))
        with self.assertRaises(Exception):
            yield service.store.head("dm:a:b")

    def test_when_listening_fires_without_endpoints_on_a_synchronous_store(self) -> None:
        """An in-process server with no listeners (as benchmarks and embedders run it) is ready at once."""
        service = IMServerService(MemoryStore(), Passwords.fast_for_tests(), [], task.Clock())
        service.startService()
        ports = self.successResultOf(service.whenListening())
        self.assertEqual(ports, [])
        self.successResultOf(service.stopService())
