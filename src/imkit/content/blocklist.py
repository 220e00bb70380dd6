"""
Phishing links: a blocklist file, reloaded when it changes, and the checker that uses it.

The file has one entry per line; ``#`` starts a comment (a whole line, or after white space)::

    # domains: the domain and all its subdomains
    evil.example
    *.bad.example               # the same as bad.example
    bücher-login.example        # IDN, as written or in punycode
    192.0.2.7                   # an address
    0.0.0.0 tracker.example     # hosts-file lines: every name after the address
    # URLs: that page, and what lies below it on the same host (any scheme)
    https://good.example/phish/
    good.example/login.php

Hosts and links are normalised alike (``imkit.content.urls``), so case, IDN spelling, userinfo
tricks and trailing dots do not get a link past an entry.

``BlocklistFile`` is a Twisted service: it polls the file's modification time (and size and
inode) every ``interval`` seconds with a LoopingCall, and reads and parses a changed file in a
thread.  The checker always uses the last good list: a file that cannot be read or has a line
that is neither a domain nor a URL is logged (one line, once per version of the file) and the
previous list stays.  Replace the file atomically (write a new file, then rename it over the old).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable
from urllib.parse import unquote

from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.logger import Logger

from imkit.checks import Action, CheckContext, Verdict
from imkit.content.urls import URL, extract_urls
from imkit.model import Item

_HOSTS_FILE_ADDRESSES = frozenset({"0.0.0.0", "127.0.0.1", "::", "::1", "::0"})


class BlocklistError(ValueError):
    """A blocklist that cannot be read or parsed (the message is one line)."""

    def __init__(self, message: str, signature: Any = None) -> None:
        super().__init__(message)
        self.signature = signature
        """The version of the file that was broken (so it is reported once)."""


class Blocklist:
    """An immutable set of blocked domains (with their subdomains) and URLs."""

    def __init__(self, domains: Iterable[str] = (), urls: Iterable[tuple[str, str]] = ()) -> None:
        """``domains``: normalised hosts; ``urls``: (normalised host, path) pairs, paths as ``_path`` makes them."""
        self._domains = frozenset(domains)
        by_host: dict[str, list[str]] = {}
        for host, path in urls:
            by_host.setdefault(host, []).append(path)
        self._urls = {host: tuple(sorted(set(paths))) for host, paths in by_host.items()}
        self._size = len(self._domains) + sum(len(paths) for paths in self._urls.values())

    @classmethod
    def parse(cls, text: str, source: str = "blocklist") -> "Blocklist":
        """The entries of a blocklist file's text; BlocklistError names the first bad line."""
        domains = []
        urls = []
        for number, line in enumerate(text.splitlines(), 1):
            entries = _entries(line)
            for entry in entries:
                parsed = parse_entry(entry)
                if parsed is None:
                    raise BlocklistError(f"{source} line {number}: {entry[:80]!r} is neither a domain nor a URL")
                host, path = parsed
                if path is None:
                    domains.append(host)
                else:
                    urls.append((host, path))
        return cls(domains, urls)

    @classmethod
    def of(cls, *entries: str) -> "Blocklist":
        """A blocklist of the given entries (lines of a file)."""
        return cls.parse("\n".join(entries))

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __repr__(self) -> str:
        return f"<Blocklist of {len(self._domains)} domains and {self._size - len(self._domains)} URLs>"

    def match(self, url: URL) -> str | None:
        """The entry that blocks ``url`` (a domain, or host and path), or None."""
        host = url.host
        domains = self._domains
        if host in domains:
            return host
        if not host.startswith("["):
            dot = host.find(".")
            while dot >= 0:
                parent = host[dot + 1 :]
                if parent in domains:
                    return parent
                dot = host.find(".", dot + 1)
        paths = self._urls.get(host)
        if paths:
            path = _path(url.path)
            for prefix in paths:
                if path == prefix or (
                    path.startswith(prefix) and (prefix.endswith("/") or path[len(prefix)] in "/?&")
                ):
                    return host + prefix
        return None

    def blocks(self, text: str) -> str | None:
        """The first entry that blocks a link in ``text``, or None."""
        if not self:
            return None
        for url in extract_urls(text):
            entry = self.match(url)
            if entry is not None:
                return entry
        return None


EMPTY = Blocklist()


def _entries(line: str) -> list[str]:
    """The entries of one line: none for a comment or blank, several for a hosts-file line."""
    hash_at = line.find("#")
    while hash_at >= 0:
        if hash_at == 0 or line[hash_at - 1].isspace():
            line = line[:hash_at]
            break
        hash_at = line.find("#", hash_at + 1)
    fields = line.split()
    if len(fields) > 1 and fields[0] in _HOSTS_FILE_ADDRESSES:
        return fields[1:]
    if len(fields) > 1:
        return [line.strip()]  # reported as a bad entry
    return fields


def parse_entry(entry: str) -> tuple[str, str | None] | None:
    """(host, None) for a domain, (host, path) for a URL, None if it is neither."""
    if entry.startswith("*."):
        entry = entry[2:]
    elif entry.startswith("."):
        entry = entry[1:]
    candidate = entry if "://" in entry else "http://" + entry
    found = extract_urls(candidate)
    if len(found) != 1 or found[0].start != 0 or found[0].end != len(candidate):
        return None
    url = found[0]
    path = _path(url.path)
    return (url.host, None if path == "/" else path)


def _path(path: str) -> str:
    """A link's path and query as compared: no fragment, '/' separators, escapes decoded, never empty."""
    path = unquote(path.partition("#")[0].replace("\\", "/"), errors="replace")
    if not path.startswith("/"):
        path = "/" + path
    return path


