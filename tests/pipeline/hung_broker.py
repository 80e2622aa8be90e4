"""An MQTT 3.1.1 server that accepts a client and its subscriptions but never acknowledges
a QoS 1/2 PUBLISH: a broker that hangs mid-flight, byte by byte, for shutdown tests."""

from __future__ import annotations

import socket
import struct
import threading


class HungBroker:
    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.publishes: list[str] = []  # topics of PUBLISH packets received (never acknowledged)
        self.connects = 0
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()

    def start(self) -> "HungBroker":
        threading.Thread(target=self._accept, daemon=True, name="hung-broker").start()
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _read(conn: socket.socket, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = conn.recv(n - len(out))
            if not chunk:
                raise ConnectionError
            out += chunk
        return out

    def _packet(self, conn: socket.socket) -> tuple[int, bytes]:
        first = self._read(conn, 1)[0]
        length, mult = 0, 1
        while True:
            b = self._read(conn, 1)[0]
            length += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        return first, self._read(conn, length) if length else b""

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                first, body = self._packet(conn)
                kind = first >> 4
                if kind == 1:  # CONNECT
                    if body[6:7] != b"\x04":
                        # A 3.1.1 server refuses any other protocol level [MQTT-3.1.2-2].
                        conn.sendall(b"\x20\x02\x00\x01")
                        conn.close()
                        return
                    with self._lock:
                        self.connects += 1
                    conn.sendall(b"\x20\x02\x00\x00")
                elif kind == 8:  # SUBSCRIBE: grant every filter at QoS 1
                    pid = body[:2]
                    i, granted = 2, 0
                    while i < len(body):
                        (n,) = struct.unpack("!H", body[i:i + 2])
                        i += 2 + n + 1
                        granted += 1
                    conn.sendall(bytes([0x90, 2 + granted]) + pid + b"\x01" * granted)
                elif kind == 12:  # PINGREQ
                    conn.sendall(b"\xd0\x00")
                elif kind == 3:  # PUBLISH: remember it, never acknowledge it
                    (n,) = struct.unpack("!H", body[:2])
                    with self._lock:
                        self.publishes.append(body[2:2 + n].decode(errors="replace"))
                elif kind == 14:  # DISCONNECT
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            conn.close()

    def send(self, topic: str, payload: bytes) -> None:
        """A QoS 0 PUBLISH to every client connected now (whatever it subscribed)."""
        body = struct.pack("!H", len(topic.encode())) + topic.encode() + payload
        length, n = b"", len(body)
        while True:
            n, digit = n // 128, n % 128
            length += bytes([digit | (0x80 if n else 0)])
            if not n:
                break
        for conn in list(self._conns):
            conn.sendall(b"\x30" + length + body)

    def drop(self) -> None:
        """Close every connection (the broker went away); new ones are still accepted."""
        conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        for conn in self._conns:
            try:
                conn.close()
            except OSError:
                pass
