"""gateway.clock's time base: every start re-anchors it to the wall clock and shifts the
stored deadlines by how far the old timeline was off (known exactly on the same boot, from
the last save after a reboot, never earlier than the last saved time); a step while running
is noticed and logged (no real clock is stepped here; see test_clock_step.py)."""

from __future__ import annotations

import sqlite3

import pytest

from gateway import clock, migrations


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
    migrations.migrate(c, only=tuple(x for x in migrations.components() if x.name == "clock"))
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


class Recorder:
    """Collects the shifts establish() asks the deadline owners for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.deltas: list[float] = []
        monkeypatch.setattr(clock, "_shifters", lambda: [self.shift])

    def shift(self, conn, delta: float) -> int:
        self.deltas.append(delta)
        return 0


def test_restart_on_the_same_boot_re_anchors_to_the_stepped_wall_clock(monkeypatch, conn):
    m = Machine(monkeypatch, wall=1_000_000.0, mono=50.0, boot="a")
    shifts = Recorder(monkeypatch)
    clock.establish(conn)
    m.wall -= 3600  # stepped back an hour while running, then a restart 20 s later
    m.advance(20)
    clock._offset = 0.0  # a new process knows nothing
    assert clock.establish(conn) == -3600.0
    assert clock.now() == m.wall  # written times are the system clock's again
    assert shifts.deltas == [-3600.0]  # deadlines keep their remaining durations


def test_restart_without_a_step_rewrites_nothing(monkeypatch, conn):
    m = Machine(monkeypatch, wall=1_000_000.0, mono=50.0, boot="a")
    shifts = Recorder(monkeypatch)
    clock.establish(conn)
    m.advance(20)
    m.wall += 0.5  # slewing, not a step
    clock._offset = 0.0
    assert clock.establish(conn) == 0.0
    assert clock.now() == 1_000_020.0  # the timeline continues
    assert shifts.deltas == []


def test_after_a_reboot_the_downtime_comes_from_the_wall_clock(monkeypatch, conn):
    m = Machine(monkeypatch, wall=1_000_000.0, mono=50.0, boot="a")
    shifts = Recorder(monkeypatch)
    clock.establish(conn)
    m.wall -= 3600  # stepped back an hour during the run: the timeline is an hour ahead
    m.advance(30)
    clock.save(conn)
    m.boot, m.mono = "b", 7.0  # reboot, down for 100 s
    m.wall += 100
    clock._offset = 0.0
    clock.establish(conn)
    assert clock.now() == m.wall
    assert shifts.deltas == [pytest.approx(-3600.0)]  # the old timeline was at wall + 3600


def test_after_a_reboot_with_the_clock_far_behind_deadlines_move_back_with_it(monkeypatch, conn):
    m = Machine(monkeypatch, wall=1_000_000.0, mono=50.0, boot="a")
    shifts = Recorder(monkeypatch)
    clock.establish(conn)
    m.advance(30)
    clock.save(conn)
    m.boot, m.mono, m.wall = "b", 7.0, 0.0  # a box without RTC boots in 1970
    clock._offset = 0.0
    clock.establish(conn)
    assert clock.now() == 0.0
    # The old timeline is taken at its last saved time (no downtime): nothing falls due, nothing freezes.
    assert shifts.deltas == [-1_000_030.0]


def test_a_failed_shift_keeps_the_old_timeline(monkeypatch, conn):
    m = Machine(monkeypatch, wall=1_000_000.0, mono=50.0, boot="a")
    clock.establish(conn)
    m.wall += 3600
    m.advance(10)

    def refuse(conn, delta):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(clock, "_shifters", lambda: [refuse])
    clock._offset = 0.0
    with pytest.raises(sqlite3.OperationalError):
        clock.establish(conn)
    assert clock.now() == 1_000_010.0  # deadlines were not shifted, so the clock is not moved either


def test_establish_shifts_the_owners_deadlines_but_not_history(monkeypatch, conn):
    """The real owners' shift functions on their real tables."""
    migrations.migrate(conn)
    m = Machine(monkeypatch, wall=1_000_000.0, mono=50.0, boot="a")
    clock.establish(conn)
    t = 1_000_000.0
    conn.execute("INSERT INTO jobs(job_id, state, source, target, notification, options, created_at, updated_at, "
                 "expires_at, ttl, status_published_at) VALUES ('open', 'dispatching', 'mqtt', '{}', '{}', '{}', ?, ?, ?, 600, ?)",
                 (t, t, t + 600, t))
    conn.execute("INSERT INTO jobs(job_id, state, source, target, notification, options, created_at, updated_at, "
                 "expires_at, ttl) VALUES ('done', 'completed', 'mqtt', '{}', '{}', '{}', ?, ?, ?, 600)", (t, t, t + 600))
    conn.execute("INSERT INTO jobs(job_id, state, source, target, notification, options, created_at, updated_at, "
                 "expires_at, ttl) VALUES ('resending', 'completed', 'mqtt', '{}', '{}', '{}', ?, ?, ?, 600)", (t, t, t + 600))
    conn.execute("INSERT INTO deliveries(message_id, job_id, device_id, state, next_at, sent_at, resend_at) "
                 "VALUES ('r', 'resending', 'c', 'sent', ?, ?, ?)", (t, t, t + 15))
    conn.execute("INSERT INTO deliveries(message_id, job_id, device_id, state, next_at) VALUES ('q', 'open', 'a', 'queued', ?)",
                 (t + 30,))
    conn.execute("INSERT INTO deliveries(message_id, job_id, device_id, state, next_at, sent_at, resend_at) "
                 "VALUES ('s', 'open', 'b', 'sent', ?, ?, ?)", (t, t, t + 15))
    conn.execute("INSERT INTO alarms(rule, akey, state, since, fired_at, due_at, last_seen, updated_at) "
                 "VALUES ('door', 'a', 'firing', ?, ?, ?, NULL, ?)", (t, t, t + 20, t))
    conn.execute("INSERT INTO alarms(rule, akey, state, last_seen, updated_at) VALUES ('beat', 's', 'idle', ?, ?)", (t, t))
    conn.execute("INSERT INTO alarm_meta(name, value) VALUES ('alive_at', ?)", (t,))
    conn.execute("INSERT INTO broker_sessions(client_id, created_at, seen_at) VALUES ('c', ?, ?)", (t, t))
    conn.execute("INSERT INTO broker_messages(client_id, seq, topic, payload, qos, expires_at) VALUES ('c', 1, 't', x'', 1, ?)",
                 (t + 60,))
    conn.execute("INSERT INTO broker_retained(topic, payload, qos, stored_at, expires_at) VALUES ('t', x'', 0, ?, ?)",
                 (t, t + 60))
    conn.execute("INSERT INTO upstream_outbox(kind, topic, payload, retain, size, created_at) VALUES ('ack', 't', x'', 0, 0, ?)",
                 (t,))
    conn.execute("INSERT INTO upstream_outbox_held(topic, payload, size, created_at) VALUES ('t', x'', 0, ?)", (t,))
    m.wall += 3600  # a forward step of an hour, then a restart
    m.advance(5)
    clock._offset = 0.0
    assert clock.establish(conn) == 3600.0
    d = 3600.0
    one = lambda sql: conn.execute(sql).fetchone()  # noqa: E731
    assert one("SELECT expires_at, created_at, updated_at, status_published_at FROM jobs WHERE job_id = 'open'") == \
        (t + 600 + d, t, t, t + d)
    assert one("SELECT expires_at FROM jobs WHERE job_id = 'done'") == (t + 600,)  # finished: history
    assert one("SELECT expires_at FROM jobs WHERE job_id = 'resending'") == (t + 600 + d,)  # its resends still count
    assert one("SELECT next_at FROM deliveries WHERE message_id = 'q'") == (t + 30 + d,)
    assert one("SELECT next_at, sent_at, resend_at FROM deliveries WHERE message_id = 's'") == (t, t, t + 15 + d)
    assert one("SELECT since, fired_at, due_at FROM alarms WHERE rule = 'door'") == (t, t, t + 20 + d)
    assert one("SELECT last_seen FROM alarms WHERE rule = 'beat'") == (t + d,)
    assert one("SELECT value FROM alarm_meta WHERE name = 'alive_at'") == (t + d,)
    assert one("SELECT created_at, seen_at FROM broker_sessions") == (t, t + d)
    assert one("SELECT expires_at FROM broker_messages") == (t + 60 + d,)
    assert one("SELECT stored_at, expires_at FROM broker_retained") == (t, t + 60 + d)
    assert one("SELECT created_at FROM upstream_outbox") == (t + d,)
    assert one("SELECT created_at FROM upstream_outbox_held") == (t + d,)


