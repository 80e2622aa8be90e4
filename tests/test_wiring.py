"""The service graph is typed: mypy checks the wiring, the daemon, the Service protocol,
the health reporter and the operator's CLI (gateway/cli.py: a row looked up by a typed id
is checked before use) with the configuration in pyproject.toml, and that configuration
rejects an ``Any`` on the graph and a service handed a collaborator that lacks what its
port asks for."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WIRING = ROOT / "gateway" / "wiring.py"


def mypy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_mypy_passes_on_the_service_graph_and_the_cli():
    out = mypy()  # the files and the flags come from [tool.mypy]
    assert out.returncode == 0, out.stdout + out.stderr
    assert "gateway/cli.py" in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
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


def test_the_graph_is_built_without_a_daemon_with_one_outbox_and_the_signer_first(tmp_path: Path):
    """build() alone: services in start order, the pipeline and the link share one Outbox,
    the pipeline signs ack URLs with the HTTP API's signer from construction on, and SIGHUP
    reaches the API's credential cache."""
    from gateway.config import parse_config
    from gateway.mqtt import ConnectionSettings, GatewayClient
    from gateway.storage import Database
    from gateway.wiring import Runtime, build

    cfg, secrets = parse_config({"gateway": {"data_dir": str(tmp_path)}, "broker": {
        "listeners": [{"name": "l", "bind": "127.0.0.1:1"}], "auth": {"password_file": str(tmp_path / "passwd")}},
        "http": {"bind": "127.0.0.1:8080"},
        "upstream": {"url": "mqtts://cloud.example:8883", "buffer_max_mb": 1, "overflow": "refuse-new"}},
        environ={})
    client = GatewayClient(ConnectionSettings(url="mqtt://127.0.0.1:1", client_id="gw"))
    graph = build(cfg, Database(cfg.db_path), Runtime(started_at="2026-01-01T00:00:00Z", secrets=secrets,
                                                            client=client))
    pipeline, link, alarms, health, http = graph.services
    assert [s.name for s in graph.services] == ["pipeline", "upstream", "alarms", "health", "http"]
    assert pipeline.forward is link.outbox and link.drain.outbox is link.outbox  # type: ignore[attr-defined]
    assert (link.outbox.max_bytes, link.outbox.overflow) == (1024 * 1024, "refuse-new")  # type: ignore[attr-defined]
    assert pipeline.ack_url("m-1") == http.signer.url("m-1")  # type: ignore[attr-defined]
    assert alarms.pipeline is pipeline and health.probes.bridges is pipeline  # type: ignore[attr-defined]
    assert http.alarms is alarms  # type: ignore[attr-defined]  # the page acks alarms in process
    assert health.probes.upstream is link and health.probes.client is client  # type: ignore[attr-defined]
    assert [name for name, _ in graph.reload_callbacks] == ["http credential cache"]
    for part in (http.metrics, http.auth, http.reader, http.ui_reader):  # type: ignore[attr-defined]
        part.close()
