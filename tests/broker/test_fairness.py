"""One client's traffic must not hold the broker from the others (bench/hostile_bench.py measures
the throughput; these tests pin the two mechanisms, counted in packets and loop turns rather than
time, so they hold on a loaded machine)."""

from __future__ import annotations

import asyncio
from pathlib import Path

FAIR_SHARE = 64
from gateway.broker.clients import MAX_INFLIGHT
from tests.broker.helpers import PUBACK, RawClient, start_broker, until

FLOOD = 60_000


async def test_a_flooding_client_leaves_the_loop_to_the_others(tmp_path: Path):
    """A client that keeps its socket full of denied PUBLISHes is read FAIR_SHARE packets at a
    time: another client's QoS 1 round trip waits for a few hundred of them, not for the
    thousands one read of the flooder's socket holds (which cut a legitimate publisher to
    0.08x of its rate)."""
    b = await start_broker(tmp_path)
    try:
        flooder, other = RawClient(b.port), RawClient(b.port)
        assert await flooder.connect("flooder") == (False, 0)
        assert await other.connect("other") == (False, 0)
        packet = b"\x30\x4c\x00\x0a$SYS/flood" + b"x" * 64   # QoS 0, denied for everyone
        assert flooder.writer is not None
        flooder.writer.write(packet * FLOOD)
        await until(lambda: b.metrics()["denied_publish"] > 0)
        per_round_trip = []
        while True:
            before = b.metrics()["denied_publish"]
            pid = other.publish("t/fair", b"x", qos=1)
            ack = await other.expect(PUBACK, timeout=30)
            assert ack.packet_id == pid
            after = b.metrics()["denied_publish"]
            if after >= FLOOD:
                break   # the flood was over during this round trip
            per_round_trip.append(after - before)
        assert len(per_round_trip) >= 5, per_round_trip
        # One round trip of this test's client (in the same event loop, wait_for per read) takes
        # about a dozen loop turns: ~13 x FAIR_SHARE denied packets. Read whole, the flooder's
        # socket took ~30,000 per round trip.
        average = sum(per_round_trip) / len(per_round_trip)
        assert average <= 40 * FAIR_SHARE, per_round_trip
        await until(lambda: b.metrics()["denied_publish"] == FLOOD, timeout=30)
    finally:
        await b.stop()


async def lurker_beside_publisher(b) -> tuple[RawClient, RawClient, object]:  # noqa: ANN001 - a started broker
    """A subscriber "lurker" to ``t/lurk`` at QoS 1 that reads nothing, a publisher beside it,
    and the broker's own view of the lurker's session."""
    lurker, pub = RawClient(b.port), RawClient(b.port)
    assert await lurker.connect("lurker") == (False, 0)
    assert await lurker.subscribe(("t/lurk", 1)) == [1]
    assert await pub.connect("pub") == (False, 0)
    return lurker, pub, b.broker._clients["lurker"]  # noqa: SLF001 - the broker's view of the session


async def test_a_subscriber_that_never_reads_does_not_slow_publishers(tmp_path: Path):
    """A subscriber with a full window of unacknowledged messages (it reads nothing) cannot take
    more: publishers must not yield to it after every message (its queue drops its oldest
    instead). A subscriber whose sender can move messages still gets the yield."""
    b = await start_broker(tmp_path, broker={"max_queued_messages": 50})
    try:
        lurker, pub, cs = await lurker_beside_publisher(b)
        for _ in range(400):
            pub.publish("t/lurk", b"y" * 32, qos=1)
        await until(lambda: b.metrics()["dropped"] > 0, timeout=15)
        assert len(cs.inflight) + len(cs.pending) > 0
        assert 2 * len(cs.pending) >= 50   # half full and more: the old rule said "backlogged"
        assert not cs.backlogged
    finally:
        await b.stop()


async def test_a_subscriber_waiting_for_acknowledgements_is_not_woken_per_message(tmp_path: Path):
    """A subscriber that acknowledges nothing has a full window: each message routed to it woke
    its sender, only for the sender to find the window still full (a task step per message,
    for nothing). Now only an acknowledgement wakes it, and then it moves the next message."""
    b = await start_broker(tmp_path, broker={"max_queued_messages": 50})
    try:
        lurker, pub, cs = await lurker_beside_publisher(b)
        for _ in range(MAX_INFLIGHT):
            pub.publish("t/lurk", b"y" * 32, qos=1)
        await until(lambda: len(cs.inflight) == MAX_INFLIGHT, timeout=15)
        wake = cs._wake  # noqa: SLF001 - the sender clears it each time it wakes up to look
        woken = []
        real_clear = wake.clear
        wake.clear = lambda: (woken.append(1), real_clear())  # type: ignore[method-assign]
        for _ in range(30):   # in 30 separate reads: the old sender woke at each
            for _ in range(10):
                pub.publish("t/lurk", b"y" * 32, qos=1)
            await asyncio.sleep(0.01)
        await until(lambda: b.metrics()["dropped"] >= 250, timeout=15)
        assert len(woken) <= 1    # once, to find its window full; then not again
        assert len(cs.pending) == 50
        before = len(woken)
        lurker.ack(PUBACK, next(iter(cs.inflight)))
        await until(lambda: len(cs.pending) == 49 and len(cs.inflight) == MAX_INFLIGHT, timeout=5)
        assert len(woken) == before + 1   # the acknowledgement woke it, and it sent the next one
    finally:
        await b.stop()
