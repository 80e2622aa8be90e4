"""A minimal MQTT 3.1.1 QoS 1 publisher for benchmarks: pre-encoded PUBLISH packets,
a window of unacknowledged ones, PUBACKs counted as they come (no library in the way,
so the figure is the gateway's, not a client's)."""

from __future__ import annotations

import asyncio
import struct
import time

from gateway.broker.wire.codec import send_publish as encode_publish, utf8 as encode_topic, varint as remaining_length


def connect_packet(client_id: str) -> bytes:
    """CONNECT, MQTT 3.1.1, CleanSession=1, keepalive 60 s, no credentials."""
    body = encode_topic("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 60) + encode_topic(client_id)
    return bytes([0x10]) + remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes, packet_id: int, retain: bool = False) -> bytes:
    return encode_publish(encode_topic(topic), payload, 1, retain, packet_id=packet_id)


async def publish_all(port: int, messages: list[tuple[str, bytes]], client_id: str, window: int = 500,
                      retain: bool = False) -> float:
    """Publish every (topic, payload) at QoS 1 keeping at most ``window`` unacknowledged;
    returns the time.perf_counter() at which the last PUBACK arrived."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(connect_packet(client_id))
    connack = await reader.readexactly(4)
    if connack[0] != 0x20 or connack[3] != 0:
        raise RuntimeError(f"CONNACK refused: {connack!r}")
    free = asyncio.Semaphore(window)
    outstanding: set[int] = set()
    total = len(messages)
    done = asyncio.get_running_loop().create_future()
    acked = 0

    async def read() -> None:
        nonlocal acked
        while acked < total:
            head = await reader.readexactly(2)
            rest = await reader.readexactly(head[1])  # PUBACK: remaining length 2
            if head[0] >> 4 != 4:
                continue
            pid = struct.unpack("!H", rest[:2])[0]
            if pid in outstanding:
                outstanding.discard(pid)
                acked += 1
                free.release()
        done.set_result(time.perf_counter())

    reader_task = asyncio.create_task(read())
    for n, (topic, payload) in enumerate(messages):
        pid = n % 65535 + 1
        await free.acquire()
        outstanding.add(pid)
        writer.write(publish_packet(topic, payload, pid, retain))
        if n % 64 == 63:
            await writer.drain()
    await writer.drain()
    last = await asyncio.wait_for(done, 600)
    reader_task.cancel()
    writer.write(bytes([0xE0, 0]))
    writer.close()
    return last
