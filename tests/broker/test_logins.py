"""Password checks under reconnect floods and guessing (gateway.broker.logins).

A known good password skips argon2 (so a client reconnecting in a loop does not take the
cores), but a changed or removed password is refused at once; guesses are checked one at a
time and an address that keeps failing waits; an account disconnected for violations in a
loop waits before its next CONNECT.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.broker import logins as logins_mod
from gateway.broker.logins import Backoff
from gateway.broker.passwords import add_user, remove_user
from tests.broker.helpers import RawClient, start_broker, write_accounts

BAD_PASSWORD = 4      # MQTT 3.1.1 CONNACK return codes
SERVER_UNAVAILABLE = 3


class ArgonSpy:
    """Wraps the real argon2 check: counts the calls and how many ran at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, hold_s: float = 0.0):
        self.calls = 0
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()
        self._real = logins_mod.check_password
        self._hold_s = hold_s
        monkeypatch.setattr(logins_mod, "check_password", self)

    def __call__(self, account, password):  # type: ignore[no-untyped-def]
        with self._lock:
            self.calls += 1
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(self._hold_s)   # a slow hash: overlapping checks would show
            return self._real(account, password)
        finally:
            with self._lock:
                self.running -= 1


async def login(port: int, user: str, password: str, client_id: str = "") -> int:
    c = await RawClient(port).open()
    try:
        _, code = await c.connect(client_id or f"c-{user}", username=user, password=password)
        return code
    finally:
        c.drop()


async def test_a_known_good_password_skips_argon2_and_a_changed_one_is_refused_at_once(tmp_path: Path, monkeypatch):
    passwd = tmp_path / "var" / "passwd"
    write_accounts(passwd, {"tech": "technician", "other": "technician"}, password="pw-1")
    spy = ArgonSpy(monkeypatch)
    b = await start_broker(tmp_path)
    try:
        assert await login(b.port, "tech", "pw-1") == 0
        assert spy.calls == 1
        for _ in range(5):
            assert await login(b.port, "tech", "pw-1") == 0
        assert spy.calls == 1                                  # reconnects: no argon2
        assert await login(b.port, "tech", "wrong") == BAD_PASSWORD
        assert spy.calls == 2                                  # a wrong password is checked in full
        assert await login(b.port, "tech", "pw-1") == 0 and spy.calls == 2

        # users passwd: the old password is refused on the very next login, before any reload
        # or account check ran, although it was remembered.
        add_user(passwd, "tech", "pw-2", "technician")
        assert await login(b.port, "tech", "pw-1") == BAD_PASSWORD
        assert await login(b.port, "tech", "pw-2") == 0
        calls = spy.calls
        assert await login(b.port, "tech", "pw-2") == 0 and spy.calls == calls

        # users remove: refused at once too.
        assert await login(b.port, "other", "pw-1") == 0
        remove_user(passwd, "other")
        assert await login(b.port, "other", "pw-1") == BAD_PASSWORD

        # The account check (SIGHUP, or the watcher's poll) drops what is remembered of
        # changed accounts: nothing of "other" stays in memory.
        assert b.broker is not None
        await b.check_accounts()
        assert b.broker.logins.remembered() == 1               # "tech" with pw-2 only
    finally:
        await b.stop()


async def test_argon2_checks_run_one_at_a_time(tmp_path: Path, monkeypatch):
    write_accounts(tmp_path / "var" / "passwd", {"a": "technician", "b": "technician", "c": "technician"})
    spy = ArgonSpy(monkeypatch, hold_s=0.2)
    b = await start_broker(tmp_path)
    try:
        codes = await asyncio.gather(login(b.port, "a", "pw"), login(b.port, "b", "nope"),
                                     login(b.port, "c", "pw"), login(b.port, "nobody", "pw"))
        assert codes == [0, BAD_PASSWORD, 0, BAD_PASSWORD]
        assert spy.calls == 4 and spy.most == 1
    finally:
        await b.stop()


async def test_an_address_that_keeps_failing_waits_but_a_known_password_does_not(tmp_path: Path, monkeypatch):
    write_accounts(tmp_path / "var" / "passwd", {"tech": "technician"})
    monkeypatch.setattr(logins_mod, "BASE_DELAY_S", 1.0)
    b = await start_broker(tmp_path)
    try:
        assert await login(b.port, "tech", "pw") == 0           # remembered from now on
        for _ in range(logins_mod.FREE_FAILURES):
            t0 = time.monotonic()
            assert await login(b.port, "tech", "guess") == BAD_PASSWORD
        free = time.monotonic() - t0
        t0 = time.monotonic()
        assert await login(b.port, "tech", "guess") == BAD_PASSWORD
        assert time.monotonic() - t0 >= 0.8 > free + 0.3        # the next guess waited its turn
        t0 = time.monotonic()
        assert await login(b.port, "tech", "pw") == 0           # the known password: no wait
        assert time.monotonic() - t0 < 0.5
    finally:
        await b.stop()


