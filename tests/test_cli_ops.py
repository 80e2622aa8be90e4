"""The CLI as an operator meets it (issue 14.4–14.7): errors in its own words, bulk import,
what happened to a job, ``send`` and the daemon lock, the ``--wait`` bar and ``--until``."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli import app
from tests.helpers import cli_in_process, wait_until
from tests.support import base_config, bulk_register, free_port, write_config


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    return write_config(tmp_path, base_config(tmp_path, free_port()))


def run_inproc(cfg: Path, *args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["--config", str(cfg), *args])
    return res.exit_code, res.stderr


@pytest.mark.parametrize(("args", "expected"), [
    (["devices", "add", "a", "--platform", "fcm", "--address", ""], "--address: fcm needs the FCM registration token"),
    (["devices", "add", "a", "--platform", "apns", "--address", "zz"],
     "--address: must be the device token in hex (64 hex digits)"),
    (["devices", "add", "a", "--platform", "fcm", "--platform", "webpush", "--address", "tok", "--address",
      '{"endpoint": "https://push.example/x", keys: {}}'],
     "--address[1] (webpush): webpush needs the subscription JSON: Expecting property name enclosed in double "
     "quotes at line 1 column 40 (character 40)"),
    (["devices", "add", "a", "--platform", "webpush", "--address", '{"endpoint": "https://p.example/1", "keys": {"p256dh": "k"}}'],
     "--address: subscription.keys.auth: required"),
    (["devices", "add", "a", "--platform", "wns", "--address", "http://x.notify.windows.com/"],
     "--address: must be an https:// URL"),
    (["devices", "add", "bad id", "--platform", "mqtt"], "ID: must match [A-Za-z0-9._:-]{1,128}"),
    (["devices", "add", "a", "--platform", "pager"], "--platform: unknown platform 'pager'"),
    (["devices", "add", "a", "--platform", "mqtt", "--address", "x"], "--address: mqtt takes no address"),
    (["send", "--title", "t", "--device", "ok-1", "--device", "x y"], "--device 'x y': must match [A-Za-z0-9._:-]{1,128}"),
    (["send", "--title", "t", "--all", "--yes", "--ttl", "-1"], "--ttl: Input should be greater than or equal to 0"),
    (["send", "--title", "t", "--all", "--yes", "--priority", "urgent"], "--priority: Input should be 'low', 'normal', 'high' or 'critical'"),
    (["send", "--title", "t", "--all", "--yes", "--job-id", "a/b"], "--job-id: must match [A-Za-z0-9._:-]{1,64}"),
    (["send", "--title", "t", "--all", "--yes", "--data", "novalue"], "--data: expected K=V, got 'novalue'"),
    (["send", "--title", "t", "--all", "--yes", "--until", "forever"], "--until: expected completed or acknowledged"),
])
def test_cli_errors_name_the_option_not_the_json_path(cfg_path: Path, args: list[str], expected: str):
    code, err = run_inproc(cfg_path, *args)
    assert code == 2, err
    assert expected in err, err
    for json_path in ("channels.", "target.devices", "notification.", "job_id"):
        assert json_path not in err, err
    assert not (cfg_path.parent / "var" / "gateway.db").exists()  # nothing written for bad input


@pytest.mark.parametrize(("args", "expected"), [
    (["jobs", "show", "nope"], "ID: no such job 'nope'"),
    (["jobs", "show", "nope", "--json", "--deliveries"], "ID: no such job 'nope'"),
    (["devices", "show", "nope"], "ID: no such device 'nope'"),
    (["devices", "show", "nope", "--json"], "ID: no such device 'nope'"),
    (["devices", "remove", "nope"], "ID: no such device 'nope'"),
])
def test_an_unknown_id_is_named_and_fails_without_a_traceback(cfg_path: Path, args: list[str], expected: str):
    """An id the operator typed that is not stored: one line naming it, exit 1, nothing on stdout."""
    res = cli_in_process(cfg_path, *args)
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().splitlines()[-1] == expected, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == "", res.stdout + res.stderr


# ------------------------------------------------------------------ devices import
def test_devices_import_jsonl_reports_refused_lines_and_imports_the_rest(tmp_path: Path, cfg_path: Path):
    good = [{"device_id": f"pos-{i}", "segment": "pos", "tags": ["floor-2"], "channels": [{"platform": "simulation"}]}
            for i in range(1, 6)]
    lines = [json.dumps(good[0]), json.dumps(good[1]),
             '{"device_id": "broken", ',                                                         # line 3
             json.dumps({"device_id": "typo", "chanels": [{"platform": "mqtt"}]}),               # line 4
             "",
             json.dumps({"device_id": "tok", "channels": [{"platform": "fcm"}]}),                # line 6
             json.dumps(good[2]), json.dumps(good[3]),
             json.dumps(good[0] | {"segment": "dup"}),                                           # line 9
             json.dumps(good[4])]
    path = tmp_path / "fleet.jsonl"
    path.write_text("\n".join(lines) + "\n")
    res = cli_in_process(cfg_path, "devices", "import", str(path), "--batch-size", "2")
    assert res.returncode == 2, res.stderr
    err = res.stderr
    assert "imported 5 device(s)" in err and "refused 5 line(s)" in err
    assert "line 3: not valid JSON" in err
    assert "line 4: chanels: unknown field" in err and "line 4: channels: required" in err
    assert "line 6: channels.0: token: required" in err or "line 6: channels.0: required" in err
    assert "line 9: device_id: 'pos-1' is already on line 1" in err
    listed = json.loads(cli_in_process(cfg_path, "devices", "list", "--json").stdout)
    assert sorted(d["device_id"] for d in listed) == [f"pos-{i}" for i in range(1, 6)]
    assert all(d["segment"] == "pos" and d["tags"] == ["floor-2"] for d in listed)


def test_devices_import_csv_channels_in_row_order_and_field_names_as_columns(tmp_path: Path, cfg_path: Path):
    token = "ab" * 32
    csv_text = "\n".join([
        "id,platform,address,segment,tags",
        f"phone-1,apns,{token},field,oncall;floor-2",
        "phone-1,simulation,,,",                        # a fallback channel for phone-1
        "plc-1,mqtt,,plant,",
        "plc-2,pager,,plant,",                          # line 5: unknown platform
        "plc-3,mqtt,,plant,",
        "plc-3,simulation,,other,",                     # line 7: segment differs from line 6
        "bad id,mqtt,,,",                               # line 8
        'pwa-1,webpush,"{""endpoint"": ""https://push.example/1"", ""keys"": {""p256dh"": ""k""}}",web,',  # line 9
    ]) + "\n"
    path = tmp_path / "fleet.csv"
    path.write_text(csv_text)
    res = cli_in_process(cfg_path, "devices", "import", str(path))
    assert res.returncode == 2, res.stderr
    err = res.stderr
    assert "line 5: platform: unknown platform 'pager'" in err
    assert "line 7: segment: differs from an earlier row of 'plc-3' (line 6)" in err
    assert "line 8: id: must match [A-Za-z0-9._:-]{1,128}" in err
    assert "line 9: address: subscription.keys.auth: required" in err
    assert "imported 2 device(s)" in err
    phone = json.loads(cli_in_process(cfg_path, "devices", "show", "phone-1", "--json").stdout)
    assert [c["platform"] for c in phone["channels"]] == ["apns", "simulation"]
    assert phone["segment"] == "field" and phone["tags"] == ["oncall", "floor-2"]
    assert cli_in_process(cfg_path, "devices", "show", "plc-3").returncode == 1  # a device with a refused row is not imported

    # A clean file of many devices: exit 0; the header is optional; batches of 500.
    big = tmp_path / "big.csv"
    big.write_text("".join(f"term-{i:05d},simulation,,stores,\n" for i in range(1500)))
    ok = cli_in_process(cfg_path, "devices", "import", str(big))
    assert ok.returncode == 0, ok.stderr
    assert "imported 1500 device(s)" in ok.stdout
    from gateway.storage import connect

    conn = connect(tmp_path / "var" / "gateway.db")
    assert conn.execute("SELECT count(*) FROM devices WHERE segment = 'stores'").fetchone()[0] == 1500
    conn.close()


def test_devices_import_unreadable_file_is_a_usage_error(tmp_path: Path, cfg_path: Path):
    code, err = run_inproc(cfg_path, "devices", "import", str(tmp_path / "nope.csv"))
    assert code == 2 and f"FILE: not found: {tmp_path / 'nope.csv'}" in err
    bad = tmp_path / "x.csv"
    bad.write_text("id,platform,colour\n")
    code, err = run_inproc(cfg_path, "devices", "import", str(bad))
    assert code == 2 and "line 1: unknown column 'colour'" in err


# ------------------------------------------------------------------ jobs, send and the daemon
def sims(n: int, prefix: str = "sim") -> list[dict]:
    return [{"device_id": f"{prefix}-{i:03d}", "segment": "demo", "channels": [{"platform": "simulation"}]}
            for i in range(n)]


def test_send_without_a_daemon_says_so_and_a_second_daemon_is_refused(gateway_factory, tmp_path: Path):
    gw = gateway_factory(start=False)
    bulk_register(tmp_path / "var", sims(2))
    res = cli_in_process(gw.config, "send", "--title", "t", "--all", "--yes", "--job-id", "early")
    assert res.returncode == 0 and res.stdout.strip() == "early"
    assert f"no homepot-gateway daemon runs on {tmp_path / 'var'}" in res.stderr
    assert "job early is stored and goes out when the daemon starts" in res.stderr
    t0 = time.monotonic()
    res = cli_in_process(gw.config, "send", "--title", "t", "--all", "--yes", "--wait", "--timeout", "60")
    assert res.returncode == 1 and "not waiting" in res.stderr and time.monotonic() - t0 < 10

    gw.start()
    second = gateway_factory(start=False)  # same data_dir (tmp_path/var), another port
    second.start(wait_ready=False)
    assert second.wait(timeout=20) == 2
    assert f"another homepot-gateway (pid {gw.proc.pid}) runs on" in second.log()
    res = cli_in_process(gw.config, "send", "--title", "t", "--all", "--yes", "--wait", "--until", "acknowledged",
                         "--timeout", "30")
    assert res.returncode == 0, res.stderr
    assert "no homepot-gateway daemon" not in res.stderr
    assert "acknowledged: targets=2" in res.stderr
    # The job stored before the start goes out too (its acks come in on their own time).
    wait_until(lambda: json.loads(cli_in_process(gw.config, "jobs", "show", "early", "--json").stdout)["state"]
               == "acknowledged", timeout=15, what="the early job acknowledged")
    assert gw.stop() == 0


def test_until_deliveries_and_a_daemon_that_goes_away(gateway_factory, tmp_path: Path):
    gw = gateway_factory({"bridges": {"simulation": {"latency_ms": 0, "ack": False}}})
    bulk_register(tmp_path / "var", sims(2))
    done = cli_in_process(gw.config, "send", "--title", "t", "--device", "sim-000", "--device", "sim-001",
                          "--device", "ghost", "--job-id", "j1", "--wait")
    assert done.returncode == 1  # ghost is unknown: a failed delivery
    assert "completed: targets=3 sent=2 acknowledged=0 failed=1" in done.stderr
    shown = cli_in_process(gw.config, "jobs", "show", "j1", "--deliveries")
    assert shown.returncode == 0
    text = shown.stdout
    assert "sent (2):" in text and "failed (1):" in text
    assert [line for line in text.splitlines() if line.strip().startswith("ghost")][0].endswith("unknown device")
    as_json = json.loads(cli_in_process(gw.config, "jobs", "show", "j1", "--json", "--deliveries").stdout)
    assert {d["device_id"]: d["state"] for d in as_json["deliveries"]} == {"ghost": "failed", "sim-000": "sent",
                                                                          "sim-001": "sent"}
    # Nothing acks: --until acknowledged gives up at the timeout and says which state it waited for.
    res = cli_in_process(gw.config, "send", "--title", "t", "--segment", "demo", "--wait", "--until", "acknowledged",
                         "--timeout", "2")
    assert res.returncode == 1 and "not acknowledged after 2 s" in res.stderr and "sent=2" in res.stderr

    # The daemon stops while a CLI waits: the CLI says so within about a second instead of timing out.
    waiting = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(gw.config), "send", "--title", "t",
                                "--segment", "demo", "--job-id", "j-wait", "--wait", "--until", "acknowledged",
                                "--timeout", "120"],
                               cwd=gw.config.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert waiting.stdout is not None and waiting.stdout.readline().strip() == "j-wait"  # stored; checks the lock next
    from tests.support import job_status_from_db

    deadline = time.monotonic() + 30  # the daemon has done its part: the CLI is well into its wait
    while (job_status_from_db(tmp_path / "var", "j-wait") or {}).get("state") != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)
    assert gw.stop() == 0
    out, err = waiting.communicate(timeout=15)
    assert waiting.returncode == 1
    assert "the gateway daemon on" in err and "stopped" in err, err


def test_send_wait_draws_a_progress_bar_on_a_terminal(gateway_factory, tmp_path: Path):
    # About 2 s of work (60 deliveries, 6 at a time, 200 ms each): several frames get drawn.
    gw = gateway_factory({"bridges": {"simulation": {"latency_ms": 200, "ack": True}},
                          "dispatch": {"max_in_flight": 6}})
    bulk_register(tmp_path / "var", sims(60))
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "180", "LINES": "40"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(gw.config), "send", "--title", "t",
                             "--all", "--yes", "--job-id", "bar-1", "--wait", "--until", "acknowledged", "--timeout", "60"],
                            cwd=gw.config.parent, stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(master)
    screen = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, screen
    assert "60/60" in screen and "100%" in screen          # done of the job's targets
    assert "acked 60" in screen                           # per-state counts
    assert "/s" in screen and "ETA" in screen             # rate and time left
    assert "acknowledged: targets=60 sent=0 acknowledged=60" in screen
    # Part-way frames: done grew while the total stayed the job's target count.
    partial = [int(n) for n in __import__("re").findall(r"\b(\d+)/60\b", screen)]
    assert partial and min(partial) < 60
    assert gw.stop(signal.SIGTERM) == 0


def test_every_command_refuses_an_sqlite_too_old_for_the_batched_writes(cfg_path: Path, monkeypatch):
    """The library's version is what it is on this machine; the floor is raised instead, so
    the check the CLI runs before any command must refuse it with one line naming both."""
    import gateway.storage

    monkeypatch.setattr(gateway.storage, "MIN_SQLITE", (99, 0, 0))
    for args in (["check-config"], ["devices", "list"]):
        code, err = run_inproc(cfg_path, *args)
        assert code != 0 and "is too old: the gateway needs 99.0.0 or newer" in err, (args, code, err)
