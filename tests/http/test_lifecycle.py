"""The HTTP service's life in the daemon: READY only once it listens, a port in use, HTTPS,
a stop within the budget with streams open, hostile clients, account changes, a full disk.

HTTPS and the slow clients are the listener's own behaviour: those two serve the HTTP
service in-process (tests/helpers/http_app.py); the rest need the daemon's process (its
READY, exit code, signals, SIGHUP, its storage on a full disk). The CLI commands they run
beside the daemon run in the test's process (tests/helpers/cli.py)."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time

import httpx
import pytest
import trustme

from gateway.broker.passwords import remove_user

from tests.helpers import cli_in_process
from tests.helpers.http_app import serve_api
from tests.http.conftest import dumps, error_of, job, make_api_gateway, wait_until
from tests.support import GatewayProcess, base_config, free_port, mounted_tmpfs, write_config


def test_ready_only_once_the_api_listens_and_a_port_in_use_is_exit_2(tmp_path):
    api = make_api_gateway(tmp_path, users={}, start=False)
    api.gw.start(wait_ready=True)
    try:
        # READY=1 came: the API answers at once, no connection refused.
        assert api.client().get("/healthz").status_code == 200
    finally:
        api.close()
    # A second daemon whose [http] bind is taken: no READY, exit 2, the key named.
    other = tmp_path / "other"
    other.mkdir()
    port = free_port()
    cfg = write_config(other, base_config(other, port, http={"bind": f"127.0.0.1:{api.http_port}"}))
    gw2 = GatewayProcess(cfg, other).start(wait_ready=False)
    assert gw2.wait(20) == 2
    assert "http.bind" in gw2.log() and not any("READY" in m for _, m in gw2.notify.messages)
    assert api.gw.stop() == 0


def test_https_with_certfile_and_keyfile(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    # The listener's TLS is the HTTP service's own: served in-process (tests/helpers/http_app.py),
    # whose close fails the test unless the service stops cleanly (the daemon's exit 0).
    with serve_api(tmp_path, {"http": {"certfile": str(tmp_path / "server.pem"),
                                       "keyfile": str(tmp_path / "server.pem")},
                              "bridges": {"simulation": {"latency_ms": 0, "ack": False}}},
                   users={"tech": ("technician", "tech-pw")}, scheme="https") as api:
        api.verify = str(tmp_path / "ca.pem")
        assert api.client().get("/healthz").status_code == 200
        with socket.create_connection(("127.0.0.1", api.http_port), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP at a TLS port: no answer in clear
            assert not s.recv(100).startswith(b"HTTP/1.1 200")
        tech = httpx.Client(base_url=api.base, auth=("tech", "tech-pw"), verify=api.verify)
        tech.put("/v1/devices/s-1", content=dumps({"device_id": "s-1", "channels": [{"platform": "mqtt"}]}))
        assert tech.post("/v1/jobs", content=dumps(job("tls-1"))).status_code == 202
        tech.close()


def test_stop_within_budget_with_an_event_stream_open(tmp_path):
    # A simulated device whose platform answers 503, retry in a minute: the job stays dispatching.
    api = make_api_gateway(tmp_path, {"bridges": {"simulation": {"latency_ms": 0, "transient_attempts": 5,
                                                                 "retry_after_s": 60}}},
                           users={"mon": ("monitor", "mon-pw"), "tech": ("technician", "tech-pw")})
    assert cli_in_process(api.config, "devices", "add", "slow-1", "--platform", "simulation").returncode == 0
    tech = httpx.Client(base_url=api.base, auth=("tech", "tech-pw"))
    assert tech.post("/v1/jobs", content=dumps(job("slow-job", target={"devices": ["slow-1"]}))).status_code == 202
    tech.close()
    lines: list[str] = []
    ended = threading.Event()

    def reader() -> None:
        try:
            with httpx.stream("GET", f"{api.base}/v1/jobs/slow-job/events", auth=("mon", "mon-pw"), timeout=30) as r:
                for line in r.iter_lines():
                    lines.append(line)
        except httpx.HTTPError:
            pass
        ended.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    wait_until(lambda: any(line.startswith("data: ") for line in lines))
    started = time.monotonic()
    assert api.gw.stop(timeout=15) == 0
    assert time.monotonic() - started < 10  # contract §3
    assert ended.wait(5)
    assert "http api stopped" in api.gw.log()


HEADER_TIMEOUT_S = 3.0  # the listener's header timeout for the slow-client test (the daemon's: 10 s)


@pytest.mark.e2e  # no process, but it waits out a real header timeout: not for `make test-fast`
def test_slow_clients_are_cut_off_and_do_not_block_others(tmp_path, monkeypatch):
    # The listener's timeouts are the HTTP service's own: served in-process, with a header
    # timeout of 3 s instead of 10 (the same listener option, read when the service starts).
    from gateway.http import service

    monkeypatch.setattr(service, "HEADER_TIMEOUT_S", HEADER_TIMEOUT_S)
    slow: list[socket.socket] = []
    with serve_api(tmp_path) as api, contextlib.ExitStack() as closing:
        closing.callback(lambda: [s.close() for s in slow])
        for _ in range(100):  # slowloris: headers that never finish
            s = socket.create_connection(("127.0.0.1", api.http_port), timeout=30)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            slow.append(s)
        t0 = time.monotonic()
        assert api.client().get("/healthz").status_code == 200
        assert time.monotonic() - t0 < 2
        # Dribbling more bytes does not buy time: closed ~HEADER_TIMEOUT_S after connecting
        # (were each byte to restart it, the 100 would take 100 timeouts one after another).
        closed = 0
        deadline = time.monotonic() + HEADER_TIMEOUT_S + 10
        for s in slow:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                s.sendall(b"a")
                if s.recv(1024) == b"":
                    closed += 1
            except (ConnectionError, OSError):
                closed += 1
        assert closed == len(slow) and time.monotonic() - t0 < HEADER_TIMEOUT_S + 10
        # A body that never arrives: 408 after the body timeout, the daemon unaffected.
        with socket.create_connection(("127.0.0.1", api.http_port), timeout=20) as s:
            s.sendall(b"POST /v1/acks/x?sig=00 HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            assert s.recv(4096).startswith(b"HTTP/1.1 403")  # the signature is checked before the body
        assert api.client().get("/healthz").status_code == 200


def test_a_changed_password_is_refused_at_once_though_logins_are_cached(tmp_path):
    api = make_api_gateway(tmp_path, users={"tech": ("technician", "old-pw")}, shipped_hashes=True)
    try:
        old = httpx.Client(base_url=api.base, auth=("tech", "old-pw"))
        t0 = time.monotonic()
        for _ in range(30):
            assert old.get("/v1/jobs").status_code == 200
        assert time.monotonic() - t0 < 3  # argon2 once, then the cache (30 checks would take seconds)
        # SIGHUP (systemctl reload) clears the cache through Daemon.on_reload.
        api.gw.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "http credential cache cleared" in api.gw.log(), timeout=10)
        assert old.get("/v1/jobs").status_code == 200  # verified again, still valid
        r = cli_in_process(api.config, "users", "add", "tech", "--role", "technician", "--password-stdin",
                           input="new-pw\n")
        assert r.returncode == 0
        wait_until(lambda: old.get("/v1/jobs").status_code == 401, timeout=5)
        assert httpx.get(f"{api.base}/v1/jobs", auth=("tech", "new-pw")).status_code == 200
        remove_user(api.data_dir / "passwd", "tech")
        wait_until(lambda: httpx.get(f"{api.base}/v1/jobs", auth=("tech", "new-pw")).status_code == 401, timeout=5)
        old.close()
        log = api.gw.log()
        assert "old-pw" not in log and "new-pw" not in log
    finally:
        api.close()
    assert api.gw.stop() == 0


def test_a_full_disk_is_503_never_2xx(tmp_path):
    import os

    with mounted_tmpfs(tmp_path / "var", "24m") as var:
        api = make_api_gateway(tmp_path, {"bridges": {"simulation": {"latency_ms": 0}}},
                               users={"tech": ("technician", "tech-pw")})
        tech = httpx.Client(base_url=api.base, auth=("tech", "tech-pw"), timeout=30)
        filler = var / "filler"
        with open(filler, "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
        answers: dict[str, int] = {}
        blob = "x" * 200_000
        for i in range(60):
            try:
                r = tech.post("/v1/jobs", content=dumps(job(f"full-{i}", target={"segment": "nobody"},
                                                            data={"blob": blob})))
            except httpx.HTTPError:
                break
            answers[f"full-{i}"] = r.status_code
            if r.status_code == 503:
                assert error_of(r)["code"] == "not_stored" and r.headers["retry-after"]
                break
        assert 503 in answers.values(), answers
        os.unlink(filler)
        wait_until(lambda: tech.get("/healthz").status_code == 200, timeout=15)
        after = tech.post("/v1/jobs", content=dumps(job("after-full", target={"segment": "nobody"})))
        assert after.status_code == 202, after.text
        # Nothing was answered 202 that is not stored.
        for job_id, code in answers.items():
            if code == 202:
                assert tech.get(f"/v1/jobs/{job_id}").status_code == 200, job_id
            else:
                assert code == 503
        tech.close()
        api.close()
        assert api.gw.stop() == 0
        assert json.loads((var / "runtime.json").read_text())["state"] == "stopped"
