"""
The ``imkit`` command: manage users, contacts and groups, send messages, listen for them.

Usage errors are one line naming the fix, with exit status 2; failures at run time (a refused
login, a refused or unacknowledged message, an operation or query the server refused) are one
line with exit status 1.  ``send`` and ``listen`` print one JSON object per line on standard
output, flushed at the end of each reactor turn (so at once, but one write per burst), so scripts
can read them as a stream; ``contact`` and ``group`` print JSON lines too.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import queue
import sys
import threading
from collections import deque
from typing import Any, Awaitable, Callable, NoReturn, Sequence

from twisted.internet import defer
from twisted.internet.task import react
from twisted.python.failure import Failure
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    globalLogBeginner,
    textFileLogObserver,
)

from imkit.client import (
    ClientSettings,
    ErrorCode,
    IMClient,
    IMClientError,
    LoginFailed,
    Message,
    QueryFailed,
    Receipt,
    SendRejected,
    SendTimeout,
    describe,
)
from imkit.client.endpoint import development_ca, tls_endpoint
from imkit.tuning import tune_garbage_collector
from imkit.tls import TLSConfigError
from imkit.wire.schema import DEFAULT_MAX_FRAME, OPERATION_PREFIX

_COMMANDS = {
    "imkit": "user, contact, group, send or listen",
    "imkit user": "add, passwd, revoke, disable, enable or list",
    "imkit contact": "add, remove, block, unblock or list",
    "imkit group": "create, add, remove, leave, members or list",
}

DEFAULT_STORE = "sqlite:imkit.sqlite3"
DEFAULT_SERVER = "localhost:14000"
GROUP_PREFIX = "g:"
"""What every group's conversation id starts with (direct conversations are dm:A:B)."""
MAX_IN_FLIGHT = 1000
"""Messages ``imkit send`` keeps unacknowledged at most, so a huge input never sits in memory."""
_log = Logger("imkit")

Job = Callable[[Any], Awaitable[None]]


class UsageError(Exception):
    """Arguments that cannot work; the message says what to write instead (exit status 2)."""