# The file, reloaded ----------------------------------------------------------------------------


def _signature(stat: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino, stat.st_dev)


def read_blocklist(path: str, known: Any = None) -> tuple[Any, Blocklist] | None:
    """
    (signature, Blocklist) of the file at ``path``, or None if its signature is still ``known``.
    Blocking: run it in a thread.  Raises BlocklistError (with the signature) if it is unusable.
    """
    try:
        signature = _signature(os.stat(path))
    except OSError as error:
        raise BlocklistError(f"cannot read blocklist {path}: {error.strerror or error}", ("missing", error.errno)) from None
    if signature == known:
        return None
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise BlocklistError(f"cannot read blocklist {path}: {error.strerror or error}", signature) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise BlocklistError(f"blocklist {path} is not UTF-8 text (byte {error.start})", signature) from None
    try:
        return signature, Blocklist.parse(text, f"blocklist {path}")
    except BlocklistError as error:
        raise BlocklistError(str(error), signature) from None


class BlocklistFile(Service):
    """
    A blocklist file and its current contents (``current``), reloaded when the file changes.

    ``load()`` reads it now, blocking (at start-up, to refuse a bad file with one line);
    as a running service it polls every ``interval`` seconds on ``clock`` (the reactor unless
    given), reading in a thread (``in_thread``, deferToThread unless given).
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        clock: Any = None,
        interval: float = 5.0,
        in_thread: Callable[..., defer.Deferred] | None = None,
    ) -> None:
        self.path = path
        self.clock = clock
        self.interval = interval
        self.in_thread = in_thread or threads.deferToThread
        self.current: Blocklist = EMPTY
        self._signature: Any = None
        self._broken: Any = None
        self._polling: task.LoopingCall | None = None

    def load(self) -> Blocklist:
        """Read the file now (blocking); raises BlocklistError and keeps the current list if it is unusable."""
        found = read_blocklist(self.path)
        assert found is not None
        self._signature, self.current = found
        self._broken = None
        return self.current

    def check(self) -> defer.Deferred:
        """Reload the file if it changed.  Deferred[bool]: whether the list was replaced; never fails."""
        d = self.in_thread(read_blocklist, self.path, self._signature)
        return d.addCallbacks(self._read, self._unreadable)

    def _read(self, found: tuple[Any, Blocklist] | None) -> bool:
        if found is None:
            return False
        self._signature, self.current = found
        self._broken = None
        self.log.info("blocklist {path} loaded: {count} entries", path=self.path, count=len(self.current))
        return True

    def _unreadable(self, failure: Any) -> bool:
        if failure.check(BlocklistError):
            signature = failure.value.signature
            if signature is None or signature != self._broken:
                self._broken = signature
                self.log.error(
                    "{problem}; keeping the previous {count} entries",
                    problem=failure.getErrorMessage(),
                    count=len(self.current),
                )
        else:
            self.log.failure("reloading blocklist {path} failed", failure, path=self.path)
        return False

    def startService(self) -> None:
        super().startService()
        if self.clock is None:
            from twisted.internet import reactor

            self.clock = reactor
        self._polling = task.LoopingCall(self.check)
        self._polling.clock = self.clock
        self._polling.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._polling is not None and self._polling.running:
            self._polling.stop()
        self._polling = None


# The checker -----------------------------------------------------------------------------------


class PhishingChecker:
    """
    A content checker: rejects (or flags, ``action="flag"``) a text item that links to a site
    on the blocklist.

    ``blocklist`` is a Blocklist or something whose ``current`` is one (a BlocklistFile): the
    list in force when a message arrives judges it.  Bodies up to ``inline_limit`` bytes are
    scanned on the reactor thread (a millisecond or two at most); longer ones in a thread (``in_thread``).
    Only items whose content type starts with one of ``content_types`` are looked at.
    """

    name = "phishing"

    def __init__(
        self,
        blocklist: Any,
        action: Action | str = Action.REJECT,
        in_thread: Callable[..., defer.Deferred] | None = None,
        inline_limit: int = 4096,
        content_types: tuple[str, ...] = ("text/",),
    ) -> None:
        if isinstance(action, str):
            if action not in ("reject", "flag"):
                raise ValueError(f"the blocklist action is reject or flag, not {action!r}")
            action = Action.REJECT if action == "reject" else Action.FLAG
        if action not in (Action.REJECT, Action.FLAG):
            raise ValueError(f"the blocklist action is reject or flag, not {action!r}")
        self.source = blocklist
        self.action = action
        self.in_thread = in_thread or threads.deferToThread
        self.inline_limit = inline_limit
        self.content_types = tuple(content_types)

    @property
    def blocklist(self) -> Blocklist:
        return self.source if isinstance(self.source, Blocklist) else self.source.current

    def __call__(self, context: CheckContext, item: Item) -> Verdict | defer.Deferred | None:
        if not item.content_type.startswith(self.content_types):
            return None
        blocklist = self.blocklist
        if not blocklist:
            return None
        if len(item.body) <= self.inline_limit:
            return self.judge(item.body, blocklist)
        return self.in_thread(self.judge, bytes(item.body), blocklist)

    def judge(self, body: bytes, blocklist: Blocklist) -> Verdict | None:
        """The verdict on one body (thread-safe: the blocklist is immutable)."""
        entry = blocklist.blocks(bytes(body).decode("utf-8", "replace"))
        if entry is None:
            return None
        return Verdict(self.action, f"links to a blocked site ({entry})")
