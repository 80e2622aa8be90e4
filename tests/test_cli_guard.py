"""A CLI that is safe to use: big sends are confirmed, empty jobs refused, one key moves the
broker's port, lists and views read as tables and records (JSON on request), help loses
no words and shows no Python types."""

from __future__ import annotations

import functools
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from gateway.cli import app
from tests.helpers import cli_in_process
from tests.support import GatewayProcess, base_config, bulk_register, free_port, write_config


def sims(n: int, prefix: str = "sim", segment: str = "demo") -> list[dict]:
    return [{"device_id": f"{prefix}-{i:03d}", "segment": segment, "channels": [{"platform": "simulation"}]}
            for i in range(n)]


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    return write_config(tmp_path, base_config(tmp_path, free_port(), cli={"confirm_above": 3}))


def stored_jobs(cfg: Path) -> list[str]:
    return [j["job_id"] for j in json.loads(cli_in_process(cfg, "jobs", "list", "--json").stdout)]


# ------------------------------------------------------------------ send: confirmation
def test_send_to_all_or_to_many_needs_yes_without_a_terminal(tmp_path: Path, cfg_path: Path):
    bulk_register(tmp_path / "var", sims(2) + sims(4, "pos", "pos"))
    res = cli_in_process(cfg_path, "send", "--body", "x", "--all")
    assert res.returncode == 2, res.stderr
    assert "--yes: this job goes to 6 device(s) (every registered device); confirm with --yes" in res.stderr
    assert res.stdout == "" and stored_jobs(cfg_path) == []
    # A segment over [cli] confirm_above (3) too; one within it goes without a question.
    res = cli_in_process(cfg_path, "send", "--body", "x", "--segment", "pos", "--job-id", "pos-1")
    assert res.returncode == 2 and "4 device(s) (segment 'pos')" in res.stderr, res.stderr
    assert cli_in_process(cfg_path, "send", "--body", "x", "--segment", "demo", "--job-id", "demo-1").returncode == 0
    assert cli_in_process(cfg_path, "send", "--body", "x", "--all", "--yes", "--job-id", "all-1").returncode == 0
    assert cli_in_process(cfg_path, "send", "--body", "x", "--segment", "pos", "-y", "--job-id", "pos-2").returncode == 0
    assert sorted(stored_jobs(cfg_path)) == ["all-1", "demo-1", "pos-2"]