class CommandFailed(Exception):
    """The command ran but did not succeed; the message says why (exit status 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> NoReturn:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.prepare is None:
        parser.exit(2, f"{args.prog}: name a command: {_COMMANDS[args.prog]} (see {args.prog} --help)\n")
    try:
        job = args.prepare(args)
    except (UsageError, ValueError) as error:
        # ValueErrors here are the one-line ones of endpoint, TLS and store strings.
        parser.exit(2, f"{args.prog}: {error}\n")
    _start_logging(args.verbose)
    tune_garbage_collector(collect=False)
    react(_run, (job, args.prog))


async def _run(reactor: Any, job: Job, prog: str) -> None:
    try:
        await job(reactor)
    except (CommandFailed, IMClientError) as error:
        sys.stdout.flush()
        sys.stderr.write(f"{prog}: {error}\n")
        raise SystemExit(1)


def _start_logging(verbose: bool) -> None:
    """Quiet by default: only bugs (critical events) reach standard error; --verbose shows progress."""
    level = LogLevel.info if verbose else LogLevel.critical
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(defaultLogLevel=level)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


# Arguments ---------------------------------------------------------------------------------------


def _password_source(parser: argparse.ArgumentParser, what: str) -> None:
    """--password or --password-file (or, with neither, a prompt: see read_new_password)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--password", help=f"{what} (visible to other local users; prefer --password-file)")
    source.add_argument("--password-file", metavar="FILE", help=f"read {what} from the first line of FILE")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="imkit", description="Manage imkit users, contacts and groups, send messages and listen for them.")
    parser.set_defaults(prepare=None, prog="imkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log connections and retries on standard error")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    user = commands.add_parser("user", help="add, list and manage users (safe while the server runs)")
    user.set_defaults(prepare=None, prog="imkit user")
    user_commands = user.add_subparsers(title="user commands", metavar="USER_COMMAND")
    store_help = f"the server's store: sqlite:PATH or memory: (default {DEFAULT_STORE})"

    add = user_commands.add_parser("add", help="add a user", description="Add a user; the password is stored as an argon2id hash.")
    add.set_defaults(prepare=_prepare_user_add, prog="imkit user add")
    add.add_argument("name", help="the new user's name (1-64 characters, no ':' or whitespace)")
    add.add_argument("--store", default=DEFAULT_STORE, help=store_help)
    _password_source(add, "the password")

    passwd = user_commands.add_parser(
        "passwd", help="change a user's password",
        description="Replace a user's password, and revoke its devices' resume tokens so they must log in with the new one.",
    )
    passwd.set_defaults(prepare=_prepare_user_passwd, prog="imkit user passwd")
    passwd.add_argument("name", help="the user")
    passwd.add_argument("--store", default=DEFAULT_STORE, help=store_help)
    _password_source(passwd, "the new password")

    revoke = user_commands.add_parser(
        "revoke", help="revoke resume tokens",
        description=(
            "Revoke the resume tokens of one device of a user, or of all its devices: they must log in with the password"
            " again.  A running server is not told: a device connected now stays connected until it next reconnects"
            " (then it needs the password).  To end live sessions too, disable the user (the server logs them out"
            " within its --account-check-interval), or call the server's hub.revoke() from Python."
        ),
    )
    revoke.set_defaults(prepare=_prepare_user_revoke, prog="imkit user revoke")
    revoke.add_argument("name", help="the user")
    revoke.add_argument("--device", help="only this device (default: every device of the user)")
    revoke.add_argument("--store", default=DEFAULT_STORE, help=store_help)

    disable = user_commands.add_parser(
        "disable", help="stop a user from logging in",
        description=(
            "Disable a user: their resume tokens are revoked and every login of theirs is refused; a running server"
            " logs them out within its --account-check-interval (10 s by default).  Their messages and"
            " memberships stay.  imkit user enable undoes it."
        ),
    )
    disable.set_defaults(prepare=_prepare_user_disable, prog="imkit user disable")
    disable.add_argument("name", help="the user")
    disable.add_argument("--store", default=DEFAULT_STORE, help=store_help)

    enable = user_commands.add_parser(
        "enable", help="let a disabled user log in again",
        description="Enable a disabled user: they can log in with their password again.",
    )
    enable.set_defaults(prepare=_prepare_user_enable, prog="imkit user enable")
    enable.add_argument("name", help="the user")
    enable.add_argument("--store", default=DEFAULT_STORE, help=store_help)

    listing = user_commands.add_parser("list", help="list user names", description="Print every user name, one a line.")
    listing.set_defaults(prepare=_prepare_user_list, prog="imkit user list")
    listing.add_argument("--store", default=DEFAULT_STORE, help=store_help)
    listing.add_argument("--disabled", action="store_true", help="only the disabled users")

    connection = _Parser(add_help=False)
    connection.add_argument("--server", default=DEFAULT_SERVER, metavar="HOST:PORT", help=f"default {DEFAULT_SERVER}")
    connection.add_argument("--ca", metavar="FILE", help="PEM file of the CA that signed the server's certificate (default: the development CA)")
    connection.add_argument("--user", default=os.environ.get("IMKIT_USER"), help="user name (default $IMKIT_USER)")
    connection.add_argument("--password", default=os.environ.get("IMKIT_PASSWORD"), help="password (default $IMKIT_PASSWORD, which is safer)")

    _add_contact_commands(commands, connection)
    _add_group_commands(commands, connection)

    send = commands.add_parser(
        "send",
        parents=[connection],
        help="send messages",
        description=(
            "Send TEXT, or each line of standard input as one message (without its newline), pipelined. "
            "Prints one JSON line per acknowledgement, in send order: "
            '{"id": SERVER_ID, "conversation": ID, "seq": N}.  Exits 0 only when every message was acknowledged.'
        ),
    )
    send.set_defaults(prepare=_prepare_send, prog="imkit send")
    target = send.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", metavar="NAME", help="send to this user (their direct conversation with you)")
    target.add_argument("--conversation", metavar="ID", help="send to this conversation")
    target.add_argument("--group", type=_group_id, metavar="ID", help="send to this group (an id from imkit group list)")
    send.add_argument("text", nargs="?", metavar="TEXT", help="the message (default: read lines from standard input)")
    send.add_argument("--device", default="cli-send", help="device name (default cli-send)")
    send.add_argument("--e2ee", action="store_true", help=_E2EE_HELP.format(verb="encrypt the messages end to end"))
    _timeout(send, "a message is not acknowledged")

    listen = commands.add_parser(
        "listen",
        parents=[connection],
        help="print messages as they arrive",
        description=(
            "Print one JSON line per message of your conversations, in order, each once: "
            '{"kind", "conversation", "seq", "id", "sender", "sender_device", "sent_at", ...}.  '
            'A message has kind "message", its "content_type" and its "body" as text; the operations '
            'of contacts and groups have their own kinds ("group.add", "contact.block", ...) and fields '
            '("users", "title", "target", "seconds").  Your own messages are printed too (from every '
            "device: they are part of the conversation)."
        ),
    )
    listen.set_defaults(prepare=_prepare_listen, prog="imkit listen")
    listen.add_argument(
        "--state",
        metavar="FILE",
        help="remember in FILE where this listener stopped, and continue from there (default: the server remembers per device)",
    )
    listen.add_argument("--count", type=_positive_int, metavar="N", help="exit after N messages")
    listen.add_argument(
        "--idle-exit", type=_positive_float, metavar="SECONDS", help="exit after SECONDS without a message (counted from the end of the catch-up)"
    )
    listen.add_argument("--device", default="cli-listen", help="device name (default cli-listen)")
    listen.add_argument("--e2ee", action="store_true", help=_E2EE_HELP.format(verb="decrypt end-to-end encrypted messages"))
    return parser


