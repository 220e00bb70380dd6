"""
Content security: the URL extractor, the blocklist and its reloading, the checker pipeline, and
all of it through a real hub (MemoryStore, StringTransport, task.Clock) and the twistd options.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imkit.checks import Rejected
from imkit.content import (
    ERROR_REASON,
    FLAGGED_FORMAT,
    REJECTED_FORMAT,
    Action,
    Blocklist,
    BlocklistError,
    BlocklistFile,
    CheckContext,
    ContentCheckError,
    ContentPipeline,
    FlagReport,
    PhishingChecker,
    Verdict,
    allow,
    extract_urls,
    flag,
    load_checkers,
    normalise_host,
    reject,
    threaded,
    worst,
)
from imkit.model import Item, Submission, direct_conversation
from imkit.passwords import Passwords
from imkit.server import tap
from imkit.server.hub import Hub
from imkit.server.protocol import IMServerFactory
from imkit.session.settings import ServerSettings
from imkit.store.interface import Flag
from imkit.store.memory import MemoryStore
from imkit.wire import codec, packets, schema
from imkit.wire.errors import ErrorCode
from test_server_protocol import Peer

AB = direct_conversation("alice", "bob")


def inline(function: Any, *args: Any) -> defer.Deferred:
    """An ``in_thread`` runner for tests: runs now, on this thread."""
    return defer.maybeDeferred(function, *args)


def submission(*bodies: bytes | Item, client_msg_id: int = 1) -> Submission:
    items = tuple(body if isinstance(body, Item) else Item("text/plain", body) for body in bodies)
    return Submission("alice", "phone", client_msg_id, AB, ("alice", "bob"), 0, items)


class LogCapture:
    """The events of the imkit.content loggers while a test runs."""

    def capture_logs(self) -> list[dict]:
        events: list[dict] = []

        def observe(event: dict) -> None:
            if str(event.get("log_namespace", "")).startswith("imkit.content."):
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return events


# 1. URLs ---------------------------------------------------------------------------------------


def hosts(text: str) -> list[str]:
    return [url.host for url in extract_urls(text)]


class URLExtractionTests(SynchronousTestCase):
    def test_schemes_and_bare_domains(self) -> None:
        cases = {
            "see https://example.com/path": [("https", "example.com", None, "/path")],
            "HTTP://WWW.Example.COM:8080/A?b=1#c": [("http", "www.example.com", 8080, "/A?b=1#c")],
            "ftp://files.example.org and wss://chat.example.net/x": [
                ("ftp", "files.example.org", None, ""),
                ("wss", "chat.example.net", None, "/x"),
            ],
            "go to example.com/path?q=1 now": [("", "example.com", None, "/path?q=1")],
            "www.example.co.uk:8443/a/b": [("", "www.example.co.uk", 8443, "/a/b")],
            "http:\\\\evil.example\\x": [("http", "evil.example", None, "\\x")],
            "a https://one.example b two.example c": [("https", "one.example", None, ""), ("", "two.example", None, "")],
        }
        for text, expected in cases.items():
            found = [(u.scheme, u.host, u.port, u.path) for u in extract_urls(text)]
            self.assertEqual(found, expected, text)

    def test_what_is_not_a_link(self) -> None:
        for text in (
            "",
            "no links here",
            "version 1.2.3, pi is 3.14",
            "e.g. this",
            "write to alice@example.com",
            "file:///etc/passwd",
            "http://",
            "http://a..b/",
            "https://example.com:99999/",
            "not.a-tld1 x",
        ):
            self.assertEqual(extract_urls(text), [], text)

    def test_trailing_punctuation_and_brackets(self) -> None:
        cases = {
            "look: https://example.com/a.": "https://example.com/a",
            "(see https://example.com/a)": "https://example.com/a",
            "https://en.wikipedia.org/wiki/Foo_(bar)": "https://en.wikipedia.org/wiki/Foo_(bar)",
            "[example.com/x], next": "example.com/x",
            "<https://example.com/a?b=c>": "https://example.com/a?b=c",
            '"example.com!"': "example.com",
            "«https://example.com/x»": "https://example.com/x",
            "really?? example.com/a/...": "example.com/a/",
            "请访问 https://example.com/x。谢谢": "https://example.com/x",
            "example.com.": "example.com",
        }
        for text, link in cases.items():
            (url,) = extract_urls(text)
            self.assertEqual(url.text, link, text)
            self.assertEqual(text[url.start : url.end], link)

    def test_hosts_are_normalised(self) -> None:
        cases = {
            "https://Bücher.DE/x": "xn--bcher-kva.de",
            "bücher.de": "xn--bcher-kva.de",
            "https://xn--bcher-kva.de": "xn--bcher-kva.de",
            "ＥＸＡＭＰＬＥ．ＣＯＭ/x": "example.com",
            "http://example。com": "example.com",
            "пример.рф": "xn--e1afmkfd.xn--p1ai",
            "http://%65vil.example/": "evil.example",
            "http://evil.example./": "evil.example",
            "http://0x7f.1/": "127.0.0.1",
            "http://2130706433/": "127.0.0.1",
            "http://0177.0.0.01/": "127.0.0.1",
            "http://[0:0::1]:80/": "[::1]",
        }
        for text, host in cases.items():
            self.assertEqual(hosts(text), [host], text)

    def test_userinfo_does_not_hide_the_host(self) -> None:
        self.assertEqual(hosts("https://paypal.com@evil.example/login"), ["evil.example"])
        self.assertEqual(hosts("https://user:pass@evil.example:81/"), ["evil.example"])
        self.assertEqual(hosts("http://evil.example\\@good.example/"), ["evil.example"])

    def test_text_without_spaces(self) -> None:
        """CJK text runs on without spaces: the link starts and ends where the script changes."""
        self.assertEqual([u.text for u in extract_urls("请访问evil.example获取奖品")], ["evil.example"])
        self.assertEqual(hosts("点击" * 50 + "evil.example"), ["evil.example"])
        self.assertEqual(hosts("例子.中国"), ["xn--fsqu00a.xn--fiqs8s"])

    def test_normalise_host(self) -> None:
        self.assertEqual(normalise_host("EXAMPLE.com."), "example.com")
        self.assertEqual(normalise_host("faß.de"), "xn--fa-hia.de")
        for bad in ("", ".", "a..b", "a b.com", "x" * 64 + ".com", "[::g]", "256.1.1.1", "1.2.3.4.5", "a/b"):
            self.assertIsNone(normalise_host(bad), bad)

    def test_str_is_the_normal_form(self) -> None:
        (url,) = extract_urls("HTTPS://Bücher.de:443")
        self.assertEqual(str(url), "https://xn--bcher-kva.de:443/")
        (bare,) = extract_urls("example.com/a")
        self.assertEqual(str(bare), "http://example.com/a")

    def test_hostile_text_is_scanned_quickly(self) -> None:
        """No catastrophic backtracking: a quarter megabyte of nasty text takes well under a second."""
        for text in (
            "a." * 131072,
            "a-" * 131072 + ".",
            "http://" * 37449,
            "(" * 262144 + "example.com",
            "x" * 262144,
            "a1." * 87381,
            "点" * 131072 + ".com",
            ("https://a.b/" + "(" * 100 + " ") * 2000,
            "https://a.b/" + ")" * 262144,
            "example.com/" + "." * 262144,
            "https://a.b/" + "(" * 131072 + ")" * 131072,
        ):
            started = time.perf_counter()
            extract_urls(text)
            self.assertLess(time.perf_counter() - started, 2.0, text[:20])


labels = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
tlds = st.from_regex(r"[a-z]{2,6}", fullmatch=True)
idn_labels = st.text(alphabet="abcdeäöüéñжщя中文字", min_size=1, max_size=10)
paths = st.from_regex(r"(?:/[A-Za-z0-9\-]{1,8}){0,3}/?(?:\?[a-z]=[0-9]{1,3})?", fullmatch=True)
spaces = st.sampled_from([" ", "\n", "\t", "  ", "\u3000"])
openers = st.sampled_from(["", "(", "<", '"', "«", "["])
closers = st.sampled_from(["", ".", ",", ")", "!", "?", ">", '"', "...", "»", "]", "。"])


class URLPropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.text())
    def test_never_crashes(self, text: str) -> None:
        for url in extract_urls(text):
            self.assertEqual(text[url.start : url.end], url.text)
            self.assertTrue(url.host.isascii())
            self.assertEqual(normalise_host(url.host), url.host)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        st.text(max_size=40),
        spaces,
        openers,
        st.sampled_from(["", "http://", "https://", "HTTPS://", "ftp://"]),
        st.lists(labels, min_size=1, max_size=3),
        tlds,
        paths,
        st.booleans(),
        closers,
        spaces,
        st.text(max_size=40),
    )
    def test_finds_links_embedded_in_any_text(
        self, prefix, before, opener, scheme, host_labels, tld, path, upper, closer, after, suffix
    ) -> None:
        host = ".".join(host_labels + [tld])
        link = scheme + (host.upper() if upper else host) + path
        text = prefix + before + opener + link + closer + after + suffix
        found = [(u.scheme, u.host, u.path, u.text) for u in extract_urls(text)]
        self.assertIn((scheme[:-3].lower(), host, path, link), found, text)

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=30), st.lists(idn_labels, min_size=1, max_size=3), tlds, spaces, st.text(max_size=30))
    def test_finds_idn_links(self, prefix, host_labels, tld, space, suffix) -> None:
        host = ".".join(host_labels + [tld])
        normal = normalise_host(host)
        self.assertIsNotNone(normal)
        self.assertTrue(normal.isascii())
        self.assertEqual(normalise_host(normal), normal, "normalising is idempotent")
        found = hosts(prefix + " " + "https://" + host + space + suffix)
        self.assertIn(normal, found)


# 2. The blocklist ------------------------------------------------------------------------------

BLOCKLIST = """\
# phishing sites
evil.example
*.bad.example            # with its subdomains
bücher-login.example
192.0.2.7
0.0.0.0 tracker.example ads.example
https://good.example/phish/
good.example/login.php
"""


class BlocklistTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.blocklist = Blocklist.parse(BLOCKLIST)

    def blocked(self, text: str) -> str | None:
        return self.blocklist.blocks(text)

    def test_domains_block_their_subdomains_only(self) -> None:
        self.assertEqual(len(self.blocklist), 8)
        self.assertEqual(self.blocked("go to evil.example now"), "evil.example")
        self.assertEqual(self.blocked("https://login.secure.EVIL.example/x"), "evil.example")
        self.assertEqual(self.blocked("bad.example"), "bad.example")
        self.assertEqual(self.blocked("http://www.bad.example"), "bad.example")
        self.assertEqual(self.blocked("ads.example and tracker.example"), "ads.example")
        for fine in ("notevil.example", "evil.example.org", "example", "good.example", "https://evil-example.com"):
            self.assertIsNone(self.blocked(fine), fine)

    def test_tricks_do_not_get_past(self) -> None:
        for text in (
            "https://paypal.com@evil.example/",
            "HTTPS://EVIL.EXAMPLE./",
            "https://%65vil.example",
            "ＥＶＩＬ．ｅｘａｍｐｌｅ",
            "https://xn--bcher-login-thb.example/",  # the punycode spelling of an IDN entry
            "bücher-login.example",
            "http://192.0.2.7/",
            "http://3221225991/",  # 192.0.2.7 as one number
            "点击evil.example领奖",
        ):
            self.assertIsNotNone(self.blocked(text), text)

    def test_url_entries_block_a_page_and_below(self) -> None:
        self.assertEqual(self.blocked("http://good.example/phish/kit.html"), "good.example/phish/")
        self.assertEqual(self.blocked("good.example/login.php?user=me"), "good.example/login.php")
        self.assertEqual(self.blocked("https://good.example/login.php#top"), "good.example/login.php")
        self.assertEqual(self.blocked("https://good.example/log%69n.php"), "good.example/login.php")
        for fine in ("https://good.example/", "https://good.example/phish", "good.example/login.php5", "x.good.example/login.php"):
            self.assertIsNone(self.blocked(fine), fine)

    def test_empty_and_comment_only(self) -> None:
        self.assertFalse(Blocklist.parse("# nothing yet\n\n   \n"))
        self.assertIsNone(Blocklist().blocks("evil.example"))

    def test_bad_lines_are_named(self) -> None:
        for text, line in (("evil.example\nnot a domain\n", 2), ("a..b", 1), ("\n\n1.2.3.4.5.6", 3), ("x" * 300, 1)):
            with self.assertRaises(BlocklistError) as raised:
                Blocklist.parse(text, "blocklist f.txt")
            self.assertIn(f"blocklist f.txt line {line}:", str(raised.exception))
            self.assertNotIn("\n", str(raised.exception))


class BlocklistFileTests(LogCapture, SynchronousTestCase):
    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="imkit-blocklist-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.path = os.path.join(directory, "blocklist.txt")
        self.version = 0
        self.write("evil.example\n")
        self.clock = Clock()
        self.watcher = BlocklistFile(self.path, clock=self.clock, interval=5.0, in_thread=inline)
        self.events = self.capture_logs()

    def write(self, text: str | bytes) -> None:
        """Replace the file, with a modification time of its own even on coarse file systems."""
        with open(self.path, "wb") as file:
            file.write(text.encode() if isinstance(text, str) else text)
        self.version += 1
        stamp = 1_700_000_000_000_000_000 + self.version * 1_000_000_000
        os.utime(self.path, ns=(stamp, stamp))

    def errors(self) -> list[str]:
        return [event["problem"] for event in self.events if event.get("log_level").name == "error"]

    def test_load_and_reload_on_change(self) -> None:
        self.assertEqual(len(self.watcher.load()), 1)
        self.watcher.startService()
        self.addCleanup(self.watcher.stopService)
        self.clock.advance(5)
        self.assertEqual(len(self.watcher.current), 1, "unchanged: not read again")
        self.write("evil.example\nworse.example\n")
        self.assertIsNone(self.watcher.current.blocks("worse.example"))
        self.clock.advance(4)
        self.assertIsNone(self.watcher.current.blocks("worse.example"), "only when the poll comes round")
        self.clock.advance(1)
        self.assertEqual(self.watcher.current.blocks("worse.example"), "worse.example")
        self.assertEqual(self.errors(), [])

    def test_a_broken_file_keeps_the_previous_list_and_logs_one_line(self) -> None:
        self.watcher.load()
        previous = self.watcher.current
        self.watcher.startService()
        self.addCleanup(self.watcher.stopService)
        self.write("evil.example\nthis is not a domain\n")
        self.clock.advance(5)
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertIs(self.watcher.current, previous)
        (error,) = self.errors()
        self.assertIn(f"blocklist {self.path} line 2", error)
        self.assertNotIn("\n", error)
        self.write(b"evil.example\n\xff\xfe\n")
        self.clock.advance(5)
        self.assertIn("is not UTF-8", self.errors()[-1])
        os.remove(self.path)
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertIn("cannot read blocklist", self.errors()[-1])
        self.assertEqual(len(self.errors()), 3, "one line per broken version of the file")
        self.assertIs(self.watcher.current, previous)
        self.write("new.example\n")
        self.clock.advance(5)
        self.assertEqual(self.watcher.current.blocks("new.example"), "new.example")
        self.assertIsNone(self.watcher.current.blocks("evil.example"))

    def test_check_drives_a_reload_without_the_service(self) -> None:
        self.assertTrue(self.successResultOf(self.watcher.check()))
        self.assertFalse(self.successResultOf(self.watcher.check()))
        self.write("other.example\n")
        self.assertTrue(self.successResultOf(self.watcher.check()))
        self.assertEqual(self.watcher.current.blocks("other.example"), "other.example")

    def test_load_refuses_a_bad_file(self) -> None:
        self.write("fine.example\n???\n")
        with self.assertRaises(BlocklistError):
            self.watcher.load()
        os.remove(self.path)
        with self.assertRaises(BlocklistError) as raised:
            self.watcher.load()
        self.assertIn("cannot read blocklist", str(raised.exception))

    def test_stopping_stops_polling(self) -> None:
        self.watcher.load()
        self.watcher.startService()
        self.watcher.stopService()
        self.write("later.example\n")
        self.clock.advance(60)
        self.assertIsNone(self.watcher.current.blocks("later.example"))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PhishingCheckerTests(SynchronousTestCase):
    def context(self) -> CheckContext:
        return CheckContext(submission(b"x"), 0)

    def test_verdicts(self) -> None:
        blocklist = Blocklist.of("evil.example")
        rejecting = PhishingChecker(blocklist, in_thread=inline)
        flagging = PhishingChecker(blocklist, "flag", in_thread=inline)
        item = Item("text/plain", "Click https://login.evil.example/ now".encode())
        self.assertEqual(rejecting(self.context(), item), reject("links to a blocked site (evil.example)"))
        self.assertEqual(flagging(self.context(), item), flag("links to a blocked site (evil.example)"))
        self.assertIsNone(rejecting(self.context(), Item("text/plain", b"https://fine.example")))
        self.assertIsNone(rejecting(self.context(), Item("application/octet-stream", b"evil.example")), "not text")
        self.assertIsNone(PhishingChecker(Blocklist())(self.context(), item), "an empty list allows everything")
        self.assertEqual(rejecting(self.context(), Item("text/plain", b"\xffevil.example\xfe")).action, Action.REJECT)
        with self.assertRaises(ValueError):
            PhishingChecker(blocklist, "shrug")

    def test_large_bodies_go_to_the_thread_runner(self) -> None:
        ran = []

        def runner(function: Any, *args: Any) -> defer.Deferred:
            ran.append(len(args[0]))
            return defer.maybeDeferred(function, *args)

        checker = PhishingChecker(Blocklist.of("evil.example"), in_thread=runner, inline_limit=100)
        self.assertEqual(checker(self.context(), Item("text/plain", b"evil.example".rjust(100))).action, Action.REJECT)
        self.assertEqual(ran, [])
        result = checker(self.context(), Item("text/plain", b"evil.example".rjust(101)))
        self.assertEqual(self.successResultOf(result).action, Action.REJECT)
        self.assertEqual(ran, [101])

    def test_uses_the_current_list_of_a_file(self) -> None:
        class Source:
            current = Blocklist.of("one.example")

        checker = PhishingChecker(Source, in_thread=inline)
        self.assertIsNotNone(checker(self.context(), Item("text/plain", b"one.example")))
        Source.current = Blocklist.of("two.example")
        self.assertIsNone(checker(self.context(), Item("text/plain", b"one.example")))
        self.assertIsNotNone(checker(self.context(), Item("text/plain", b"two.example")))


class ThreadedPhishingCheckerTests(TestCase):
    async def test_a_large_body_is_scanned_in_a_thread(self) -> None:
        checker = PhishingChecker(Blocklist.of("evil.example"), inline_limit=1024)
        body = ("lorem ipsum " * 20_000 + " evil.example").encode()
        result = checker(CheckContext(submission(body), 0), Item("text/plain", body))
        self.assertIsInstance(result, defer.Deferred)
        self.assertEqual((await result).action, Action.REJECT)


# 3. The pipeline -------------------------------------------------------------------------------


class PipelineTests(LogCapture, SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pipeline = ContentPipeline(self.clock)
        self.calls: list[tuple[str, int]] = []
        self.events = self.capture_logs()

    def checker(self, name: str, answer: Any = None) -> Any:
        def check(context: CheckContext, item: Item) -> Any:
            self.calls.append((name, context.index))
            return answer(context, item) if callable(answer) else answer

        check.name = name  # type: ignore[attr-defined]
        return self.pipeline.add(check)

    def outcome(self, *bodies: bytes) -> Any:
        return self.successResultOf(self.pipeline.check(submission(*bodies)))

    def rejection(self, *bodies: bytes) -> Rejected:
        return self.failureResultOf(self.pipeline.check(submission(*bodies)), Rejected).value

    def test_checkers_run_in_order_for_each_item(self) -> None:
        self.checker("a")
        self.checker("b", allow())
        self.assertEqual(self.outcome(b"1", b"2"), ())
        self.assertEqual(self.calls, [("a", 0), ("b", 0), ("a", 1), ("b", 1)])

    def test_flags_add_up(self) -> None:
        self.checker("a", flag("one"))
        self.checker("b", lambda context, item: flag("two") if item.body == b"2" else None)
        self.assertEqual(
            [tuple(f) for f in self.outcome(b"1", b"2")], [(0, "a", "one"), (1, "a", "one"), (1, "b", "two")]
        )

    def test_reject_wins_and_stops_the_check(self) -> None:
        self.checker("flagger", flag("meh"))
        self.checker("rejecter", lambda context, item: reject("no") if item.body == b"bad" else None)
        self.checker("after")
        rejected = self.rejection(b"ok", b"bad", b"ok")
        self.assertEqual((rejected.code, rejected.reason), (ErrorCode.REJECTED, "no"))
        self.assertEqual(
            self.calls, [("flagger", 0), ("rejecter", 0), ("after", 0), ("flagger", 1), ("rejecter", 1)]
        )
        (event,) = self.events
        self.assertEqual(event["log_format"], REJECTED_FORMAT)
        self.assertEqual((event["imkit_content"], event["checker"], event["reason"]), ("rejected", "rejecter", "no"))
        self.assertEqual((event["sender"], event["device"], event["conversation"]), ("alice", "phone", AB))

    def test_worst(self) -> None:
        self.assertEqual(worst([]), allow())
        self.assertEqual(worst([allow(), flag("a"), flag("b")]), flag("a"))
        self.assertEqual(worst([flag("a"), reject("x"), reject("y"), allow()]), reject("x"))

    def test_raising_rejected_still_works(self) -> None:
        def legacy(context: CheckContext, item: Item) -> None:
            raise Rejected("too long", ErrorCode.TOO_LARGE)

        self.pipeline.add(legacy)
        self.assertEqual(self.rejection(b"x").code, ErrorCode.TOO_LARGE)

    def test_deferred_and_coroutine_checkers(self) -> None:
        slow: defer.Deferred = defer.Deferred()
        self.checker("slow", lambda context, item: slow)

        async def coroutine(context: CheckContext, item: Item) -> Verdict:
            await defer.succeed(None)
            return flag("from a coroutine")

        self.pipeline.add(coroutine)
        result = self.pipeline.check(submission(b"x"))
        self.assertNoResult(result)
        slow.callback(flag("late"))
        self.assertEqual([f.checker for f in self.successResultOf(result)], ["slow", "coroutine"])

    def test_a_deferred_may_fail_with_rejected(self) -> None:
        self.checker("slow", lambda context, item: defer.fail(Rejected("later no")))
        self.assertEqual(self.rejection(b"x").reason, "later no")

    def test_failing_checkers_refuse_with_internal_error(self) -> None:
        self.checker("broken", lambda context, item: 1 / 0)
        rejected = self.rejection(b"x")
        self.assertEqual((rejected.code, rejected.reason), (ErrorCode.INTERNAL_ERROR, ERROR_REASON))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_a_wrong_answer_is_a_failure(self) -> None:
        self.checker("confused", "yes")
        self.assertEqual(self.rejection(b"x").code, ErrorCode.INTERNAL_ERROR)
        self.assertIn("returned 'yes', not a Verdict", self.events[0]["problem"])

    def test_on_error_may_flag_or_allow(self) -> None:
        self.pipeline.on_error = Action.FLAG
        self.checker("broken", lambda context, item: defer.fail(ValueError("db down")))
        (mark,) = self.outcome(b"x")
        self.assertEqual((mark.checker, mark.reason), ("broken", "check failed: db down"))
        self.pipeline.on_error = Action.ALLOW
        self.assertEqual(self.outcome(b"x"), ())
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)

    def test_a_checker_that_never_answers_times_out(self) -> None:
        never: defer.Deferred = defer.Deferred()
        self.checker("stuck", lambda context, item: never)
        result = self.pipeline.check(submission(b"x"))
        self.clock.advance(29)
        self.assertNoResult(result)
        self.clock.advance(1)
        self.assertEqual(self.failureResultOf(result, Rejected).value.code, ErrorCode.INTERNAL_ERROR)
        self.assertEqual(self.events[0]["log_format"], "content check {checker} took more than {timeout} s")

    def test_registration(self) -> None:
        self.assertFalse(self.pipeline)

        def mine(context: CheckContext, item: Item) -> None:
            return None

        self.pipeline.add(mine)
        self.pipeline.add(mine, "again")
        self.assertEqual(self.pipeline.names, ["mine", "again"])
        self.assertEqual(len(self.pipeline), 2)
        with self.assertRaises(ContentCheckError):
            self.pipeline.add(mine)
        with self.assertRaises(ContentCheckError):
            self.pipeline.add("not callable")  # type: ignore[arg-type]

    def test_threaded_runs_a_sync_checker_in_the_runner(self) -> None:
        ran = []

        def heavy(context: CheckContext, item: Item) -> Verdict:
            return reject("heavy")

        def runner(function: Any, *args: Any) -> defer.Deferred:
            ran.append(function)
            return defer.maybeDeferred(function, *args)

        self.pipeline.add(threaded(heavy, runner))
        self.assertEqual(self.pipeline.names, ["heavy"])
        self.assertEqual(self.rejection(b"x").reason, "heavy")
        self.assertEqual(ran, [heavy])

    def test_reports_go_to_the_log_and_the_observers(self) -> None:
        reports: list[FlagReport] = []
        self.pipeline.on_flagged.append(reports.append)
        self.pipeline.on_flagged.append(lambda report: 1 / 0)  # a broken observer is logged, not fatal
        self.pipeline.on_flagged.append(lambda report: defer.fail(ValueError("forwarding failed")))
        store = MemoryStore()
        for name in ("alice", "bob"):
            store.add_user(name, "h")
        marks = ((1, "words", "rude"),)
        appended = self.successResultOf(store.append(submission(b"fine", b"rude"), flags=marks))
        self.assertIs(self.pipeline.stored(appended, submission(b"fine", b"rude"), marks), appended)
        (report,) = reports
        message = appended.messages[1]
        self.assertEqual(report.flag, Flag(message.server_id, AB, 2, "alice", "words", "rude"))
        self.assertEqual((report.message, report.device), (message, "phone"))
        self.assertEqual(
            report.line(), f"content flagged: words flagged message {message.server_id} (seq 2 of {AB}) from alice/phone: rude"
        )
        flagged = [event for event in self.events if event.get("imkit_content") == "flagged"]
        self.assertEqual([event["log_format"] for event in flagged], [FLAGGED_FORMAT])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError, ValueError)), 2)
        # A duplicate was reported when first stored.
        self.pipeline.stored(self.successResultOf(store.append(submission(b"fine", b"rude"), flags=marks)), submission(b"x"), marks)
        self.assertEqual(len(reports), 1)


# 4. Through a hub ------------------------------------------------------------------------------


class HubContentTests(LogCapture, SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = MemoryStore()
        passwords = Passwords.fast_for_tests()
        for user in ("alice", "bob"):
            passwords.hash(f"{user}-secret").addCallback(lambda h, u=user: self.store.add_user(u, h))
        self.settings = ServerSettings(ack_timeout=5.0, login_timeout=10.0, idle_timeout=600.0)
        self.hub = Hub(self.store, passwords, self.clock, self.settings)
        self.factory = IMServerFactory(self.hub, self.settings, self.clock)
        self.reports: list[FlagReport] = []
        self.hub.content.on_flagged.append(self.reports.append)
        self.events = self.capture_logs()
        self.alice, self.bob = self.logged_in("alice"), self.logged_in("bob")

    def logged_in(self, user: str) -> Peer:
        peer = Peer(self.factory)
        replies = peer.login(user, f"{user}-secret")
        self.assertEqual(replies[1].status, 0)
        return peer

    def send(self, client_msg_id: int, body: bytes) -> list:
        self.alice.send(codec.encode(packets.Send(client_msg_id, schema.TARGET_USER, "bob", "text/plain", body)))
        return self.alice.received()

    def delivered(self) -> list[bytes]:
        self.clock.advance(0)
        found = []
        for packet in self.bob.received():
            found += [m.body for m in getattr(packet, "messages", ())] or [packet.message.body]
        return found

    def head(self) -> int:
        return self.successResultOf(self.store.head(AB))

    def test_a_phishing_link_is_rejected_and_nothing_is_stored(self) -> None:
        self.hub.content.add(PhishingChecker(Blocklist.of("evil.example"), in_thread=inline))
        (ack,) = self.send(1, b"log in at https://evil.example/bank")
        self.assertEqual((ack.status, ack.reason), (ErrorCode.REJECTED, "links to a blocked site (evil.example)"))
        self.assertEqual(self.head(), 0)
        self.assertEqual(self.delivered(), [])
        self.assertEqual(self.successResultOf(self.store.flags()), [])
        (fine,) = self.send(2, b"see https://good.example")
        self.assertEqual((fine.status, fine.seq), (0, 1))
        self.assertEqual(self.delivered(), [b"see https://good.example"])
        self.assertEqual([e["imkit_content"] for e in self.events], ["rejected"])
        self.assertFalse(self.alice.transport.disconnecting)

    def test_a_flagged_message_is_stored_marked_delivered_and_reported(self) -> None:
        self.hub.content.add(PhishingChecker(Blocklist.of("evil.example"), "flag", in_thread=inline))
        (ack,) = self.send(1, b"log in at https://evil.example/bank")
        self.assertEqual((ack.status, ack.seq), (0, 1))
        self.assertEqual(self.delivered(), [b"log in at https://evil.example/bank"])
        stored = self.successResultOf(self.store.flags(AB))
        self.assertEqual(stored, [Flag(ack.server_id, AB, 1, "alice", "phishing", "links to a blocked site (evil.example)")])
        (report,) = self.reports
        self.assertEqual((report.flag, report.device, report.message.body), (stored[0], "phone", b"log in at https://evil.example/bank"))
        (event,) = [e for e in self.events if e.get("imkit_content") == "flagged"]
        self.assertEqual(event["log_format"], FLAGGED_FORMAT)
        self.assertEqual((event["server_id"], event["seq"], event["checker"]), (ack.server_id, 1, "phishing"))
        # A resend is answered from the store: no second flag, no second report.
        self.clock.advance(1)
        (again,) = self.send(1, b"log in at https://evil.example/bank")
        self.assertEqual(again, ack)
        self.assertEqual(len(self.successResultOf(self.store.flags())), 1)
        self.assertEqual(len(self.reports), 1)

    def test_a_bundle_is_judged_as_a_whole(self) -> None:
        self.hub.content.add(lambda context, item: flag("odd") if item.body == b"odd" else None, "odd")
        self.hub.content.add(lambda context, item: reject("nope") if item.body == b"bad" else None, "bad")
        items = (Item("text/plain", b"odd"), Item("text/plain", b"bad"))
        self.alice.send(codec.encode(packets.Bundle(1, schema.TARGET_USER, "bob", items)))
        (ack,) = self.alice.received()
        self.assertEqual((ack.status, ack.reason), (ErrorCode.REJECTED, "nope"))
        self.assertEqual((self.head(), self.reports), (0, []))
        items = (Item("text/plain", b"fine"), Item("text/plain", b"odd"))
        self.alice.send(codec.encode(packets.Bundle(2, schema.TARGET_USER, "bob", items)))
        (ack,) = self.alice.received()
        self.assertEqual((ack.status, ack.seq, ack.count), (0, 1, 2))
        self.assertEqual([(f.seq, f.checker) for f in self.successResultOf(self.store.flags())], [(2, "odd")])

    def test_a_slow_checker_keeps_the_devices_order(self) -> None:
        pending: list[defer.Deferred] = []

        def slow(context: CheckContext, item: Item) -> defer.Deferred:
            pending.append(defer.Deferred())
            return pending[-1]

        self.hub.content.add(slow)
        self.assertEqual(self.send(1, b"first"), [])
        self.assertEqual(self.send(2, b"second"), [])
        self.assertEqual(len(pending), 1, "the second waits for the first's check")
        pending[0].callback(flag("hmm"))
        self.assertEqual(len(pending), 2)
        pending[1].callback(None)
        self.clock.advance(0)  # acks written outside a read go out at the end of the turn
        acks = self.alice.received()
        self.assertEqual([(a.client_msg_id, a.seq) for a in acks], [(1, 1), (2, 2)])
        self.assertEqual(self.delivered(), [b"first", b"second"])
        self.assertEqual([r.flag.seq for r in self.reports], [1])
        self.assertEqual(self.hub._in_order, {})

    def test_a_stuck_checker_times_out_and_the_device_goes_on(self) -> None:
        self.hub.content.add(lambda context, item: defer.Deferred() if item.body == b"stuck" else None, "stuck")
        self.assertEqual(self.send(1, b"stuck"), [])
        self.assertEqual(self.send(2, b"fine"), [])
        self.alice.send(codec.encode(packets.Ping(1)))
        self.clock.advance(30)
        acks = [p for p in self.alice.received() if isinstance(p, packets.SendAck)]
        self.assertEqual([(a.client_msg_id, a.status) for a in acks], [(1, ErrorCode.INTERNAL_ERROR), (2, 0)])
        self.assertEqual(self.head(), 1)

    def test_extension_checks_run_first_and_rejected_still_works(self) -> None:
        order = []

        def legacy(sender: str, device: str, conversation: str, item: Item) -> None:
            order.append("legacy")
            if item.body == b"no":
                raise Rejected("legacy says no")

        self.hub.checks.append(legacy)
        self.hub.content.add(lambda context, item: order.append("content"), "content")
        (ack,) = self.send(1, b"no")
        self.assertEqual((ack.status, ack.reason), (ErrorCode.REJECTED, "legacy says no"))
        (ack,) = self.send(2, b"yes")
        self.assertEqual(ack.status, 0)
        self.assertEqual(order, ["legacy", "legacy", "content"])


# 5. The twistd options -------------------------------------------------------------------------

CHECKERS_MODULE = '''
from imkit.content import flag, reject

def no_shouting(context, item):
    if item.body.isupper():
        return reject("no shouting")

def caps(context, item):
    return None

caps.name = "no_shouting"

both = [no_shouting, lambda context, item: flag("seen")]
clash = [no_shouting, caps]
not_callable = 42
'''


class TapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="imkit-content-tap-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        with open(os.path.join(self.directory, "imkit_test_checkers.py"), "w") as file:
            file.write(CHECKERS_MODULE)
        sys.path.insert(0, self.directory)
        self.addCleanup(sys.path.remove, self.directory)
        self.addCleanup(sys.modules.pop, "imkit_test_checkers", None)
        self.blocklist = os.path.join(self.directory, "blocklist.txt")
        with open(self.blocklist, "w") as file:
            file.write("# test\nevil.example\n")

    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--store", "memory:", *argv])
        return options

    def test_help_documents_the_options(self) -> None:
        text = str(tap.Options())
        for option in ("--blocklist=", "--blocklist-action", "--blocklist-interval", "--content-check"):
            self.assertIn(option, text)

    def test_options_register_checkers_in_order(self) -> None:
        options = self.parse(
            "--blocklist", self.blocklist, "--blocklist-action", "flag", "--blocklist-interval", "2",
            "--content-check", "imkit_test_checkers:both",
        )
        service = tap.makeService(options, reactor=reactor, passwords=Passwords.fast_for_tests())
        content = service.hub.content
        self.assertEqual(content.names, ["phishing", "no_shouting", "<lambda>"])
        phishing = content.checkers[0][1]
        self.assertEqual(phishing.action, Action.FLAG)
        self.assertIs(phishing.source, options.blocklist)
        self.assertIn(options.blocklist, list(service))
        self.assertEqual((options.blocklist.path, options.blocklist.interval), (self.blocklist, 2.0))
        self.assertEqual(options.blocklist.current.blocks("evil.example"), "evil.example")

    def test_defaults(self) -> None:
        options = self.parse("--blocklist", self.blocklist)
        self.assertEqual(options.content_checkers[0][1].action, Action.REJECT)
        service = tap.makeService(self.parse(), reactor=reactor, passwords=Passwords.fast_for_tests())
        self.assertFalse(service.hub.content)

    def test_bad_values_are_one_line(self) -> None:
        broken = os.path.join(self.directory, "broken.txt")
        with open(broken, "w") as file:
            file.write("fine.example\nnot a domain\n")
        cases = {
            ("--blocklist", os.path.join(self.directory, "missing.txt")): "--blocklist: cannot read blocklist",
            ("--blocklist", broken): "line 2: 'not a domain' is neither a domain nor a URL",
            ("--blocklist", self.blocklist, "--blocklist-action", "drop"): "--blocklist-action is reject or flag",
            ("--blocklist-action", "flag"): "--blocklist-action needs --blocklist FILE",
            ("--blocklist-interval", "0"): "--blocklist-interval must be greater than 0",
            ("--content-check", "nope"): "--content-check takes MODULE:ATTRIBUTE",
            ("--content-check", "imkit_no_such_module:x"): "cannot import 'imkit_no_such_module'",
            ("--content-check", "imkit_test_checkers:missing"): "has no attribute 'missing'",
            ("--content-check", "imkit_test_checkers:not_callable"): "names neither a checker",
            ("--content-check", "imkit_test_checkers:clash"): "named 'no_shouting' is registered already",
        }
        for argv, fix in cases.items():
            with self.assertRaises(usage.UsageError) as raised:
                self.parse(*argv)
            message = str(raised.exception)
            self.assertIn(fix, message)
            self.assertNotIn("\n", message)

    def test_load_checkers(self) -> None:
        self.assertEqual(len(load_checkers("imkit_test_checkers:both")), 2)
        (single,) = load_checkers("imkit_test_checkers:no_shouting")
        self.assertEqual(single(None, Item("text/plain", b"HEY")), reject("no shouting"))
        with self.assertRaises(ContentCheckError):
            load_checkers("imkit_test_checkers:")
