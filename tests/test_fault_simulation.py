"""
Exactly-once, in-order delivery under faults, proved by deterministic simulation.

Hypothesis generates storms: per-frame faults on every link in both directions (drop, duplicate,
delay so that later frames overtake), connection resets and silent cuts, server restarts with
downtime, application restarts (with saved positions or none), devices that come online late, and
a workload of direct messages and atomic bundles between 2-4 users with 1-2 devices each, to a
user name or to the ``dm:a:b`` conversation id.  Some storms also shrink the server's limits, so
that its delivery window overflows into Heads, syncs paginate, and sync answers fill their byte
budget.  After the storm (60 simulated seconds), a calm phase with no faults runs until the system
is quiet (only the sessions' own timers move it: resends, sync retries, heartbeats and idle
timeouts), and ``World.violations`` checks the promises of the seed design's "Reliability" and
"Consistency" sections.

Group storms add groups and multi-device users: 3-4 users, at least one on two devices, one of
them creating a group through TARGET_NEW_GROUP (a bundle of ``imkit/group.create`` and 0-2
messages) in the first seconds, members sending messages and bundles into it and into direct
conversations, and members added, removed and leaving as sequenced events, sometimes with a
message in the same bundle; the server sometimes runs ``history_on_join``.  The checker then
also proves that every device of every member reads exactly the part of each group its user may
read (a member removed up to and including its removal, one added later from the add on, told
HistoryUnavailable about the rest), that a user's devices see each other's messages, and that
every refusal is one the rules give in some state the group was in while the send was on its way.
Farewell storms check the seed design's corner case under ``contacts_only``: two contacts, and one
bundle [goodbye, ``imkit/contact.remove``] that must be stored whole, goodbye first, and delivered
to every device of both, with no message stored after the removal.

Dropping a frame inside one connection is something TCP never does; it can leave a session
waiting for an answer that will not come (a dropped Login, say).  That is allowed: the sessions'
timeouts must end such a connection and the client must reconnect.

The number of generated storms scales with ``IMKIT_SIM_EXAMPLES`` (total over the property tests,
shared as ``SHARES`` says; default 5000, about two minutes on one core, 50 s of them for the
group and farewell storms).  Runs are derandomized, so CI sees the same storms every time; set
``IMKIT_SIM_EXPLORE=1`` to draw new ones instead.  One known limitation (a readmitted member
reads from its readmission only) is pinned by an xfail scenario below and kept out of the group
storms by the shape of their membership changes (see ``simulate``); with
``IMKIT_SIM_KNOWN_BUGS=1`` the storms readmit members (the checker then accepts it, see
``Replay.owed``) and let refused sends meet changed rules (fixed: the hub remembers refusals).

The explicit scenarios below the property tests each prove one behaviour, with exact timings.
"""

from __future__ import annotations

import os
from functools import partial

import attrs
import pytest
from pytest import approx
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from imkit import operations
from imkit.model import Item, direct_conversation, direct_members
from imkit.rules import Policy
from imkit.session.settings import ClientSettings, ServerSettings
from imkit.wire import schema
from imkit.wire.errors import ErrorCode
from simulation import (
    DELAY,
    DELIVER,
    DOWN,
    DROP,
    DUPLICATE,
    EPOCH,
    KIND_NAMES,
    LATENCY,
    UP,
    FaultPlan,
    FrameFault,
    Noise,
    World,
    _fired,
    first_of,
)

TOTAL_EXAMPLES = int(os.environ.get("IMKIT_SIM_EXAMPLES", "5000"))
EXPLORE = os.environ.get("IMKIT_SIM_EXPLORE", "") not in ("", "0")
KNOWN_BUGS = os.environ.get("IMKIT_SIM_KNOWN_BUGS", "") not in ("", "0")
"""
Let the group storms readmit members and let refused sends become acceptable later: where the
known limitation pinned by an xfail scenario below lives, and where a fixed bug (refusals judged
afresh on resend) used to; by default membership changes are shaped so that neither happens.
"""
SHARES = {
    "any": 0.4,
    "lossy": 0.3,
    "cuts": 0.3,
    "group any": 0.2,
    "group lossy": 0.1,
    "group cuts": 0.1,
    "farewell": 0.1,
}
"""Each property test's share of IMKIT_SIM_EXAMPLES."""