_E2EE_HELP = (
    "{verb} (docs/e2ee.rst); this device's keys live in $IMKIT_KEY_FILE (default "
    "~/.local/share/imkit/keys/USER@SERVER/DEVICE.keys, mode 0600), encrypted with $IMKIT_KEY_PASSPHRASE if it is set"
)


_RECEIPT_OUTPUT = 'Prints the server\'s receipt as a JSON line: {"id": SERVER_ID, "conversation": ID, "seq": N}.'


def _command_family(
    commands: Any, connection: argparse.ArgumentParser, family: str, help: str, description: str
) -> Callable[..., argparse.ArgumentParser]:
    """A command with subcommands that talk to the server (``imkit contact ...``, ``imkit group ...``)."""
    parser = commands.add_parser(family, help=help, description=description)
    parser.set_defaults(prepare=None, prog=f"imkit {family}")
    subcommands = parser.add_subparsers(title=f"{family} commands", metavar=f"{family.upper()}_COMMAND")

    def command(name: str, help: str, description: str, prepare: Callable[[argparse.Namespace], Job]) -> argparse.ArgumentParser:
        sub = subcommands.add_parser(name, parents=[connection], help=help, description=description)
        sub.set_defaults(prepare=prepare, prog=f"imkit {family} {name}")
        sub.add_argument("--device", default=f"cli-{family}", help=f"device name (default cli-{family})")
        _timeout(sub, "the server does not answer")
        return sub

    return command


def _add_contact_commands(commands: Any, connection: argparse.ArgumentParser) -> None:
    command = _command_family(
        commands, connection, "contact", "add, remove, block and list contacts",
        "Manage your contacts (with twistd imkit --policy contacts, only mutual contacts exchange messages).",
    )

    user_help = "the other user"
    add = command("add", "add a contact", f"Make NAME one of your contacts.  {_RECEIPT_OUTPUT}", _prepare_contact_add)
    add.add_argument("name", metavar="NAME", type=_user_name, help=user_help)
    remove = command(
        "remove", "remove a contact",
        f"Remove NAME from your contacts; with --goodbye, a last message and the removal go as one bundle "
        f"(NAME gets both or neither).  {_RECEIPT_OUTPUT}",
        _prepare_contact_remove,
    )
    remove.add_argument("name", metavar="NAME", type=_user_name, help=user_help)
    remove.add_argument("--goodbye", metavar="TEXT", help="a last message to NAME, sent together with the removal")
    block = command("block", "block a user", f"Block NAME: nothing passes between you until you unblock them.  {_RECEIPT_OUTPUT}", _prepare_contact_block)
    block.add_argument("name", metavar="NAME", type=_user_name, help=user_help)
    unblock = command("unblock", "unblock a user", f"Unblock NAME.  {_RECEIPT_OUTPUT}", _prepare_contact_unblock)
    unblock.add_argument("name", metavar="NAME", type=_user_name, help=user_help)
    command(
        "list", "list contacts and blocked users",
        'Print one JSON line per user you have a relation with, by name: {"user": NAME, "state": "contact" or "blocked"}.',
        _prepare_contact_list,
    )


