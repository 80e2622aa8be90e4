"""The command line in this process: ``gateway.cli.main`` (the entry point, with its guard
that turns a file or database failure into one line) under typer's test isolation. The
same commands, options, exit codes and output as ``python -m gateway``, without the half
second an interpreter start and the imports cost per call. For tests of what the CLI says
and stores; a test of what a separate process does (a terminal, signals, a daemon it talks
to) uses :func:`tests.helpers.processes.cli`."""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


@dataclass(frozen=True)
class CliResult:
    """What ``subprocess.run`` gives for ``cli()``: the same fields, so a test reads either."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


_built: dict[tuple[int, int, int], Any] = {}


@contextmanager
def _command_built_once() -> Iterator[None]:
    """typer turns the app into click commands at every call (``app()`` runs
    ``typer.main.get_command``): the annotations of every command evaluated again, ~30 ms of
    CPU, ten times what a command like ``devices show`` then costs. A process pays it once;
    here it is paid once per app, and the same click command (it keeps no state between
    runs: each gets its own context) serves every call. The key changes if a command or
    group is registered after the first call."""
    import typer.main

    build: Callable[[Any], Any] = typer.main.get_command

    def built(app: Any) -> Any:
        key = (id(app), len(app.registered_commands), len(app.registered_groups))
        if key not in _built:
            _built[key] = build(app)
        return _built[key]

    typer.main.get_command = built
    try:
        yield
    finally:
        typer.main.get_command = build


def cli_in_process(config: Path, *args: str, input: str | None = None) -> CliResult:
    """``cli()``'s result, run in-process from the config's directory. An exception that
    escapes ``main`` ends up in ``stderr`` as the traceback a real process prints, so
    checks for "no traceback" hold here too. The umask the CLI narrows (gateway/filemodes.py)
    is put back after, as a process of its own leaves its parent's: the next call, or a
    daemon started next, gets the caller's umask. The same for the gateway's clock: a process
    starts it at the wall clock and ``clock.attach`` may move it to a database's stored
    timeline; here each call starts from the wall clock too and the caller's is put back (one
    command attached to a database stepped 44 days back once stamped the next test's jobs
    44 days old: expired at once)."""
    from typer.testing import CliRunner

    from gateway import clock
    from gateway.cli import main

    argv = ["--config", str(config), *args]
    cwd, old_argv = os.getcwd(), sys.argv
    umask = os.umask(0o077)
    os.umask(umask)
    callers_clock = clock._offset
    clock._offset = time.time() - time.monotonic()  # as at a new process's import
    code = 0
    with CliRunner().isolation(input=input) as (out, err, *_):
        os.chdir(config.parent)
        sys.argv = ["homepot-gateway", *argv]
        try:
            with _command_built_once():
                main()
        except SystemExit as exc:
            if isinstance(exc.code, int) or exc.code is None:
                code = exc.code or 0
            else:
                sys.stderr.write(f"{exc.code}\n")
                code = 1
        except Exception as exc:  # noqa: BLE001 - what the interpreter would print, then exit 1
            sys.stderr.write("Traceback (most recent call last):\n"
                             + "".join(traceback.format_exception(exc)[1:]))
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.argv = old_argv
            os.chdir(cwd)
            os.umask(umask)
            clock._offset = callers_clock
        stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    return CliResult(["homepot-gateway", *argv], code, stdout, stderr)
