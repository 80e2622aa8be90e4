"""CPU seconds per test file, for finding what makes the suite slow on 2 cores.

    make test PYTEST_ARGS="-p tests.cpu_by_file"

Wall time hides where the cores go: a file that waits on a 45 s timer costs little CPU, one
that starts twenty daemons costs a core for half a minute. Each test's CPU is the worker's
own plus that of the children it reaped (daemons, CLI runs, Mosquitto, browsers:
``RUSAGE_CHILDREN`` counts a child once it has been waited for). The controller prints the
files with the most CPU at the end, and the total.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator

import pytest

KEY = "cpu_s"
_by_file: dict[str, float] = {}


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    item.user_properties.append((KEY, -_cpu()))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    if call.when == "teardown":
        report = outcome.get_result()
        report.user_properties = [(k, v + _cpu()) if k == KEY else (k, v) for k, v in item.user_properties]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "teardown":
        return
    for key, value in report.user_properties:
        if key == KEY:
            module = report.nodeid.split("::", 1)[0]
            _by_file[module] = _by_file.get(module, 0.0) + float(value)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _by_file:
        return
    terminalreporter.section("CPU seconds by file (worker + reaped children)")
    for module, seconds in sorted(_by_file.items(), key=lambda kv: -kv[1])[:40]:
        terminalreporter.write_line(f"{seconds:8.1f}  {module}")
    terminalreporter.write_line(f"{sum(_by_file.values()):8.1f}  total")
