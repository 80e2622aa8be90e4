"""The command line fails cleanly: on a full disk (a small tmpfs as the data dir) and on a
broken database, every command prints one line naming the command and the cause (import
also how much it committed), exits 1, and never prints a traceback."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import cli_in_process
from tests.support import base_config, fill_disk, free_port, mounted_tmpfs, write_config


FULL = re.compile(r"disk is full|the file system is full")


def one_line_failure(res, prefix: str) -> str:  # noqa: ANN001
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith(prefix), res.stderr
    return res.stderr.strip()


@pytest.fixture
def full_site(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A config whose data dir (database and password file) is a 4 MiB tmpfs."""
    with mounted_tmpfs(tmp_path / "var", "4m", "0700") as var:
        config = write_config(tmp_path, base_config(tmp_path, free_port()))
        yield config, var


def test_every_writing_command_fails_in_one_line_on_a_full_disk(full_site, tmp_path: Path):
    config, var = full_site
    assert cli_in_process(config, "devices", "add", "d-ok", "--platform", "simulation").returncode == 0
    lines = [json.dumps({"device_id": f"imp-{i:05}", "segment": "s" * 100, "tags": [f"t{i}-" + "x" * 100],
                         "channels": [{"platform": "simulation"}]}) for i in range(8000)]
    import_file = tmp_path / "devices.jsonl"
    import_file.write_text("\n".join(lines) + "\n")

    filler = fill_disk(var / "filler")
    res = cli_in_process(config, "devices", "add", "d-new", "--platform", "simulation")
    assert FULL.search(one_line_failure(res, "devices add: not done: "))
    res = cli_in_process(config, "devices", "remove", "d-ok")
    assert FULL.search(one_line_failure(res, "devices remove: not done: "))
    res = cli_in_process(config, "users", "add", "tech", "--role", "technician", "--password-stdin", input="pw\n")
    assert "No space left on device" in one_line_failure(res, f"users add: {var / 'passwd'} not written")
    res = cli_in_process(config, "send", "--title", "t", "--all", "--yes", "--job-id", "full-1")
    assert FULL.search(one_line_failure(res, "send: the job was not stored"))

    # Then room for some of the import: the batches before the disk fills are committed.
    os.truncate(filler, max(0, filler.stat().st_size - 512 * 1024))

    res = cli_in_process(config, "devices", "import", str(import_file), "--batch-size", "200")
    line = one_line_failure(res, "devices import: ")
    m = re.fullmatch(r"devices import: (\d+) of 8000 device\(s\) committed \((\d+) of 8000 device lines\), "
                     r"the rest not: (.*)", line)
    assert m, line
    committed = int(m[1])
    assert 0 < committed < 8000 and int(m[2]) == committed, line
    assert FULL.search(m[3]) and str(var / "gateway.db") in m[3], line

    filler.unlink()  # what the import line said is what is in the database
    conn = sqlite3.connect(var / "gateway.db")
    try:
        stored = conn.execute("SELECT COUNT(*) FROM devices WHERE device_id LIKE 'imp-%'").fetchone()[0]
        assert stored == committed
        assert conn.execute("SELECT COUNT(*) FROM devices WHERE device_id IN ('d-ok', 'd-new')").fetchone()[0] == 1
    finally:
        conn.close()
    assert cli_in_process(config, "devices", "remove", "d-ok").returncode == 0  # space back: the same command works


@pytest.mark.parametrize("args", [("devices", "list"), ("devices", "show", "x"), ("devices", "add", "x", "--platform", "mqtt"),
                                  ("devices", "remove", "x"), ("jobs", "list"), ("jobs", "show", "x"),
                                  ("alarms", "list"), ("send", "--title", "t", "--all", "--yes")])
def test_no_command_prints_a_traceback_for_a_broken_database(tmp_path: Path, args: tuple[str, ...]):
    """The generic guard: a database error that no command words itself still ends in one
    line naming the command, the cause and the file."""
    config = write_config(tmp_path, base_config(tmp_path, free_port()))
    (tmp_path / "var").mkdir(mode=0o700)  # private already: no "made owner-only" note
    (tmp_path / "var" / "gateway.db").write_bytes(b"this is not an SQLite database, " * 200)
    (tmp_path / "var" / "gateway.db").chmod(0o600)
    res = cli_in_process(config, *args)
    command = " ".join(a for a in args[:2] if not a.startswith("-") and a not in ("x", "t"))
    line = one_line_failure(res, f"{command}: ")
    assert "file is not a database" in line and str(tmp_path / "var" / "gateway.db") in line, line
