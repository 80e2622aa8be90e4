"""Hypothesis over the MQTT 5.0 decoder: bad variable byte integers, duplicate and unknown
properties, bad UTF-8, truncated packets. The decoders raise only their own errors (which
the connection answers with DISCONNECT and a reason code), and against a running broker
every input is answered or the connection closed; never a crash, never a stall, and the
broker serves the next client."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.broker.wire import properties as P
from gateway.broker.wire.codec import PUBLISH, Body, Malformed
from gateway.broker.wire.handle_connect import Refused, decode
from tests.broker.helpers import _rl, _s, start_broker
from tests.helpers.fuzz import examples

# ------------------------------------------------------------------ building blocks
bad_utf8 = st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"a\x00b", b"\xf4\x90\x80\x80"])
text = st.one_of(st.text(max_size=8).map(lambda s: s.encode()), bad_utf8)


def _str(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "big") + raw


@st.composite
def varints(draw: st.DrawFn) -> bytes:
    """Well-formed, over-long (5 bytes) and unterminated variable byte integers."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return _rl(draw(st.integers(0, 268_435_455)))
    if kind == 1:
        return b"\xff\xff\xff\xff\x7f"
    return b"\x80" * draw(st.integers(1, 4))


# Built once: a strategy made inside a composite is built again at every draw.
_idents = st.one_of(st.sampled_from(sorted(P.KINDS)), st.integers(0, 0x7F))
_bytes, _u16, _u32 = st.integers(0, 255), st.integers(0, 65535), st.integers(0, 2 ** 32 - 1)


@st.composite
def a_property(draw: st.DrawFn) -> bytes:
    ident = draw(_idents)
    kind = P.KINDS.get(ident)
    if kind is P.Kind.BYTE or kind is None:
        value = bytes([draw(_bytes)])
    elif kind is P.Kind.U16:
        value = draw(_u16).to_bytes(2, "big")
    elif kind is P.Kind.U32:
        value = draw(_u32).to_bytes(4, "big")
    elif kind is P.Kind.VARINT:
        value = draw(varints())
    elif kind is P.Kind.PAIR:
        value = _str(draw(text)) + _str(draw(text))
    else:
        value = _str(draw(text))
    return _rl(ident) + value


_property_lists = st.lists(a_property(), max_size=5)
_length_errors = st.sampled_from([0, 0, 0, -1, 1, 7])


@st.composite
def property_blocks(draw: st.DrawFn) -> bytes:
    props = draw(_property_lists)
    if props and draw(st.booleans()):
        props.append(props[0])   # a duplicate
    raw = b"".join(props)
    length = len(raw) + draw(_length_errors)
    return _rl(max(length, 0)) + raw


@st.composite
def v5_packets(draw: st.DrawFn) -> bytes:
    """A client packet of a random type whose body is built from the pieces above, perhaps truncated."""
    kind = draw(st.sampled_from(["publish", "subscribe", "unsubscribe", "ack", "disconnect", "raw"]))
    if kind == "publish":
        qos = draw(st.integers(0, 3))
        first = 0x30 | (qos << 1) | draw(st.integers(0, 1))
        body = _str(draw(text)) + (draw(st.binary(min_size=2, max_size=2)) if qos else b"")
        body += draw(property_blocks()) + draw(st.binary(max_size=8))
    elif kind == "subscribe":
        first = 0x82
        body = b"\x00\x07" + draw(property_blocks()) + b"".join(
            _str(draw(text)) + bytes([draw(st.integers(0, 255))]) for _ in range(draw(st.integers(0, 3))))
    elif kind == "unsubscribe":
        first = 0xA2
        body = b"\x00\x08" + draw(property_blocks()) + b"".join(_str(draw(text)) for _ in range(draw(st.integers(0, 2))))
    elif kind == "ack":
        first = draw(st.sampled_from([0x40, 0x50, 0x62, 0x70]))
        body = draw(st.binary(min_size=2, max_size=2)) + bytes([draw(st.integers(0, 255))]) + draw(property_blocks())
    elif kind == "disconnect":
        first = 0xE0
        body = bytes([draw(st.integers(0, 255))]) + draw(property_blocks())
    else:
        first = draw(st.integers(0, 255))
        body = draw(st.binary(max_size=16))
    cut = draw(st.integers(0, len(body)))
    truncated = draw(st.booleans())
    sent = body[:cut] if truncated else body
    header_len = draw(st.one_of(st.just(_rl(len(body))), varints())) if draw(st.integers(0, 4)) == 0 else _rl(len(body))
    return bytes([first]) + header_len + sent


# ------------------------------------------------------------------ the decoders alone
@settings(max_examples=examples(400), suppress_health_check=[HealthCheck.too_slow])
@given(block=property_blocks(), packet_type=st.sampled_from(sorted(P.ALLOWED)))
def test_property_decoder_raises_only_malformed(block: bytes, packet_type: int) -> None:
    body = Body(block + b"tail")
    try:
        props = P.decode(body, packet_type)
    except Malformed as exc:
        assert int(exc.reason) in (0x81, 0x82)
        return
    assert body.pos <= body.end
    assert all(ident in P.ALLOWED[packet_type] for ident in props)
    # what was decoded encodes again (and decodes to the same)
    again = Body(P.block(props))
    assert P.decode(again, packet_type) == props


