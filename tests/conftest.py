from __future__ import annotations

import dis
import inspect
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import GatewayProcess, Mosquitto, base_config, free_port, require_tool
from tests.helpers import fuzz  # noqa: F401 - loads the hypothesis profile HYPOTHESIS_PROFILE names

# The system CAs stay trusted, looked up one by one in the hashed directory (/etc/ssl/certs)
# when a chain needs one, instead of the whole bundle file being parsed into every TLS client
# context: ~40 ms of CPU per context, and the tests build a few hundred (each bridge, each
# fake's client, each ``httpx`` client: ``httpx.get`` makes one per call), in this process and
# in the daemons it starts, which inherit this. ``SSL_CERT_FILE`` names a file holding one
# public root (the first of certifi's bundle), not an empty file: httpx loads that variable
# as its ``cafile`` and refuses a file without a certificate. Set whatever the environment
# says: a machine that points it at the full bundle (for its other tools) paid the parse in
# every context. No test peer uses a system CA: the fakes have their own.
def _one_root_ca() -> str:
    import certifi

    bundle = Path(certifi.where()).read_text(encoding="utf-8")
    end = "-----END CERTIFICATE-----"
    path = Path(__file__).parent / ".one-root-ca.pem"
    first = bundle[bundle.index("-----BEGIN CERTIFICATE-----"):bundle.index(end) + len(end)] + "\n"
    if not path.exists() or path.read_text(encoding="ascii") != first:
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        tmp.write_text(first, encoding="ascii")
        tmp.replace(path)  # workers write the same file at once: each rename is whole
    return str(path)


os.environ["SSL_CERT_FILE"] = _one_root_ca()

# What makes a test end-to-end (marker ``e2e``; ``make test-fast`` runs the others): it
# starts a process (the daemon, Mosquitto, the CLI, a browser, systemd tools), itself or
# through a fixture or test helper. Found here from the code the test and its fixtures
# reference (transitively through the tests' own functions and classes), not from a list
# kept by hand, so a new end-to-end test is never counted as fast. A module may still set
# ``pytestmark = pytest.mark.e2e`` itself.
_PROCESS_NAMES = frozenset({"subprocess", "create_subprocess_exec", "create_subprocess_shell", "sync_playwright",
                            "async_playwright", "Popen"})


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _local_imports(code: types.CodeType) -> list[object]:
    """What a function imports inside its body from the tests' own modules (``from
    tests.support import GatewayProcess`` in a fixture): not in its globals, still called."""
    found: list[object] = []
    module = None
    if not any(name.startswith("tests.") or name == "tests" for name in code.co_names):
        return [obj for const in code.co_consts if isinstance(const, types.CodeType) for obj in _local_imports(const)]
    for ins in dis.get_instructions(code):
        if ins.opname == "IMPORT_NAME":
            module = ins.argval
        elif ins.opname == "IMPORT_FROM" and isinstance(module, str) and module.startswith("tests"):
            obj = getattr(sys.modules.get(module), ins.argval, None)
            if obj is not None:
                found.append(obj)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found += _local_imports(const)
    return found


def _starts_processes(func: object, memo: dict[object, bool]) -> bool:
    func = inspect.unwrap(func) if callable(func) else func  # type: ignore[arg-type]
    if inspect.isclass(func):
        if not func.__module__.startswith("tests"):
            return False
        if func in memo:
            return memo[func]
        memo[func] = False
        memo[func] = any(_starts_processes(m, memo) for m in vars(func).values() if inspect.isfunction(m))
        return memo[func]
    code = getattr(func, "__code__", None)
    if code is None or not getattr(func, "__module__", "").startswith("tests"):
        return False
    if code in memo:
        return memo[code]
    memo[code] = False  # a cycle adds nothing
    found = False
    globals_ = getattr(func, "__globals__", {})
    for name in _code_names(code):
        if name in _PROCESS_NAMES:
            found = True
            break
        obj = globals_.get(name)
        if obj is not None and (inspect.isfunction(obj) or inspect.isclass(obj)) and _starts_processes(obj, memo):
            found = True
            break
    if not found:
        found = any((inspect.isfunction(obj) or inspect.isclass(obj)) and _starts_processes(obj, memo)
                    for obj in _local_imports(code))
    memo[code] = found
    return found


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    memo: dict[object, bool] = {}
    for item in items:
        funcs = [getattr(item, "obj", None)]
        info = getattr(item, "_fixtureinfo", None)
        for defs in (info.name2fixturedefs.values() if info is not None else ()):
            funcs += [d.func for d in defs]
        if any(f is not None and _starts_processes(f, memo) for f in funcs):
            item.add_marker(pytest.mark.e2e)
    _longest_modules_first(config, items)


