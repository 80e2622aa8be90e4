"""SIGHUP (``systemctl reload``, issue 9.9): the daemon keeps running, re-reads the password
file and the log level, names what needs a restart, and calls the services' reload hooks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import paho.mqtt.client as paho

from gateway.broker.passwords import add_user
from tests.support import base_config, deep_merge, free_port, write_config


def connect_rc(port: int, username: str, password: str) -> int:
    """CONNACK return code for these credentials (0 = accepted), with an independent client."""
    result: list[int] = []
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    c.username_pw_set(username, password)
    c.on_connect = lambda cl, ud, flags, reason, props: result.append(reason.value)
    c.connect("127.0.0.1", port)
    c.loop_start()
    deadline = time.monotonic() + 10
    while not result and time.monotonic() < deadline:
        time.sleep(0.02)
    c.disconnect()  # first: it wakes the network thread, which loop_stop alone leaves in a 1 s select
    c.loop_stop()
    assert result, "no CONNACK"
    return result[0]


def log_events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def wait_log(gw, event: str, after: int = 0, timeout: float = 10.0) -> dict:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in log_events(gw.log())[after:] if e.get("event") == event]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no {event!r} in the log:\n{gw.log()[-3000:]}")


def test_sighup_reloads_passwords_and_log_level_and_keeps_running(gateway_factory, tmp_path: Path):
    passwd = tmp_path / "var" / "passwd"
    add_user(passwd, "plc-1", "first-password", "device")
    gw = gateway_factory()
    assert connect_rc(gw.port, "plc-1", "first-password") == 0

    # Replace the account with another password, written in place (same inode) in a file of the
    # same size and mtime: the broker's change check (mtime, size, inode) cannot see it; only a
    # reload can. (`users add` replaces the file, a new inode, which the broker sees at once.)
    st = passwd.stat()
    staged = tmp_path / "passwd.staged"
    staged.write_bytes(passwd.read_bytes())
    add_user(staged, "plc-1", "other-password", "device")
    with open(passwd, "r+b") as fh:
        fh.write(staged.read_bytes())
    assert passwd.stat().st_size == st.st_size and passwd.stat().st_ino == st.st_ino
    os.utime(passwd, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert connect_rc(gw.port, "plc-1", "other-password") != 0

    # The config file changes too: a new log level (applied) and a key that needs a restart.
    changed = deep_merge(gw.data, {"logging": {"level": "debug"}, "broker": {"max_queued_messages": 77}})
    write_config(gw.config.parent, changed, gw.config.name)
    seen = len(log_events(gw.log()))
    gw.proc.send_signal(signal.SIGHUP)
    done = wait_log(gw, "reloaded", after=seen)
    assert gw.proc.poll() is None
    assert set(done["reloaded"]) >= {"logging.level", "broker.auth.password_file"}
    assert done["restart_needed"] == ["broker.max_queued_messages"]
    assert wait_log(gw, "reload: log level changed", after=seen)["new"] == "debug"
    assert wait_log(gw, "reload: password file read", after=seen)["accounts"] == 1
    assert connect_rc(gw.port, "plc-1", "other-password") == 0
    assert connect_rc(gw.port, "plc-1", "first-password") != 0
    # systemd hears RELOADING=1, then READY=1 again.
    gw.notify.wait_for("RELOADING", "1", timeout=5)
    gw.notify.wait_for("READY", "1", timeout=5)
    # Debug lines now reach the log (the level really changed).
    deadline = time.monotonic() + 10
    while not any(e.get("level") == "debug" for e in log_events(gw.log())[seen:]) and time.monotonic() < deadline:
        connect_rc(gw.port, "plc-1", "other-password")
        time.sleep(0.2)
    assert any(e.get("level") == "debug" for e in log_events(gw.log())[seen:])

    # A broken file is reported and the running configuration kept.
    gw.config.write_text("[gateway\n")
    seen = len(log_events(gw.log()))
    gw.proc.send_signal(signal.SIGHUP)
    wait_log(gw, "reloaded", after=seen)
    bad = wait_log(gw, "reload: the config file is invalid; keeping the running configuration", after=seen)
    assert "not valid TOML" in bad["problems"][0]
    assert connect_rc(gw.port, "plc-1", "other-password") == 0
    assert gw.stop() == 0
    assert "Traceback" not in gw.log()


async def test_services_register_reload_callbacks(tmp_path: Path):
    """``Daemon.on_reload``: every callback runs on SIGHUP (sync or async), one that raises
    does not stop the others, and each gets the configuration as re-read from the file."""
    from gateway.config import load_config
    from gateway.daemon import Daemon
    from gateway.wiring import Graph

    port = free_port()
    path = write_config(tmp_path, base_config(tmp_path, port))
    cfg = load_config(path, environ={})
    calls: list[tuple[str, str]] = []
    second = asyncio.Event()

    def broken(new_cfg) -> None:  # noqa: ANN001
        raise RuntimeError("boom")

    async def credentials_cache(new_cfg) -> None:  # noqa: ANN001
        calls.append(("async", new_cfg.gateway.site_id))
        second.set()

    def no_services(cfg, db, runtime) -> Graph:  # noqa: ANN001
        return Graph([], reload_callbacks=[("broken", broken), ("http-credentials", credentials_cache)])

    daemon = Daemon(cfg, build=no_services, environ={})
    daemon.on_reload(lambda new_cfg: calls.append(("sync", new_cfg.gateway.site_id)), name="sync-hook")
    task = asyncio.create_task(daemon.run())
    deadline = time.monotonic() + 20
    while not daemon._ready:  # noqa: SLF001 - the handler exists once the daemon is up
        assert not task.done(), task
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    path.write_text(path.read_text().replace('site_id = "site-t"', 'site_id = "site-u"'))
    os.kill(os.getpid(), signal.SIGHUP)
    await asyncio.wait_for(second.wait(), 10)
    assert calls == [("sync", "site-u"), ("async", "site-u")]
    assert daemon.cfg.gateway.site_id == "site-t"  # the running configuration is not swapped
    daemon.stop_event.set()
    assert await asyncio.wait_for(task, 15) == 0


async def test_a_reload_builds_a_new_configuration_and_keeps_the_level_in_force_apart(tmp_path: Path):
    """The running configuration is a frozen value: SIGHUP's new log level is applied and
    remembered by the daemon (``log_level``), never written into ``daemon.cfg``; the next
    reload compares against the level in force, so it is not applied twice."""
    import logging

    from gateway.config import load_config
    from gateway.daemon import Daemon

    path = write_config(tmp_path, base_config(tmp_path, free_port()))
    seen: list[str] = []
    daemon = Daemon(load_config(path, environ={}), environ={})
    daemon.on_reload(lambda new_cfg: seen.append(new_cfg.logging.level), name="probe")
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))]
    before = {lg: lg.level for lg in loggers}
    try:
        path.write_text(path.read_text().replace('level = "info"', 'level = "debug"'))
        first = await daemon.reload()
        assert "logging.level" in first["reloaded"] and first["restart_needed"] == []
        assert daemon.log_level == "debug" and logging.getLogger().level == logging.DEBUG
        assert daemon.cfg.logging.level == "info"  # the configuration the daemon started with
        second = await daemon.reload()
        assert "logging.level" not in second["reloaded"] and seen == ["debug", "debug"]
    finally:
        for lg, level in before.items():  # set_level is process-wide: leave it as it was
            lg.setLevel(level)
