"""
Links in message text: ``extract_urls(text)`` finds them, ``normalise_host`` makes their hosts comparable.

Two kinds are found:

* with a scheme, ``https://example.com/a``, ``ftp://…``, ``HTTP:\\\\example.com`` (any
  ``scheme://``; only those with a host are returned);
* bare, ``example.com``, ``www.example.com/path?q=1``, ``bücher.example:8080``: dot-separated
  labels ending in an alphabetic top-level label (``com``, ``xn--p1ai`` or ``рф``).  E-mail
  addresses are not links.

Hosts are normalised as a browser would before comparing them: percent-escapes decoded, IDNA
(UTS #46) mapping, so case, full-width letters and the ideographic full stop ``。`` do not matter,
non-ASCII labels in punycode (``xn--…``), no trailing dot, and IPv4 addresses in any of the forms
browsers accept (``0x7f.1``, ``2130706433``) as dotted quads.  Userinfo is dropped:
``https://bank.example@evil.example/`` leads to ``evil.example``.

Trailing punctuation is not part of a link (``see example.com/a.``), nor is a closing bracket
that the link did not open (``(example.com/a)``), while ``…/Foo_(bar)`` keeps its own.

Both regular expressions run in linear time (no nested unbounded repetition, labels of at most 63
characters), so a hostile 256 KiB body costs well under a second, never minutes; the checker
scans bodies beyond a few KiB in a thread all the same.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from urllib.parse import unquote

import attrs

try:  # UTS #46 mapping and IDNA 2008, as browsers do; installed with twisted[tls]
    import idna as _idna
except ImportError:  # pragma: no cover - the standard library's IDNA 2003 is close enough
    _idna = None


@attrs.frozen
class URL:
    """One link found in a text."""

    text: str
    """The link as written (``text[start:end]`` of the text searched)."""
    start: int
    end: int
    scheme: str
    """Lower case; "" for a bare domain."""
    host: str
    """Normalised (see ``normalise_host``)."""
    port: int | None
    path: str
    """Everything after the host and port: path, query and fragment, as written ("" if none)."""

    def __str__(self) -> str:
        port = "" if self.port is None else f":{self.port}"
        return f"{self.scheme or 'http'}://{self.host}{port}{self.path or '/'}"


# Characters that end a link: white space, controls, and what cannot appear in one unescaped
# but often surrounds one (angle brackets, quotes, typographic quotes and CJK brackets).
_STOP = "\\s\\x00-\\x1f\\x7f<>\"`\u00ab\u00bb\u2018\u2019\u201c\u201d\u2039\u203a\u300c-\u300f\u3010\u3011\uff02\uff1c\uff1e"

_SCHEMED = re.compile(
    # A scheme not glued to a word before it, then ``//`` (browsers take backslashes too).
    r"(?<![A-Za-z0-9+.\-])([A-Za-z][A-Za-z0-9+.\-]{0,31}):[/\\]{2}([^" + _STOP + r"]*)"
)

_DOT = "[.\u3002\uff0e\uff61]"
# Scripts written without spaces between words: a link may follow one of their letters directly.
_NO_SPACE = "\u0e00-\u0e7f\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f"
_BARE = re.compile(
    # Not inside a word (except one of those scripts), an e-mail address, a path or a longer name.
    r"(?<![.@\-/\\:%+&=~#?\u3002\uff0e\uff61])(?<!(?![" + _NO_SPACE + r"])\w)"
    r"((?:[^\W_][\w\-]{0,62}" + _DOT + r")+"
    # The top-level label: ASCII letters (a CJK letter may follow with no space between), punycode,
    # or letters of another script.
    r"(?:[A-Za-z]{2,63}(?![A-Za-z0-9_\-])|[Xx][Nn]--[A-Za-z0-9\-]{1,59}(?![\w\-])"
    r"|(?:(?![A-Za-z0-9])[^\W\d_]){2,63}(?![\w\-])))"
    r"(?::(\d{1,5}))?"
    r"([/?#][^" + _STOP + r"]*)?"
)
_SCRIPT_CHANGE = re.compile(r"[" + _NO_SPACE + r"](?=[\x00-\x7f]+$)")
# ...and ends where an ASCII host meets a full stop of those scripts and their text ("example.com。谢谢"),
_CJK_AFTER_HOST = re.compile(r"[\x00-\x7f]+?(?=[\u3002\uff0e\uff61][" + _NO_SPACE + r"])")
# or where a path meets their sentence punctuation.
_PATH_STOP = re.compile("[\u3001\u3002\uff0c\uff01\uff1f\uff1b]")

_TRAILING = ".,;:!?'*~_\u3001\u3002\uff0c\uff0e\uff01\uff1f\uff1b\uff1a\u2026"
_CLOSERS = {")": "(", "]": "[", "}": "{"}
_HOST_END = re.compile(r"[/\\?#]")
_ASCII_HOST = re.compile(r"[a-z0-9\-_]+(?:\.[a-z0-9\-_]+)*")
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
_INVALID = object()


def extract_urls(text: str) -> list[URL]:
    """Every link in ``text``, in order of appearance (never raises for any str)."""
    found = [url for url in map(_schemed, _SCHEMED.finditer(text)) if url is not None]
    if not found:
        return [url for url in map(_bare, _BARE.finditer(text)) if url is not None]
    # Bare domains outside the links with a scheme (whose hosts look bare too).
    bare = []
    index = 0
    for match in _BARE.finditer(text):
        while index < len(found) and found[index].end <= match.start():
            index += 1
        if index < len(found) and found[index].start < match.end():
            continue
        url = _bare(match)
        if url is not None:
            bare.append(url)
    return sorted(found + bare, key=lambda url: url.start)


def _schemed(match: re.Match) -> URL | None:
    scheme = match.group(1).lower()
    rest = _trim(match.group(2))
    host_end = _HOST_END.search(rest)
    authority = rest[: host_end.start()] if host_end else rest
    cjk = _CJK_AFTER_HOST.match(authority)
    if cjk is not None:
        rest = authority = authority[: cjk.end()]
    elif len(authority) < len(rest):
        rest = authority + _trim(_cut_path(rest[len(authority) :]))
    host, port = _split_port(authority.rpartition("@")[2])
    if port is _INVALID or not host:
        return None
    normal = normalise_host(host)
    if normal is None:
        return None
    start, end = match.start(), match.start(2) + len(rest)
    return URL(match.string[start:end], start, end, scheme, normal, port, rest[len(authority) :])  # type: ignore[arg-type]


def _bare(match: re.Match) -> URL | None:
    start, host = match.start(1), match.group(1)
    # CJK text needs no spaces: in "请访问example.com" the link starts where the script changes.
    first = re.split(_DOT, host, maxsplit=1)[0]
    change = _SCRIPT_CHANGE.search(first)
    if change is not None and host[len(first) :].isascii():
        start += change.end()
        host = host[change.end() :]
    port_text, path = match.group(2), match.group(3) or ""
    cjk = _CJK_AFTER_HOST.match(host)
    if cjk is not None:
        host, port_text, path = host[: cjk.end()], None, ""
    else:
        path = _trim(_cut_path(path))
    port = None
    if port_text is not None:
        port = int(port_text)
        if port > 65535:
            return None
    end = start + len(host) + (len(port_text) + 1 if port_text is not None else 0) + len(path)
    normal = normalise_host(host)
    if normal is None:
        return None
    return URL(match.string[start:end], start, end, "", normal, port, path)


def _cut_path(path: str) -> str:
    stop = _PATH_STOP.search(path)
    return path if stop is None else path[: stop.start()]


def _trim(rest: str) -> str:
    """Drop trailing punctuation and closing brackets the link did not open (in linear time)."""
    end = len(rest)
    closers: dict[str, int] = {}
    while end:
        last = rest[end - 1]
        if last in _TRAILING:
            end -= 1
        elif last in _CLOSERS:
            if last not in closers:
                closers[last] = rest.count(last, 0, end) - rest.count(_CLOSERS[last], 0, end)
            if closers[last] <= 0:
                break
            closers[last] -= 1
            end -= 1
        else:
            break
    return rest[:end]


def _split_port(authority: str) -> tuple[str, object]:
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            return "", _INVALID
        host, after = authority[: close + 1], authority[close + 1 :]
        if not after:
            return host, None
        if not after.startswith(":"):
            return "", _INVALID
        digits = after[1:]
    else:
        host, colon, digits = authority.rpartition(":")
        if not colon:
            return authority, None
    if not digits:
        return host, None
    if not digits.isascii() or not digits.isdigit() or int(digits) > 65535:
        return "", _INVALID
    return host, int(digits)


@functools.lru_cache(maxsize=8192)  # hosts repeat; thread-safe, as the checker's threads need
def normalise_host(host: str) -> str | None:
    """
    A host as browsers compare it: lower-case ASCII, non-ASCII labels in punycode, no trailing
    dot, IPv4 addresses dotted and IPv6 ones bracketed and compressed.  None if it is not a host
    (empty labels, characters no host has, more than 253 characters).
    """
    host = unquote(host, errors="replace")
    if host.startswith("[") and host.endswith("]"):
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            return None
    if not host.isascii():
        host = _map(host)
        if host is None:
            return None
    host = host.lower() if host.isascii() else host.translate(_DOTS).lower()
    if host.endswith("."):
        host = host[:-1]
    if not host or len(host) > 253:
        return None
    labels = host.split(".")
    address = _ipv4(labels)
    if address is _INVALID:
        return None
    if address is not None:
        return address  # type: ignore[return-value]
    if not host.isascii():
        encoded = [label if label.isascii() else _alabel(label) for label in labels]
        if None in encoded:
            return None
        host = ".".join(encoded)  # type: ignore[arg-type]
    if len(host) > 253 or not _ASCII_HOST.fullmatch(host) or any(len(label) > 63 for label in host.split(".")):
        return None
    return host


def _map(host: str) -> str | None:
    """UTS #46 mapping (case, width, compatibility forms, the dots of other scripts)."""
    if _idna is not None:
        try:
            return _idna.uts46_remap(host, std3_rules=False, transitional=False)
        except (_idna.IDNAError, ValueError):
            return None
    return unicodedata.normalize("NFKC", host.translate(_DOTS)).casefold()  # pragma: no cover