async def test_a_guess_whose_turn_is_too_far_is_refused_unchecked_and_counted(tmp_path: Path, monkeypatch):
    """Guesses in parallel from one failing address queue behind each other; one whose turn is
    further than MAX_DELAY_S is answered at once (3.1.1: 0x03 server unavailable) without an
    argon2 check, and /metrics' logins_throttled counts exactly those."""
    write_accounts(tmp_path / "var" / "passwd", {"tech": "technician"})
    monkeypatch.setattr(logins_mod, "MAX_DELAY_S", 0.3)
    b = await start_broker(tmp_path)
    try:
        assert await login(b.port, "tech", "pw") == 0
        for _ in range(logins_mod.FREE_FAILURES):
            assert await login(b.port, "tech", "guess") == BAD_PASSWORD
        spy = ArgonSpy(monkeypatch)
        codes = await asyncio.gather(*(login(b.port, "tech", "guess", f"g-{i}") for i in range(6)))
        refused = codes.count(SERVER_UNAVAILABLE)
        assert refused >= 1 and set(codes) <= {BAD_PASSWORD, SERVER_UNAVAILABLE}, codes
        assert spy.calls == codes.count(BAD_PASSWORD)          # the refused ones were never hashed
        assert b.metrics()["logins_throttled"] == refused
        assert await login(b.port, "tech", "pw") == 0           # the known password still passes
    finally:
        await b.stop()


async def test_an_account_disconnected_for_oversized_packets_in_a_loop_is_slowed_down(tmp_path: Path, monkeypatch):
    """The hostile bench's "oversized" client: a device account announces a PUBLISH over its
    max_packet_size (64 KiB), is disconnected after the fixed header, and reconnects. After
    FREE_FAILURES such disconnections its CONNECTs wait; one log line says why, not one per
    connection; another account is not held up meanwhile."""
    write_accounts(tmp_path / "var" / "passwd", {"dev": "device", "tech": "technician"})
    monkeypatch.setattr(logins_mod, "BASE_DELAY_S", 1.0)
    spy = ArgonSpy(monkeypatch)
    b = await start_broker(tmp_path)
    oversized = b"\x30" + bytes([0x80, 0x80, 0x08]) + struct.pack("!H", 1) + b"x"   # announces 128 KiB
    try:
        with capture_logs() as logs:
            waits = []
            for _ in range(logins_mod.FREE_FAILURES + 2):
                c = await RawClient(b.port).open()
                t0 = time.monotonic()
                assert (await c.connect("dev-1", username="dev", password="pw"))[1] == 0
                waits.append(time.monotonic() - t0)
                c.send(oversized)
                assert await c.closed()
            t0 = time.monotonic()
            assert await login(b.port, "tech", "pw") == 0
            other = time.monotonic() - t0
        assert max(waits[:logins_mod.FREE_FAILURES]) < 0.5
        assert waits[-2] >= 0.8 and waits[-1] >= 1.6            # doubling
        assert other < 0.5
        assert spy.calls == 2                                   # "dev" once, "tech" once
        lines = [e["event"] for e in logs if e["log_level"] in ("info", "warning", "error")]
        assert lines.count("client hit a broker limit") == 1, lines
        assert not [line for line in lines if "malformed" in line], lines
        assert b.metrics()["limited_packet_size"] == logins_mod.FREE_FAILURES + 2
    finally:
        await b.stop()


def test_backoff_spacing_refusal_forgetting_and_bound():
    now = [1000.0]
    backoff = Backoff(clock=lambda: now[0], max_keys=3)
    for _ in range(logins_mod.FREE_FAILURES - 1):
        backoff.event("a")
        assert backoff.turn("a") == 0
    backoff.event("a")                                # the third failure in a row
    assert backoff.turn("a") == pytest.approx(logins_mod.BASE_DELAY_S)
    # Parallel attempts queue behind each other; one whose turn is too far is refused.
    turns = [backoff.turn("a") for _ in range(40)]
    assert all(t is not None and t <= logins_mod.MAX_DELAY_S for t in turns[:10])
    assert turns[-1] is None
    now[0] += logins_mod.FORGET_S
    assert backoff.turn("a") == 0 and len(backoff) == 0  # quiet long enough: forgotten
    for key in ("k1", "k2", "k3", "k4"):
        backoff.event(key)
    assert len(backoff) == 3                          # bounded: the least recent went first
    backoff.clear("k4")
    assert len(backoff) == 2
