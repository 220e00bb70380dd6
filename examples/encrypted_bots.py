"""
Two bots chatting end-to-end encrypted: the server stores and forwards only ciphertext.

    python examples/encrypted_bots.py --rounds 3

Both log in (alice and bob with the README's passwords, unless told otherwise) with
``e2ee=KEY_FILE``: each device keeps its keys in a file of its own under ``--keys`` (created on
the first run, mode 0600; ``--passphrase`` encrypts them) and publishes its public keys on the
server.  Then the first bot asks ROUNDS questions and the second answers each one; every message
is encrypted for every device of both users, and decrypted before the bots' callbacks see it.
Run it twice: the second run reuses the keys, and the devices recognise each other.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from typing import Any

from twisted.internet import defer, task

from imkit.client import IMClient, IMClientError, Message, development_ca, tls_endpoint
from imkit.client.e2ee import E2EEOptions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Two bots chat end-to-end encrypted over an imkit server, then exit.")
    parser.add_argument("--rounds", type=int, default=3, help="how many questions (default 3)")
    parser.add_argument("--server", default="localhost:14000", metavar="HOST:PORT", help="default localhost:14000")
    parser.add_argument("--ca", metavar="FILE", help="CA certificate of the server (default: the development CA)")
    parser.add_argument("--first", default="alice", metavar="USER", help="the asking bot's user (default alice)")
    parser.add_argument("--first-password", default="alice-pw", metavar="PASSWORD", help="default alice-pw")
    parser.add_argument("--second", default="bob", metavar="USER", help="the answering bot's user (default bob)")
    parser.add_argument("--second-password", default="bob-pw", metavar="PASSWORD", help="default bob-pw")
    parser.add_argument("--keys", default="imkit-keys", metavar="DIRECTORY", help="where the bots keep their keys (default ./imkit-keys)")
    parser.add_argument("--passphrase", help="encrypt the key files with this passphrase (default: protected by file mode only)")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="give up after this long without progress (default 30)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.timeout <= 0:
        parser.error("--rounds and --timeout must be positive")
    if args.first == args.second:
        parser.error("the two bots need different users")
    return args


def bot(reactor: Any, endpoint: Any, args: argparse.Namespace, user: str, password: str) -> IMClient:
    keys = E2EEOptions(os.path.join(args.keys, f"{user}-encrypted-bot.keys"), passphrase=args.passphrase)
    client = IMClient(endpoint, user, password, "encrypted-bot", reactor=reactor, e2ee=keys)
    client.e2ee.on_undecryptable(
        lambda failure: print(f"{user} cannot read {failure.message.conversation} #{failure.message.seq}: {failure.reason}", file=sys.stderr)
    )
    return client


async def run(reactor: Any, args: argparse.Namespace) -> list[str]:
    """Play the rounds; returns the answers the first bot read."""
    try:
        endpoint = tls_endpoint(reactor, args.server, args.ca or development_ca())
    except ValueError as error:
        raise SystemExit(f"encrypted_bots: {error}")
    try:
        first = bot(reactor, endpoint, args, args.first, args.first_password)
        second = bot(reactor, endpoint, args, args.second, args.second_password)
    except IMClientError as error:  # a key file that cannot be read (wrong passphrase?)
        raise SystemExit(f"encrypted_bots: {error}")
    tag = secrets.token_hex(4)
    answers: list[str] = []
    waiting: dict[str, defer.Deferred[None]] = {}

    def answer(message: Message) -> None:
        words = message.body.decode("utf-8", "replace").split()
        if message.sender == first.user and words[:2] == ["question", tag]:
            number = words[2].rstrip(":")
            reply = f"answer {tag} {number}: {int(number) ** 2}"
            second.send(first.user, reply).addErrback(lambda failure: print(f"could not answer: {failure.value}", file=sys.stderr))

    def heard(message: Message) -> None:
        text = message.body.decode("utf-8", "replace")
        if message.sender == second.user and text.startswith(f"answer {tag} "):
            answers.append(text)
            number = text.split()[2].rstrip(":")
            if number in waiting:
                waiting.pop(number).callback(None)

    second.on_message(answer)
    first.on_message(heard)
    first.startService()
    second.startService()
    try:
        # Each device publishes its keys once logged in: then the other can encrypt for it.
        for client in (first, second):
            await client.e2ee.ready().addTimeout(args.timeout, reactor)
            print(f"{client.user}'s device key fingerprint: {client.e2ee.signing_key}", flush=True)
        for number in range(1, args.rounds + 1):
            replied = waiting[str(number)] = defer.Deferred()
            receipt = await first.send(second.user, f"question {tag} {number}: what is {number} squared?")
            await replied.addTimeout(args.timeout, reactor)
            print(f"round {number}: question stored encrypted as {receipt.conversation} #{receipt.seq}; {answers[-1]}", flush=True)
        print(f"{args.rounds} encrypted rounds played", flush=True)
    except IMClientError as error:
        raise SystemExit(f"encrypted_bots: {error}")
    except defer.TimeoutError:
        raise SystemExit(f"encrypted_bots: no progress within {args.timeout:g} seconds; is the server at {args.server} running?")
    finally:
        await defer.gatherResults([first.stopService(), second.stopService()])
    return answers


if __name__ == "__main__":
    task.react(run, [parse_args()])
