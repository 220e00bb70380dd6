"""
A poll bot using the custom VOTE packet of examples/poll.py.

    twistd -n imkit --extension examples.poll:POLL_TYPES           # the server checks votes
    python examples/poll_bot.py --user bob --password bob-pw        # bob tallies votes sent to him
    python examples/poll_bot.py --user alice --password alice-pw --vote 2 --to bob

The bot answers every vote with the poll's current tally as a text message.  Run from the
repository's top directory (so ``examples.poll`` can be imported).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from twisted.internet import defer, task

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples.poll import VOTE, Tally  # noqa: E402
from imkit.client import IMClient, IMClientError, development_ca, tls_endpoint  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Tally votes sent to this user, or cast one with --vote.")
    parser.add_argument("--server", default="localhost:14000", metavar="HOST:PORT", help="default localhost:14000")
    parser.add_argument("--ca", metavar="FILE", help="CA certificate of the server (default: the development CA)")
    parser.add_argument("--user", default=os.environ.get("IMKIT_USER"), help="default $IMKIT_USER")
    parser.add_argument("--password", default=os.environ.get("IMKIT_PASSWORD"), help="default $IMKIT_PASSWORD")
    parser.add_argument("--vote", type=int, metavar="CHOICE", help="cast this vote (0-3) instead of tallying")
    parser.add_argument("--poll", type=int, default=1, help="which poll (default 1)")
    parser.add_argument("--to", help="with --vote: the user running the tally")
    args = parser.parse_args(argv)
    if not args.user or not args.password:
        parser.error("give --user and --password (or set IMKIT_USER and IMKIT_PASSWORD)")
    if args.vote is not None and not args.to:
        parser.error("--vote needs --to USER")
    return args


async def run(reactor: Any, args: argparse.Namespace) -> None:
    endpoint = tls_endpoint(reactor, args.server, args.ca or development_ca())
    client = IMClient(endpoint, args.user, args.password, "poll-bot", reactor=reactor)
    client.startService()
    try:
        if args.vote is not None:
            receipt = await client.send_packet(VOTE, {"poll": args.poll, "choice": args.vote, "comment": ""}, to=args.to)
            print(f"vote stored as {receipt.conversation}#{receipt.seq}")
            return
        tally = Tally(client)

        def answer(message, vote) -> None:
            counts = tally.counts[vote.poll]
            client.send(message.sender, f"poll {vote.poll}: {counts}")

        client.on_packet(VOTE, answer)
        await client.loggedIn()
        print(f"{args.user} is tallying votes; Ctrl-C to stop", flush=True)
        reactor.addSystemEventTrigger("before", "shutdown", client.stopService)
        await defer.Deferred()
    except IMClientError as error:
        raise SystemExit(f"poll_bot: {error}")
    finally:
        if args.vote is not None:
            await client.stopService()


if __name__ == "__main__":
    task.react(run, [parse_args()])