def simulation_settings(share: float) -> settings:
    return settings(
        max_examples=max(1, int(TOTAL_EXAMPLES * share)),
        deadline=None,
        derandomize=not EXPLORE,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


# Generated storms -------------------------------------------------------------------------------

USERS = ("ann", "bob", "cy", "dee")
STORM = 60.0
"""Seconds of faults; the workload and the cuts and restarts all happen within them."""
CALM = 3600.0
"""At most this long with no faults to become quiet."""
DELAYS = (0.02, 0.3, 2.5, 6.0, 15.0)
"""Straddling the client's resend (2 s), the server's ack timeout (5 s) and the sync retry (10 s)."""


@attrs.frozen
class Op:
    """
    At ``at`` seconds, device number ``device`` sends to user ``target`` (or, ``to_group``, to
    the group it knows), ``repeat`` times in a row, ``items`` messages each time (2-3: an atomic
    bundle).
    """

    at: float
    device: int
    target: int
    items: int
    via_conversation: bool
    repeat: int = 1
    to_group: bool = False


@attrs.frozen
class GroupPlan:
    """
    At ``at`` seconds, device number ``device`` creates a group through TARGET_NEW_GROUP, in one
    bundle: ``imkit/group.create`` naming the users ``members`` places after its own user (so
    never itself), then ``extra`` plain messages.
    """

    at: float
    device: int
    members: tuple[int, ...]
    extra: int


@attrs.frozen
class Change:
    """
    At ``at`` seconds, a membership change, sent to the group like any message: device number
    ``device`` adds user ``user`` (``add``) or leaves (``leave``), or the group creator's first
    device (``by_creator``; else device ``device``) removes user ``user`` (``remove``).  With
    ``note``, a plain message shares the bundle (after an add, before a removal or a leave: the
    rules want adds first and removals last).  A change the rules refuse where it lands (a removal
    by a member who is not the owner, of someone already gone...) is refused, which the checker
    must find justified.
    """

    at: float
    kind: str
    device: int
    user: int
    note: bool
    by_creator: bool


@attrs.frozen
class Storm:
    """Everything one simulated run does; device and user numbers wrap around the ones that exist."""

    devices: tuple[int, ...]
    """Devices per user."""
    joins: tuple[float, ...]
    """When each device first connects (seconds into the storm)."""
    ops: tuple[Op, ...]
    faults: tuple[tuple[int, bool, int, str, float], ...] = ()
    """(device, upstream?, frame index, action, delay)."""
    noise: Noise | None = None
    cuts: tuple[tuple[float, int, bool], ...] = ()
    """(at, device, silent?)."""
    restarts: tuple[tuple[float, float], ...] = ()
    """(at, downtime)."""
    crashes: tuple[tuple[float, int, bool], ...] = ()
    """
    (at, device, saved?): the application dies and restarts, with the positions it saved or with
    none (then it resumes at the server's cursors for the device).
    """
    max_unacked: int = 10_000
    """Deliveries in flight per connection (2 makes the server fall back to Heads and sync)."""
    sync_page: int = 500
    """Messages per sync answer (2 makes every sync paginate)."""
    max_frame: int = schema.DEFAULT_MAX_FRAME
    """The server's frame limit; half of it bounds a sync answer (4096: about 7 messages)."""
    slow: tuple[int, ...] = ()
    """Devices whose link has four times the latency (so that replies cross differently)."""
    ack_delay: float = 0.0
    """The clients' delivery ack delay (ClientSettings.ack_delay; 2.0 outlasts the server's ack timeout)."""
    group: GroupPlan | None = None
    changes: tuple[Change, ...] = ()
    history_on_join: bool = False
    """The server's ``Policy.history_on_join``: members added later read the group from seq 1."""
    farewell: tuple[float, int] | None = None
    """
    (at, device): the server runs ``Policy(contacts_only=True)``, the first two users are each
    other's contacts from the start (stored before the run), and at ``at`` device number
    ``device`` sends the other user the bundle [goodbye, ``imkit/contact.remove``].
    """


times = st.integers(0, int(STORM * 4) - 1).map(lambda quarter: quarter / 4)
moments = st.tuples(times, st.sampled_from((0.0, 0.005, 0.015, 0.025))).map(sum)
"""Cuts and restarts also fall between a send and its ack (one-way latency is 0.01 s)."""


def op_strategy(to_group: st.SearchStrategy[bool] = st.just(False)) -> st.SearchStrategy[Op]:
    return st.builds(
        Op,
        at=times,
        device=st.integers(0, 7),
        target=st.integers(0, 3),
        items=st.sampled_from((1, 1, 1, 2, 3)),
        via_conversation=st.booleans(),
        repeat=st.sampled_from((1, 1, 2, 3)),
        to_group=to_group,
    )


ops = op_strategy()
group_ops = op_strategy(st.sampled_from((True, True, False)))
changes = st.builds(
    Change,
    at=times,
    kind=st.sampled_from(("add", "add", "remove", "leave")),
    device=st.integers(0, 7),
    user=st.integers(0, 3),
    note=st.booleans(),
    by_creator=st.sampled_from((True, True, False)),
)
frame_faults = st.tuples(
    st.integers(0, 7),
    st.booleans(),
    st.integers(0, 15),
    st.sampled_from((DROP, DUPLICATE, DELAY)),
    st.sampled_from(DELAYS),
)
noises = st.builds(
    Noise,
    seed=st.integers(0, 2**16),
    drop=st.sampled_from((0, 20, 50, 100, 200)),
    duplicate=st.sampled_from((0, 20, 50, 100)),
    delay=st.sampled_from((0, 20, 50, 100, 200)),
    delays=st.just(DELAYS),
)
cuts = st.tuples(moments, st.integers(0, 7), st.booleans())
restarts = st.tuples(moments, st.sampled_from((0.0, 0.0, 3.0, 20.0)))


def _storm(draw, devices: list[int], workload: st.SearchStrategy[Op], frame_level: bool, connection_level: bool, **extra) -> Storm:
    """A Storm for these devices: the workload, the server's limits, and the faults asked for."""
    count = sum(devices)
    joins = tuple(draw(st.lists(st.sampled_from((0.0, 0.0, 0.0, 10.0, 30.0)), min_size=count, max_size=count)))
    storm = Storm(
        devices=tuple(devices),
        joins=joins,
        ops=tuple(draw(st.lists(workload, min_size=1, max_size=12))),
        max_unacked=draw(st.sampled_from((10_000, 10_000, 2))),
        sync_page=draw(st.sampled_from((500, 500, 2))),
        max_frame=draw(st.sampled_from((schema.DEFAULT_MAX_FRAME, 4096))),
        slow=tuple(draw(st.lists(st.integers(0, 7), max_size=2))),
        ack_delay=draw(st.sampled_from((0.0, 0.0, 0.0, 0.05, 2.0))),
        **extra,
    )
    if frame_level:
        storm = attrs.evolve(
            storm,
            faults=tuple(draw(st.lists(frame_faults, max_size=12))),
            noise=draw(st.none() | noises),
        )
    if connection_level:
        storm = attrs.evolve(
            storm,
            cuts=tuple(draw(st.lists(cuts, max_size=3))),
            restarts=tuple(draw(st.lists(restarts, max_size=2))),
            crashes=tuple(draw(st.lists(st.tuples(moments, st.integers(0, 7), st.booleans()), max_size=2))),
        )
    return storm


@st.composite
def storms(draw, frame_level: bool = True, connection_level: bool = True) -> Storm:
    """Direct messages and bundles between 2-4 users with 1-2 devices each."""
    devices = draw(st.lists(st.integers(1, 2), min_size=2, max_size=4))
    return _storm(draw, devices, ops, frame_level, connection_level)


@st.composite
def group_storms(draw, frame_level: bool = True, connection_level: bool = True) -> Storm:
    """
    3-4 users, one of them (at least) on two devices; a group created through the protocol in
    the first seconds, messages and bundles into it and into direct conversations, and up to
    four membership changes, all under the faults asked for.
    """
    devices = draw(st.lists(st.integers(1, 2), min_size=3, max_size=4))
    devices[draw(st.integers(0, len(devices) - 1))] = 2
    group = GroupPlan(
        at=draw(st.sampled_from((0.0, 0.0, 0.5, 3.0))),
        device=draw(st.integers(0, 7)),
        members=tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3, unique=True))),
        extra=draw(st.sampled_from((0, 0, 1, 2))),
    )
    return _storm(
        draw,
        devices,
        group_ops,
        frame_level,
        connection_level,
        group=group,
        changes=tuple(draw(st.lists(changes, max_size=4))),
        history_on_join=draw(st.sampled_from((False, False, False, True))),
    )


