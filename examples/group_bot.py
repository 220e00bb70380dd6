"""
A group moderator bot: it welcomes new members, answers "!members", and removes anyone who says
a banned word (after a warning).

    twistd -n imkit                                   # a server; add users with `imkit user add`
    python examples/group_bot.py --user mod --password mod-pw --member alice --member bob --ban spam
    python examples/group_bot.py --user mod --password mod-pw --group g:... --ban spam --ban scam

Without ``--group`` the bot creates a group (and owns it); with it, the bot moderates a group it
is a member of (only the owner may remove members).  ``--member`` users are added either way.
It uses only the public client library (``imkit.client``) and judges what is said while it runs,
not the history from before it started.  Ctrl-C stops it cleanly.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from twisted.internet import defer, task

from imkit.client import IMClient, IMClientError, Message, describe, development_ca, tls_endpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Moderate a group: welcome members, answer !members, remove who says a banned word.")
    parser.add_argument("--server", default="localhost:14000", metavar="HOST:PORT", help="default localhost:14000")
    parser.add_argument("--ca", metavar="FILE", help="CA certificate of the server (default: the development CA)")
    parser.add_argument("--user", default=os.environ.get("IMKIT_USER"), help="the bot's user (default $IMKIT_USER)")
    parser.add_argument("--password", default=os.environ.get("IMKIT_PASSWORD"), help="its password (default $IMKIT_PASSWORD)")
    parser.add_argument("--device", default="group-bot", help="device name (default group-bot)")
    parser.add_argument("--group", metavar="ID", help="moderate this group (default: create one)")
    parser.add_argument("--title", default="moderated", help="the title of a group the bot creates (default moderated)")
    parser.add_argument("--member", action="append", default=[], metavar="NAME", help="add this user (repeat for more)")
    parser.add_argument("--ban", action="append", default=[], metavar="WORD", help="remove whoever says WORD (a whole word, in any case; repeat for more)")
    args = parser.parse_args(argv)
    if not args.user or not args.password:
        parser.error("give --user and --password (or set IMKIT_USER and IMKIT_PASSWORD)")
    return args


class Moderator:
    """Acts on the events of one group, as its (owning) member ``client``."""

    def __init__(self, client: IMClient, group: str, banned: list[str]) -> None:
        self.client = client
        self.group = group
        self.banned = {word.lower() for word in banned}
        client.on_message(self.handle)

    def handle(self, message: Message) -> None:
        event = describe(message)
        if event.conversation != self.group:
            return
        if event.kind == "group.add":  # whoever added them, the bot included
            self.welcome([user for user in event.users if user != self.client.user])
        elif event.kind == "message" and event.sender != self.client.user:  # its own messages come back too
            defer.ensureDeferred(self.judge(event.sender, event.text)).addErrback(self.complain)

    def welcome(self, users: list[str]) -> None:
        if not users:
            return
        rules = f"  Please do not say: {', '.join(sorted(self.banned))}." if self.banned else ""
        self.say(f"Welcome, {' and '.join(users)}!{rules}").addErrback(self.complain)

    async def judge(self, sender: str, text: str) -> None:
        if text.strip() == "!members":
            members = await self.client.members(self.group)
            await self.say("Members: " + ", ".join(f"{m.user} ({m.role})" if m.role == "owner" else m.user for m in members))
            return
        said = set(re.findall(r"\w+", text.lower())) & self.banned
        if said:
            await self.say(f"{sender}: {', '.join(sorted(said))} is not allowed here. Goodbye.")
            await self.client.remove_members(self.group, [sender])

    def say(self, text: str) -> defer.Deferred:
        return self.client.send(group=self.group, body=text)

    def complain(self, failure: Any) -> None:
        print(f"group_bot: {failure.getErrorMessage()}", file=sys.stderr, flush=True)


async def start(client: IMClient, args: argparse.Namespace) -> Moderator:
    """Log in, skip the history, create (or take) the group, add --member users; the Moderator."""
    await client.caughtUp()
    group = args.group or await client.create_group(args.title)
    moderator = Moderator(client, group, args.ban)
    if args.member:
        await client.add_members(group, args.member)  # the group.add event brings the welcome
    return moderator


async def run(reactor: Any, args: argparse.Namespace) -> None:
    try:
        endpoint = tls_endpoint(reactor, args.server, args.ca or development_ca())
    except ValueError as error:
        raise SystemExit(f"group_bot: {error}")
    bot = IMClient(endpoint, args.user, args.password, args.device, reactor=reactor)
    reactor.addSystemEventTrigger("before", "shutdown", bot.stopService)
    bot.startService()
    try:
        moderator = await start(bot, args)
    except IMClientError as error:
        raise SystemExit(f"group_bot: {error}")
    print(f"{args.user} is moderating {moderator.group}; Ctrl-C to stop", flush=True)
    await defer.Deferred()  # until Ctrl-C: the shutdown trigger stops the bot


if __name__ == "__main__":
    task.react(run, [parse_args()])