def _on_a_terminal(cfg: Path, answer: bytes, *args: str) -> tuple[int, str, str]:
    """Run the CLI with a pty as stdin and stderr (an operator's terminal); answer the prompt."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(cfg), *args], cwd=cfg.parent,
                            stdin=slave, stderr=slave, stdout=subprocess.PIPE, env={**os.environ, "COLUMNS": "120"})
    os.close(slave)
    screen = b""
    deadline = time.monotonic() + 60
    while b"?" not in screen and time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            screen += os.read(master, 4096)
    os.write(master, answer)
    out, _ = proc.communicate(timeout=60)
    try:
        while select.select([master], [], [], 0.2)[0]:
            screen += os.read(master, 4096)
    except OSError:
        pass
    os.close(master)
    return proc.returncode, out.decode(), screen.decode(errors="replace")


def test_send_to_all_asks_on_a_terminal(tmp_path: Path, cfg_path: Path):
    bulk_register(tmp_path / "var", sims(2))
    code, out, screen = _on_a_terminal(cfg_path, b"n\n", "send", "--title", "t", "--all", "--job-id", "no-1")
    assert "Send to 2 device(s) (every registered device)? [y/N]" in screen, screen
    assert code == 1 and out == "" and "not confirmed; nothing was queued" in screen, (code, screen)
    code, out, screen = _on_a_terminal(cfg_path, b"y\n", "send", "--title", "t", "--all", "--job-id", "yes-1")
    assert code == 0 and out.strip() == "yes-1", (code, out, screen)
    assert stored_jobs(cfg_path) == ["yes-1"]


# ------------------------------------------------------------------ send: a job must say something
def test_a_job_with_no_title_body_or_data_is_refused_naming_the_fields(tmp_path: Path, cfg_path: Path):
    from gateway.pipeline.models import InputError, parse_job

    bulk_register(tmp_path / "var", sims(1))
    res = cli_in_process(cfg_path, "send", "--device", "sim-000", "--priority", "high")
    assert res.returncode == 2
    assert res.stderr.strip() == "--title, --body, --data: nothing to notify: give at least one of them"
    assert stored_jobs(cfg_path) == []
    # Data only is a valid job (contract §6), so is a title or a body alone.
    for args in (["--data", "recipe=7"], ["--title", "t"], ["--body", "b"]):
        assert cli_in_process(cfg_path, "send", "--device", "sim-000", *args).returncode == 0, args
    # The same rule for jobs that arrive over MQTT or HTTP.
    with pytest.raises(InputError) as err:
        parse_job({"target": {"all": True}, "notification": {"priority": "high", "data": {}}})
    assert "notification.title, notification.body or notification.data" in err.value.message


# ------------------------------------------------------------------ one key moves the broker's port
def test_broker_url_follows_the_listeners_and_a_stray_url_fails_check_config(tmp_path: Path):
    port = free_port()
    data = base_config(tmp_path, port)
    del data["broker"]["url"]
    cfg = write_config(tmp_path, data)
    res = cli_in_process(cfg, "check-config")
    assert res.returncode == 0, res.stderr
    # The daemon's own client finds the broker on the moved port: it gets ready.
    gw = GatewayProcess(cfg, tmp_path).start()
    try:
        assert f"mqtt://127.0.0.1:{port}" in gw.log()
    finally:
        assert gw.stop() == 0
    # A URL left at the old port is caught before the start, naming the key and the listeners.
    data["broker"]["url"] = "mqtt://127.0.0.1:1883"
    stray = write_config(tmp_path, data, name="stray.toml")
    res = cli_in_process(stray, "check-config")
    assert res.returncode == 2
    assert (f"broker.url: mqtt://127.0.0.1:1883 points at none of the listeners (local tcp 127.0.0.1:{port}); "
            "leave broker.url out to derive it from them") in res.stderr


@pytest.mark.parametrize(("listeners", "url"), [
    ([{"name": "lan", "type": "tcp", "bind": "0.0.0.0:1999"}], "mqtt://127.0.0.1:1999"),
    ([{"name": "v6", "type": "tcp", "bind": "[::]:1999"}], "mqtt://[::1]:1999"),
    ([{"name": "ws", "type": "ws", "bind": "127.0.0.1:9001"},
      {"name": "plain", "type": "tcp", "bind": "127.0.0.1:1884"}], "mqtt://127.0.0.1:1884"),
])
def test_derived_broker_url(listeners: list[dict], url: str):
    from gateway.config import parse_config

    assert parse_config({"broker": {"listeners": listeners}}, {}).config.broker.url == url


@pytest.mark.parametrize(("url", "ok"), [
    ("mqtt://localhost:1999", True), ("mqtt://192.168.1.5:1999", True),   # a wildcard bind takes any address
    ("mqtts://127.0.0.1:1999", False),                                    # the listener is not TLS
    ("mqtt://127.0.0.1:2000", False),
])
def test_a_given_broker_url_must_reach_a_listener(url: str, ok: bool):
    from gateway.config import ConfigError, parse_config

    data = {"broker": {"url": url, "listeners": [{"name": "lan", "bind": "0.0.0.0:1999"}]}}
    if ok:
        parse_config(data, {})
    else:
        with pytest.raises(ConfigError) as err:
            parse_config(data, {})
        assert err.value.lines()[0].startswith(f"broker.url: {url} points at none of the listeners (lan tcp 0.0.0.0:1999)")


# ------------------------------------------------------------------ lists and views
def test_devices_list_has_headers_filters_and_a_limit(tmp_path: Path, cfg_path: Path):
    bulk_register(tmp_path / "var", sims(3) + [
        {"device_id": "plc-1", "segment": "plant", "tags": ["line-1", "north"], "channels": [{"platform": "mqtt"}]},
        {"device_id": "plc-2", "segment": "plant", "tags": ["line-2"],
         "channels": [{"platform": "mqtt"}, {"platform": "simulation"}]},
    ])
    lines = cli_in_process(cfg_path, "devices", "list").stdout.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["DEVICE", "SEGMENT", "CHANNELS", "TAGS", "OWNER", "CONNECTED"]
    assert re.split(r"\s{2,}", lines[-1]) == ["sim-002", "demo", "simulation", "-", "-", "?"]  # no gateway running
    assert len(lines) == 6
    col = lines[0].index("SEGMENT")
    assert all(line[col - 2:col] == "  " for line in lines)  # aligned columns

    def ids(*args: str) -> list[str]:
        out = cli_in_process(cfg_path, "devices", "list", *args)
        assert out.returncode == 0, out.stderr
        return [line.split()[0] for line in out.stdout.splitlines()[1:]]

    assert ids("--segment", "plant") == ["plc-1", "plc-2"]
    assert ids("--platform", "simulation") == ["plc-2", "sim-000", "sim-001", "sim-002"]
    assert ids("--tag", "north") == ["plc-1"]
    assert ids("--tag", "line-1", "--tag", "line-2") == []
    assert ids("--limit", "2") == ["plc-1", "plc-2"]
    listed = json.loads(cli_in_process(cfg_path, "devices", "list", "--segment", "plant", "--json").stdout)
    assert [d["device_id"] for d in listed] == ["plc-1", "plc-2"]

    shown = cli_in_process(cfg_path, "devices", "show", "plc-2").stdout
    assert re.search(r"^segment:\s+plant$", shown, re.M) and re.search(r"^channel 2:\s+simulation$", shown, re.M)
    assert json.loads(cli_in_process(cfg_path, "devices", "show", "plc-2", "--json").stdout)["tags"] == ["line-2"]


def test_jobs_list_has_headers_a_state_filter_and_a_limit(tmp_path: Path, cfg_path: Path):
    bulk_register(tmp_path / "var", sims(2))
    for job in ("j-1", "j-2", "j-3"):
        assert cli_in_process(cfg_path, "send", "--title", "t", "--device", "sim-000", "--job-id", job).returncode == 0
    lines = cli_in_process(cfg_path, "jobs", "list").stdout.splitlines()
    assert lines[0].split() == ["JOB", "STATE", "TARGETS", "QUEUED", "SENT", "ACKED", "FAILED", "EXPIRED", "INVALID", "MUTED",
                                "CREATED"]
    assert [line.split()[0] for line in lines[1:]] == ["j-3", "j-2", "j-1"]
    assert len(cli_in_process(cfg_path, "jobs", "list", "--limit", "2").stdout.splitlines()) == 3
    assert cli_in_process(cfg_path, "jobs", "list", "--state", "acknowledged").stdout.splitlines()[1:] == []
    assert len(cli_in_process(cfg_path, "jobs", "list", "--state", "accepted").stdout.splitlines()) == 4
    bad = cli_in_process(cfg_path, "jobs", "list", "--state", "done")
    assert bad.returncode == 2 and "--state: expected one of accepted, rejected" in bad.stderr
    shown = cli_in_process(cfg_path, "jobs", "show", "j-1").stdout
    assert re.search(r"^state:\s+accepted$", shown, re.M) and re.search(r"^targets:\s+1$", shown, re.M), shown
    assert json.loads(cli_in_process(cfg_path, "jobs", "show", "j-1", "--json").stdout)["job_id"] == "j-1"


# ------------------------------------------------------------------ help
@functools.cache
def _commands():
    """Every command with its path, built once (typer builds the whole tree, ~30 ms, at each
    get_command): read by each parametrized help test."""
    def walk(cmd, path):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    return list(walk(get_command(app), []))


@pytest.mark.parametrize("path", [p for p, _ in _commands()], ids=lambda p: " ".join(p) or "top")
def test_help_keeps_every_word_and_shows_no_python_types(path: list[str]):
    cmd = dict((tuple(p), c) for p, c in _commands())[tuple(path)]
    res = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
    assert res.exit_code == 0
    flat = " ".join(res.output.split())
    texts = [cmd.help or ""] + [p.help for p in cmd.params if getattr(p, "help", None)]
    for text in texts:
        assert " ".join(text.split()) in flat, (text, res.output)
    assert not re.search(r"<(str|int|float|bool|path|list\[[a-z]+\])>", res.output), res.output
    assert all(len(line) <= 80 for line in res.output.splitlines()), res.output


def test_bracketed_config_names_survive_in_help():
    runner = CliRunner()
    assert "Sensor alarms ([[rules]]) and their states." in runner.invoke(app, ["alarms", "--help"]).output
    assert "one from [broker.acl]" in " ".join(runner.invoke(app, ["users", "add", "--help"]).output.split())
    send = " ".join(runner.invoke(app, ["send", "--help"]).output.split())
    assert "Needs one target (--device, --segment, --all or --person) and something to say (--title, --body or --data)." in send


# ------------------------------------------------------------------ status
def test_status_fits_80_columns_with_a_busy_site(monkeypatch, capsys):
    """A full view (a failing check with a long reason, seven-digit counts, every platform)
    stays within 80 columns and cuts no heading or count."""
    from gateway.status import render

    monkeypatch.setenv("COLUMNS", "80")
    reason = "bridges: fcm: the service account key was rejected by Google (invalid_grant); webpush paused"
    info = {
        "site_id": "site-0042", "status": "degraded", "reason": reason,
        "daemon": {"pid": 4194304, "version": "0.1.0", "started_at": "2026-12-07T16:16:47.918Z"},
        "checks": {"loop": {"ok": True, "detail": "lag 0.002 s"}, "bridges": {"ok": False, "detail": reason}},
        "broker": {"mode": "embedded", "client_connected": True, "clients_connected": 1026, "sessions": 1030,
                   "messages_dropped": 0},
        "bridges": {p: {"healthy": p != "fcm", "in_flight": 500, "sent": 1234567, "reason": reason if p == "fcm" else ""}
                    for p in ("apns", "fcm", "mqtt", "simulation", "webpush", "wns")},
        "deliveries": {p: {s: 1234567 for s in ("queued", "sent", "acknowledged", "failed", "expired",
                                               "invalid_address", "suppressed")}
                       for p in ("apns", "fcm", "mqtt", "simulation", "unassigned", "webpush", "wns")},
        "oldest_queued_age_s": 12.0,
        "upstream": {"connected": False, "buffer_rows": 123456, "buffer_bytes": 98765432,
                     "buffer_oldest_age_s": 3600.0, "drain_rate": 12.5},
        "alarms_firing": [],
    }
    render(info)
    out = capsys.readouterr().out
    assert all(len(line) <= 80 for line in out.splitlines()), "\n".join(l for l in out.splitlines() if len(l) > 80)
    assert "…" not in out, out
    header = next(line for line in out.splitlines() if "platform" in line and "queued" in line)
    assert header.split() == ["platform", "queued", "sent", "acked", "failed", "expired", "invalid"]
    assert out.count("1234567") >= 7 * 6


def test_a_command_closes_its_database_when_it_ends(cfg_path: Path):
    """Run in-process (as here, or from another program), a command leaves no connection
    open behind it: the last connection to close checkpoints and removes the -wal file, so
    a daemon started and stopped later finds the database as the CLI left it."""
    db = cfg_path.parent / "var" / "gateway.db"
    assert cli_in_process(cfg_path, "devices", "add", "tab-1", "--platform", "simulation").returncode == 0
    assert cli_in_process(cfg_path, "send", "--body", "x", "--device", "tab-1", "--job-id", "j-1").returncode == 0
    assert db.exists()
    assert not Path(f"{db}-wal").exists(), "a connection of the CLI is still open"