@st.composite
def farewell_storms(draw) -> Storm:
    """Two contacts on 1-2 devices each, messages both ways, and one [goodbye, contact.remove] bundle."""
    devices = draw(st.lists(st.integers(1, 2), min_size=2, max_size=2))
    farewell = (draw(times), draw(st.integers(0, 7)))
    return _storm(draw, devices, ops, True, True, farewell=farewell)


def simulate(storm: Storm) -> World:
    """Build the world a Storm describes, run the storm and then the calm."""
    users = {USERS[i]: n for i, n in enumerate(storm.devices)}
    labels = [f"{user}/d{n}" for user, count in users.items() for n in range(1, count + 1)]
    names = list(users)
    start = EPOCH
    faults = FaultPlan(
        faults=[
            FrameFault(labels[device % len(labels)], UP if up else DOWN, index, action, delay)
            for device, up, index, action, delay in storm.faults
        ],
        noise=storm.noise,
        until=start + STORM,
    )
    world = World(
        users,
        ServerSettings(max_unacked=storm.max_unacked, sync_page=storm.sync_page, max_frame=storm.max_frame),
        ClientSettings(send_timeout=None, sync_page=storm.sync_page, ack_delay=storm.ack_delay, ack_every=8),
        faults=faults,
        latency={labels[device % len(labels)]: 4 * LATENCY for device in storm.slow},
        policy=Policy(contacts_only=storm.farewell is not None, history_on_join=storm.history_on_join),
    )

    def crash(label: str, saved: bool) -> None:
        world.restart_device(label, world.device(label).app.positions() if saved else None)

    for label, join in zip(labels, storm.joins):
        world.at(start + join, "join", partial(world.connect, label))
    for number, op in enumerate(storm.ops):
        label = labels[op.device % len(labels)]
        target = names[op.target % len(names)]
        for again in range(op.repeat):
            bodies = [b"%s #%d.%d.%d" % (label.encode(), number, again, i) for i in range(op.items)]
            if op.to_group:
                items = [Item("text/plain", body) for body in bodies]
                action = partial(world.send_to_group, label, items)
            elif op.items == 1:
                action = partial(world.send, label, target, bodies[0], op.via_conversation)
            else:
                action = partial(world.send_bundle, label, target, bodies, op.via_conversation)
            world.at(start + op.at, "send", action)
    if storm.group is not None:
        plan = storm.group
        creator = labels[plan.device % len(labels)]
        first = names.index(world.device(creator).user)
        invited = [names[(first + offset) % len(names)] for offset in plan.members]
        welcome = [b"%s welcomes #%d" % (creator.encode(), i) for i in range(plan.extra)]
        world.at(start + plan.at, "create", partial(world.create_group, creator, "the group", invited, welcome))
        owner = f"{world.device(creator).user}/d1"
        initial = {names[first], *invited}
        later = [name for name in names if name not in initial]
        founders = [label for label in labels if world.device(label).user in initial]
        for number, change in enumerate(storm.changes):
            label = owner if change.kind == "remove" and change.by_creator else labels[change.device % len(labels)]
            user = names[change.user % len(names)]
            if not KNOWN_BUGS:
                # Nobody is ever readmitted, and no refusal can turn into an acceptance later:
                # only users outside the first members are added, only first members are removed
                # (by the creator, who is owner until it leaves for good) or leave.
                if change.kind == "add":
                    if not later:
                        continue
                    user = later[change.user % len(later)]
                elif change.kind == "remove":
                    label = owner
                    user = sorted(initial)[change.user % len(initial)]
                else:
                    label = founders[change.device % len(founders)]
            note_items = [Item("text/plain", b"%s change #%d" % (label.encode(), number))] if change.note else []
            if change.kind == "add":
                items = [operations.group_add([user]), *note_items]
            elif change.kind == "remove":
                items = [*note_items, operations.group_remove([user])]
            else:
                items = [*note_items, operations.group_leave()]
            world.at(start + change.at, change.kind, partial(world.send_to_group, label, items, change.kind))
    if storm.farewell is not None:
        first, second = names[:2]
        conversation = direct_conversation(first, second)
        world.preload(f"{first}/setup", conversation, [operations.contact_add()])
        world.preload(f"{second}/setup", conversation, [operations.contact_add()])
        at, device = storm.farewell
        label = labels[device % len(labels)]
        other = second if world.device(label).user == first else first
        goodbye = [Item("text/plain", b"goodbye from " + label.encode()), operations.contact_remove()]
        world.at(start + at, "farewell", partial(world.submit, label, schema.TARGET_USER, other, goodbye))
    for at, device, silent in storm.cuts:
        world.at(start + at, "cut", partial(world.cut, labels[device % len(labels)], silent))
    for at, device, saved in storm.crashes:
        world.at(start + at, "crash", partial(crash, labels[device % len(labels)], saved))
    for at, downtime in storm.restarts:
        world.at(start + at, "restart", partial(world.restart_server, downtime))
    world.run_until(start + STORM)
    world.settle_down(CALM)
    return world


