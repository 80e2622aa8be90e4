"""A daemon whose wall clock the test steps: libfaketime (Debian ``faketime``) preloaded,
its offset read from a file the test rewrites. ``CLOCK_MONOTONIC`` is left alone
(``FAKETIME_DONT_FAKE_MONOTONIC``), as a real step by NTP or an operator leaves it."""

from __future__ import annotations

import glob
from pathlib import Path

from tests.helpers.processes import require_tool


def faketime_env(offset_file: Path) -> dict[str, str]:
    """The environment of a process under libfaketime, its offset "+0" until :func:`step`;
    the offset file is read on every call of the clock, so a step is seen at once (with the
    setting below that costs no measurable CPU).

    ``FAKETIME_FORCE_MONOTONIC_FIX=0``: libfaketime's "monotonic fix" (on by default with
    this glibc) converts the deadline of a timed wait on a ``CLOCK_MONOTONIC`` condition
    variable with the *faked* monotonic time although it is not faked here, so every such
    wait returns at once. CPython waits for its GIL that way: each thread that wants the GIL
    spun instead of sleeping, an idle daemon burnt a third of a core and its start took twice
    the CPU (tests/test_clock_step.py checks that a timed wait waits)."""
    import pytest

    require_tool("faketime")  # the Debian package that ships libfaketime
    libs = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1"))
    if not libs:
        pytest.fail("libfaketime.so.1 not found although faketime is installed", pytrace=False)
    offset_file.write_text("+0\n")
    return {"LD_PRELOAD": libs[0], "FAKETIME_TIMESTAMP_FILE": str(offset_file), "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_FORCE_MONOTONIC_FIX": "0"}


def step(offset_file: Path, offset: str) -> None:
    """Set the daemon's clock offset (libfaketime syntax: "+1d", "-1h"); atomic rewrite."""
    tmp = offset_file.with_suffix(".new")
    tmp.write_text(offset + "\n")
    tmp.replace(offset_file)
