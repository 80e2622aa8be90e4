"""What keeps ``make test-fast`` quick without weakening ``make test``: the hypothesis
example counts per profile, the make targets that pick them, and the in-process CLI
leaving its caller as a separate process would."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from tests.helpers import ROOT, base_config, cli_in_process, free_port, fuzz, write_config


def test_full_runs_each_tests_own_count_and_fast_a_tenth_of_it_but_at_least_ten(monkeypatch):
    monkeypatch.setattr(fuzz, "PROFILE", fuzz.FULL)
    assert [fuzz.examples(n) for n in (600, 60, 5)] == [600, 60, 5]
    monkeypatch.setattr(fuzz, "PROFILE", fuzz.FAST)
    assert [fuzz.examples(n) for n in (600, 60, 5)] == [60, 10, 5]


def _recipe(target: str) -> str:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    m = re.search(rf"^{re.escape(target)}:[^\n]*\n\t([^\n]+)", text, re.M)
    assert m, f"no recipe for {target}"
    return m.group(1)


def test_make_test_runs_the_full_fuzz_bar_and_test_fast_the_fast_profile_on_more_workers():
    assert "HYPOTHESIS_PROFILE=full" in _recipe("test") and "-n $(PYTEST_WORKERS)" in _recipe("test")
    fast = _recipe("test-fast")
    assert "HYPOTHESIS_PROFILE=fast" in fast and "-n $(FAST_WORKERS)" in fast and '-m "not e2e"' in fast


def test_the_cli_in_process_narrows_the_umask_for_its_files_and_gives_the_callers_back(tmp_path: Path):
    config = write_config(tmp_path, base_config(tmp_path, free_port()))
    old = os.umask(0o022)
    try:
        res = cli_in_process(config, "devices", "add", "dev-1", "--platform", "simulation", "--address", "")
        assert res.returncode == 0, res.stderr
        now = os.umask(0o022)
    finally:
        os.umask(old)
    assert now == 0o022  # as after a child process: a daemon started next gets the caller's umask
    db = tmp_path / "var" / "gateway.db"
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_an_unknown_profile_is_refused_by_name():
    import importlib

    started = os.environ.get("HYPOTHESIS_PROFILE")
    os.environ["HYPOTHESIS_PROFILE"] = "quick"
    try:
        with pytest.raises(ValueError, match="HYPOTHESIS_PROFILE: 'quick' is not one of"):
            importlib.reload(fuzz)
    finally:
        if started is None:
            del os.environ["HYPOTHESIS_PROFILE"]
        else:
            os.environ["HYPOTHESIS_PROFILE"] = started
        importlib.reload(fuzz)  # back to the profile this run started with


def test_the_tests_trust_one_root_whatever_the_environment_set_and_httpx_accepts_it():
    """A machine whose environment points ``SSL_CERT_FILE`` at the full bundle made every TLS
    context and every ``httpx`` client of the tests parse ~140 certificates (~40 ms of CPU
    each); an empty file, the other way to skip that, is refused by httpx as its cafile."""
    import ssl

    import httpx

    path = Path(os.environ["SSL_CERT_FILE"])
    assert path.read_text(encoding="ascii").count("-----BEGIN CERTIFICATE-----") == 1
    assert ssl.create_default_context(cafile=str(path)).cert_store_stats()["x509_ca"] == 1
    httpx.Client().close()  # verify=True loads SSL_CERT_FILE as its cafile: an empty file raises here


def test_the_cli_in_process_builds_the_command_once_and_each_call_runs_its_own(tmp_path: Path, monkeypatch):
    """typer builds its click command at every ``app()``; the in-process CLI builds it once
    per app and reuses it, every call still parsing its own arguments."""
    import importlib

    import typer.main

    helper = importlib.import_module("tests.helpers.cli")  # the module (tests.helpers.cli is also a function's name)
    built = []
    real = typer.main.get_command
    monkeypatch.setattr(typer.main, "get_command", lambda app: built.append(app) or real(app))
    monkeypatch.setattr(helper, "_built", {}, raising=False)
    config = write_config(tmp_path, base_config(tmp_path, free_port()))
    assert cli_in_process(config, "devices", "add", "plc-1", "--platform", "mqtt").returncode == 0
    shown = cli_in_process(config, "devices", "show", "plc-1")
    missing = cli_in_process(config, "devices", "show", "plc-2")
    assert shown.returncode == 0 and "plc-1" in shown.stdout
    assert missing.returncode == 1 and "plc-2" in missing.stderr
    assert len(built) == 1


def test_the_cli_in_process_starts_on_the_wall_clock_and_gives_the_callers_back(tmp_path: Path):
    """A command starts the gateway's clock at the wall clock, as a new process does, whatever
    an earlier in-process command attached to; the caller's clock is put back after."""
    import sqlite3
    import time

    from gateway import clock

    config = write_config(tmp_path, base_config(tmp_path, free_port()))
    stepped = clock._offset - 44 * 86400  # a timeline another test's database left behind
    clock._offset = stepped
    try:
        assert cli_in_process(config, "send", "--title", "t", "--all", "--yes", "--job-id", "now").returncode == 0
        assert clock._offset == stepped
    finally:
        clock._offset = time.time() - time.monotonic()
    conn = sqlite3.connect(tmp_path / "var" / "gateway.db")
    (created_at,) = conn.execute("SELECT created_at FROM jobs WHERE job_id = 'now'").fetchone()
    conn.close()
    assert abs(created_at - time.time()) < 60, created_at