def check(world: World) -> None:
    problems = world.violations()
    if not world.quiet():
        problems.append(f"not quiet after {CALM} s of calm")
    if problems:
        note(world.explain())
    assert not problems, "\n".join(problems)


def check_farewell(world: World) -> None:
    """
    The seed design's corner case: under ``contacts_only``, [goodbye, contact.remove] from a
    contact is stored whole, the goodbye first, acknowledged (unless its application died with
    it unsent), and the removal holds from there on (``Replay`` finds any plain message stored
    after it; ``violations`` that every device of both users got the two together).
    """
    check(world)
    (farewell,) = [s for s in world.sent if s.items[-1].content_type == schema.CONTACT_REMOVE]
    device = world.device(farewell.device)
    stored = world.stored()[farewell.conversation]
    mine = [m for m in stored if (m.sender_device, m.client_msg_id) == (device.name, farewell.client_msg_id)]
    if (farewell.device, farewell.client_msg_id) in world.abandoned:
        if not mine:
            return
    else:
        assert device.acked(farewell.client_msg_id) is not None, "the farewell was not acknowledged"
    assert [(m.content_type, m.bundle_remaining) for m in mine] == [("text/plain", 1), (schema.CONTACT_REMOVE, 0)]
    assert mine[1].seq == mine[0].seq + 1
    other = next(user for user in direct_members(farewell.conversation) if user != device.user)
    contacts = _fired(world.store.contacts(device.user))
    assert contacts.get(other) != schema.RELATION_CONTACT
    for label in [d.label for d in world.devices.values()]:
        got = [m for m in world.device(label).app.messages() if m.server_id in {m.server_id for m in mine}]
        if got:  # a restarted application may have resumed past it; violations checks the rest
            assert got == mine


@simulation_settings(SHARES["any"])
@given(storms())
def test_any_storm(storm: Storm) -> None:
    """Frame faults, cuts and restarts together: nothing acknowledged is lost, nothing doubled."""
    check(simulate(storm))


@simulation_settings(SHARES["lossy"])
@given(storms(connection_level=False))
def test_lossy_links(storm: Storm) -> None:
    """Per-frame drops, duplicates and reordering alone, on links that are never cut."""
    check(simulate(storm))


@simulation_settings(SHARES["cuts"])
@given(storms(frame_level=False))
def test_cuts_and_restarts(storm: Storm) -> None:
    """Connection resets, silent cuts, server restarts and application restarts alone, on links that lose no frame."""
    check(simulate(storm))


@simulation_settings(SHARES["group any"])
@given(group_storms())
def test_group_storm(storm: Storm) -> None:
    """
    A group created through the protocol, members on one or two devices, plain messages and
    bundles into it and into direct conversations, members added, removed and leaving, under
    frame faults, cuts and restarts: every device of every member reads exactly what its user
    may read, in the same order as everybody else, once; a refusal is always justified.
    """
    check(simulate(storm))


@simulation_settings(SHARES["group lossy"])
@given(group_storms(connection_level=False))
def test_group_lossy_links(storm: Storm) -> None:
    """Groups and membership changes over links that drop, duplicate and reorder frames."""
    check(simulate(storm))


@simulation_settings(SHARES["group cuts"])
@given(group_storms(frame_level=False))
def test_group_cuts_and_restarts(storm: Storm) -> None:
    """Groups and membership changes across resets, silent cuts, server and application restarts."""
    check(simulate(storm))


@simulation_settings(SHARES["farewell"])
@given(farewell_storms())
def test_farewell_is_delivered_before_the_contact_removal(storm: Storm) -> None:
    """Under contacts_only, [goodbye, contact.remove] survives every fault whole and in that order."""
    check_farewell(simulate(storm))


# Explicit scenarios -----------------------------------------------------------------------------

ANN_BOB = direct_conversation("ann", "bob")


def bodies(world: World, label: str, conversation: str = ANN_BOB) -> list[bytes]:
    return [m.body for m in world.device(label).app.messages() if m.conversation == conversation]


def online_world(faults: FaultPlan | None = None, **users: int) -> World:
    world = World(users or {"ann": 1, "bob": 1}, faults=faults)
    world.connect_all()
    world.run_for(1.0)
    return world