def _add_group_commands(commands: Any, connection: argparse.ArgumentParser) -> None:
    command = _command_family(
        commands, connection, "group", "create groups, manage their members, list them",
        "Create groups and manage their members; send to a group with imkit send --group ID.",
    )

    group_help = "the group's id (g:..., see imkit group list)"
    create = command(
        "create", "create a group",
        'Create a group with you as its owner; prints its id as a JSON line: {"group": ID}.',
        _prepare_group_create,
    )
    create.add_argument("title", metavar="TITLE", help="the group's title")
    create.add_argument(
        "--member", action="append", default=[], type=_user_name, metavar="NAME", help="a member besides you (repeat for more)"
    )
    add = command("add", "add members", f"Add users to a group you are a member of.  {_RECEIPT_OUTPUT}", _prepare_group_add)
    add.add_argument("group", metavar="GROUP", type=_group_id, help=group_help)
    add.add_argument("names", nargs="+", metavar="NAME", type=_user_name, help="a user to add")
    remove = command(
        "remove", "remove members", f"Remove members from a group you own.  {_RECEIPT_OUTPUT}", _prepare_group_remove
    )
    remove.add_argument("group", metavar="GROUP", type=_group_id, help=group_help)
    remove.add_argument("names", nargs="+", metavar="NAME", type=_user_name, help="a member to remove")
    leave = command(
        "leave", "leave a group",
        f"Leave a group (if you own it, its longest-standing member becomes the owner).  {_RECEIPT_OUTPUT}",
        _prepare_group_leave,
    )
    leave.add_argument("group", metavar="GROUP", type=_group_id, help=group_help)
    members = command(
        "members", "list a group's members",
        'Print one JSON line per member of the group: {"user": NAME, "role": "owner" or "member", "joined_seq": N}.',
        _prepare_group_members,
    )
    members.add_argument("group", metavar="GROUP", type=_group_id, help=group_help)
    command(
        "list", "list your groups",
        'Print one JSON line per group you are in: {"conversation": ID, "title": TITLE, "head": LAST_SEQ, "role": ROLE}.',
        _prepare_group_list,
    )


def _timeout(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--timeout", type=_positive_float, default=30.0, metavar="SECONDS", help=f"fail if {what} within this long (default 30)"
    )


