"""The cloud link in-process against a real Mosquitto with TLS as the cloud broker.

The pipeline is replaced by a recording intake and rows are queued with Outbox.enqueue
directly, as the pipeline does inside its transactions.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import pytest

from gateway.storage import Database
from gateway.upstream import outbox
from gateway.upstream.link import SOURCE, UpstreamLink
from tests.upstream.cloud import PREFIX, Cloud, Observer, Seen
from tests.upstream.conftest import FAST, RecordingIntake, make_config, running, wait_until


async def enqueue_traffic(db: Database, start: int, count: int, jobs: int = 5,
                          ob: outbox.Outbox | None = None) -> list[tuple[str, bytes]]:
    """Statuses and acks as the pipeline would queue them (into a running link's outbox,
    which wakes its drain); returns (topic, payload) in order."""
    sent: list[tuple[str, bytes]] = []
    ob = ob if ob is not None else outbox.Outbox()

    def one(conn, i: int) -> None:
        job = f"job-{i % jobs}"
        if i % 3 == 0:
            payload = json.dumps({"job_id": job, "state": "dispatching", "n": i}).encode()
            ob.enqueue(conn, "status", f"{PREFIX}/jobs/{job}/status", payload, True, coalesce_key=job)
            sent.append((f"{PREFIX}/jobs/{job}/status", payload))
        else:
            payload = json.dumps({"message_id": f"m-{i}", "status": "received", "job_id": job,
                                  "device_id": f"pos-{i}", "latency_ms": 12, "n": i}).encode()
            ob.enqueue(conn, "ack", f"{PREFIX}/acks", payload, False)
            sent.append((f"{PREFIX}/acks", payload))

    for i in range(start, start + count):
        await db.run(lambda conn, i=i: one(conn, i))
    return sent


def forwarded(msgs: list[Seen]) -> list[tuple[str, bytes]]:
    """(topic, payload as queued) of every outbox row the cloud saw, in arrival order."""
    return [(m.topic, m.body) for m in msgs if "/gateway/status" not in m.topic]


def ids(msgs: list[Seen]) -> list[str | None]:
    return [m.id for m in msgs if "/gateway/status" not in m.topic]


def first_occurrences(items: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    seen: set[tuple[str, bytes]] = set()
    out = []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


async def test_buffered_rows_drain_in_order_and_statuses_are_retained(cloud: Cloud, db: Database, tmp_path: Path):
    cfg, secrets = make_config(cloud, tmp_path)
    sent = await enqueue_traffic(db, 0, 150)
    with Observer(cloud) as obs:
        async with running(UpstreamLink(cfg, db, RecordingIntake(), secrets=secrets.upstream, **FAST)) as link:
            msgs = await asyncio.to_thread(obs.wait_for, lambda m: len(forwarded(m)) >= 150)
            # more traffic while connected goes straight through, after the backlog
            sent += await enqueue_traffic(db, 150, 30, ob=link.outbox)
            msgs = await asyncio.to_thread(obs.wait_for, lambda m: len(forwarded(m)) >= 180)
            await wait_until(lambda: link.metrics()["buffer_rows"] == 0, what="outbox emptied")
            assert link.metrics()["published"] == 180 and link.metrics()["connected"]
    assert forwarded(msgs) == sent  # exactly once here (no outage), in enqueue order
    assert None not in ids(msgs) and len(set(ids(msgs))) == 180  # every row carries its own id

    # retained: a controller subscribing later sees each job's last status and the gateway status
    for j in range(5):
        last = [p for t, p in sent if t == f"{PREFIX}/jobs/job-{j}/status"][-1]
        retained = cloud.retained(f"{PREFIX}/jobs/job-{j}/status")
        assert Seen("", retained, True, 0).body == last
    assert cloud.retained(f"{PREFIX}/acks", timeout=0.3) is None  # acks are not retained
    status = json.loads(cloud.retained(f"{PREFIX}/gateway/status"))
    assert status["state"] == "offline"  # clean stop says so


async def test_jobs_and_registrations_from_the_cloud_reach_the_intake(cloud: Cloud, db: Database, tmp_path: Path):
    cfg, secrets = make_config(cloud, tmp_path)
    intake = RecordingIntake()
    job = json.dumps({"job_id": "cloud-1", "target": {"all": True},
                      "notification": {"title": "Config update", "body": "2.1.0"}}).encode()
    async with running(UpstreamLink(cfg, db, intake, secrets=secrets.upstream, **FAST)) as link:
        await wait_until(lambda: link.client.connected, what="connected")
        # 'connected' is set before the on-connect announcement is published; read the
        # retained status off the loop (cloud.retained blocks) until the announcement is there.
        deadline = time.monotonic() + 10
        while (await asyncio.to_thread(cloud.retained, f"{PREFIX}/gateway/status", 0.5)) is None:
            assert time.monotonic() < deadline, "no retained gateway status"
        assert json.loads(await asyncio.to_thread(cloud.retained, f"{PREFIX}/gateway/status"))["state"] == "online"
        cloud.publish(f"{PREFIX}/jobs", job)
        cloud.publish(f"{PREFIX}/jobs", b"{not json")  # bad input is the intake's to reject
        cloud.publish(f"{PREFIX}/devices/pos-1/register", b'{"device_id":"pos-1","channels":[{"platform":"simulation"}]}')
        cloud.publish(f"{PREFIX}/devices/pos-2/register", b"")  # empty = remove
        cloud.publish("homepot/other-site/jobs", job)  # another site's job is not ours
        await intake.wait(lambda i: len(i.jobs) == 2 and len(i.registrations) == 2)
        await asyncio.sleep(0.2)
    assert intake.jobs == [(job, SOURCE), (b"{not json", SOURCE)]
    assert intake.registrations == [
        ("pos-1", b'{"device_id":"pos-1","channels":[{"platform":"simulation"}]}', SOURCE), ("pos-2", b"", SOURCE)]

    # persistent session: a job published while the gateway is away waits on the cloud broker
    cloud.publish(f"{PREFIX}/jobs", b'{"job_id":"while-away"}')
    intake2 = RecordingIntake()
    async with running(UpstreamLink(cfg, db, intake2, secrets=secrets.upstream, **FAST)):
        await intake2.wait(lambda i: len(i.jobs) == 1)
    assert intake2.jobs == [(b'{"job_id":"while-away"}', SOURCE)]


async def test_mutual_tls(cloud_factory, db: Database, tmp_path: Path):
    cloud = cloud_factory(require_certificate=True)
    cfg, secrets = make_config(cloud, tmp_path)
    sent = await enqueue_traffic(db, 0, 6)
    intake = RecordingIntake()
    with Observer(cloud) as obs:
        async with running(UpstreamLink(cfg, db, intake, secrets=secrets.upstream, **FAST)):
            msgs = await asyncio.to_thread(obs.wait_for, lambda m: len(forwarded(m)) >= 6)
            cloud.publish(f"{PREFIX}/jobs", b'{"job_id":"mtls"}')
            await intake.wait(lambda i: len(i.jobs) == 1)
    assert forwarded(msgs) == sent


async def test_outage_buffers_then_drains_everything_in_order(cloud: Cloud, db: Database, tmp_path: Path):
    cfg, secrets = make_config(cloud, tmp_path)
    with Observer(cloud) as obs:  # persistent session: the cloud queues for it across the restart
        async with running(UpstreamLink(cfg, db, RecordingIntake(), secrets=secrets.upstream, **FAST)) as link:
            sent = await enqueue_traffic(db, 0, 20, ob=link.outbox)
            await asyncio.to_thread(obs.wait_for, lambda m: len(forwarded(m)) >= 20)

            cloud.stop()
            await wait_until(lambda: not link.client.connected, what="disconnect noticed")
            t0 = time.monotonic()
            sent += await enqueue_traffic(db, 20, 120, ob=link.outbox)  # the local pipeline keeps going
            assert time.monotonic() - t0 < 5  # enqueue is not held up by the dead link
            m = await link.refresh_metrics()
            assert m["buffer_rows"] == 120 and not m["connected"] and m["buffer_bytes"] > 0
            await asyncio.sleep(0.8)  # a while offline: several reconnect attempts
            assert link.metrics()["connect_failures"] >= 2

            cloud.start()
            msgs = await asyncio.to_thread(
                obs.wait_for, lambda m: set(forwarded(m)) >= set(sent), 15)
            await wait_until(lambda: link.metrics()["buffer_rows"] == 0, what="outbox emptied")
    got = forwarded(msgs)
    assert first_occurrences(got) == sent  # nothing lost, order kept (duplicates allowed: at least once)
    assert len(got) - len(sent) <= link._window  # only what was in flight when the link dropped  # noqa: SLF001


async def test_statuses_of_the_same_job_never_regress_on_the_cloud(cloud: Cloud, db: Database, tmp_path: Path):
    """Ordering matters for retained statuses: the last one the cloud keeps is the newest."""
    cfg, secrets = make_config(cloud, tmp_path)
    job = "job-x"

    def snap(conn, n: int) -> None:
        outbox.Outbox().enqueue(conn, "status", f"{PREFIX}/jobs/{job}/status",
                                json.dumps({"job_id": job, "n": n}).encode(), True, coalesce_key=job)

    for n in range(200):
        await db.run(lambda c, n=n: snap(c, n))
    async with running(UpstreamLink(cfg, db, RecordingIntake(), secrets=secrets.upstream, window=100, **FAST)) as link:
        await wait_until(lambda: link.metrics()["published"] >= 200, what="all published")
    assert json.loads(cloud.retained(f"{PREFIX}/jobs/{job}/status"))["n"] == 199


@pytest.mark.parametrize("case", ["bad_password", "untrusted_server", "client_cert_rejected", "broken_tls_file",
                                  "plaintext_port", "wrong_host"])
async def test_bad_credentials_or_certificates_retry_with_backoff(case: str, cloud_factory, db: Database,
                                                                  tmp_path: Path):
    cloud = cloud_factory(require_certificate=case == "client_cert_rejected")
    overrides: dict = {}
    if case == "bad_password":
        wrong = tmp_path / "wrong.password"
        wrong.write_text("not-the-password\n")
        overrides["password_file"] = str(wrong)
        expect = "refused our credentials"
    elif case == "untrusted_server":
        other = Cloud(tmp_path / "other-ca")  # a CA that did not sign the broker's certificate
        overrides["ca_file"] = str(other.ca_file)
        expect = "cannot verify the cloud broker's certificate"
    elif case == "client_cert_rejected":
        other = Cloud(tmp_path / "other-ca")  # a client certificate from a CA the broker does not trust
        overrides.update(cert_file=str(other.client_cert), key_file=str(other.client_key))
        expect = "rejected our client certificate"
    elif case == "plaintext_port":  # mqtts:// to a port that speaks plain MQTT: not a certificate problem
        overrides["url"] = f"mqtts://127.0.0.1:{cloud.plain_port}"
        expect = "(is the port in upstream.url a plaintext MQTT port? mqtts:// needs the TLS port"
    elif case == "wrong_host":  # the certificate names 127.0.0.1 and localhost, not this name
        overrides["url"] = f"mqtts://127.1:{cloud.port}"  # 127.0.0.1 by another name
        expect = "the cloud broker's certificate is not for this host"
    else:
        garbage = tmp_path / "garbage.pem"
        garbage.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
        overrides["ca_file"] = str(garbage)
        expect = "cannot load the TLS files"
    cfg, secrets = make_config(cloud, tmp_path, **overrides)
    await enqueue_traffic(db, 0, 3)
    link = UpstreamLink(cfg, db, RecordingIntake(), secrets=secrets.upstream, backoff_initial=0.05, backoff_max=0.4, poll_interval=0.2)
    async with running(link):
        t0 = time.monotonic()
        await wait_until(lambda: link.client.connect_failures >= 4, timeout=6, what="retries")
        elapsed = time.monotonic() - t0
        assert not link.client.connected
        assert expect in (link.client.last_error or ""), link.client.last_error
    # failed fast (no 10 s connect timeouts) yet with backoff between attempts
    assert 0.05 < elapsed < 4
    assert (await link.refresh_metrics())["buffer_rows"] == 3  # nothing lost meanwhile


def test_the_password_is_used_but_never_shown(cloud_factory, tmp_path: Path):
    """Rich tracebacks print locals: the connection settings must not reveal the secret."""
    from tests.upstream.cloud import GW_PASSWORD

    cloud = cloud_factory(start=False)
    cfg, secrets = make_config(cloud, tmp_path)
    link = UpstreamLink(cfg, Database(tmp_path / "unused.db"), RecordingIntake(), secrets=secrets.upstream)
    assert link.client.settings.password == GW_PASSWORD
    assert GW_PASSWORD not in repr(link.client.settings) and GW_PASSWORD not in repr(cfg)
    assert link.client.settings.client_id == "gw-site-t"  # default gw-<site_id>


class FullDiskIntake(RecordingIntake):
    """The pipeline's database refuses the first ``failures`` jobs as a full disk does."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def submit_job(self, payload: bytes, source: str) -> dict:
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return await super().submit_job(payload, source)


async def test_a_cloud_job_that_cannot_be_stored_is_not_acked_and_arrives_once_the_disk_takes_it(
        cloud: Cloud, db: Database, tmp_path: Path):
    """Issue 9.3 for the cloud link: the job stays with the cloud broker (no PUBACK) until it
    is stored, later jobs keep their order, and holding it is not a dropped connection."""
    cfg, secrets = make_config(cloud, tmp_path)
    intake = FullDiskIntake(failures=2)
    async with running(UpstreamLink(cfg, db, intake, secrets=secrets.upstream, **FAST)) as link:
        await wait_until(lambda: link.client.connected, what="connected")
        for n in range(3):
            cloud.publish(f"{PREFIX}/jobs", f'{{"job_id":"disk-{n}"}}'.encode())
        await intake.wait(lambda i: len(i.jobs) == 3, timeout=20)
        assert link.client.held == 2
        assert link.client.drops == 0  # we closed it to get the job back; not a lost link
    assert [p for p, _ in intake.jobs] == [b'{"job_id":"disk-0"}', b'{"job_id":"disk-1"}', b'{"job_id":"disk-2"}']