def test_lost_ack_is_answered_with_the_original_ack() -> None:
    """
    A Send whose SendAck is lost is resent, flagged as a resend, after the client's first resend
    timeout (2 s plus up to 20% jitter).  The server recognises it by (sender, device,
    client_msg_id), stores nothing new, pushes nothing new, and answers with the original ack:
    same server id, same seq, same sent_at.
    """
    world = online_world(FaultPlan(rules=[first_of(schema.SEND_ACK, "ann/d1", DOWN)]))
    cmid = world.send("ann/d1", "bob", b"hello")
    assert world.settle_down()

    sends = world.frames("ann/d1", UP, schema.SEND)
    acks = world.frames("ann/d1", DOWN, schema.SEND_ACK)
    assert [(t.resend, t.action) for t in sends] == [(False, DELIVER), (True, DELIVER)]
    assert 2.0 <= sends[1].at - sends[0].at <= 2.4
    assert [t.action for t in acks] == [DROP, DELIVER]
    original, again = (t.packet() for t in acks)
    assert again == original
    assert (original.client_msg_id, original.seq, original.count) == (cmid, 1, 1)
    assert original.sent_at == int((sends[0].at + LATENCY) * 1000)
    assert world.device("ann/d1").app.acks == {cmid: original}

    (stored,) = world.stored()[ANN_BOB]
    assert (stored.server_id, stored.seq, stored.body) == (original.server_id, 1, b"hello")
    assert len(world.frames("bob/d1", DOWN, schema.DELIVER)) == 1
    assert bodies(world, "bob/d1") == bodies(world, "ann/d1") == [b"hello"]
    assert world.violations() == []


def test_lost_delivery_is_resent_after_the_ack_timeout() -> None:
    """
    A Deliver that is lost is pushed again, flagged as a resend, exactly ``ack_timeout`` (5 s)
    after it was first sent, then after twice that (10 s) if it is lost again; once the recipient
    acknowledges it, the server stops.  The recipient's application sees it once.
    """
    world = online_world(FaultPlan(rules=[first_of(schema.DELIVER, "bob/d1", DOWN, count=2)]))
    world.send("ann/d1", "bob", b"are you there?")
    assert world.settle_down()
    world.run_for(600.0)

    pushes = world.frames("bob/d1", DOWN, schema.DELIVER)
    first = pushes[0].at
    assert first == EPOCH + 1.0 + LATENCY
    assert [(t.at - first, t.resend, t.action) for t in pushes] == [
        (0.0, False, DROP),
        (approx(5.0), True, DROP),
        (approx(15.0), True, DELIVER),
    ]
    (ack,) = world.frames("bob/d1", UP, schema.DELIVER_ACK)
    assert ack.packet().seq == 1
    assert bodies(world, "bob/d1") == [b"are you there?"]
    assert world.violations() == []


def test_offline_recipient_gets_stored_messages_exactly_once_on_connect() -> None:
    """
    Messages to a user with no device online wait in the store.  When the device connects, the
    sync after login hands them over, all of them, in order and once, in one delivery before
    CaughtUp (a bundle among them stays whole); nothing is pushed and nothing comes again later.
    """
    world = World({"ann": 1, "bob": 1})
    world.connect("ann/d1")
    world.run_for(1.0)
    for n in range(3):
        world.send("ann/d1", "bob", b"note %d" % n)
    world.send_bundle("ann/d1", "bob", [b"photo", b"caption"], via_conversation=True)
    world.run_for(60.0)
    assert len(world.stored()[ANN_BOB]) == 5
    assert bodies(world, "bob/d1") == []

    world.connect("bob/d1")
    assert world.settle_down()
    world.run_for(600.0)
    expected = [b"note 0", b"note 1", b"note 2", b"photo", b"caption"]
    app = world.device("bob/d1").app
    assert [[m.body for m in batch] for batch in app.batches] == [expected]
    assert app.caught_up == 1
    assert world.frames("bob/d1", DOWN, schema.DELIVER) == []
    assert world.frames("bob/d1", DOWN, schema.DELIVER_BUNDLE) == []
    (result,) = world.frames("bob/d1", DOWN, schema.SYNC_RESULT)
    assert [m.seq for m in result.packet().messages] == [1, 2, 3, 4, 5]
    assert world.violations() == []


def test_server_restart_mid_stream_loses_and_doubles_nothing() -> None:
    """
    The server dies while a stream of sends is under way: one send is stored but its ack dies with
    the server, later ones are queued while it is down (5 s).  The clients reconnect, the stored
    send is resent and answered with its original ack, the rest are stored once, in the order
    they were sent, and both sides see all ten messages once.
    """
    world = online_world()
    start = world.now
    for n in range(10):
        world.at(start + 0.1 * n, "send", lambda n=n: world.send("ann/d1", "bob", b"part %d" % n))
    # The send at +0.4 reaches the server at +0.41; its ack would reach ann at +0.42.
    world.at(start + 0.415, "restart", lambda: world.restart_server(downtime=5.0))
    assert world.settle_down()

    stored = world.stored()[ANN_BOB]
    assert [m.body for m in stored] == [b"part %d" % n for n in range(10)]
    lost_ack = stored[4]
    ack = world.device("ann/d1").app.acks[lost_ack.client_msg_id]
    assert (ack.server_id, ack.seq, ack.sent_at) == (lost_ack.server_id, 5, int((start + 0.41) * 1000))
    # It was answered twice, the same way: once by the server that died, once after the restart.
    answers = [t for t in world.frames("ann/d1", DOWN, schema.SEND_ACK) if t.packet().client_msg_id == ack.client_msg_id]
    assert [t.packet() for t in answers] == [ack, ack]
    assert answers[0].at < start + 0.415 < start + 5.415 <= answers[1].at
    assert world.restarts == 1
    assert bodies(world, "bob/d1") == bodies(world, "ann/d1") == [m.body for m in stored]
    assert world.violations() == []