def test_establish_on_an_empty_database_shifts_nothing_and_does_not_fail(monkeypatch, conn):
    m = Machine(monkeypatch, wall=1_000_000.0, mono=50.0, boot="a")
    clock.establish(conn)
    m.wall -= 86400
    clock._offset = 0.0
    assert clock.establish(conn) == -86400.0  # no owner's table exists yet: nothing to shift
    assert clock.now() == m.wall


def test_a_step_while_running_is_noticed_once(monkeypatch):
    m = Machine(monkeypatch, wall=1_000_000.0, mono=50.0, boot="a")
    watch = clock.StepWatch()
    m.advance(2)
    m.wall += 0.3
    assert watch.check() is None  # slewing
    m.wall += 3600
    m.advance(2)
    assert watch.check() == pytest.approx(3600.0)
    m.advance(2)
    assert watch.check() is None  # logged once, not at every check
    m.wall -= 7200
    assert watch.check() == pytest.approx(-7200.0)


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
    assert clock.now() == m.wall  # nothing stored for this boot, and the last save was in step: the wall clock


def test_a_cli_process_after_a_reboot_writes_where_the_daemons_next_start_takes_the_timeline_from(monkeypatch, conn):
    m = Machine(monkeypatch, wall=1_000_000.0, mono=50.0, boot="a")
    clock.establish(conn)
    m.wall -= 3600  # stepped back while running: the timeline is an hour ahead at the last save
    m.advance(30)
    clock.save(conn)
    m.boot, m.mono = "b", 7.0  # reboot; a CLI `send` before the daemon starts
    m.wall += 100
    clock._offset = m.wall - m.mono
    clock.attach(conn)
    cli_time = clock.now()
    assert cli_time == pytest.approx(m.wall + 3600)
    shifts = Recorder(monkeypatch)
    clock._offset = 0.0
    clock.establish(conn)  # the daemon starts at once: what the CLI wrote moves with the rest
    assert shifts.deltas == [pytest.approx(-3600.0)]
    assert cli_time + shifts.deltas[0] == pytest.approx(clock.now())


def test_attach_without_the_table_keeps_the_wall_clock(monkeypatch, conn):
    m = Machine(monkeypatch, wall=5.0, mono=1.0, boot="a")
    clock._offset = m.wall - m.mono
    clock.attach(conn)
    assert clock.now() == 5.0
