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

Dropping a frame inside one connection is something TCP never does; it can leave a session
waiting for an answer that will not come (a dropped Login, say).  That is allowed: the sessions'
timeouts must end such a connection and the client must reconnect.

The number of generated storms scales with ``IMKIT_SIM_EXAMPLES`` (total over the three property
tests; default 5000, about 45 s).  Runs are derandomized, so CI sees the same storms every time; set
``IMKIT_SIM_EXPLORE=1`` to draw new ones instead.

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

from imkit.model import direct_conversation
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
    first_of,
)

TOTAL_EXAMPLES = int(os.environ.get("IMKIT_SIM_EXAMPLES", "5000"))
EXPLORE = os.environ.get("IMKIT_SIM_EXPLORE", "") not in ("", "0")


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
    At ``at`` seconds, device number ``device`` sends to user ``target``, ``repeat`` times in a row,
    ``items`` messages each time (2-3: an atomic bundle).
    """

    at: float
    device: int
    target: int
    items: int
    via_conversation: bool
    repeat: int = 1


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


times = st.integers(0, int(STORM * 4) - 1).map(lambda quarter: quarter / 4)
moments = st.tuples(times, st.sampled_from((0.0, 0.005, 0.015, 0.025))).map(sum)
"""Cuts and restarts also fall between a send and its ack (one-way latency is 0.01 s)."""
ops = st.builds(
    Op,
    at=times,
    device=st.integers(0, 7),
    target=st.integers(0, 3),
    items=st.sampled_from((1, 1, 1, 2, 3)),
    via_conversation=st.booleans(),
    repeat=st.sampled_from((1, 1, 2, 3)),
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


@st.composite
def storms(draw, frame_level: bool = True, connection_level: bool = True) -> Storm:
    devices = tuple(draw(st.lists(st.integers(1, 2), min_size=2, max_size=4)))
    count = sum(devices)
    joins = tuple(draw(st.lists(st.sampled_from((0.0, 0.0, 0.0, 10.0, 30.0)), min_size=count, max_size=count)))
    storm = Storm(
        devices=devices,
        joins=joins,
        ops=tuple(draw(st.lists(ops, min_size=1, max_size=12))),
        max_unacked=draw(st.sampled_from((10_000, 10_000, 2))),
        sync_page=draw(st.sampled_from((500, 500, 2))),
        max_frame=draw(st.sampled_from((schema.DEFAULT_MAX_FRAME, 4096))),
        slow=tuple(draw(st.lists(st.integers(0, 7), max_size=2))),
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
        ClientSettings(send_timeout=None, sync_page=storm.sync_page),
        faults=faults,
        latency={labels[device % len(labels)]: 4 * LATENCY for device in storm.slow},
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
            if op.items == 1:
                action = partial(world.send, label, target, bodies[0], op.via_conversation)
            else:
                action = partial(world.send_bundle, label, target, bodies, op.via_conversation)
            world.at(start + op.at, "send", action)
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


@simulation_settings(0.4)
@given(storms())
def test_any_storm(storm: Storm) -> None:
    """Frame faults, cuts and restarts together: nothing acknowledged is lost, nothing doubled."""
    check(simulate(storm))


@simulation_settings(0.3)
@given(storms(connection_level=False))
def test_lossy_links(storm: Storm) -> None:
    """Per-frame drops, duplicates and reordering alone, on links that are never cut."""
    check(simulate(storm))


@simulation_settings(0.3)
@given(storms(frame_level=False))
def test_cuts_and_restarts(storm: Storm) -> None:
    """Connection resets, silent cuts, server restarts and application restarts alone, on links that lose no frame."""
    check(simulate(storm))


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
