"""A small TLS HTTP server for the strict platform fakes: HTTP/2 (h2) and HTTP/1.1 (h11).

The platform fakes need exact control over what is accepted: APNs must refuse anything
that is not HTTP/2, WNS is HTTP/1.1 with a mandatory Content-Length. A general framework
would hide both, so this drives h2 and h11 (already installed with httpx) directly on an
asyncio TLS server. Handlers see a :class:`Request` and return a :class:`Response`.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h11
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack.hpack
import hpack.huffman_table
from hpack import HeaderTuple, NeverIndexedHeaderTuple


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names; last value wins
    body: bytes
    http_version: str  # "2" or "1.1"
    chunked: bool = False  # HTTP/1.1 body without Content-Length
    has_content_length: bool = False

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]


# Clients send their credential (the APNs provider JWT, the FCM bearer token) on every
# request as a never-indexed, Huffman-coded literal (h2, nghttp2 and libcurl all do, as RFC
# 7541 §7.1.3 advises), and hpack decodes Huffman in pure Python: the same ~200 bytes decoded
# again per request were 14 % of the fake's CPU. Decoding is a pure function of the bytes,
# so the fakes' process memoises it (hpack.hpack looks the function up as a module global;
# hpack is pinned exactly in pyproject.toml for that reason). What is decoded is unchanged.
_decode_huffman_cached = functools.lru_cache(maxsize=1024)(hpack.huffman_table.decode_huffman)


def _decode_huffman(data: bytes | memoryview) -> bytes:
    return _decode_huffman_cached(bytes(data))


hpack.hpack.decode_huffman = _decode_huffman  # type: ignore[attr-defined]

# Response headers whose values repeat, so HPACK may add them to its dynamic table. Every
# other response header (apns-id is a new UUID per answer, retry-after varies) is sent as a
# literal that is never indexed: indexing them filled the encoder's dynamic table (up to the
# client's SETTINGS_HEADER_TABLE_SIZE, 64 KiB for libcurl) with entries no answer reuses, and
# hpack searches that table linearly for every header it encodes, which made the search a
# quarter of the fake's CPU per request. Only the encoding changes; a client decodes the same.
INDEXED_RESPONSE_HEADERS = frozenset({"content-type", "content-length"})


class TlsHttpServer:
    """Serve ``handler`` over TLS on loopback; ``alpn`` picks the protocols offered."""

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext, *,
                 protocols: tuple[str, ...] = ("h2", "http/1.1"), host: str = "127.0.0.1",
                 port: int = 0, max_concurrent_streams: int = 1000):
        self.handler = handler
        self.protocols = protocols
        ssl_context.set_alpn_protocols(list(protocols))
        self.ssl_context = ssl_context
        self.host = host
        self.port = port
        self.max_concurrent_streams = max_concurrent_streams
        self.server: asyncio.base_events.Server | None = None
        self.connections = 0
        self.rejected_protocol = 0  # connections refused for speaking the wrong protocol
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> "TlsHttpServer":
        self.server = await asyncio.start_server(self._serve, self.host, self.port,
                                                 ssl=self.ssl_context, backlog=512)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def origin(self) -> str:
        return f"https://{self.host}:{self.port}"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            try:
                await asyncio.wait_for(self.server.wait_closed(), 2)
            except asyncio.TimeoutError:
                pass
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            ssl_obj = writer.get_extra_info("ssl_object")
            alpn = ssl_obj.selected_alpn_protocol() if ssl_obj is not None else None
            if alpn == "h2":
                await self._serve_h2(reader, writer)
            elif "http/1.1" in self.protocols and alpn in ("http/1.1", None):
                await self._serve_h1(reader, writer)
            else:
                self.rejected_protocol += 1  # e.g. an HTTP/1.1 client at an h2-only service
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, h2.exceptions.ProtocolError,
                h11.RemoteProtocolError, asyncio.CancelledError):
            pass  # a client that hung up, or the fake stopping: nothing to report
        finally:
            self._tasks.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, ssl.SSLError, OSError):
                pass

    # ------------------------------------------------------------------ HTTP/2
    async def _serve_h2(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_concurrent_streams})
        writer.write(conn.data_to_send())
        streams: dict[int, tuple[list[tuple[str, str]], bytearray]] = {}
        window_open = asyncio.Event()
        lock = asyncio.Lock()
        pending: set[asyncio.Task[None]] = set()

        async def flush() -> None:
            data = conn.data_to_send()
            if data:
                writer.write(data)
                await writer.drain()

        # Answers that fit the flow-control window are written once per event-loop pass,
        # together: many streams finish in the same pass, and one TLS record and one send()
        # for all of them costs a fraction of one each. Back-pressure still holds: the read
        # loop drains the writer before it reads the next requests.
        write_pending = False

        def write_soon() -> None:
            nonlocal write_pending
            if not write_pending:
                write_pending = True
                asyncio.get_running_loop().call_soon(write_now)

        def write_now() -> None:
            nonlocal write_pending
            write_pending = False
            data = conn.data_to_send()
            if data and not writer.is_closing():
                writer.write(data)

        async def respond(stream_id: int, headers: list[tuple[str, str]], body: bytes) -> None:
            h = dict(headers)
            req = Request(method=h.get(":method", ""), path=h.get(":path", ""),
                          headers={k.lower(): v for k, v in headers if not k.startswith(":")},
                          body=bytes(body), http_version="2")
            try:
                resp = await self.handler(req)
            except Exception as exc:  # a bug in a fake must be visible, not a hang
                resp = Response(500, f"fake handler error: {exc!r}".encode())
            out_headers = [HeaderTuple(":status", str(resp.status))]
            for k, v in resp.headers.items():
                k = k.lower()
                out_headers.append(HeaderTuple(k, v) if k in INDEXED_RESPONSE_HEADERS else
                                   NeverIndexedHeaderTuple(k, v))
            out_headers.append(HeaderTuple("content-length", str(len(resp.body))))
            async with lock:
                try:
                    conn.send_headers(stream_id, out_headers, end_stream=not resp.body)
                    data = memoryview(resp.body)
                    while data:
                        window = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
                        if window <= 0:
                            await flush()
                            window_open.clear()
                            lock.release()
                            try:
                                await window_open.wait()
                            finally:
                                await lock.acquire()
                            continue
                        chunk, data = data[:window], data[window:]
                        conn.send_data(stream_id, bytes(chunk), end_stream=not data)
                    write_soon()
                except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, ConnectionError):
                    pass

        while True:
            data = await reader.read(65536)
            if not data:
                break
            async with lock:
                events = conn.receive_data(data)
            for event in events:
                if isinstance(event, h2.events.RequestReceived):
                    streams[event.stream_id] = (list(event.headers), bytearray())
                    if event.stream_ended:
                        hs, body = streams.pop(event.stream_id)
                        t = asyncio.create_task(respond(event.stream_id, hs, body))
                        pending.add(t)
                        t.add_done_callback(pending.discard)
                elif isinstance(event, h2.events.DataReceived):
                    async with lock:
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    if event.stream_id in streams:
                        streams[event.stream_id][1].extend(event.data)
                    if event.stream_ended and event.stream_id in streams:
                        hs, body = streams.pop(event.stream_id)
                        t = asyncio.create_task(respond(event.stream_id, hs, body))
                        pending.add(t)
                        t.add_done_callback(pending.discard)
                elif isinstance(event, h2.events.StreamEnded):
                    if event.stream_id in streams:
                        hs, body = streams.pop(event.stream_id)
                        t = asyncio.create_task(respond(event.stream_id, hs, body))
                        pending.add(t)
                        t.add_done_callback(pending.discard)
                elif isinstance(event, h2.events.StreamReset):
                    streams.pop(event.stream_id, None)
                elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                    window_open.set()
                elif isinstance(event, h2.events.ConnectionTerminated):
                    async with lock:
                        await flush()
                    return
            async with lock:
                await flush()
        for t in list(pending):
            t.cancel()

    # ------------------------------------------------------------------ HTTP/1.1
    async def _serve_h1(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        while True:
            head: h11.Request | None = None
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    if not data and conn.their_state is h11.CLOSED:
                        return
                    continue
                if isinstance(event, h11.ConnectionClosed):
                    return
                if isinstance(event, h11.Request):
                    head = event
                elif isinstance(event, h11.Data):
                    body.extend(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert head is not None
            headers = {k.decode().lower(): v.decode() for k, v in head.headers}
            req = Request(method=head.method.decode(), path=head.target.decode(), headers=headers,
                          body=bytes(body), http_version="1.1",
                          chunked="chunked" in headers.get("transfer-encoding", ""),
                          has_content_length="content-length" in headers)
            try:
                resp = await self.handler(req)
            except Exception as exc:
                resp = Response(500, f"fake handler error: {exc!r}".encode())
            out = [(k, v) for k, v in resp.headers.items()] + [("content-length", str(len(resp.body)))]
            writer.write(conn.send(h11.Response(status_code=resp.status, headers=out)))
            if resp.body:
                writer.write(conn.send(h11.Data(data=resp.body)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()


class FakeService:
    """Base of the platform fakes: one :class:`TlsHttpServer` in ``self.server``."""

    server: TlsHttpServer

    async def start(self):  # noqa: ANN201 - returns the subclass
        await self.server.start()
        return self

    async def stop(self) -> None:
        await self.server.stop()

    @property
    def origin(self) -> str:
        return self.server.origin