# Test files in the order the workers should take them: longest first. xdist's loadfile
# hands out one file at a time in collection order (with ``--no-loadscope-reorder``; its
# default puts the files with the most tests first, which are the quick unit files, and
# leaves the few long end-to-end files to run one after another at the end). The length
# of a file is what it took in the last complete-enough run (pytest's cache), else a guess
# from what its tests do: a process-starting test costs seconds, a unit test milliseconds.
DURATIONS_KEY = "homepot-gateway/module-seconds"  # + the -m expression of a run that had one
GUESS_S = {"slow": 60.0, "e2e": 8.0, "unit": 0.2}


def _durations_key(config: pytest.Config) -> str:
    """A file's time depends on which of its tests run: ``make test-fast`` (``-m "not e2e"``)
    keeps its own times, so its order follows what its files take without their e2e tests."""
    markexpr = config.option.markexpr
    return f"{DURATIONS_KEY}[{markexpr}]" if markexpr else DURATIONS_KEY


def _module_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def _longest_modules_first(config: pytest.Config, items: list[pytest.Item]) -> None:
    cache = getattr(config, "cache", None)
    known: dict[str, float] = (cache.get(_durations_key(config), {}) if cache is not None else {}) or {}
    guess: dict[str, float] = {}
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        module = _module_of(item.nodeid)
        first.setdefault(module, i)
        kind = "slow" if item.get_closest_marker("slow") else "e2e" if item.get_closest_marker("e2e") else "unit"
        guess[module] = guess.get(module, 0.0) + GUESS_S[kind]

    def cost(module: str) -> float:
        seconds = known.get(module)
        return float(seconds) if isinstance(seconds, (int, float)) else guess[module]

    # Stable: every worker computes the same order from the same cache (xdist checks that).
    items.sort(key=lambda item: (-cost(_module_of(item.nodeid)), first[_module_of(item.nodeid)]))


_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _seconds[_module_of(report.nodeid)] = _seconds.get(_module_of(report.nodeid), 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remembers each file's time (in the process that ran or collected the reports: the
    xdist controller, or a run without workers) for the next run's order. Only runs that
    ran whole files (of the tests an -m expression selects) count: none chosen by -k or a test
    id, none cut short by -x."""
    config = session.config
    cache = getattr(config, "cache", None)
    if cache is None or hasattr(config, "workerinput") or not _seconds:
        return
    if config.option.keyword or any("::" in str(a) for a in config.args):
        return
    if exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) or (
            config.option.maxfail and session.testsfailed):
        return
    key = _durations_key(config)
    known = cache.get(key, {}) or {}
    known.update({module: round(seconds, 2) for module, seconds in _seconds.items()})
    cache.set(key, known)


@pytest.fixture(autouse=True)
def _keep_umask() -> Iterator[None]:
    """CLI commands invoked in-process (typer's CliRunner) narrow the process umask, as they
    do in their own process (gateway/filemodes.py); the next test starts with the old one."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator:
    """Start real daemons: ``gateway_factory(extra_config_dict) -> GatewayProcess``.

    Without ``port`` the broker listener binds port 0; ``gw.port`` (and ``gw.ports``,
    ``gw.http_port``) are read from the daemon's runtime.json once it is ready."""
    procs: list[GatewayProcess] = []

    def make(extra: dict | None = None, port: int | None = None, env: dict | None = None,
             start: bool = True) -> GatewayProcess:
        data = base_config(tmp_path, port or 0, **(extra or {}))
        gw = GatewayProcess.from_data(tmp_path, data, name=f"config-{len(procs)}.toml", env=env)
        gw.port = port or 0
        procs.append(gw)
        if start:
            gw.start()
        return gw

    yield make
    for gw in procs:
        gw.kill()
        if gw.notify:
            gw.notify.close()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path, free_port()).start()
    yield m
    m.stop()


@pytest.fixture
def mosquitto_clients() -> dict[str, str]:
    """mosquitto_pub/_sub paths; a missing one fails the test (make test installs them)."""
    return {name: require_tool(name) for name in ("mosquitto_pub", "mosquitto_sub")}


# Marks a test that runs mosquitto_pub/mosquitto_sub: it fails, never skips, without them.
needs_mosquitto_clients = pytest.mark.usefixtures("mosquitto_clients")
