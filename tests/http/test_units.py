"""In-process checks of the pieces the daemon tests cannot see from outside: the delivery
aggregates stay exact, the credential cache, the ack signer."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from gateway import migrations, stats
from gateway.config import parse_config
from gateway.http.acks import AckSigner, load_or_create_secret
from gateway.http.auth import BasicAuth
from gateway.http.errors import ApiError
from gateway.pipeline import deliveries, jobs, registry, retention
from gateway.pipeline import acks as pipeline_acks
from gateway.pipeline.deliveries import DeliveryWriter
from gateway.pipeline.models import AckIn, parse_job
from gateway.timeutil import iso, utcnow


def fresh_db() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.row_factory = sqlite3.Row
    migrations.migrate(conn)
    return conn


def grouped(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
    return {(r[0], r[1]): r[2] for r in conn.execute(
        "SELECT COALESCE(platform, ''), state, COUNT(*) FROM deliveries GROUP BY 1, 2")}


def test_delivery_stats_follow_every_pipeline_write_and_survive_a_recount():
    conn = fresh_db()
    from devices.models import Device

    for i in range(30):
        registry.upsert_device(conn, Device.model_validate({"device_id": f"d-{i:02}", "channels": [{"platform": "mqtt"}]}), "t")
    job = parse_job({"job_id": "j", "target": {"all": True}, "notification": {"title": "x"}})
    jobs.insert_job(conn, job, "t")
    assert not deliveries.expand_page(conn, "j", 20, time.time()) and deliveries.expand_page(conn, "j", 20, time.time())
    assert jobs.job_status(conn, "j")["counts"]["targets"] == 30  # rowcount, not trigger writes
    assert stats.delivery_counts(conn) == {("", "queued"): 30} == grouped(conn)
    rows = deliveries.due_deliveries(conn, time.time() + 1, 100)
    results = [deliveries.Result(r.message_id, r.job_id, r.device_id, "sent", platform="mqtt", attempts=1) for r in rows[:20]]
    results += [deliveries.Result(r.message_id, r.job_id, r.device_id, "failed", platform="fcm", attempts=1) for r in rows[20:25]]
    deliveries.apply_results(conn, results, time.time())
    acks = [(r.device_id, AckIn(message_id=r.message_id, status="received", at=iso(utcnow()))) for r in rows[:12]]
    pipeline_acks.apply_acks(conn, acks, time.time() + 0.2)
    pipeline_acks.apply_acks(conn, acks[:3], time.time())  # second acks: stored, not counted again
    assert stats.delivery_counts(conn) == grouped(conn) == {
        ("", "queued"): 5, ("mqtt", "sent"): 8, ("mqtt", "acknowledged"): 12, ("fcm", "failed"): 5}
    latency = stats.ack_latency(conn)["mqtt"]
    assert latency["count"] == 12 and latency["buckets"][-1] == (float("inf"), 12)
    assert [n for _, n in latency["buckets"]] == sorted(n for _, n in latency["buckets"])  # cumulative
    failed = [r[0] for r in conn.execute("SELECT message_id FROM deliveries WHERE state = 'failed'")]
    with DeliveryWriter(conn, time.time()) as writer:  # a deletion, as retention (retention.prune) makes it
        writer.delete(failed)
    assert stats.delivery_counts(conn) == grouped(conn)
    assert deliveries.oldest_queued(conn)[""] >= 0 and set(deliveries.oldest_queued(conn)) == {""}
    migrations.migrate(conn)  # a start with exact counts: nothing to repair
    assert not stats.stale(conn) and stats.delivery_counts(conn) == grouped(conn)
    conn.execute("UPDATE deliveries SET state = 'expired' WHERE state = 'queued'")  # a writer bypassing the writer...
    assert stats.delivery_counts(conn) != grouped(conn) and stats.stale(conn)
    migrations.migrate(conn)  # ...the next start finds the counts off and recounts them
    assert stats.delivery_counts(conn) == grouped(conn)
    assert stats.ack_latency(conn)["mqtt"]["count"] == 12
    conn.execute("DELETE FROM delivery_stats")  # how an operator forces a full recount
    migrations.migrate(conn)
    assert stats.delivery_counts(conn) == grouped(conn)
    conn.execute("UPDATE jobs SET state = 'completed', updated_at = 0 WHERE job_id = 'j'")
    retention.prune(conn, time.time(), time.time(), max_rows=7)  # retention: part of the job's rows...
    assert stats.delivery_counts(conn) == grouped(conn) and sum(grouped(conn).values()) == 25 - 7
    retention.prune(conn, time.time(), time.time())  # ...then the rest and the job
    assert stats.delivery_counts(conn) == grouped(conn) == {} and not stats.stale(conn)
    assert stats.ack_latency(conn)["mqtt"]["count"] == 12  # a histogram only grows


def test_a_database_kept_by_the_old_triggers_loses_them_without_a_recount():
    """An older gateway kept the aggregates with row triggers: the first start drops them
    (else every change would count twice) and keeps the counts it finds exact."""
    conn = fresh_db()
    conn.execute("INSERT INTO jobs(job_id, state, source, target, notification, options, created_at, updated_at, "
                 "expires_at, ttl, queued) VALUES ('j', 'dispatching', 't', '{}', '{}', '{}', 0, 0, 9e9, 60, 1)")
    conn.execute("CREATE TRIGGER delivery_stats_insert AFTER INSERT ON deliveries BEGIN "
                 "INSERT INTO delivery_stats(platform, state, n) VALUES (COALESCE(NEW.route, NEW.platform, ''), "
                 "NEW.state, 1) ON CONFLICT(platform, state) DO UPDATE SET n = n + 1; END")
    conn.execute("INSERT INTO deliveries(message_id, job_id, device_id, state, next_at, route) "
                 "VALUES ('m1', 'j', 'd1', 'queued', 0, 'fcm')")
    conn.execute("UPDATE delivery_stats SET n = 7")  # marks the kept count: a recount would reset it
    conn.execute("INSERT INTO deliveries(message_id, job_id, device_id, state, next_at, route) "
                 "VALUES ('m0', 'j', 'd0', 'acknowledged', 0, 'fcm')")  # the trigger counts it
    assert stats.delivery_counts(conn) == {("fcm", "queued"): 7, ("fcm", "acknowledged"): 1}
    conn.execute("UPDATE delivery_stats SET n = 1 WHERE state = 'queued'")  # exact again
    conn.execute("DROP TABLE schema_versions")  # that gateway had no schema registry
    migrations.migrate(conn)
    assert conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'deliveries'"
                        ).fetchone()[0] == 0
    with DeliveryWriter(conn, time.time()) as writer:
        writer.insert("j", [("d2", "fcm")], "queued", None, 0)
    assert stats.delivery_counts(conn) == {("fcm", "queued"): 2, ("fcm", "acknowledged"): 1} == grouped_by(
        conn, "COALESCE(route, platform, '')")


async def test_logins_are_verified_once_then_cached_and_forgotten_on_invalidate(tmp_path, monkeypatch):
    from gateway.broker import logins as logins_mod
    from gateway.broker.passwords import add_user

    cfg = parse_config({"gateway": {"data_dir": str(tmp_path)}, "broker": {
        "listeners": [{"name": "l", "bind": "127.0.0.1:1"}], "auth": {"password_file": str(tmp_path / "passwd")}},
        "http": {}}, environ={}).config
    add_user(tmp_path / "passwd", "tech", "pw", "technician")
    checks: list[str] = []
    real = logins_mod.check_password
    monkeypatch.setattr(logins_mod, "check_password", lambda account, password: checks.append(password) or real(account, password))
    auth = BasicAuth(cfg)
    header = "Basic dGVjaDpwdw=="  # tech:pw
    for _ in range(5):
        principal = await auth.principal(header, "10.0.0.7")
    assert principal.role == "technician" and principal.may_submit_jobs() and len(checks) == 1
    assert all(b"pw" not in verifier for _, verifier in auth._logins._good.values())  # an HMAC, not the password
    auth.invalidate()  # SIGHUP
    await auth.principal(header, "10.0.0.7")
    assert len(checks) == 2
    with pytest.raises(ApiError) as err:
        await auth.principal("Basic dGVjaDp3cm9uZw==", "10.0.0.7")  # tech:wrong
    assert err.value.status == 401 and len(checks) == 3
    # The password changes: the remembered one is refused at once, with no reload.
    add_user(tmp_path / "passwd", "tech", "new-pw", "technician")
    with pytest.raises(ApiError) as err:
        await auth.principal(header, "10.0.0.7")
    assert err.value.status == 401
    # An address the checks throttle (tests/broker/test_logins.py) is answered 503, Retry-After.
    async def throttled(name: str, password: str, source: str):  # noqa: ANN202
        assert source == "10.0.0.9"
        return logins_mod.Verdict.THROTTLED, None
    monkeypatch.setattr(auth._logins, "verify", throttled)
    with pytest.raises(ApiError) as err:
        await auth.principal("Basic dGVjaDp3cm9uZw==", "10.0.0.9")
    assert err.value.status == 503 and err.value.headers == {"Retry-After": "8"}
    auth.close()


def test_ack_signer_constant_format_and_secret_file(tmp_path):
    path = tmp_path / "sub" / "ack_secret"
    secret = load_or_create_secret(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600" and load_or_create_secret(path) == secret
    signer = AckSigner(secret, "https://gw.example/")
    mid = "6f1c1b9e-0000-4000-8000-000000000001"
    url = signer.url(mid)
    assert url.startswith(f"https://gw.example/v1/acks/{mid}?sig=") and len(url.rsplit("=", 1)[1]) == 64
    sig = url.rsplit("=", 1)[1]
    assert signer.verify(mid, sig) and signer.verify(mid, sig.upper())
    assert not signer.verify(mid.replace("1", "2"), sig) and not signer.verify(mid, "é" * 64)
    assert secret.decode() not in repr(signer) and json.dumps({"s": repr(signer)})
    (tmp_path / "short").write_text("abc")
    with pytest.raises(ValueError):
        load_or_create_secret(tmp_path / "short")


def test_http_config_keys_are_validated_and_named(tmp_path):
    from gateway.config import ConfigError

    def problems(http: dict) -> list[str]:
        with pytest.raises(ConfigError) as info:
            parse_config({"broker": {"listeners": [{"name": "l", "bind": "127.0.0.1:1"}]}, "http": http}, environ={})
        return info.value.lines()

    assert problems({"certfile": str(tmp_path / "c.pem")}) == ["http: certfile and keyfile go together (HTTPS needs both)"]
    assert problems({"public_url": "https://gw.example/x?y=1"})[0].startswith("http.public_url: expected")
    assert problems({"certfile": str(tmp_path / "c.pem"), "keyfile": str(tmp_path / "k.pem")}) == [
        f"http.certfile: file not found: {tmp_path / 'c.pem'}", f"http.keyfile: file not found: {tmp_path / 'k.pem'}"]
    assert problems({"bnd": "x"}) == ["http.bnd: unknown key"]
    cfg = parse_config({"broker": {"listeners": [{"name": "l", "bind": "127.0.0.1:1"}]}, "http": {"bind": "[::1]:8443"}},
                       environ={"HOMEPOT_HTTP_PUBLIC_URL": "https://gw.example:8443/"}).config
    assert cfg.http.base_url() == "https://gw.example:8443"
    cfg = parse_config({"broker": {"listeners": [{"name": "l", "bind": "127.0.0.1:1"}]}, "http": {"bind": "[::1]:8443"}},
                       environ={}).config
    assert cfg.http.base_url() == "http://[::1]:8443"


def test_a_route_column_gives_queued_work_its_platform_before_the_first_attempt():
    """A pipeline that routes deliveries (a ``route`` column) is followed at the next start."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    migrations.migrate(conn)
    conn.execute("INSERT INTO jobs(job_id, state, source, target, notification, options, created_at, updated_at, "
                 "expires_at, ttl, queued) VALUES ('j', 'dispatching', 't', '{}', '{}', '{}', 0, 0, 9e9, 60, 2)")
    with DeliveryWriter(conn, time.time()) as writer:
        writer.insert("j", [("d1", None)], "queued", None, 0)
    m1 = conn.execute("SELECT message_id FROM deliveries WHERE device_id = 'd1'").fetchone()[0]
    assert stats.delivery_counts(conn) == {("", "queued"): 1}
    if "route" not in {r[1] for r in conn.execute("PRAGMA table_info(deliveries)")}:
        conn.execute("ALTER TABLE deliveries ADD COLUMN route TEXT")
    conn.execute("UPDATE deliveries SET route = 'fcm'")  # an upgrade's backfill, not tracked
    migrations.migrate(conn)  # the next start: the queued rows' platform changed, so it recounts
    assert stats.delivery_counts(conn) == {("fcm", "queued"): 1} == grouped_by(conn, "COALESCE(route, platform, '')")
    with DeliveryWriter(conn, time.time()) as writer:
        writer.insert("j", [("d2", "wns")], "queued", None, 0)
    with DeliveryWriter(conn, time.time()) as writer:  # a queued delivery routed to another bridge
        writer.record([deliveries.Result(m1, "j", "d1", "queued", route="apns", next_at=0)])
    assert stats.delivery_counts(conn) == {("apns", "queued"): 1, ("wns", "queued"): 1}
    assert set(deliveries.oldest_queued(conn)) == {"apns", "wns"}
    plan = conn.execute("EXPLAIN QUERY PLAN SELECT 1 FROM deliveries WHERE job_id = 'j' AND state = 'queued' "
                        f"AND {stats.platform_key(conn)} = 'wns' LIMIT 1").fetchall()
    assert stats.QUEUED_INDEX in str(plan)


def grouped_by(conn: sqlite3.Connection, key: str) -> dict[tuple[str, str], int]:
    return {(r[0], r[1]): r[2] for r in conn.execute(f"SELECT {key}, state, COUNT(*) FROM deliveries GROUP BY 1, 2")}
