"""The link as a real process: kill -9, the will, redelivery, and what it logs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.storage import connect
from gateway.upstream import outbox
from tests.support import ROOT, write_config
from tests.upstream.cloud import GW_PASSWORD, PREFIX, Cloud, Observer


class LinkProcess:
    def __init__(self, config: Path, workdir: Path, *args: str):
        self.n = len(list(workdir.glob("link-*.out")))
        self.out = workdir / f"link-{self.n}.out"
        self.err = workdir / f"link-{self.n}.err"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.upstream.link_proc", str(config), *args],
            cwd=ROOT, stdout=open(self.out, "wb"), stderr=open(self.err, "wb"))

    def wait_output(self, marker: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.out.read_text()
            if marker in text:
                return text
            assert self.proc.poll() is None, f"link process exited early:\n{self.log()}"
            time.sleep(0.02)
        raise AssertionError(f"no {marker!r} from the link process:\n{self.log()}")

    def log(self) -> str:
        return self.err.read_text(errors="replace")

    def log_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> dict:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(15) == 0, self.log()
        line = next(x for x in self.out.read_text().splitlines() if x.startswith("METRICS "))
        return json.loads(line[len("METRICS "):])

    def __enter__(self) -> "LinkProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def outbox_rows(db_path: Path) -> int:
    conn = connect(db_path, readonly=True)
    try:
        return outbox.stats(conn).rows
    finally:
        conn.close()


def wait(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_buffer_survives_kill9_drains_in_order_and_the_will_marks_offline(cloud_factory, tmp_path: Path):
    cloud: Cloud = cloud_factory(start=False)  # the cloud is away while the gateway works
    config = write_config(tmp_path, cloud.config_data(tmp_path))
    db_path = tmp_path / "var" / "gateway.db"

    with LinkProcess(config, tmp_path, "--enqueue", "300") as first:
        first.wait_output("ENQUEUED")
        time.sleep(0.5)  # it tries to connect meanwhile
        first.kill9()
    with LinkProcess(config, tmp_path, "--enqueue", "100", "--start", "300") as second:
        second.wait_output("ENQUEUED")
        second.kill9()
    assert outbox_rows(db_path) == 400  # every committed row survived two kill -9

    cloud.start()
    with Observer(cloud) as obs, LinkProcess(config, tmp_path) as third:
        msgs = obs.wait_for(lambda m: len([x for x in m if x.topic.endswith("/acks")]) >= 400, timeout=20)
        acks = [json.loads(m.payload)["n"] for m in msgs if m.topic == f"{PREFIX}/acks"]
        assert acks == list(range(400))  # in order, none lost, none doubled (no outage during the drain)
        wait(lambda: outbox_rows(db_path) == 0, what="outbox emptied after PUBACKs")
        assert json.loads(cloud.retained(f"{PREFIX}/gateway/status"))["state"] == "online"
        third.kill9()
        # the will: the cloud learns the gateway went away without saying goodbye
        wait(lambda: json.loads(cloud.retained(f"{PREFIX}/gateway/status") or b"{}").get("state") == "offline",
             what="will published")
        assert GW_PASSWORD not in third.log()


def test_a_job_is_redelivered_when_the_gateway_dies_before_storing_it(cloud: Cloud, tmp_path: Path):
    config = write_config(tmp_path, cloud.config_data(tmp_path))
    intake_log = tmp_path / "var" / "intake.jsonl"
    with LinkProcess(config, tmp_path, "--stuck-intake") as first:
        first.wait_output("ENQUEUED")
        wait(lambda: json.loads(cloud.retained(f"{PREFIX}/gateway/status") or b"{}").get("state") == "online",
             what="link online")
        cloud.publish(f"{PREFIX}/jobs", b'{"job_id":"cloud-7"}')
        wait(lambda: intake_log.exists() and intake_log.read_text().count("cloud-7") == 1, what="job in intake")
        first.kill9()  # killed while the job was being stored: it was never acknowledged
    with LinkProcess(config, tmp_path) as second:
        wait(lambda: intake_log.read_text().count("cloud-7") == 2, what="redelivery")
        second.stop()
    entries = [json.loads(line) for line in intake_log.read_text().splitlines()]
    assert entries == [{"job": '{"job_id":"cloud-7"}', "source": "upstream"}] * 2


@pytest.mark.parametrize("case", ["bad_password", "client_cert_rejected"])
def test_wrong_credentials_give_one_clear_log_line_and_quiet_retries(case: str, cloud_factory, tmp_path: Path):
    cloud: Cloud = cloud_factory(require_certificate=case == "client_cert_rejected")
    wrong_secret = "wr0ng-s3cret-value"
    if case == "bad_password":
        pw = tmp_path / "wrong.password"
        pw.write_text(wrong_secret + "\n")
        overrides = {"password_file": str(pw)}
        hint = "refused our credentials (check upstream.username, upstream.password_file"
    else:
        other = Cloud(tmp_path / "other-ca")
        overrides = {"cert_file": str(other.client_cert), "key_file": str(other.client_key)}
        hint = "rejected our client certificate (check upstream.cert_file, upstream.key_file"
    config = write_config(tmp_path, cloud.config_data(tmp_path, **overrides))
    with LinkProcess(config, tmp_path, "--enqueue", "2", "--backoff", "0.05", "--backoff-max", "0.2") as p:
        p.wait_output("ENQUEUED")
        time.sleep(2.0)
        assert p.proc.poll() is None  # retrying, not crashing
        metrics = p.stop()
    assert metrics["connect_failures"] >= 5 and not metrics["connected"] and metrics["buffer_rows"] == 2
    failures = [line for line in p.log_lines() if line.get("event") == "mqtt connect failed"]
    assert len(failures) == 1, failures  # one line, not one per retry
    assert failures[0]["level"] == "warning" and failures[0]["link"] == "upstream"
    assert hint in failures[0]["error"]
    log = p.log()
    assert "Traceback" not in log
    assert wrong_secret not in log and GW_PASSWORD not in log
