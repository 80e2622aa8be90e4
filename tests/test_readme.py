"""The README's Quick start runs as written.

Every fenced block preceded by ``<!-- tested -->`` is run, command by command, in README
order, in a copy of this checkout, against a daemon started the way the README says
(the block marked ``<!-- tested: daemon -->``, i.e. ``make run``). Conventions, which the
README's readers see as ordinary shell:

- a command ending in ``&`` runs in the background; the next command starts once it has
  printed its first line (the agent's ``{"event": "ready"}``, mosquitto_sub's first message);
- a comment line ``# → TEXT`` under a command is its documented result: TEXT must appear
  in what the command printed (for a background command: by the end of the run);
- every foreground command must exit 0.

So that the commands can run verbatim (port 1883, no ``-p``), everything runs inside a
network namespace of its own: nothing else on the machine can hold the port, and nothing
here touches the machine's network. No network access is needed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import ROOT, require_tool

README = ROOT / "README.md"
MARK = re.compile(r"^<!--\s*tested(?::\s*(\w+))?\s*-->\s*$")
EXPECT = re.compile(r"^#\s*→\s*(.+)$")


@dataclass
class Command:
    text: str
    line: int
    background: bool = False
    expect: list[str] = field(default_factory=list)


@dataclass
class Block:
    kind: str  # "daemon" or "run"
    line: int
    commands: list[Command]


def _tokens(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars="&;|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def _strip_background(text: str) -> tuple[str, bool]:
    """``cmd args &  # comment`` → (``cmd args``, True); an ``&`` inside quotes is not one."""
    tokens = _tokens(text)
    if not tokens or tokens[-1] != "&":
        return text, False
    m = re.match(r"^(.*?)\s*&\s*(#.*)?$", text)
    assert m and _tokens(m.group(1)) == tokens[:-1], f"cannot find the background '&' in {text!r}"
    return m.group(1), True


