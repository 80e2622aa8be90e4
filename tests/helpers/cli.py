"""The command line in this process (typer's runner): the same commands, options, exit
codes and output as ``python -m gateway`` without the half second an interpreter start and
the imports cost per call. For tests of what the CLI says and stores; a test of what a
separate process does (a terminal, signals, a daemon it talks to) uses
:func:`tests.helpers.processes.cli`."""

from __future__ import annotations

import os
import subprocess
import traceback
from pathlib import Path


def cli_in_process(config: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """``cli()``'s result, run in-process from the config's directory. An exception that
    escapes a command ends up in ``stderr`` as a traceback, where a real process prints
    it, so checks for "no traceback" hold here too."""
    from typer.testing import CliRunner

    from gateway.cli import app

    argv = ["--config", str(config), *args]
    cwd = os.getcwd()
    os.chdir(config.parent)
    try:
        result = CliRunner().invoke(app, argv, input=input)
    finally:
        os.chdir(cwd)
    stderr = result.stderr
    code = result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "Traceback (most recent call last):\n" + "".join(
            traceback.format_exception(result.exception)[1:])
        code = 1
    return subprocess.CompletedProcess(["gateway", *argv], code, result.stdout, stderr)
