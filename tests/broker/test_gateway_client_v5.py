"""The gateway's own MQTT client speaks 5.0 where the broker does (``[broker] protocol``):
against the embedded broker it connects as 5.0 and keeps its session across reconnects
(a Session Expiry Interval that never ends, as CleanSession=0); with ``auto`` against a
broker that refuses 5.0 it falls back to 3.1.1."""

from __future__ import annotations

import asyncio

import aiomqtt

from gateway.mqtt import ConnectionSettings, GatewayClient
from tests.broker.helpers import PUBACK, RawClient, start_broker, until
from tests.support import free_port

GW_ID = "homepot-gateway-site-t"


def _settings(b, port: int, protocol: str) -> ConnectionSettings:  # noqa: ANN001
    """The gateway's client id is reserved for the gateway's account."""
    return ConnectionSettings(url=f"mqtt://127.0.0.1:{port}", client_id=GW_ID, protocol=protocol,
                              username=b.internal.username, password=b.internal.password)


async def _running(client: GatewayClient) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(client.run(stop))
    await until(lambda: client.connected, timeout=10)
    return stop, task


async def _stop(stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_the_gateway_client_speaks_5_and_keeps_its_session(tmp_path):
    b = await start_broker(tmp_path)
    try:
        got: list[bytes] = []

        async def handler(message: aiomqtt.Message) -> None:
            got.append(bytes(message.payload))

        for protocol in ("5", "auto"):
            client = GatewayClient(_settings(b, b.port, protocol))
            client.route("jobs/#", handler, qos=1)
            stop, task = await _running(client)
            session = b.broker._clients[GW_ID]  # noqa: SLF001 - the broker's view of the connection
            assert session.handler is not None and session.handler.version == 5
            assert session.expiry_s is None and not session.clean   # never expires
            await _stop(stop, task)
            # Offline: what is published now waits in the gateway's session.
            pub = RawClient(b.port)
            await pub.connect(f"pub-{protocol}")
            pub.publish("jobs/1", protocol.encode(), 1)
            await pub.expect(PUBACK)
            pub.disconnect()
            stop, task = await _running(client)
            await until(lambda: got and got[-1] == protocol.encode())
            await _stop(stop, task)
        assert got == [b"5", b"auto"]
    finally:
        await b.stop()


async def _refuse_v5_proxy(target: int) -> tuple[asyncio.base_events.Server, int, list[int]]:
    """A broker that speaks only 3.1.1, as amqtt 0.12.1 did: a level-5 CONNECT is answered with
    the 3.1.1 CONNACK 0x01 (unacceptable protocol version) and closed; anything else is
    passed to the embedded broker. Records the protocol level of every CONNECT."""
    levels: list[int] = []
    port = free_port()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readexactly(2)
        length, shift, data = head[1] & 0x7F, 7, head
        more = head[1] & 0x80
        while more:
            byte = await reader.readexactly(1)
            data += byte
            length |= (byte[0] & 0x7F) << shift
            shift += 7
            more = byte[0] & 0x80
        body = await reader.readexactly(length)
        level = body[6]
        levels.append(level)
        if level == 5:
            writer.write(b"\x20\x02\x00\x01")
            await writer.drain()
            writer.close()
            return
        up_r, up_w = await asyncio.open_connection("127.0.0.1", target)
        up_w.write(data + body)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while chunk := await src.read(65536):
                    dst.write(chunk)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    server = await asyncio.start_server(serve, "127.0.0.1", port)
    return server, port, levels


async def test_auto_falls_back_to_311_when_the_broker_refuses_5(tmp_path):
    b = await start_broker(tmp_path)
    server, port, levels = await _refuse_v5_proxy(b.port)
    try:
        client = GatewayClient(_settings(b, port, "auto"))
        stop, task = await _running(client)
        assert levels == [5, 4]
        assert client.protocol_version == aiomqtt.ProtocolVersion.V311
        assert b.broker._clients[GW_ID].handler.version == 4  # noqa: SLF001
        await _stop(stop, task)
        # "5" does not fall back: the refusal is the error
        strict = GatewayClient(_settings(b, port, "5"))
        stop = asyncio.Event()
        task = asyncio.create_task(strict.run(stop))
        await until(lambda: strict.connect_failures >= 1, timeout=10)
        assert not strict.connected
        await _stop(stop, task)
    finally:
        server.close()
        await b.stop()