def _user_name(text: str) -> str:
    if not _valid_user_name(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a user name: use 1-64 characters without ':' or whitespace")
    return text


def _group_id(text: str) -> str:
    if not text.startswith(GROUP_PREFIX) or len(text) == len(GROUP_PREFIX):
        raise argparse.ArgumentTypeError(f"{text!r} is not a group id: group ids start with {GROUP_PREFIX}; imkit group list shows yours")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


# imkit user ------------------------------------------------------------------------------------


def _valid_user_name(name: str) -> bool:
    from imkit.server.hub import valid_name

    return valid_name(name)


def _open_store(description: str, reactor: Any) -> Any:
    from imkit.store import store_from_string

    return store_from_string(description, reactor)


def read_new_password(args: argparse.Namespace, prompt: Callable[[str], str] = getpass.getpass) -> str:
    """The new user's password: --password, the first line of --password-file, or asked twice."""
    if args.password is not None:
        password = args.password
    elif args.password_file is not None:
        try:
            with open(args.password_file, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except OSError as error:
            raise UsageError(f"cannot read --password-file {args.password_file}: {error.strerror or error}") from None
        except UnicodeDecodeError:
            raise UsageError(f"--password-file {args.password_file} is not UTF-8 text") from None
    else:
        try:
            password = prompt(f"Password for {args.name}: ")
            if password and prompt("Repeat the password: ") != password:
                raise UsageError("the passwords do not match; try again")
        except (EOFError, KeyboardInterrupt):
            raise UsageError("no password given; use --password-file FILE when not at a terminal") from None
    if not password:
        raise UsageError("the password is empty; give a non-empty one")
    return password


def _prepare_user_add(args: argparse.Namespace) -> Job:
    if not _valid_user_name(args.name):
        raise UsageError(f"{args.name!r} is not a valid user name: use 1-64 characters without ':' or whitespace")
    from twisted.internet import reactor

    store = _open_store(args.store, reactor)
    password = read_new_password(args)

    async def add_user(reactor: Any) -> None:
        from imkit.passwords import Passwords
        from imkit.store import UserExists

        async with _opened(store):
            password_hash = await Passwords().hash(password)
            try:
                await store.add_user(args.name, password_hash)
            except UserExists:
                raise CommandFailed(f"user {args.name!r} exists already in {store.description}; pick another name") from None
        print(f"added user {args.name} to {store.description}")

    return add_user


def _prepare_user_passwd(args: argparse.Namespace) -> Job:
    from twisted.internet import reactor

    store = _open_store(args.store, reactor)
    password = read_new_password(args)

    async def change_password(reactor: Any) -> None:
        from imkit.passwords import Passwords
        from imkit.store import UnknownUser

        async with _opened(store):
            password_hash = await Passwords().hash(password)
            try:
                await store.set_password_hash(args.name, password_hash)
            except UnknownUser:
                raise CommandFailed(f"no user {args.name!r} in {store.description}; see imkit user list") from None
            revoked = await store.revoke_tokens(args.name)
        print(f"changed the password of {args.name}; revoked {revoked} resume token(s)")

    return change_password


def _prepare_user_revoke(args: argparse.Namespace) -> Job:
    from twisted.internet import reactor

    store = _open_store(args.store, reactor)

    async def revoke_tokens(reactor: Any) -> None:
        async with _opened(store):
            if await store.password_hash(args.name) is None:
                raise CommandFailed(f"no user {args.name!r} in {store.description}; see imkit user list")
            revoked = await store.revoke_tokens(args.name, args.device)
        which = f"device {args.device} of {args.name}" if args.device else f"every device of {args.name}"
        print(f"revoked {revoked} resume token(s) of {which}")

    return revoke_tokens


def _prepare_user_disable(args: argparse.Namespace) -> Job:
    return _set_disabled(args, True)


def _prepare_user_enable(args: argparse.Namespace) -> Job:
    return _set_disabled(args, False)


def _set_disabled(args: argparse.Namespace, disabled: bool) -> Job:
    from twisted.internet import reactor

    store = _open_store(args.store, reactor)

    async def set_disabled(reactor: Any) -> None:
        from imkit.store import UnknownUser

        async with _opened(store):
            try:
                revoked = await store.set_disabled(args.name, disabled)
            except UnknownUser:
                raise CommandFailed(f"no user {args.name!r} in {store.description}; see imkit user list") from None
        if disabled:
            print(f"disabled {args.name}; revoked {revoked} resume token(s); a running server logs them out shortly")
        else:
            print(f"enabled {args.name}")

    return set_disabled


def _prepare_user_list(args: argparse.Namespace) -> Job:
    from twisted.internet import reactor

    store = _open_store(args.store, reactor)

    async def list_users(reactor: Any) -> None:
        async with _opened(store):
            names = await (store.disabled_users() if getattr(args, "disabled", False) else store.list_users())
        for name in names:
            print(name)

    return list_users


class _opened:
    """``async with _opened(store)``: open it (one-line error if that fails), close it afterwards."""

    def __init__(self, store: Any) -> None:
        self.store = store

    async def __aenter__(self) -> Any:
        try:
            await self.store.open()
        except Exception as error:
            await self.store.close()
            raise CommandFailed(f"cannot open the store {self.store.description}: {error}; check the --store path") from None
        return self.store

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.store.close()


# imkit send ------------------------------------------------------------------------------------


def _client(args: argparse.Namespace, settings: ClientSettings = ClientSettings(), state_path: str | None = None) -> IMClient:
    if not args.user:
        raise UsageError("no user name: pass --user NAME or set IMKIT_USER")
    if not args.password:
        raise UsageError("no password: set IMKIT_PASSWORD or pass --password")
    from twisted.internet import reactor

    try:
        endpoint = tls_endpoint(reactor, args.server, args.ca or development_ca())
    except TLSConfigError as error:
        # imkit.tls names the server's option for the CA file; ours is --ca.
        raise UsageError(str(error).replace("--tls-ca", "--ca")) from None
    e2ee = None
    if getattr(args, "e2ee", False):
        from imkit.client.e2ee import E2EEOptions, default_key_file

        key_file = os.environ.get("IMKIT_KEY_FILE") or default_key_file(args.user, args.device, args.server)
        e2ee = E2EEOptions(key_file, passphrase=os.environ.get("IMKIT_KEY_PASSPHRASE") or None)
    try:
        return IMClient(
            endpoint, args.user, args.password, args.device, settings=settings, state_path=state_path, reactor=reactor, e2ee=e2ee
        )
    except IMClientError as error:  # an unreadable key file
        raise UsageError(str(error)) from None


def _prepare_send(args: argparse.Namespace) -> Job:
    client = _client(args, ClientSettings(send_timeout=args.timeout))
    text = args.text

    async def send(reactor: Any) -> None:
        if text is not None:
            source = _OneLine(text.encode("utf-8", "surrogateescape"))
        else:
            source = LineReader(reactor, sys.stdin.fileno())
        try:
            await send_all(reactor, client, source, to=args.to, conversation=args.conversation or args.group, out=sys.stdout)
        except SendRejected as error:
            raise CommandFailed(_with_fix(str(error), error.code)) from None

    return send


class _OneLine:
    def __init__(self, line: bytes) -> None:
        self._lines: list[bytes] | None = [line]

    async def next_lines(self) -> list[bytes] | None:
        lines, self._lines = self._lines, None
        return lines


class LineReader:
    """
    Lines of a file descriptor (standard input), read on a thread of its own.

    A daemon thread rather than the reactor's pool: a read blocked on a terminal must not keep the
    process from exiting.  Each ``os.read`` returns what is there, so typed lines go out at once
    and piped input in large chunks.
    """

    def __init__(self, reactor: Any, fd: int, max_line: int = DEFAULT_MAX_FRAME) -> None:
        self._reactor = reactor
        self._fd = fd
        self._max_line = max_line
        self._requests: queue.SimpleQueue[defer.Deferred[bytes]] = queue.SimpleQueue()
        self._partial = b""
        self._ended = False
        threading.Thread(target=self._serve, name="imkit-stdin", daemon=True).start()

    def _serve(self) -> None:
        while True:
            wanted = self._requests.get()
            try:
                data = os.read(self._fd, 65536)
            except OSError as error:
                self._reactor.callFromThread(_answer, wanted, CommandFailed(f"cannot read standard input: {error.strerror}"))
                return
            self._reactor.callFromThread(_answer, wanted, data)
            if not data:
                return

    async def next_lines(self) -> list[bytes] | None:
        """The next complete lines, without their newlines; None after the last one."""
        while not self._ended:
            wanted: defer.Deferred[bytes] = defer.Deferred()
            self._requests.put(wanted)
            data = await wanted
            if not data:
                self._ended = True
                break
            *lines, self._partial = (self._partial + data).split(b"\n")
            if len(self._partial) > self._max_line:
                raise CommandFailed(f"a line of standard input is longer than the largest message ({self._max_line} bytes)")
            if lines:
                return [line[:-1] if line.endswith(b"\r") else line for line in lines]
        if self._partial:
            last, self._partial = self._partial, b""
            return [last]
        return None


def _answer(wanted: defer.Deferred[bytes], outcome: bytes | Exception) -> None:
    """Fire ``wanted``, unless the command stopped waiting for it (and cancelled it)."""
    if wanted.called:
        return
    if isinstance(outcome, Exception):
        wanted.errback(outcome)
    else:
        wanted.callback(outcome)


async def send_all(
    reactor: Any,
    client: IMClient,
    source: Any,
    *,
    to: str | None,
    conversation: str | None,
    out: Any,
    max_in_flight: int = MAX_IN_FLIGHT,
) -> None:
    """
    Send every line ``source.next_lines()`` gives, pipelined, at most ``max_in_flight``
    unacknowledged; print one JSON line per acknowledgement, in send order.  Raises the first
    failure (after stopping the client).
    """
    flusher = _TurnFlush(reactor, out)
    window: deque[_Outcome] = deque()
    in_flight = 0
    room: list[defer.Deferred[None]] = []  # the reader, waiting for an ack to make room
    failed: list[BaseException] = []
    done: defer.Deferred[None] = defer.Deferred()
    wake_reader: list[defer.Deferred[None]] = []
    reading = True
    logged_in: list[None] = []

    def login_refused(failure: Any) -> None:
        # Fails the command even while no message is waiting for the login.
        if failure.check(LoginFailed) and not failed:
            failed.append(failure.value)
            settled(release=False)

    client.loggedIn().addCallbacks(logged_in.append, login_refused)

    def settled(_: Any = None, release: bool = True) -> None:
        nonlocal in_flight
        if release:
            in_flight -= 1
        if room and (failed or in_flight <= max_in_flight // 2):
            # Refill in bursts: waking the reader for every single ack costs more than the send.
            room.pop().callback(None)
        while window and window[0].finished and not failed:
            outcome = window.popleft()
            if outcome.error is not None:
                failed.append(outcome.error)
                break
            receipt = outcome.receipt
            assert receipt is not None
            out.write(json.dumps({"id": receipt.server_id, "conversation": receipt.conversation, "seq": receipt.seq}) + "\n")
            flusher.soon()
        if failed:
            for wake in wake_reader:
                if not wake.called:
                    wake.callback(None)
        if (failed or not (reading or window)) and not done.called:
            done.callback(None)

    trigger = reactor.addSystemEventTrigger("before", "shutdown", client.stopService)
    client.startService()
    try:
        while not failed:
            # A failure ends the command even while the input is still open (a terminal, a pipe).
            wake_reader[:] = [defer.Deferred()]
            _, lines = await defer.race([defer.ensureDeferred(source.next_lines()), wake_reader[0]])
            if lines is None:
                break
            for line in lines:
                if in_flight >= max_in_flight:
                    room.append(defer.Deferred())
                    await room[-1]
                if failed:
                    break
                try:
                    sent = client.send(to, line, conversation=conversation)
                except ValueError as error:  # too large for a frame
                    failed.append(CommandFailed(f"message {len(window) + 1} cannot be sent: {error}"))
                    break
                outcome = _Outcome()
                window.append(outcome)
                in_flight += 1
                sent.addBoth(outcome.settle)
                sent.addCallback(settled)
        reading = False
        if not window and not done.called:
            done.callback(None)
        await done
    finally:
        flusher.now()
        reactor.removeSystemEventTrigger(trigger)
        await client.stopService()
    if failed:
        error = failed[0]
        if isinstance(error, SendTimeout) and not logged_in:
            raise CommandFailed(
                f"could not log in within {error.timeout:g} seconds; is the server running, and is --server right?"
            )
        raise error


class _TurnFlush:
    """
    Flushes an output at the end of the reactor turn, however often ``soon`` is called in it:
    a burst of acks or messages costs one write, not one per line.
    """

    def __init__(self, reactor: Any, out: Any) -> None:
        self._reactor = reactor
        self._out = out
        self._call: Any = None

    def soon(self) -> None:
        if self._call is None:
            self._call = self._reactor.callLater(0, self.now)

    def now(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._out.flush()


class _Outcome:
    """What became of one send, kept until the acknowledgements before it have been printed."""

    def __init__(self) -> None:
        self.finished = False
        self.receipt: Receipt | None = None
        self.error: BaseException | None = None

    def settle(self, result: Receipt | Failure) -> None:
        self.finished = True
        if isinstance(result, Failure):
            self.error = result.value
        else:
            self.receipt = result


# imkit contact and imkit group -----------------------------------------------------------------


_FIXES = {
    ErrorCode.UNKNOWN_RECIPIENT: "check the user name",
    ErrorCode.NOT_A_MEMBER: "check the group or conversation id: imkit group list shows the groups you are in",
    ErrorCode.NOT_ALLOWED: "neither of you may block the other, and with --policy contacts both must imkit contact add the other",
    ErrorCode.INVALID_TARGET: "check the conversation id: imkit group list shows your groups",
}


def _with_fix(text: str, code: ErrorCode | int, fixes: dict[Any, str] = {}) -> str:
    """``text`` and what to do about a refusal with ``code``, unless the server's reason says so already."""
    fix = fixes.get(code) or _FIXES.get(code)
    return f"{text}; {fix}" if fix and "; " not in text else text


def _refused(error: SendRejected | QueryFailed, fixes: dict[Any, str] = {}) -> CommandFailed:
    """A one-line failure for a refusal: the code, the server's reason, and what to do about it."""
    name = error.code.name if isinstance(error.code, ErrorCode) else str(error.code)
    return CommandFailed(_with_fix(f"refused ({name}): {error.reason}", error.code, fixes))


_REMOVAL_FIXES = {ErrorCode.INVALID_OPERATION: "imkit group members GROUP shows who is in the group and who owns it"}


def _one_shot(args: argparse.Namespace, work: Callable[[IMClient], Awaitable[None]], fixes: dict[Any, str] = {}) -> Job:
    """
    A job that logs in (failing after --timeout seconds without a login), runs ``work`` with the
    client, and stops the client; refusals become one-line CommandFailed errors.
    """
    client = _client(args, ClientSettings(send_timeout=args.timeout))

    async def job(reactor: Any) -> None:
        trigger = reactor.addSystemEventTrigger("before", "shutdown", client.stopService)
        client.startService()
        try:
            login = client.loggedIn()
            login.addTimeout(args.timeout, reactor)
            try:
                await login
            except defer.TimeoutError:
                raise CommandFailed(
                    f"could not log in within {args.timeout:g} seconds; is the server running, and is --server right?"
                ) from None
            try:
                await work(client)
            except (SendRejected, QueryFailed) as error:
                raise _refused(error, fixes) from None
        finally:
            sys.stdout.flush()
            reactor.removeSystemEventTrigger(trigger)
            await client.stopService()

    return job


def _print_json(value: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(value) + "\n")


def _print_receipt(receipt: Receipt) -> None:
    _print_json({"id": receipt.server_id, "conversation": receipt.conversation, "seq": receipt.seq})


def _prepare_contact_add(args: argparse.Namespace) -> Job:
    async def work(client: IMClient) -> None:
        _print_receipt(await client.add_contact(args.name))

    return _one_shot(args, work)


def _prepare_contact_remove(args: argparse.Namespace) -> Job:
    async def work(client: IMClient) -> None:
        goodbye = None if args.goodbye is None else args.goodbye.encode("utf-8", "surrogateescape")
        _print_receipt(await client.remove_contact(args.name, goodbye=goodbye))

    return _one_shot(args, work)


def _prepare_contact_block(args: argparse.Namespace) -> Job:
    async def work(client: IMClient) -> None:
        _print_receipt(await client.block(args.name))

    return _one_shot(args, work)


def _prepare_contact_unblock(args: argparse.Namespace) -> Job:
    async def work(client: IMClient) -> None:
        _print_receipt(await client.unblock(args.name))

    return _one_shot(args, work)


def _prepare_contact_list(args: argparse.Namespace) -> Job:
    async def work(client: IMClient) -> None:
        for user, state in sorted((await client.contacts()).items()):
            _print_json({"user": user, "state": state})

    return _one_shot(args, work)


def _prepare_group_create(args: argparse.Namespace) -> Job:
    async def work(client: IMClient) -> None:
        _print_json({"group": await client.create_group(args.title, args.member)})

    return _one_shot(args, work)


def _prepare_group_add(args: argparse.Namespace) -> Job:
    async def work(client: IMClient) -> None:
        _print_receipt(await client.add_members(args.group, args.names))

    return _one_shot(args, work)


def _prepare_group_remove(args: argparse.Namespace) -> Job:
    async def work(client: IMClient) -> None:
        _print_receipt(await client.remove_members(args.group, args.names))

    return _one_shot(args, work, _REMOVAL_FIXES)


def _prepare_group_leave(args: argparse.Namespace) -> Job:
    async def work(client: IMClient) -> None:
        _print_receipt(await client.leave_group(args.group))

    return _one_shot(args, work)


def _prepare_group_members(args: argparse.Namespace) -> Job:
    async def work(client: IMClient) -> None:
        for member in await client.members(args.group):
            _print_json({"user": member.user, "role": member.role, "joined_seq": member.joined_seq})

    return _one_shot(args, work)


def _prepare_group_list(args: argparse.Namespace) -> Job:
    async def work(client: IMClient) -> None:
        for group in await client.groups():
            _print_json({"conversation": group.conversation, "title": group.title, "head": group.head, "role": group.role})

    return _one_shot(args, work)


# imkit listen ----------------------------------------------------------------------------------


def _prepare_listen(args: argparse.Namespace) -> Job:
    client = _client(args, state_path=args.state)

    async def listen(reactor: Any) -> None:
        await listen_until(reactor, client, sys.stdout, count=args.count, idle_exit=args.idle_exit)

    return listen


def message_json(message: Message) -> str:
    """
    One line of ``imkit listen``: ``describe(message).to_json()``.  An ordinary message has kind
    "message" and keeps the keys scripts read (conversation, seq, id, sender, body as text,
    sent_at); an operation has its own kind and fields (users, title, target, seconds).
    """
    content_type = message.content_type
    if content_type.startswith(OPERATION_PREFIX):
        return json.dumps(describe(message).to_json())
    # The common case, spelled out: the same dict describe() builds, at half the cost per line.
    return json.dumps(
        {
            "kind": "message",
            "conversation": message.conversation,
            "seq": message.seq,
            "sender": message.sender,
            "sender_device": message.sender_device,
            "id": message.server_id,
            "sent_at": message.sent_at,
            "content_type": content_type,
            "body": message.body.decode("utf-8", "replace"),
        }
    )


async def listen_until(reactor: Any, client: IMClient, out: Any, *, count: int | None = None, idle_exit: float | None = None) -> None:
    """Print every message until ``count`` were printed, ``idle_exit`` seconds passed without one, or the login fails."""
    flusher = _TurnFlush(reactor, out)
    finished: defer.Deferred[None] = defer.Deferred()
    stopping: list[defer.Deferred[None]] = []
    idle: list[Any] = []
    printed = 0

    def finish(outcome: Any = None) -> None:
        if finished.called:
            return
        for call in idle:
            if call.active():
                call.cancel()
        # Stop at once, from inside the hand-off: messages after this one are not taken (and are
        # not saved as taken), so a restarted listener prints them.
        stopping.append(client.stopService())
        finished.callback(outcome)

    def show(message: Message) -> None:
        nonlocal printed
        if finished.called:
            return
        out.write(message_json(message) + "\n")
        flusher.soon()
        printed += 1
        if count is not None and printed >= count:
            finish()
        elif idle:
            idle[0].reset(idle_exit)

    def caught_up(_: Any) -> None:
        _log.info("caught up: every message stored before the login has been shown")
        if idle_exit is not None and not finished.called:
            idle.append(reactor.callLater(idle_exit, finish))

    client.on_message(show)
    trigger = reactor.addSystemEventTrigger("before", "shutdown", client.stopService)
    client.startService()
    client.loggedIn().addErrback(finish)
    client.caughtUp().addCallbacks(caught_up, lambda _: None)
    try:
        outcome = await finished
    finally:
        flusher.now()
        reactor.removeSystemEventTrigger(trigger)
    await stopping[0]
    if outcome is not None:
        outcome.raiseException()


if __name__ == "__main__":
    main()