def parse_readme(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = MARK.match(lines[i].strip())
        if not m:
            i += 1
            continue
        assert i + 1 < len(lines) and lines[i + 1].startswith("```"), f"README.md:{i + 1}: a mark must precede a fence"
        start = i + 2
        end = start
        while not lines[end].startswith("```"):
            end += 1
        commands: list[Command] = []
        pending = ""
        for n in range(start, end):
            raw = lines[n]
            expect = EXPECT.match(raw.strip())
            if expect and not pending:
                assert commands, f"README.md:{n + 1}: '# →' must follow a command"
                commands[-1].expect.append(expect.group(1).strip())
                continue
            if not raw.strip() or (raw.strip().startswith("#") and not pending):
                continue
            if raw.endswith("\\"):
                pending += raw[:-1] + " "
                continue
            full = pending + raw
            pending = ""
            cmd, bg = _strip_background(full)
            commands.append(Command(cmd, n + 1, bg))
        blocks.append(Block(m.group(1) or "run", i + 1, commands))
        i = end + 1
    return blocks


def test_the_readme_marks_what_it_runs():
    blocks = parse_readme(README.read_text())
    kinds = [b.kind for b in blocks]
    assert kinds and kinds[0] == "daemon" and kinds.count("daemon") == 1, kinds
    assert [_tokens(c.text) for c in blocks[0].commands] == [["make", "run"]]
    commands = [c for b in blocks[1:] for c in b.commands]
    joined = "\n".join(c.text for c in commands)
    # The end-to-end path a new user takes: an account for the device, the agent, an acked job.
    assert "users add plc-7 --role device" in joined and "devices.agent" in joined
    assert any("--until acknowledged" in c.text and c.expect for c in commands)


# ------------------------------------------------------------------ the run
class Namespace:
    """A network namespace with its loopback up, held open by a sleeping process."""

    def __init__(self) -> None:
        require_tool("unshare")
        self.nsenter = require_tool("nsenter")
        up = ("import fcntl, socket, struct, sys, time\n"
              "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
              "flags = struct.unpack('16sh', fcntl.ioctl(s, 0x8913, struct.pack('16sh', b'lo', 0)))[1]\n"
              "fcntl.ioctl(s, 0x8914, struct.pack('16sh', b'lo', flags | 1))\n"
              "print('up', flush=True)\n"
              "time.sleep(3600)\n")
        self.proc = subprocess.Popen([require_tool("unshare"), "--net", sys.executable, "-c", up],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "up"

    def wrap(self, argv: list[str]) -> list[str]:
        return [self.nsenter, f"--net=/proc/{self.proc.pid}/ns/net", "--", *argv]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def copy_checkout(dest: Path) -> None:
    """The checkout's files as a fresh clone has them, plus the already-installed .venv."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    # `make run` must not reinstall (that would point the shared editable install at the copy).
    dry = subprocess.run(["make", "-n", "run"], cwd=dest, capture_output=True, text=True, check=True).stdout
    assert "pip install" not in dry, f"make run would reinstall; run `make install` in {ROOT} first:\n{dry}"


@dataclass
class Background:
    command: Command
    proc: subprocess.Popen[str]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _wait_first_line(bg: Background, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if bg.output().strip():
            return
        assert bg.proc.poll() is None, (f"README.md:{bg.command.line}: `{bg.command.text}` exited "
                                        f"{bg.proc.returncode}:\n{bg.output()}")
        time.sleep(0.05)
    raise AssertionError(f"README.md:{bg.command.line}: `{bg.command.text}` printed nothing in {timeout} s")


@pytest.mark.slow
def test_readme_quick_start_runs_as_written(tmp_path: Path):
    require_tool("make")
    require_tool("mosquitto_sub")
    blocks = parse_readme(README.read_text())
    work = tmp_path / "checkout"
    work.mkdir()
    copy_checkout(work)
    ns = Namespace()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOMEPOT_")}
    env["PYTHONUNBUFFERED"] = "1"
    daemon_log = tmp_path / "make-run.log"
    assert [_tokens(c.text) for c in blocks[0].commands] == [["make", "run"]]
    daemon = subprocess.Popen(ns.wrap(["bash", "-c", "exec " + blocks[0].commands[0].text]), cwd=work, env=env, stdout=open(daemon_log, "wb"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    background: list[Background] = []
    try:
        deadline = time.monotonic() + 60
        while "gateway ready" not in daemon_log.read_text(errors="replace"):
            assert daemon.poll() is None, f"make run exited {daemon.returncode}:\n{daemon_log.read_text()}"
            assert time.monotonic() < deadline, f"make run did not get ready:\n{daemon_log.read_text()}"
            time.sleep(0.1)
        for block in blocks[1:]:
            for cmd in block.commands:
                if cmd.background:
                    log = tmp_path / f"bg-{len(background)}.log"
                    proc = subprocess.Popen(ns.wrap(["bash", "-c", "exec " + cmd.text]), cwd=work, env=env,
                                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, text=True,
                                            start_new_session=True)
                    bg = Background(cmd, proc, log)
                    background.append(bg)
                    _wait_first_line(bg)
                    continue
                res = subprocess.run(ns.wrap(["bash", "-c", cmd.text]), cwd=work, env=env, capture_output=True,
                                     text=True, timeout=120)
                out = res.stdout + res.stderr
                assert res.returncode == 0, (f"README.md:{cmd.line}: `{cmd.text}` exited {res.returncode}:\n{out}\n"
                                             f"daemon:\n{daemon_log.read_text()[-3000:]}")
                for want in cmd.expect:
                    assert want in out, f"README.md:{cmd.line}: `{cmd.text}` did not print {want!r}:\n{out}"
        for bg in background:
            deadline = time.monotonic() + 10
            for want in bg.command.expect:
                while want not in bg.output() and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert want in bg.output(), (f"README.md:{bg.command.line}: `{bg.command.text}` did not print "
                                             f"{want!r}:\n{bg.output()}")
    finally:
        for bg in background:
            if bg.proc.poll() is None:
                os.killpg(bg.proc.pid, signal.SIGTERM)
        for bg in background:
            try:
                bg.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(bg.proc.pid, signal.SIGKILL)
                bg.proc.wait()
        # Ctrl-C, as the README says: SIGINT to the foreground process group.
        if daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGINT)
        try:
            daemon.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
            raise AssertionError(f"make run did not stop on Ctrl-C:\n{daemon_log.read_text()}") from None
        finally:
            ns.close()
    log = daemon_log.read_text(errors="replace")
    assert "Traceback" not in log, log
    assert re.search(r"stopped.*exit_code=0", log), log
