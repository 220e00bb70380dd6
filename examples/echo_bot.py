"""
An echo bot: every text message someone sends it goes straight back to them.

    python examples/echo_bot.py --user bob --password bob-pw [--state bob-echo.json]

It uses only the public client library (``imkit.client``).  Messages that arrived while it was not
running are answered when it starts; with ``--state`` it remembers exactly which ones it has seen,
so a restarted bot answers each message once.  Ctrl-C stops it cleanly.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from twisted.internet import defer, task

from imkit.client import IMClient, IMClientError, Message, development_ca, tls_endpoint
from imkit.tuning import tune_garbage_collector


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Echo every text message back to its sender.")
    parser.add_argument("--server", default="localhost:14000", metavar="HOST:PORT", help="default localhost:14000")
    parser.add_argument("--ca", metavar="FILE", help="CA certificate of the server (default: the development CA)")
    parser.add_argument("--user", default=os.environ.get("IMKIT_USER"), help="the bot's user (default $IMKIT_USER)")
    parser.add_argument("--password", default=os.environ.get("IMKIT_PASSWORD"), help="its password (default $IMKIT_PASSWORD)")
    parser.add_argument("--device", default="echo-bot", help="device name (default echo-bot)")
    parser.add_argument("--state", metavar="FILE", help="remember in FILE which messages were answered")
    args = parser.parse_args(argv)
    if not args.user or not args.password:
        parser.error("give --user and --password (or set IMKIT_USER and IMKIT_PASSWORD)")
    return args


async def run(reactor: Any, args: argparse.Namespace) -> None:
    try:
        endpoint = tls_endpoint(reactor, args.server, args.ca or development_ca())
    except ValueError as error:
        raise SystemExit(f"echo_bot: {error}")
    bot = IMClient(endpoint, args.user, args.password, args.device, state_path=args.state, reactor=reactor)

    def echo(message: Message) -> None:
        if message.sender == bot.user or not message.content_type.startswith("text/"):
            return  # our own messages (echoes included) are part of the conversation too
        reply = bot.send(message.sender, message.body, content_type=message.content_type)
        reply.addCallbacks(
            lambda receipt: print(f"echoed {message.sender}'s message {message.seq} as {receipt.seq}", flush=True),
            lambda failure: print(f"could not echo to {message.sender}: {failure.value}", file=sys.stderr, flush=True),
        )

    bot.on_message(echo)
    reactor.addSystemEventTrigger("before", "shutdown", bot.stopService)
    bot.startService()
    try:
        await bot.loggedIn()
    except IMClientError as error:
        raise SystemExit(f"echo_bot: {error}")
    print(f"{args.user} is echoing; Ctrl-C to stop", flush=True)
    tune_garbage_collector()  # a long-running bot: see imkit.tuning
    await defer.Deferred()  # until Ctrl-C: the shutdown trigger stops the bot and saves its state


if __name__ == "__main__":
    task.react(run, [parse_args()])
