"""The service install (issue 14.3) and the CLI run as root against it (issue 9.10).

``systemd/install.sh`` runs for real — a venv built with the system Python, a real system
user, the unit checked by ``systemd-analyze verify`` — but into a temporary root (every
location is an environment variable), so the machine's /opt, /etc and /usr stay untouched;
the user is deleted afterwards. The daemon then runs as that user from the installed venv,
as systemd would start it, while root uses the linked CLI on the same state.
"""

from __future__ import annotations

import json
import os
import pwd
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


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    if os.geteuid() != 0:
        pytest.fail("the service install test needs root (CI runs as root)", pytrace=False)
    require_tool("useradd")
    require_tool("systemd-analyze")
    root = Path(tempfile.mkdtemp(prefix="hpgw-root-", dir="/tmp"))
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
        for _ in range(2):  # idempotent: the second run changes nothing and succeeds
            res = subprocess.run([str(ROOT / "systemd" / "install.sh")], env={**os.environ, **env},
                                 capture_output=True, text=True, timeout=600)
            assert res.returncode == 0, res.stdout + res.stderr
            runs.append(res)
        yield Installed(root, user, env, runs)
    finally:
        subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", user], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_install_is_one_idempotent_step(installed: Installed):
    first, second = (r.stdout for r in installed.runs)
    assert f"created system user {installed.user}" in first and "created system user" not in second
    assert f"wrote {installed.config}" in first and f"kept the existing {installed.config}" in second
    assert "code unchanged since the last install" in second
    assert "listeners" in first and "allow_anonymous" in first and "bridges" in first  # what to edit next

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
    port = free_port()
    text = installed.config.read_text()
    installed.config.write_text(text.replace("127.0.0.1:1883", f"127.0.0.1:{port}"))
    daemon = ServiceDaemon(installed)
    daemon.start()
    try:
        # users add as root: the running broker (another user) must be able to read the file.
        res = root_cli(installed, "users", "add", "plc-1", "--role", "device", "--password-stdin", input="pw-1\n")
        assert res.returncode == 0, res.stderr
        from tests.test_reload import connect_rc

        assert connect_rc(port, "plc-1", "pw-1") == 0
        assert root_cli(installed, "devices", "add", "sim-1", "--platform", "simulation").returncode == 0
        res = root_cli(installed, "send", "--title", "t", "--all", "--job-id", "svc-1", "--wait",
                       "--until", "acknowledged", "--timeout", "60")
        assert res.returncode == 0, res.stderr
        assert "no homepot-gateway daemon" not in res.stderr
        listed = root_cli(installed, "jobs", "list", "--json")
        assert [j["state"] for j in json.loads(listed.stdout) if j["job_id"] == "svc-1"] == ["acknowledged"]
        assert root_cli(installed, "vapid-keys").returncode == 0
        assert not foreign_files(installed), foreign_files(installed)
        assert daemon.stop() == 0

        # With the service down, root's CLI creates the database side files itself.
        res = root_cli(installed, "send", "--title", "t", "--all", "--job-id", "svc-2")
        assert res.returncode == 0 and "no homepot-gateway daemon runs on" in res.stderr
        assert root_cli(installed, "devices", "add", "sim-2", "--platform", "simulation").returncode == 0
        assert root_cli(installed, "users", "add", "plc-2", "--role", "device", "--password-stdin",
                        input="pw-2\n").returncode == 0
        assert not foreign_files(installed), foreign_files(installed)

        # The service starts on that state and finishes the job queued while it was down.
        daemon.start()
        res = root_cli(installed, "send", "--title", "t", "--all", "--job-id", "svc-3", "--wait",
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
