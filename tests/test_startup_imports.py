"""What a gateway process imports before it does anything: every daemon, CLI command and
device agent pays it in CPU (the suite starts hundreds; a technician pays it per command).

Each case runs in a fresh interpreter and lists ``sys.modules`` afterwards, so the test fails
when someone adds an eager import of a heavy library to a path that does not use it; it
measures no time (that would be flaky on a loaded machine). See gateway/lean_imports.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.helpers.config import base_config, write_config

# The push platforms' HTTP and crypto stacks: imported by a bridge that is enabled, when it is built.
PLATFORM_SDKS = {"httpx", "httpcore", "h2", "curl_cffi", "google", "jwt", "pywebpush", "aiohttp", "cryptography"}


def modules_after(code: str, cwd: Path) -> set[str]:
    """The modules loaded once ``code`` ran in a fresh ``python`` (as the entry points run)."""
    probe = code + "\nimport json, sys\nprint('MODULES=' + json.dumps(sorted(sys.modules)))\n"
    env = {k: v for k, v in os.environ.items() if k not in ("HOMEPOT_GATEWAY_CONFIG", "PYDANTIC_DISABLE_PLUGINS")}
    out = subprocess.run([sys.executable, "-c", probe], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=120)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("MODULES=")), None)
    assert line is not None, f"exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return set(json.loads(line.removeprefix("MODULES=")))


def tops(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def run_cli(*argv: str) -> str:
    return textwrap.dedent(f"""
        import sys
        sys.argv = ["homepot-gateway", *{list(argv)!r}]
        import gateway.cli
        try:
            gateway.cli.main()
        except SystemExit:
            pass
        """)


def test_cli_help_imports_no_config_logging_or_rich(tmp_path: Path):
    """``--help`` (and a usage error) print from typer's definitions alone: the config is not
    loaded, no structlog, asyncio or rich. (Anything past the top level's help runs the root
    option parsing, which typer does with pydantic: only ``--help`` is free of pydantic.)"""
    heavy = {"structlog", "rich", "asyncio", "aiomqtt", "paho", *PLATFORM_SDKS}
    for argv, also in ((["--help"], {"pydantic"}), (["no-such-command"], set()), (["devices", "--help"], set())):
        loaded = modules_after(run_cli(*argv), tmp_path)
        assert "typer" in loaded  # the probe ran the command line
        unwanted = tops(loaded) & (heavy | also) | loaded & {"gateway.config", "gateway.storage", "gateway.clock"}
        assert not unwanted, f"homepot-gateway {' '.join(argv)} imported {sorted(unwanted)}"


def test_cli_command_imports_no_rich_and_no_platform_sdk(tmp_path: Path):
    """A command that loads the config and opens the database (``devices list``) validates
    the config and logs through structlog, without rich, the daemon's services or the push
    platforms' libraries (the config enables only the simulation and MQTT bridges)."""
    cfg = write_config(tmp_path, base_config(tmp_path))
    loaded = modules_after(run_cli("--config", str(cfg), "devices", "list"), tmp_path)
    assert {"gateway.config", "gateway.storage", "structlog", "gateway.pipeline.registry"} <= loaded  # it ran
    # The tables' modules, not the services around them: the daemon's broker, pipeline
    # service, cloud link and MQTT client are not needed to read and migrate the database.
    unwanted = (tops(loaded) & {"rich", "aiomqtt", "paho", "argon2", "websockets", *PLATFORM_SDKS}
                | loaded & {"gateway.broker.embedded", "gateway.pipeline.service", "gateway.upstream.link",
                            "gateway.mqtt"})
    assert not unwanted, f"devices list imported {sorted(unwanted)}"


def test_daemon_entry_imports_no_rich_and_no_platform_sdk(tmp_path: Path):
    """The daemon's modules and its logging set-up, in either format, leave rich and the
    platform SDKs unloaded (a bridge's library comes with that bridge, when enabled)."""
    for fmt in ("json", "console"):
        loaded = modules_after(textwrap.dedent(f"""
            import gateway.daemon, gateway.wiring, gateway.logs
            gateway.logs.setup_logging("info", {fmt!r})
            """), tmp_path)
        assert {"gateway.daemon", "structlog", "aiomqtt"} <= loaded
        unwanted = tops(loaded) & {"rich", *PLATFORM_SDKS}
        assert not unwanted, f"the daemon ({fmt} logs) imported {sorted(unwanted)}"


def test_console_log_prints_a_plain_traceback_without_rich(tmp_path: Path):
    """The ``console`` format still shows an exception's traceback (as Python prints it)
    with rich kept out of structlog."""
    code = textwrap.dedent("""
        import structlog, sys
        import gateway.logs
        gateway.logs.setup_logging("info", "console")
        try:
            1 / 0
        except ZeroDivisionError:
            structlog.get_logger("t").exception("it failed")
        sys.stderr.flush()
        """)
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    out = subprocess.run([sys.executable, "-c", "import gateway\n" + code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "it failed" in out.stderr
    assert "Traceback (most recent call last):" in out.stderr and "ZeroDivisionError: division by zero" in out.stderr


def test_rich_stays_importable_after_structlog(tmp_path: Path):
    """rich is hidden only while structlog itself is imported: ``devices import`` draws its
    progress bar with rich afterwards."""
    loaded = modules_after("import gateway.clock\nimport structlog\nfrom rich.console import Console\n", tmp_path)
    assert {"structlog", "rich.console"} <= loaded


def test_device_agent_imports_no_config_models(tmp_path: Path):
    """The reference device agent (started many times by the tests, and on every test bench)
    parses its broker URL with gateway.mqtt_url: no config models, pydantic or rich."""
    loaded = modules_after("import devices.agent\n", tmp_path)
    assert {"devices.agent", "aiomqtt"} <= loaded
    unwanted = tops(loaded) & {"pydantic", "rich", *PLATFORM_SDKS} | loaded & {"gateway.config"}
    assert not unwanted, f"devices.agent imported {sorted(unwanted)}"