@settings(max_examples=examples(600), suppress_health_check=[HealthCheck.too_slow])
@given(block=property_blocks(), tail=st.binary(max_size=6))
def test_the_publish_property_decoder_agrees_with_the_generic_one(block: bytes, tail: bytes) -> None:
    """The PUBLISH entry of the one property decoder (P.decode_publish, on the hot path) accepts
    and refuses what P.decode does, with the same reason code, and forwards exactly the
    pass-through properties [MQTT-3.3.2-4/15/16/17/20]."""
    data = block + tail
    expected: P.Properties | int
    try:
        cursor = Body(data)
        expected = P.decode(cursor, PUBLISH)
        expected_end = cursor.pos
    except Malformed as exc:
        expected = int(exc.reason)
    try:
        props, forwarded, end = P.decode_publish(data, 0)
    except Malformed as exc:
        assert expected == int(exc.reason)
        return
    assert props == expected and end == expected_end
    passed = {k: v for k, v in props.items() if k in P.PASSED_THROUGH}
    assert P.decode(Body(_rl(len(forwarded)) + forwarded), PUBLISH) == passed


@settings(max_examples=examples(400), suppress_health_check=[HealthCheck.too_slow])
@given(flags=st.integers(0, 255), keepalive=st.integers(0, 65535), props=property_blocks(),
       client_id=text, rest=st.binary(max_size=24), level=st.sampled_from([3, 4, 5, 5, 5, 6]),
       cut=st.integers(0, 64))
def test_connect_decoder_raises_only_its_errors(flags: int, keepalive: int, props: bytes, client_id: bytes,
                                                rest: bytes, level: int, cut: int) -> None:
    data = _s("MQTT") + bytes([level, flags]) + keepalive.to_bytes(2, "big") + (props if level == 5 else b"")
    data += _str(client_id) + rest
    for candidate in (data, data[:cut]):
        try:
            packet = decode(candidate)
        except (Malformed, Refused):
            continue
        assert packet.version in (4, 5) and "\0" not in packet.client_id


# ------------------------------------------------------------------ against a running broker
@pytest.fixture(scope="module")
def live_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A broker on its own loop in a thread, so hypothesis drives it with blocking sockets."""
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, object] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        # The clients ask for no keepalive, so a packet left incomplete is closed after
        # packet_timeout_s: a truncated input costs a fraction of a second, not 1.5 s.
        holder["broker"] = loop.run_until_complete(start_broker(tmp, options={"packet_timeout_s": 0.25}))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30)
    broker = holder["broker"]
    yield broker.port  # type: ignore[attr-defined]
    asyncio.run_coroutine_threadsafe(broker.stop(), loop).result(10)  # type: ignore[attr-defined]
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _connect5(port: int, client_id: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    var = _s("MQTT") + bytes([5, 0x02]) + (0).to_bytes(2, "big") + b"\x00"   # no keepalive
    payload = _s(client_id)
    s.sendall(b"\x10" + _rl(len(var) + len(payload)) + var + payload)
    head = s.recv(2)
    assert head[:1] == b"\x20", head
    remaining = head[1]
    while remaining:
        remaining -= len(s.recv(remaining))
    return s


def _answered_or_closed(s: socket.socket, deadline_s: float) -> str:
    """After the input, PINGREQs, one every half second: "answered" when a PINGRESP arrives,
    "closed" when the broker ends the connection; anything else (silence past the deadline)
    is a failure. One PINGREQ is not enough: after a packet cut short, its two bytes may be
    read as that packet's missing tail (``@\\x04\\x00\\x00`` + PINGREQ is a whole PUBACK), and
    only the next one is a PINGREQ to the broker."""
    end = time.monotonic() + deadline_s
    data = b""
    next_ping = 0.0
    while time.monotonic() < end:
        if time.monotonic() >= next_ping:
            try:
                s.sendall(b"\xc0\x00")
            except OSError:
                return "closed"
            next_ping = time.monotonic() + 0.5
        s.settimeout(max(0.01, min(end, next_ping) - time.monotonic()))
        try:
            chunk = s.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            return "closed"
        if not chunk:
            return "closed"
        data += chunk
        if b"\xd0\x00" in data:
            return "answered"
    return "silent"


@pytest.mark.slow
@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(packet=v5_packets())
@example(packet=b"@\x04\x00\x00")  # a PUBACK two bytes short: the first PINGREQ completes it
def test_every_input_is_answered_or_the_connection_closed(live_broker: int, packet: bytes) -> None:
    s = _connect5(live_broker, "fuzz")
    try:
        s.sendall(packet)
        # a truncated packet is closed by the packet time limit (packet_timeout_s)
        assert _answered_or_closed(s, 5.0) in ("answered", "closed")
    finally:
        s.close()
    probe = _connect5(live_broker, "probe")
    try:
        assert _answered_or_closed(probe, 5.0) == "answered"
    finally:
        probe.close()


def test_a_property_identifier_in_a_longer_varint_is_refused() -> None:
    """Identifiers are Variable Byte Integers in their minimum number of bytes [MQTT-1.5.5-1]:
    0x91 0x00 (Session Expiry Interval written in two bytes) is malformed, in every packet type.
    (The decoder for packets other than PUBLISH used to accept it; the PUBLISH one refused it.)"""
    for packet_type, block in ((P.CONNECT, b"\x06\x91\x00\x00\x00\x00\x3c"), (PUBLISH, b"\x03\x81\x00\x01")):
        with pytest.raises(Malformed) as exc:
            P.decode(Body(block), packet_type)
        assert int(exc.value.reason) == 0x81
    assert P.decode(Body(b"\x05\x11\x00\x00\x00\x3c"), P.CONNECT) == {0x11: 60}
