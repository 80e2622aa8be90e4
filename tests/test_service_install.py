"""The service install (issue 14.3) and the CLI run as root against it (issue 9.10).

``systemd/install.sh`` runs for real — a venv built with the system Python, a real system
user, the unit checked by ``systemd-analyze verify`` — but into a temporary root (every
location is an environment variable), so the machine's /opt, /etc and /usr stay untouched;
the user is deleted afterwards. The daemon then runs as that user from the installed venv,
as systemd would start it, while root uses the linked CLI on the same state.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import ROOT, free_port, require_tool

pytestmark = pytest.mark.slow


@dataclass
class Installed:
    root: Path
    user: str
    env: dict[str, str]
    runs: list[subprocess.CompletedProcess[str]]
    # The checkout's build artifacts (build/, *.egg-info; path -> mtime) before and after.
    artifacts: tuple[dict[str, int], dict[str, int]]

    def path(self, key: str) -> Path:
        return Path(self.env[key])

    @property
    def cli(self) -> Path:
        return self.path("BINDIR") / "homepot-gateway"

    @property
    def config(self) -> Path:
        return self.path("CONFDIR") / "config.toml"

    @property
    def state(self) -> Path:
        return self.path("STATEDIR")


def build_artifacts() -> dict[str, int]:
    """What a build in the checkout leaves there (setuptools' build/ and *.egg-info)."""
    paths = [p for top in [ROOT / "build", *ROOT.glob("*.egg-info")] for p in [top, *top.rglob("*")]
             if p.exists()]
    return {str(p.relative_to(ROOT)): p.stat().st_mtime_ns for p in paths}


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    if os.geteuid() != 0:
        pytest.fail("the service install test needs root (CI runs as root)", pytrace=False)
    require_tool("useradd")
    require_tool("systemd-analyze")
    # Not under /tmp: the unit's PrivateTmp= would hide the install from the service when the
    # real-systemd test starts it.
    Path("/srv").mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="hpgw-root-", dir="/srv"))
    root.chmod(0o755)  # the service user must reach its state dir and the venv below it
    user = f"hpgwtest{os.getpid() % 100000}"
    env = {
        "PREFIX": str(root / "opt/homepot-gateway"), "BINDIR": str(root / "usr/local/bin"),
        "CONFDIR": str(root / "etc/homepot-gateway"), "STATEDIR": str(root / "var/lib/homepot-gateway"),
        "UNITDIR": str(root / "etc/systemd/system"), "DOCDIR": str(root / "usr/share/doc/homepot-gateway"),
        "SERVICE_USER": user,
    }
    runs = []
    try:
        before = build_artifacts()
        for _ in range(2):  # idempotent: the second run changes nothing and succeeds
            res = subprocess.run([str(ROOT / "systemd" / "install.sh")], env={**os.environ, **env},
                                 capture_output=True, text=True, timeout=600)
            assert res.returncode == 0, res.stdout + res.stderr
            runs.append(res)
        yield Installed(root, user, env, runs, (before, build_artifacts()))
    finally:
        subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", user], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_install_is_one_idempotent_step(installed: Installed):
    first, second = (r.stdout for r in installed.runs)
    assert f"created system user {installed.user}" in first and "created system user" not in second
    assert f"wrote {installed.config}" in first and f"kept the existing {installed.config}" in second
    assert "code unchanged since the last install" in second
    assert "listeners" in first and "no anonymous clients" in first and "bridges" in first  # what to edit next

    # The venv's pip was brought up to date at its creation (an old distribution pip spends
    # most of the install matching index files): as current as the one `make install-test`
    # upgraded this checkout's venv to, not the one the system's venv bundles.
    dists = list(installed.path("PREFIX").glob("lib/python3*/site-packages/pip-*.dist-info"))
    assert len(dists) == 1, dists
    assert _release(dists[0].name.removesuffix(".dist-info").split("-")[1]) >= _release(importlib.metadata.version("pip"))

    # The install wrote nothing into the checkout, and it installed exactly the checkout's
    # modules (a build in the checkout would keep, in build/lib, every module it ever copied).
    assert installed.artifacts[1] == installed.artifacts[0]
    site = dists[0].parent
    for package in ("gateway", "bridges", "devices"):
        assert ({p.relative_to(site) for p in (site / package).rglob("*.py")}
                == {p.relative_to(ROOT) for p in (ROOT / package).rglob("*.py")}), package

    # The CLI is on the PATH directory, and it runs.
    assert installed.cli.is_symlink() and installed.cli.resolve() == (installed.path("PREFIX") / "bin/homepot-gateway").resolve()
    check = subprocess.run([str(installed.cli), "--config", str(installed.config), "check-config"],
                           capture_output=True, text=True, cwd="/")
    assert check.returncode == 0, check.stderr

    # The config has absolute paths under the state dir, never ./var.
    text = installed.config.read_text()
    assert "./var" not in text
    assert f'data_dir = "{installed.state}"' in text and f'password_file = "{installed.state}/passwd"' in text
    assert 'format = "json"' in text
    st = installed.config.stat()
    assert (st.st_mode & 0o777, st.st_uid) == (0o640, 0)
    entry = pwd.getpwnam(installed.user)
    assert st.st_gid == entry.pw_gid
    state = installed.state.stat()
    assert (state.st_uid, state.st_mode & 0o777) == (entry.pw_uid, 0o700)
    assert entry.pw_shell.endswith("nologin")

    # The unit points at the install, its documentation exists, and systemd accepts it.
    unit = installed.path("UNITDIR") / "homepot-gateway.service"
    body = unit.read_text()
    assert f"ExecStart={installed.path('PREFIX')}/bin/homepot-gateway --config {installed.config} run" in body
    assert f"User={installed.user}" in body and "DynamicUser" not in body
    doc = [line for line in body.splitlines() if line.startswith("Documentation=")][0]
    assert Path(doc.removeprefix("Documentation=file://")).read_text() == (ROOT / "README.md").read_text()
    # ... with the docs/ it links to, so its links work where it is installed.
    installed = Path(doc.removeprefix("Documentation=file://")).parent
    assert (installed / "docs" / "configuration.md").read_text() == (ROOT / "docs" / "configuration.md").read_text()
    assert (installed / "docs" / "operator-page.png").is_file()
    verify = subprocess.run([require_tool("systemd-analyze"), "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    assert "homepot-gateway.service" not in verify.stderr, verify.stderr


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def test_install_writes_a_closed_production_config_and_an_upgrade_keeps_an_edited_one(installed: Installed):
    """The demo config (simulation fleet, anonymous technicians on loopback, test rules) is
    the checkout's, not a site's: the install writes the closed template instead."""
    import tomllib

    text = installed.config.read_text()
    cfg = tomllib.loads(text)
    listeners = cfg["broker"]["listeners"]
    assert listeners and all(lst.get("allow_anonymous") is False for lst in listeners), listeners
    assert cfg["bridges"]["simulation"]["enabled"] is False
    assert "rules" not in cfg and "url" not in cfg["broker"]
    assert cfg["logging"]["format"] == "json"
    # TLS and the push platforms are there to uncomment, with paths of this install.
    assert '# type = "tls"' in text and f'# certfile = "{installed.path("CONFDIR")}/broker.pem"' in text
    for section in ("# [bridges.fcm]", "# [bridges.apns]"):
        assert section in text
    assert cfg["bridges"]["webpush"] == {"enabled": False,
                                         "vapid_private_key_file": f"{installed.state}/vapid_private.pem"}
    assert "@" + "STATEDIR@" not in text and "@" + "CONFDIR@" not in text
    # No role that can send jobs gets in without an account: an anonymous CONNECT is refused.
    moved, port, _ = on_free_ports(text)
    installed.config.write_text(moved)
    daemon = ServiceDaemon(installed)
    daemon.start()
    try:
        from tests.test_reload import connect_rc

        assert connect_rc(port, None, None) != 0
    finally:
        assert daemon.stop() == 0
    # An upgrade keeps the operator's config byte for byte.
    edited = text + "\n# edited by the operator\n"
    installed.config.write_text(edited)
    res = subprocess.run([str(ROOT / "systemd" / "install.sh")], env={**os.environ, **installed.env},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"kept the existing {installed.config}" in res.stdout
    assert installed.config.read_text() == edited


class ServiceDaemon:
    """The installed daemon, started the way the unit starts it: as the service user."""

    def __init__(self, inst: Installed):
        self.inst = inst
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = inst.root / "daemon.log"

    def start(self) -> None:
        entry = pwd.getpwnam(self.inst.user)
        self.log.write_bytes(b"")
        self.proc = subprocess.Popen(
            [str(self.inst.path("PREFIX") / "bin/homepot-gateway"), "--config", str(self.inst.config), "run"],
            cwd=self.inst.state, user=entry.pw_uid, group=entry.pw_gid, extra_groups=[],
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, stdout=subprocess.DEVNULL,
            stderr=open(self.log, "wb"))
        deadline = time.monotonic() + 60
        while "gateway ready" not in self.log.read_text(errors="replace"):
            assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)


def on_free_ports(text: str) -> tuple[str, int, int]:
    """The installed config with its broker listener and [http] on ports free a moment ago
    (whatever ports earlier tests chose), not 1883/8080: other processes on a test machine
    may hold those. The listener's bind comes first, [http]'s second."""
    port, http_port = free_port(), free_port()
    fresh = iter([port, http_port])
    moved = re.sub(r'bind = "127\.0\.0\.1:\d+"', lambda m: f'bind = "127.0.0.1:{next(fresh)}"', text, count=2)
    assert moved.count(f":{port}\"") == 1 and moved.count(f":{http_port}\"") == 1, moved
    return moved, port, http_port


def root_cli(inst: Installed, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """The operator's `sudo homepot-gateway ...`: root, from an unrelated directory."""
    return subprocess.run([str(inst.cli), "--config", str(inst.config), *args], capture_output=True, text=True,
                          cwd="/", input=input, timeout=120)


def foreign_files(inst: Installed) -> list[str]:
    uid = pwd.getpwnam(inst.user).pw_uid
    out = []
    for path in [inst.state, *inst.state.rglob("*")]:
        st = path.lstat()
        if st.st_uid != uid:
            out.append(f"{path} uid={st.st_uid}")
    return out


def test_root_cli_against_the_service_leaves_nothing_the_service_cannot_use(installed: Installed):
    text = installed.config.read_text()
    # The demo fleet is off in the installed config; this test's devices are simulated.
    text = text.replace("[bridges.simulation]\nenabled = false", "[bridges.simulation]\nenabled = true")
    moved, port, _ = on_free_ports(text)
    installed.config.write_text(moved)
    daemon = ServiceDaemon(installed)
    daemon.start()
    try:
        # users add as root: the running broker (another user) must be able to read the file.
        res = root_cli(installed, "users", "add", "plc-1", "--role", "device", "--password-stdin", input="pw-1\n")
        assert res.returncode == 0, res.stderr
        from tests.test_reload import connect_rc

        assert connect_rc(port, "plc-1", "pw-1") == 0
        assert root_cli(installed, "devices", "add", "sim-1", "--platform", "simulation").returncode == 0
        res = root_cli(installed, "send", "--title", "t", "--all", "--yes", "--job-id", "svc-1", "--wait",
                       "--until", "acknowledged", "--timeout", "60")
        assert res.returncode == 0, res.stderr
        assert "no homepot-gateway daemon" not in res.stderr
        listed = root_cli(installed, "jobs", "list", "--json")
        assert [j["state"] for j in json.loads(listed.stdout) if j["job_id"] == "svc-1"] == ["acknowledged"]
        assert root_cli(installed, "vapid-keys").returncode == 0
        assert not foreign_files(installed), foreign_files(installed)
        assert daemon.stop() == 0

        # With the service down, root's CLI creates the database side files itself.
        res = root_cli(installed, "send", "--title", "t", "--all", "--yes", "--job-id", "svc-2")
        assert res.returncode == 0 and "no homepot-gateway daemon runs on" in res.stderr
        assert root_cli(installed, "devices", "add", "sim-2", "--platform", "simulation").returncode == 0
        assert root_cli(installed, "users", "add", "plc-2", "--role", "device", "--password-stdin",
                        input="pw-2\n").returncode == 0
        assert not foreign_files(installed), foreign_files(installed)

        # The service starts on that state and finishes the job queued while it was down.
        daemon.start()
        res = root_cli(installed, "send", "--title", "t", "--all", "--yes", "--job-id", "svc-3", "--wait",
                       "--until", "acknowledged", "--timeout", "60")
        assert res.returncode == 0, res.stderr
        shown = json.loads(root_cli(installed, "jobs", "show", "svc-2", "--json").stdout)
        assert shown["state"] == "acknowledged", shown
        assert connect_rc(port, "plc-2", "pw-2") == 0
        assert daemon.stop() == 0
        assert not foreign_files(installed), foreign_files(installed)
        assert "Traceback" not in daemon.log.read_text()
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


# --------------------------------------------------------------------------- under a real systemd
def _prepare_nspawn_host() -> None:
    """What systemd-nspawn expects of a host that runs systemd, made by hand on one that does
    not (these machines boot a VM init as PID 1): the inaccessible nodes it bind-mounts over
    /proc entries, and a tmpfs for its propagation directory (it refuses to clean one up on
    a disk file system)."""
    import socket
    import stat as st

    base = Path("/run/systemd/inaccessible")
    base.mkdir(parents=True, exist_ok=True)
    nodes = {"reg": st.S_IFREG, "dir": None, "chr": st.S_IFCHR, "blk": st.S_IFBLK, "fifo": st.S_IFIFO}
    for name, kind in nodes.items():
        path = base / name
        if path.exists():
            continue
        if kind is None:
            path.mkdir(mode=0)
        else:
            os.mknod(path, kind | 0, os.makedev(0, 0))
        path.chmod(0)
    if not (base / "sock").exists():
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(base / "sock"))
        sock.close()
        (base / "sock").chmod(0)
    propagate = Path("/run/systemd/nspawn")
    propagate.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mountpoint", "-q", str(propagate)]).returncode != 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(propagate)], check=True)


class Container:
    """systemd as PID 1 on the host's own /usr with a throw-away tmpfs root
    (``systemd-nspawn --directory=/ --volatile=yes --boot``; nspawn refuses an overlay on
    the host's root), the install root bound in at its path, the host's user database (the
    service user) and the unit bound read-only. It boots to basic.target: the services
    of a multi-user boot (the unit itself among them, enabled by the first boot's presets;
    logind, networkd, ...) would each start and cost CPU before the test starts the unit
    itself."""

    def __init__(self, inst: Installed, unit: Path):
        self.name = f"hpgw{os.getpid() % 100000}"
        self.log = inst.root / "container.log"
        self.proc = subprocess.Popen(
            [require_tool("systemd-nspawn"), "--quiet", "--register=no", "--keep-unit", "--directory=/",
             "--volatile=yes", f"--machine={self.name}", f"--bind={inst.root}",
             "--bind-ro=/etc/passwd", "--bind-ro=/etc/group", "--bind-ro=/etc/nsswitch.conf",
             f"--bind-ro={unit}:/etc/systemd/system/homepot-gateway.service", "--boot",
             "systemd.firstboot=off", "systemd.unit=basic.target"],
            stdin=subprocess.DEVNULL, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        self.leader = self._find_leader()
        self.wait_booted()

    def _find_leader(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"systemd-nspawn exited {self.proc.returncode}:\n{self.log.read_text()}"
            todo, seen = [self.proc.pid], set()
            while todo:
                pid = todo.pop()
                seen.add(pid)
                try:
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd" and pid != self.proc.pid:
                        return pid
                    for task in Path(f"/proc/{pid}/task").iterdir():
                        todo += [int(c) for c in (task / "children").read_text().split() if int(c) not in seen]
                except (FileNotFoundError, ProcessLookupError):
                    continue
            time.sleep(0.2)
        raise AssertionError(f"no systemd in the container:\n{self.log.read_text()}")

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", f"--target={self.leader}", "--all", *args], capture_output=True, text=True,
                              timeout=timeout, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})

    def wait_booted(self) -> None:
        deadline = time.monotonic() + 180
        state = ""
        while time.monotonic() < deadline:
            state = self.run("systemctl", "is-system-running").stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.5)
        raise AssertionError(f"the container's systemd did not finish booting ({state!r}):\n{self.log.read_text()}")

    def show(self, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", "homepot-gateway", "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self) -> list[str]:
        return self.run("journalctl", "-u", "homepot-gateway", "-o", "cat", "--no-pager").stdout.splitlines()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.run("systemctl", "poweroff", "--no-block")
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_the_unit_under_a_real_systemd(installed: Installed):
    """systemd 252 as PID 1 in a container starts the installed unit with all its hardening:
    READY=1, watchdog pings, reload, stop within TimeoutStopSec, JSON lines in the journal,
    argon2 (password check in the daemon) and cffi/libcurl under MemoryDenyWriteExecute and
    the syscall filter."""
    require_tool("systemd-nspawn")
    require_tool("nsenter")
    _prepare_nspawn_host()
    text = installed.config.read_text()
    moved, port, http_port = on_free_ports(text)
    installed.config.write_text(moved)
    assert root_cli(installed, "users", "add", "plc-1", "--role", "device", "--password-stdin",
                    input="pw-1\n").returncode == 0
    # The installed unit, with a short watchdog so that a missing ping shows within the test.
    unit = installed.root / "unit-under-test.service"
    body = (installed.path("UNITDIR") / "homepot-gateway.service").read_text()
    unit.write_text(body.replace("WatchdogSec=30s", "WatchdogSec=3s"))
    box = Container(installed, unit)
    try:
        # `restart`, not `start`: the same call whether or not something started it already.
        started = time.monotonic()
        res = box.run("systemctl", "restart", "homepot-gateway", timeout=90)
        assert res.returncode == 0, res.stderr + "\n".join(box.journal())
        # Type=notify: "active (running)" only once the daemon sent READY=1.
        props = box.show("ActiveState", "SubState", "MainPID", "StatusText", "NRestarts",
                         "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
        assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
        assert props["StatusText"].startswith("running"), props
        main_pid = props["MainPID"]
        # systemd's own clock: from the exec to READY=1 (the daemon's start-up, imports included).
        ready_s = (int(props["ActiveEnterTimestampMonotonic"]) - int(props["ExecMainStartTimestampMonotonic"])) / 1e6
        assert 0 < ready_s < 60, props
        start_call_s = time.monotonic() - started
        assert start_call_s >= ready_s, (start_call_s, props)  # systemctl waited for READY=1

        # argon2 in the daemon: a device account logs in.
        from tests.test_reload import connect_rc

        assert connect_rc(port, "plc-1", "pw-1") == 0
        assert connect_rc(port, "plc-1", "wrong") != 0

        # The watchdog: pings keep a 3 s watchdog happy for 4 periods (systemd kills a silent one).
        # Checked after the sandbox probe below, which runs meanwhile.
        first = box.show("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]
        watched_from = time.monotonic()

        # cffi/libcurl and argon2 under the unit's own sandbox (same user, same hardening).
        hardening = [line for line in body.splitlines()
                     if line.split("=", 1)[0] in ("MemoryDenyWriteExecute", "SystemCallFilter", "ProtectSystem",
                                                  "SystemCallArchitectures", "NoNewPrivileges", "User",
                                                  "RestrictAddressFamilies", "LockPersonality")]
        probe = ("import argon2, curl_cffi.requests as r;"
                 "h = argon2.PasswordHasher(); assert h.verify(h.hash('x'), 'x');"
                 f"print(r.get('http://127.0.0.1:{http_port}/healthz', timeout=10).status_code)")
        res = box.run("systemd-run", "--quiet", "--wait", "--pipe", "--collect",
                      *[f"--property={line}" for line in hardening],
                      f"{installed.path('PREFIX')}/bin/python", "-c", probe, timeout=120)
        assert res.returncode == 0 and res.stdout.strip() in ("200", "503"), res.stdout + res.stderr

        time.sleep(max(0.0, watched_from + 12 - time.monotonic()))
        props = box.show("ActiveState", "MainPID", "NRestarts", "WatchdogTimestampMonotonic", "WatchdogUSec")
        assert props["WatchdogUSec"] in ("3s", "3000000"), props
        assert (props["ActiveState"], props["MainPID"], props["NRestarts"]) == ("active", main_pid, "0"), props
        assert int(props["WatchdogTimestampMonotonic"]) > int(first), (first, props)

        # systemctl reload: SIGHUP re-reads the password file, logged.
        res = box.run("systemctl", "reload", "homepot-gateway")
        assert res.returncode == 0, res.stderr
        deadline = time.monotonic() + 20
        while not any("reload" in line for line in box.journal()):
            assert time.monotonic() < deadline, "\n".join(box.journal())
            time.sleep(0.2)

        # stop within TimeoutStopSec (15 s), cleanly.
        t0 = time.monotonic()
        res = box.run("systemctl", "stop", "homepot-gateway", timeout=60)
        stop_call_s = time.monotonic() - t0
        assert res.returncode == 0, res.stderr
        props = box.show("ActiveState", "Result", "ExecMainStatus", "ActiveExitTimestampMonotonic",
                         "InactiveEnterTimestampMonotonic")
        stop_s = (int(props["InactiveEnterTimestampMonotonic"]) - int(props["ActiveExitTimestampMonotonic"])) / 1e6
        assert {k: props[k] for k in ("ActiveState", "Result", "ExecMainStatus")} == {
            "ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, props
        assert 0 <= stop_s < 15 and stop_call_s < 15, (stop_s, stop_call_s)

        # The journal holds the daemon's JSON lines (the installed config logs json).
        lines = [line for line in box.journal() if line.startswith("{")]
        events = [json.loads(line) for line in lines]
        assert any(e.get("event") == "gateway ready" for e in events), lines[-20:]
        assert not [e for e in events if e.get("level") in ("error", "critical")], lines
        print(f"READY=1 {ready_s:.2f} s after exec (systemctl restart returned in {start_call_s:.2f} s); "
              f"stopped in {stop_s:.2f} s (systemctl stop returned in {stop_call_s:.2f} s)")
    finally:
        box.close()
        installed.config.write_text(text)