def test_reconnect_with_last_sequence_gets_exactly_the_gap() -> None:
    """
    A device that reconnects tells the server the last sequence it has per conversation; the
    sync answer holds exactly the messages after it (nothing it already has), which its
    application then gets once.
    """
    world = online_world()
    for n in range(1, 4):
        world.send("ann/d1", "bob", b"m%d" % n)
    world.run_for(5.0)
    world.disconnect("bob/d1")
    for n in range(4, 7):
        world.send("ann/d1", "bob", b"m%d" % n)
    world.run_for(5.0)
    world.connect("bob/d1")
    assert world.settle_down()

    sync = world.frames("bob/d1", UP, schema.SYNC)[-1].packet()
    assert [(c.conversation, c.seq) for c in sync.cursors] == [(ANN_BOB, 3)]
    result = world.frames("bob/d1", DOWN, schema.SYNC_RESULT)[-1].packet()
    assert [m.seq for m in result.messages] == [4, 5, 6]
    assert bodies(world, "bob/d1") == [b"m%d" % n for n in range(1, 7)]
    assert world.violations() == []


def test_restarted_client_resumes_from_its_saved_positions() -> None:
    """
    An application restarted with the positions it saved (``ClientCore(delivered=...)``) syncs
    from them, not from the server's cursors: it gets what arrived while it was down, and nothing
    it had already processed.
    """
    world = online_world()
    for n in range(1, 4):
        world.send("ann/d1", "bob", b"m%d" % n)
    world.run_for(5.0)
    saved = world.device("bob/d1").app.positions()
    assert saved == {ANN_BOB: 3}

    world.restart_device("bob/d1", delivered=saved)
    world.send("ann/d1", "bob", b"m4")
    world.send_bundle("ann/d1", "bob", [b"m5", b"m6"])
    assert world.settle_down()

    sync = world.frames("bob/d1", UP, schema.SYNC)[-1].packet()
    assert sync.flags & schema.SYNC_SERVER_CURSORS == 0
    assert [(c.conversation, c.seq) for c in sync.cursors] == [(ANN_BOB, 3)]
    before, after = world.device("bob/d1").apps
    assert [[m.body for m in b] for b in before.batches] == [[b"m1"], [b"m2"], [b"m3"]]
    assert [[m.body for m in b] for b in after.batches] == [[b"m4", b"m5", b"m6"]]
    assert world.violations() == []


def test_client_without_saved_positions_resumes_at_the_server_cursor() -> None:
    """
    An application restarted with no saved positions (``delivered=None``) asks the server to start
    each conversation at the device's acknowledged cursor: it gets only what it had not yet
    acknowledged.
    """
    world = online_world()
    for n in range(1, 4):
        world.send("ann/d1", "bob", b"m%d" % n)
    world.run_for(5.0)
    world.restart_device("bob/d1", delivered=None)
    world.send("ann/d1", "bob", b"m4")
    assert world.settle_down()

    sync = world.frames("bob/d1", UP, schema.SYNC)[-1].packet()
    assert sync.flags & schema.SYNC_SERVER_CURSORS and sync.cursors == ()
    assert [m.body for m in world.frames("bob/d1", DOWN, schema.SYNC_RESULT)[-1].packet().messages] == [b"m4"]
    before, after = world.device("bob/d1").apps
    assert [m.body for m in before.messages()] == [b"m1", b"m2", b"m3"]
    assert after.starts == {ANN_BOB: 3}
    assert [m.body for m in after.messages()] == [b"m4"]
    assert world.violations() == []


def test_lost_heads_are_resent_until_the_client_has_caught_up() -> None:
    """
    When a connection has ``max_unacked`` deliveries in flight, the server holds further ones
    back and, once acks make room, sends Heads instead so that the client syncs.  A Heads frame
    stands in for messages the client was never sent, so it is resent like a delivery (after
    ``ack_timeout``) until the client's cumulative ack reaches its head.  (Found by the storms: a
    lost Heads used to lose the held-back message for good.)
    """
    world = World(
        {"ann": 1, "bob": 1},
        ServerSettings(max_unacked=2),
        faults=FaultPlan(rules=[first_of(schema.HEADS, "ann/d1", DOWN)]),
    )
    world.connect_all()
    world.run_for(1.0)
    for n in range(1, 4):
        world.send("bob/d1", "ann", b"m%d" % n)
    assert world.settle_down()
    world.run_for(600.0)

    assert len(world.frames("ann/d1", DOWN, schema.DELIVER)) == 2
    heads = world.frames("ann/d1", DOWN, schema.HEADS)
    assert [(t.at - heads[0].at, t.resend, t.action) for t in heads] == [(0.0, False, DROP), (approx(5.0), True, DELIVER)]
    assert [(c.conversation, c.seq) for c in heads[1].packet().heads] == [(ANN_BOB, 3)]
    gap = world.frames("ann/d1", UP, schema.SYNC)[-1].packet()
    assert [(c.conversation, c.seq) for c in gap.cursors] == [(ANN_BOB, 2)]
    assert bodies(world, "ann/d1") == [b"m1", b"m2", b"m3"]
    assert world.violations() == []


