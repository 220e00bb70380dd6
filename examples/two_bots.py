"""
Two bots that talk to each other: the first pings, the second answers each ping with a pong.

    python examples/two_bots.py --rounds 10

Both log in (alice and bob with the README's passwords, unless told otherwise), wait until they
have caught up, then play ROUNDS rounds and exit.  The first bot reads its messages with
``async for``, the second with a callback: the two ways ``imkit.client`` hands messages over.
Each run tags its messages, so messages from earlier runs are ignored.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from typing import Any

from twisted.internet import defer, task

from imkit.client import ClientSettings, IMClient, IMClientError, Message, MessageStream, development_ca, tls_endpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Two bots play ping-pong over an imkit server, then exit.")
    parser.add_argument("--rounds", type=int, default=5, help="how many ping-pongs (default 5)")
    parser.add_argument("--server", default="localhost:14000", metavar="HOST:PORT", help="default localhost:14000")
    parser.add_argument("--ca", metavar="FILE", help="CA certificate of the server (default: the development CA)")
    parser.add_argument("--first", default="alice", metavar="USER", help="the pinging bot's user (default alice)")
    parser.add_argument("--first-password", default="alice-pw", metavar="PASSWORD", help="default alice-pw")
    parser.add_argument("--second", default="bob", metavar="USER", help="the answering bot's user (default bob)")
    parser.add_argument("--second-password", default="bob-pw", metavar="PASSWORD", help="default bob-pw")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="give up after this long without progress (default 30)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.timeout <= 0:
        parser.error("--rounds and --timeout must be positive")
    if args.first == args.second:
        parser.error("the two bots need different users")
    return args


async def run(reactor: Any, args: argparse.Namespace) -> None:
    try:
        endpoint = tls_endpoint(reactor, args.server, args.ca or development_ca())
    except ValueError as error:
        raise SystemExit(f"two_bots: {error}")
    settings = ClientSettings(send_timeout=args.timeout)
    first = IMClient(endpoint, args.first, args.first_password, "two-bots", settings=settings, reactor=reactor)
    second = IMClient(endpoint, args.second, args.second_password, "two-bots", settings=settings, reactor=reactor)
    run_tag = secrets.token_hex(4)

    def answer(message: Message) -> None:
        words = message.body.split()
        if message.sender == first.user and words[:2] == [b"ping", run_tag.encode()]:
            second.send(first.user, b"pong " + b" ".join(words[1:])).addErrback(
                lambda failure: print(f"{second.user} could not answer: {failure.value}", file=sys.stderr)
            )

    second.on_message(answer)
    replies = first.messages()
    first.startService()
    second.startService()
    try:
        for bot in (first, second):
            await bot.caughtUp().addTimeout(args.timeout, reactor)
        for round_number in range(1, args.rounds + 1):
            started = reactor.seconds()
            receipt = await first.send(second.user, f"ping {run_tag} {round_number}")
            pong = f"pong {run_tag} {round_number}".encode()
            await defer.ensureDeferred(_reply(replies, second.user, pong)).addTimeout(args.timeout, reactor)
            took = (reactor.seconds() - started) * 1000
            print(f"round {round_number}: ping stored as {receipt.conversation} #{receipt.seq}, pong after {took:.1f} ms", flush=True)
        print(f"{args.rounds} rounds played", flush=True)
    except IMClientError as error:
        raise SystemExit(f"two_bots: {error}")
    except defer.TimeoutError:
        raise SystemExit(f"two_bots: no progress within {args.timeout:g} seconds; is the server at {args.server} running?")
    finally:
        await defer.gatherResults([first.stopService(), second.stopService()])


async def _reply(replies: MessageStream, sender: str, body: bytes) -> Message:
    async for message in replies:
        if message.sender == sender and message.body == body:
            return message
    raise IMClientError("the client stopped before the reply came")


if __name__ == "__main__":
    task.react(run, [parse_args()])
