"""The data dir is owner-only whatever the umask (gateway/filemodes.py).

Outside the shipped unit (``make run``, containers: umask 022) the database, its WAL and
shm, the lock, keys, the ack secret and the runtime snapshot hold notification text,
signed ack URLs, push tokens and password hashes. The real daemon and the CLI run here
with a loose umask, and every entry of the data dir is checked. The CLI runs in this
process (it narrows the umask of the process it runs in, here as in its own) except as
root, where it becomes the service user, and for one ``status`` that proves a CLI process
started under a loose umask leaves nothing loose either.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import CliResult, cli_in_process
from tests.support import base_config, free_port, write_config


def loose(data_dir: Path) -> list[str]:
    """Every entry of ``data_dir`` (itself included) that group or others may use."""
    out = []
    for path in [data_dir, *data_dir.rglob("*")]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
        if st.st_mode & 0o077 or stat.S_IMODE(st.st_mode) & ~want:
            out.append(f"{path.relative_to(data_dir.parent)} {oct(stat.S_IMODE(st.st_mode))}")
    return out


def config_with_everything(tmp_path: Path, port: int) -> Path:
    data = base_config(tmp_path, port, http={"bind": f"127.0.0.1:{free_port()}"},
                       bridges={"webpush": {"enabled": True,
                                            "vapid_private_key_file": str(tmp_path / "var" / "vapid_private.pem")}})
    return write_config(tmp_path, data)


def run_cli(config: Path, *args: str, stdin: str | None = None) -> CliResult:
    res = cli_in_process(config, *args, input=stdin)
    assert res.returncode == 0, f"{args}: {res.stdout}{res.stderr}"
    return res


def run_cli_process(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI in its own process: for the root case, where it gives up root for the data
    dir's owner (this process must not)."""
    res = subprocess.run([sys.executable, "-m", "gateway", "--config", str(config), *args], input=stdin,
                         capture_output=True, text=True, cwd=config.parent, timeout=120)
    assert res.returncode == 0, f"{args}: {res.stdout}{res.stderr}"
    return res


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_daemon_and_cli_leave_only_owner_files_whatever_the_umask(tmp_path: Path, umask: int):
    """umask 022 (make run, containers) and 000: the CLI creates the data dir (users add,
    vapid-keys, devices add before the daemon ever ran), the daemon runs with HTTP and Web
    Push on (ack secret, VAPID key, lock, runtime snapshot, database with WAL and shm), a
    job goes out; every file is 0600 and every dir 0700, while it runs and after it stops."""
    from tests.support import GatewayProcess

    port = free_port()
    config = config_with_everything(tmp_path, port)
    data_dir = tmp_path / "var"
    old = os.umask(umask)  # the daemon inherits it; the autouse fixture restores ours
    try:
        run_cli(config, "users", "add", "tech", "--role", "technician", "--password-stdin", stdin="pw-123456\n")
        run_cli(config, "vapid-keys")
        run_cli(config, "devices", "add", "dev-1", "--platform", "simulation", "--address", "")
        assert loose(data_dir) == []
        gw = GatewayProcess(config, tmp_path)
        gw.start()
        try:
            run_cli(config, "send", "--title", "t", "--body", "b", "--device", "dev-1", "--wait", "--timeout", "30")
            run_cli(config, "jobs", "list", "--json")
            run_cli(config, "alarms", "list")
            assert subprocess.run([sys.executable, "-m", "gateway", "--config", str(config), "status"],
                                  capture_output=True, cwd=tmp_path).returncode in (0, 1)
            names = {p.name for p in data_dir.iterdir()}
            assert {"gateway.db", "gateway.db-wal", "gateway.db-shm", "gateway.lock", "passwd", "ack_secret",
                    "vapid_private.pem"} <= names, names
            deadline = time.monotonic() + 15
            while not any(n.startswith("runtime") for n in names) and time.monotonic() < deadline:
                time.sleep(0.1)
                names = {p.name for p in data_dir.iterdir()}
            assert any(n.startswith("runtime") for n in names), names
            assert loose(data_dir) == []
        finally:
            assert gw.stop() == 0, gw.log()
    finally:
        os.umask(old)
    assert loose(data_dir) == []
    assert "data_dir tightened" not in gw.log()  # nothing was loose: nothing to say