def test_silent_cut_is_found_by_both_idle_timeouts() -> None:
    """
    A connection that silently stops carrying anything (a dead NAT entry; nobody gets a reset)
    is closed by each side on its own: the server after ``idle_timeout`` (90 s) with no frame from
    the client, the client after three heartbeat intervals (90 s) with no frame from the server,
    its pings unanswered.  The client reconnects after its delay and syncs what it missed.
    """
    world = online_world()
    world.cut("ann/d1", silent=True)
    world.send("bob/d1", "ann", b"still there?")
    assert world.settle_down()

    old_up = [t for t in world.trace if t.device == "ann/d1" and t.connection == 1 and t.direction == UP]
    old_down = [t for t in world.trace if t.device == "ann/d1" and t.connection == 1 and t.direction == DOWN]
    heard_from_client = max(t.at for t in old_up if t.delivered) + LATENCY
    heard_from_server = max(t.at for t in old_down if t.delivered) + LATENCY
    assert [KIND_NAMES[t.kind] for t in old_up if not t.delivered] == ["PING"] * 3  # one per heartbeat
    error = old_down[-1]
    assert (KIND_NAMES[error.kind], error.at) == ("ERROR", approx(heard_from_client + 90.0))
    assert error.packet().code == ErrorCode.IDLE_TIMEOUT
    (hello,) = world.frames("ann/d1", UP, schema.HELLO)[1:]
    assert (hello.connection, hello.at) == (2, approx(heard_from_server + 90.0 + world.reconnect_delay))
    assert bodies(world, "ann/d1") == [b"still there?"]
    assert world.violations() == []


def test_send_over_the_servers_frame_limit_is_refused_not_retried_for_ever() -> None:
    """
    A server drops the connection on a frame over its limit (``HelloOk.max_frame``).  A send
    queued before the client knew that limit, and too large for it, is refused with TOO_LARGE at
    login instead of being resent on every reconnect and blocking the sends behind it; once the
    limit is known, ``send`` refuses such a message at once.  (Found while reviewing the
    simulation: it used to reconnect every second for ever.)
    """
    world = World({"ann": 1, "bob": 1}, ServerSettings(max_frame=4096))
    world.connect("bob/d1")
    big = world.send("ann/d1", "bob", b"x" * 5000)
    world.send("ann/d1", "bob", b"small")
    world.connect("ann/d1")
    assert world.settle_down()

    app = world.device("ann/d1").app
    assert app.logins == 1
    assert list(app.rejected) == [big] and app.rejected[big].status == ErrorCode.TOO_LARGE
    assert bodies(world, "bob/d1") == [b"small"]
    with pytest.raises(ValueError):
        world.send("ann/d1", "bob", b"x" * 5000)


# Groups, multi-device, contacts -----------------------------------------------------------------


def group_world(users: dict[str, int], members: tuple[str, ...], policy: Policy = Policy(), faults: FaultPlan | None = None) -> tuple[World, str]:
    """Everybody online; ann/d1 creates a group with ``members`` through TARGET_NEW_GROUP."""
    world = World(users, faults=faults, policy=policy)
    world.connect_all()
    world.run_for(1.0)
    world.create_group("ann/d1", "the group", members, [b"welcome"])
    assert world.settle_down()
    (group,) = world.device("ann/d1").groups
    return world, group


def group_bodies(world: World, label: str, group: str) -> list[bytes]:
    return [m.body for m in world.device(label).app.messages() if m.conversation == group]


def test_group_is_created_through_the_protocol_and_reaches_every_device() -> None:
    """
    The create bundle names no conversation; the ack names the new group, whose seq 1 is the
    create and seq 2 the welcome.  Every device of every member, the creator's other device
    included, gets both in one delivery; a user not invited gets nothing.
    """
    world, group = group_world({"ann": 2, "bob": 2, "cy": 1}, ("bob",))
    (ack,) = world.device("ann/d1").app.acks.values()
    assert (ack.conversation, ack.seq, ack.count) == (group, 1, 2)
    for label in ("ann/d1", "ann/d2", "bob/d1", "bob/d2"):
        (batch,) = world.device(label).app.batches
        assert [m.content_type for m in batch] == [schema.GROUP_CREATE, "text/plain"]
    assert world.device("cy/d1").app.batches == []
    world.send_to_group("ann/d2", [Item("text/plain", b"from my phone")])
    assert world.settle_down()
    for label in ("ann/d1", "ann/d2", "bob/d1", "bob/d2"):
        assert group_bodies(world, label, group)[-1] == b"from my phone"
    assert world.violations() == []


def test_late_member_reads_from_its_join_and_is_told_about_the_rest() -> None:
    """
    Without history on join, a user added later reads the group from the event that added them:
    each of its devices is told the earlier sequences are unavailable (HistoryUnavailable), never
    left waiting for them, and gets the add and everything after, once.
    """
    world, group = group_world({"ann": 1, "bob": 1, "cy": 2}, ("bob",))
    world.send_to_group("bob/d1", [Item("text/plain", b"before cy")])
    world.run_for(1.0)
    world.disconnect("cy/d2")
    world.send_to_group("ann/d1", [operations.group_add(["cy"]), Item("text/plain", b"hi cy")])
    world.send_to_group("bob/d1", [Item("text/plain", b"after cy")])
    world.run_for(5.0)
    world.connect("cy/d2")
    assert world.settle_down()
    for label in ("cy/d1", "cy/d2"):
        app = world.device(label).app
        assert app.skipped and all(e.upto == 3 for e in app.skipped)
        assert [m.seq for m in app.messages()] == [4, 5, 6]
        assert group_bodies(world, label, group)[1:] == [b"hi cy", b"after cy"]
    assert world.violations() == []


