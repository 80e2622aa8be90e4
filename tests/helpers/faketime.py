"""A daemon whose wall clock the test steps: libfaketime (Debian ``faketime``) preloaded,
its offset read from a file the test rewrites. ``CLOCK_MONOTONIC`` is left alone
(``FAKETIME_DONT_FAKE_MONOTONIC``), as a real step by NTP or an operator leaves it."""

from __future__ import annotations

import glob
from pathlib import Path

from tests.helpers.processes import require_tool


def faketime_env(offset_file: Path, cache_s: int | None = None) -> dict[str, str]:
    """The environment of a process under libfaketime, its offset "+0" until :func:`step`.

    Without ``cache_s`` the offset file is read on every call of the clock, so a step is
    seen at once; with it, at most once every ``cache_s`` seconds (reading it on every call
    makes the daemon's start twice as slow on a loaded machine), for tests that step the
    clock while the daemon is stopped or can wait that long for the step to be seen."""
    import pytest

    require_tool("faketime")  # the Debian package that ships libfaketime
    libs = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1"))
    if not libs:
        pytest.fail("libfaketime.so.1 not found although faketime is installed", pytrace=False)
    offset_file.write_text("+0\n")
    env = {"LD_PRELOAD": libs[0], "FAKETIME_TIMESTAMP_FILE": str(offset_file), "FAKETIME_NO_CACHE": "1",
           "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    if cache_s is not None:
        env.update({"FAKETIME_NO_CACHE": "0", "FAKETIME_CACHE_DURATION": str(cache_s)})
    return env


def step(offset_file: Path, offset: str) -> None:
    """Set the daemon's clock offset (libfaketime syntax: "+1d", "-1h"); atomic rewrite."""
    tmp = offset_file.with_suffix(".new")
    tmp.write_text(offset + "\n")
    tmp.replace(offset_file)