def test_a_loose_data_dir_is_tightened_once_at_start(gateway_factory, tmp_path: Path):
    """A data dir an older version (or a copy by hand) left 0755 with a 0644 database is
    made owner-only when the daemon starts, and the daemon says once, at info, what it changed."""
    data_dir = tmp_path / "var"
    old = os.umask(0o022)
    try:
        data_dir.mkdir(mode=0o755)
        from tests.support import bulk_register

        bulk_register(data_dir, [{"device_id": "d1", "channels": [{"platform": "simulation"}]}])
        (data_dir / "notes").mkdir(mode=0o755)
        (data_dir / "notes" / "copied.txt").write_text("x")
        os.chmod(data_dir, 0o755)
        assert len(loose(data_dir)) >= 4  # the dir, the db, notes/, notes/copied.txt
        gw = gateway_factory()
    finally:
        os.umask(old)
    assert loose(data_dir) == []
    lines = [json.loads(line) for line in gw.log().splitlines() if line.startswith("{")]
    tightened = [e for e in lines if e.get("event") == "data_dir tightened to owner-only"]
    assert len(tightened) == 1 and tightened[0]["level"] == "info", tightened
    assert "gateway.db 0o644->0o600" in tightened[0]["changed"] and ". 0o755->0o700" in tightened[0]["changed"]
    assert gw.stop() == 0
    gw.start()  # nothing loose any more: nothing logged
    assert gw.stop() == 0
    assert "data_dir tightened" not in gw.log()


def test_the_cli_tightens_and_says_so(tmp_path: Path):
    config = write_config(tmp_path, base_config(tmp_path, free_port()))
    data_dir = tmp_path / "var"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)
    (data_dir / "gateway.db").touch()
    os.chmod(data_dir / "gateway.db", 0o644)
    res = cli_in_process(config, "devices", "list")
    assert res.returncode == 0, res.stderr
    assert f"note: {data_dir} made owner-only (2 entries" in res.stderr, res.stderr
    assert loose(data_dir) == []


def test_cli_as_root_leaves_the_service_user_owner_only_files(tmp_path: Path):
    """Run as root (umask 022) against a data dir that a service user owns (contract §3): the
    CLI becomes that user, so what it creates is the user's and owner-only."""
    if os.geteuid() != 0:
        pytest.fail("needs root (CI runs as root)", pytrace=False)
    nobody = 65534
    root = Path(tempfile.mkdtemp(prefix="hpgw-modes-", dir="/tmp"))
    try:
        root.chmod(0o755)  # the service user must reach its data dir
        data_dir = root / "var"
        data_dir.mkdir(mode=0o755)
        os.chown(data_dir, nobody, nobody)
        data = base_config(root, free_port())
        config = write_config(root, data)
        old = os.umask(0o022)
        try:
            run_cli_process(config, "users", "add", "tech", "--role", "technician", "--password-stdin", stdin="pw-123456\n")
            run_cli_process(config, "vapid-keys")
            run_cli_process(config, "devices", "add", "dev-1", "--platform", "simulation", "--address", "")
        finally:
            os.umask(old)
        entries = [data_dir, *data_dir.rglob("*")]
        assert {p.name for p in entries} >= {"var", "passwd", "vapid_private.pem", "gateway.db"}
        assert [p.name for p in entries if p.lstat().st_uid != nobody] == []
        assert loose(data_dir) == []
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_shared_sticky_dir_is_left_alone_and_a_stricter_umask_kept(tmp_path: Path):
    """data_dir = "/tmp" by mistake must not make /tmp private; a umask stricter than 077 stays."""
    from gateway import filemodes

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    (shared / "someone-elses").write_text("x")
    os.chmod(shared / "someone-elses", 0o644)
    done = filemodes.tighten(shared)
    assert done.changed == [] and "sticky" in (done.skipped or "")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert stat.S_IMODE((shared / "someone-elses").stat().st_mode) == 0o644
    os.umask(0o277)
    assert filemodes.restrict_umask() == 0o277
    os.umask(0o002)
    assert filemodes.restrict_umask() == 0o077