def test_removed_member_gets_its_removal_and_nothing_after() -> None:
    """
    The owner's [goodbye, group.remove] reaches the removed member's devices whole, and nothing
    the group says afterwards does; a send of theirs that reaches the server afterwards is refused
    with NOT_A_MEMBER.
    """
    world, group = group_world({"ann": 1, "bob": 2}, ("bob",))
    world.send_to_group("ann/d1", [Item("text/plain", b"sorry bob"), operations.group_remove(["bob"])])
    world.run_for(0.005)  # the removal is on its way
    late = world.send_to_group("bob/d1", [Item("text/plain", b"wait")])
    world.send_to_group("ann/d1", [Item("text/plain", b"bob is gone")])
    assert world.settle_down()
    for label in ("bob/d1", "bob/d2"):
        batches = [b for b in world.device(label).app.batches if b[0].conversation == group]
        assert [[m.body for m in b] for b in batches[1:]] == [[b"sorry bob", operations.group_remove(["bob"]).body]]
    assert world.device("bob/d1").app.rejected[late].status == ErrorCode.NOT_A_MEMBER
    assert group_bodies(world, "ann/d1", group)[-1] == b"bob is gone"
    assert world.violations() == []


@pytest.mark.xfail(strict=True, reason="the store keeps one readable span per group member: a readmission hides the earlier one")
def test_readmitted_member_keeps_its_earlier_membership() -> None:
    """
    Found by the group storms: bob is added (seq 2), removed (3) and added again (4) before his
    device has synced the group.  He may read 2-3 (he was a member then) and 4 on, but the
    store's ``visible`` / ``visibility`` answer only (3, 4): ``_apply`` drops the former-member
    record when he joins again, so his device is told 1-3 are unavailable and never gets his own
    first add and removal.  A device that was online throughout got them; one that was not can
    never get them.
    """
    world = World({"ann": 1, "bob": 1})
    world.connect("ann/d1")
    world.run_for(1.0)
    world.create_group("ann/d1", "the group", ())
    world.run_for(1.0)
    world.send_to_group("ann/d1", [operations.group_add(["bob"])])
    world.send_to_group("ann/d1", [operations.group_remove(["bob"])])
    world.send_to_group("ann/d1", [operations.group_add(["bob"])])
    world.run_for(1.0)
    world.connect("bob/d1")
    assert world.settle_down()
    assert [m.seq for m in world.device("bob/d1").app.messages()] == [2, 3, 4]


def test_refused_send_is_never_stored_by_its_resend() -> None:
    """
    Found by the group storms (there with a duplicated frame; here on a plain slow link, 1.5 s
    each way, as TCP would carry it): bob, who has left the group, sends to it.  The server
    refuses it (NOT_A_MEMBER), but the refusal takes 1.5 s to reach him, so his client resends
    it after 2 s; meanwhile ann has added him back, and the resend is stored and pushed to
    everybody.  Bob's application was told the send was refused; his client drops the ack of the
    resend, and his own message never reaches his device until something after it makes a gap.
    The hub now remembers its refusals, so the resend gets the same answer.
    """
    world = World({"ann": 1, "bob": 1}, latency={"bob/d1": 1.5})
    world.connect_all()
    world.run_for(5.0)
    world.create_group("ann/d1", "the group", ("bob",))
    world.run_for(5.0)
    world.send_to_group("bob/d1", [operations.group_leave()])
    world.run_for(5.0)
    refused = world.send_to_group("bob/d1", [Item("text/plain", b"one more thing")])
    world.run_for(2.5)  # the send was refused at +1.5 s; the refusal is still on its way
    world.send_to_group("ann/d1", [operations.group_add(["bob"])])
    world.run_for(60.0)
    (group,) = world.device("ann/d1").groups
    assert world.device("bob/d1").app.rejected[refused].status == ErrorCode.NOT_A_MEMBER
    assert [m.body for m in world.stored()[group] if m.client_msg_id == refused] == []


def test_farewell_is_stored_whole_and_the_removal_holds() -> None:
    """
    The seed design's corner case, under ``contacts_only``: ann's [goodbye, contact.remove]
    is stored as one bundle, the goodbye first, and reaches both users' devices whole, even when
    its first transmission and its ack are lost; bob's reply, judged after it, is refused with
    NOT_ALLOWED and stored nowhere.
    """
    faults = FaultPlan(rules=[first_of(schema.BUNDLE, "ann/d1", UP), first_of(schema.SEND_ACK, "ann/d1", DOWN)])
    world = World({"ann": 1, "bob": 2}, faults=faults, policy=Policy(contacts_only=True))
    world.preload("ann/setup", ANN_BOB, [operations.contact_add()])
    world.preload("bob/setup", ANN_BOB, [operations.contact_add()])
    world.connect_all()
    world.run_for(1.0)
    world.submit("ann/d1", schema.TARGET_USER, "bob", [Item("text/plain", b"goodbye"), operations.contact_remove()])
    world.run_for(10.0)
    reply = world.send("bob/d2", "ann", b"why?")
    assert world.settle_down()
    assert [(m.seq, m.content_type) for m in world.stored()[ANN_BOB]] == [
        (1, schema.CONTACT_ADD), (2, schema.CONTACT_ADD), (3, "text/plain"), (4, schema.CONTACT_REMOVE)
    ]
    for label in ("ann/d1", "bob/d1", "bob/d2"):
        assert [[m.seq for m in b] for b in world.device(label).app.batches][-1] == [3, 4]
    assert world.device("bob/d2").app.rejected[reply].status == ErrorCode.NOT_ALLOWED
    assert world.violations() == []
