"""gateway.clock's time base: continued on the same boot, resumed after a reboot, never
earlier than the last saved time (no real clock is stepped here; see test_clock_step.py)."""

from __future__ import annotations

import sqlite3

import pytest

from gateway import clock


class Machine:
    """The two clocks and the boot id that gateway.clock reads, set by the test."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, wall: float, mono: float, boot: str):
        self.wall, self.mono, self.boot = wall, mono, boot
        monkeypatch.setattr(clock.time, "time", lambda: self.wall)
        monkeypatch.setattr(clock.time, "monotonic", lambda: self.mono)
        monkeypatch.setattr(clock, "boot_id", lambda: self.boot)
        monkeypatch.setattr(clock, "_offset", clock._offset)  # restored after the test

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


@pytest.fixture
def conn():
    c = sqlite3.connect(":memory:")
    yield c
    c.close()


def test_first_start_takes_the_wall_clock_then_ignores_its_steps(monkeypatch, conn):
    m = Machine(monkeypatch, wall=1_000_000.0, mono=50.0, boot="a")
    clock.establish(conn)
    assert clock.now() == 1_000_000.0
    m.advance(10)
    m.wall += 86400  # a forward step of a day
    assert clock.now() == 1_000_010.0
    m.wall -= 2 * 86400  # and back, a day before
    m.advance(5)
    assert clock.now() == 1_000_015.0


def test_restart_on_the_same_boot_continues_the_timeline(monkeypatch, conn):
    m = Machine(monkeypatch, wall=1_000_000.0, mono=50.0, boot="a")
    clock.establish(conn)
    m.wall -= 3600  # stepped back an hour while running, then a restart 20 s later
    m.advance(20)
    clock._offset = 0.0  # a new process knows nothing
    clock.establish(conn)
    assert clock.now() == 1_000_020.0


def test_after_a_reboot_the_downtime_comes_from_the_wall_clock(monkeypatch, conn):
    m = Machine(monkeypatch, wall=1_000_000.0, mono=50.0, boot="a")
    clock.establish(conn)
    m.wall -= 3600  # stepped back an hour during the run: the timeline is an hour ahead
    m.advance(30)
    clock.save(conn)
    m.boot, m.mono = "b", 7.0  # reboot, down for 100 s
    m.wall += 100
    clock._offset = 0.0
    clock.establish(conn)
    assert clock.now() == pytest.approx(1_000_030.0 + 100)


def test_after_a_reboot_with_the_clock_far_behind_the_timeline_does_not_go_back(monkeypatch, conn):
    m = Machine(monkeypatch, wall=1_000_000.0, mono=50.0, boot="a")
    clock.establish(conn)
    m.advance(30)
    clock.save(conn)
    m.boot, m.mono, m.wall = "b", 7.0, 0.0  # a box without RTC boots in 1970
    clock._offset = 0.0
    clock.establish(conn)
    assert clock.now() == 1_000_030.0


def test_a_cli_process_adopts_the_daemons_time_base_on_the_same_boot_only(monkeypatch, conn):
    m = Machine(monkeypatch, wall=1_000_000.0, mono=50.0, boot="a")
    clock.establish(conn)
    m.wall += 86400
    clock._offset = m.wall - m.mono  # a CLI process starts: its own base is the (stepped) wall clock
    clock.attach(conn)
    assert clock.now() == 1_000_000.0
    m.boot = "b"
    clock._offset = m.wall - m.mono
    clock.attach(conn)
    assert clock.now() == m.wall  # nothing stored for this boot: the wall clock


def test_attach_without_the_table_keeps_the_wall_clock(monkeypatch, conn):
    m = Machine(monkeypatch, wall=5.0, mono=1.0, boot="a")
    clock._offset = m.wall - m.mono
    clock.attach(conn)
    assert clock.now() == 5.0