def _alabel(label: str) -> str | None:
    if _idna is not None:
        try:
            return _idna.alabel(label).decode("ascii")
        except (_idna.IDNAError, ValueError, UnicodeError):
            pass  # a label IDNA 2008 refuses (symbols, mixed directions) still has one spelling
    try:
        return "xn--" + label.encode("punycode").decode("ascii")
    except UnicodeError:
        return None


def _ipv4(labels: list[str]) -> str | object | None:
    """
    A host that ends in a number is an IPv4 address, as the WHATWG URL standard has it:
    1-4 parts, each decimal, 0x-hex or 0-octal; the last fills the remaining bytes.
    Returns the dotted quad, None (not an address) or _INVALID (looks like one, is not).
    """
    last = labels[-1]
    if not (last.isascii() and last.isdigit()) and not re.fullmatch(r"0x[0-9a-f]*", last):
        return None
    numbers = []
    for label in labels:
        if re.fullmatch(r"0x[0-9a-f]*", label):
            numbers.append(int(label[2:] or "0", 16))
        elif re.fullmatch(r"0[0-7]+", label):
            numbers.append(int(label, 8))
        elif label.isascii() and label.isdigit():
            numbers.append(int(label))
        else:
            return _INVALID
    if len(numbers) > 4 or any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        return _INVALID
    value = numbers[-1]
    for position, number in enumerate(numbers[:-1]):
        value += number * 256 ** (3 - position)
    return str(ipaddress.IPv4Address(value))
