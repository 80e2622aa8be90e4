"""The service graph is typed: mypy checks the wiring, the daemon, the Service protocol and
the health reporter (with the configuration in pyproject.toml), and that configuration
rejects an ``Any`` on the graph and a service handed a collaborator that lacks what its
port asks for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIRING = ROOT / "gateway" / "wiring.py"


def mypy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_mypy_passes_on_the_service_graph():
    out = mypy()  # the files and the flags come from [tool.mypy]
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success" in out.stdout


def test_mypy_rejects_any_and_a_wrong_collaborator_on_the_graph(tmp_path: Path):
    source = WIRING.read_text()
    assert "bridges=pipeline" in source
    bad = tmp_path / "wiring.py"
    bad.write_text(source.replace("bridges=pipeline", "bridges=link")  # the link has no bridge_health()
                   + "\n\ndef locate(daemon: 'typing.Any') -> None:\n    daemon.pipeline.ack_url = None\n"
                   + "\n\nimport typing\n")
    out = mypy("--shadow-file", str(WIRING), str(bad))
    assert out.returncode == 1, out.stdout + out.stderr
    assert 'Argument "bridges" to "HealthProbes" has incompatible type' in out.stdout, out.stdout
    assert 'Explicit "Any" is not allowed' in out.stdout, out.stdout
