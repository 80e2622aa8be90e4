"""Who may stop an alarm's escalation, and what the record says about who did.

Every notification's payload carries its signed ack URL, a capability to acknowledge it: a
read-only ``monitor`` must not obtain it (its default ACL denies the devices' notify topics),
and ``acknowledged_by`` names the channel the ack really came by — the device's MQTT account
or "ack-url" (whoever held the URL), never the device for an ack the device did not send.
Against the real daemon, with real accounts on the embedded broker.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import paho.mqtt.client as paho

from tests.alarms.test_alarms_daemon import P, mqtt_device, wait_envelope, wait_state
from tests.helpers import write_accounts
from tests.support import MqttProbe, bulk_register, free_port


def test_a_monitor_gets_no_ack_capability_and_acks_name_their_channel(gateway_factory, tmp_path: Path):
    data_dir = tmp_path / "var"
    write_accounts(data_dir / "passwd", {name: (role, f"{name}-pw") for name, role in (
        ("mon", "monitor"), ("dev-a", "device"), ("tech", "technician"))})
    bulk_register(data_dir, [mqtt_device("dev-a", "technicians")])
    rule = {"name": "door", "topic": "{prefix}/devices/+/telemetry/door", "equals": "open", "key": "{device_id}",
            "target": {"segment": "technicians"}, "title": "Door {device_id} is {value}",
            "escalate": [{"after_s": 600, "target": {"segment": "technicians"}}]}
    http_port = free_port()
    gw = gateway_factory({"rules": [rule], "http": {"bind": f"127.0.0.1:{http_port}"}})

    # The monitor reads everything it may: P/# and $SYS/# are granted; the notify topics are not.
    monitor = MqttProbe(gw.port, [f"{P}/#", "$SYS/#"], username="mon", password="mon-pw")
    granted: list[list[int]] = []
    monitor.client.on_subscribe = lambda cl, ud, mid, reasons, props: granted.append(  # noqa: ARG005
        [r.value for r in reasons])
    assert monitor.client.subscribe([(f"{P}/devices/+/notify", 1), (f"{P}/devices/dev-a/notify", 1)])[0] \
        == paho.MQTT_ERR_SUCCESS
    device = MqttProbe(gw.port, [f"{P}/devices/dev-a/notify"], username="dev-a", password="dev-a-pw")
    admin = MqttProbe(gw.port, [f"{P}/alarms/#"])

    admin.publish(f"{P}/devices/door-1/telemetry/door", "open")
    _, env = wait_envelope(device, "dev-a", "alarm.door.door-1.1")
    assert env["ack_url"].startswith(f"http://127.0.0.1:{http_port}/v1/acks/")
    # Barrier: the job's status with the delivery sent is published after the envelope was
    # accepted by the broker; the monitor gets it, and would have got the envelope before it.
    monitor.wait_for(lambda m: [p for _, t, p, _ in m if t == f"{P}/jobs/alarm.door.door-1.1/status"
                                and json.loads(p)["counts"]["sent"] >= 1], timeout=15)
    wait_state(monitor, "door", "door-1", "firing")
    assert monitor.on(f"{P}/devices/+/notify") == []
    assert not [p for _, _, p, _ in monitor.messages if b"/v1/acks/" in p]  # no ack URL anywhere
    assert granted == [[0x80, 0x80]]  # subscribing the notify topics themselves is refused

    # An ack by URL is recorded as such: it proves only that its sender held the URL.
    r = httpx.post(env["ack_url"], json={"status": "opened"})
    assert r.status_code == 202, r.text
    assert wait_state(admin, "door", "door-1", "acknowledged")["acknowledged_by"] == "ack-url"
    detail = httpx.get(f"http://127.0.0.1:{http_port}/ui/api/devices/dev-a", auth=("mon", "mon-pw")).json()
    assert detail["last_ack"]["via"] == "ack-url" and detail["last_ack"]["status"] == "opened"

    # The device's own ack, on its ack topic with its account, names that account.
    admin.publish(f"{P}/devices/door-2/telemetry/door", "open")
    _, env2 = wait_envelope(device, "dev-a", "alarm.door.door-2.1")
    device.publish(f"{P}/devices/dev-a/ack", json.dumps({"message_id": env2["message_id"], "status": "opened"}))
    assert wait_state(admin, "door", "door-2", "acknowledged")["acknowledged_by"] == "mqtt:dev-a"
    detail = httpx.get(f"http://127.0.0.1:{http_port}/ui/api/devices/dev-a", auth=("mon", "mon-pw")).json()
    assert detail["last_ack"]["via"] == "mqtt"

    # An operator's ack on the alarm topic says what it is: the publisher's word for who.
    admin.publish(f"{P}/devices/door-3/telemetry/door", "open")
    wait_state(admin, "door", "door-3", "firing")
    tech = MqttProbe(gw.port, username="tech", password="tech-pw")
    tech.publish(f"{P}/alarms/door/door-3/ack", json.dumps({"by": "dev-a"}))
    assert wait_state(admin, "door", "door-3", "acknowledged")["acknowledged_by"] == "alarm-topic:dev-a"

    for probe in (monitor, device, admin, tech):
        probe.close()
    assert gw.stop() == 0


OLD_TRIGGER = """CREATE TRIGGER IF NOT EXISTS alarm_opened_ack AFTER INSERT ON acks
WHEN NEW.status = 'opened'
BEGIN
    INSERT INTO alarm_inbox(rule, akey, episode, by, note, at, source)
    SELECT j.rule, j.akey, j.episode, 'device:' || NEW.device_id, NULL, NEW.received_at, 'delivery'
    FROM deliveries d JOIN alarm_jobs j ON j.job_id = d.job_id
    WHERE d.message_id = NEW.message_id AND j.kind != 'clear';
END"""


def test_an_older_database_gets_the_channel_column_and_trigger_once(tmp_path: Path):
    """A database of a gateway before acks recorded their channel: the column is added, the
    trigger replaced, and a second migration (every CLI command runs one) changes nothing."""
    from gateway import migrations
    from gateway.alarms import store as alarm_store
    from gateway.storage import connect, run_script

    conn = connect(tmp_path / "gateway.db")
    conn.execute("CREATE TABLE acks (id INTEGER PRIMARY KEY, message_id TEXT NOT NULL, device_id TEXT NOT NULL, "
                 "status TEXT NOT NULL, at TEXT NOT NULL, error TEXT, received_at REAL NOT NULL)")
    conn.execute("INSERT INTO acks(message_id, device_id, status, at, received_at) VALUES ('m', 'd', 'opened', 'x', 1)")
    run_script(conn, alarm_store.DDL)
    conn.execute(OLD_TRIGGER)
    migrations.migrate(conn)  # the schema registry: the pipeline's, then the alarms' migrations
    assert "via" in {r[1] for r in conn.execute("PRAGMA table_info(acks)")}
    assert [tuple(r) for r in conn.execute("SELECT via FROM acks")] == [(None,)]
    trigger = lambda: conn.execute("SELECT sql FROM sqlite_master WHERE name = 'alarm_opened_ack'").fetchone()[0]  # noqa: E731
    assert trigger() == alarm_store.TRIGGER
    cookie = conn.execute("PRAGMA schema_version").fetchone()[0]
    migrations.migrate(conn)
    assert conn.execute("PRAGMA schema_version").fetchone()[0] == cookie  # nothing re-created
    conn.close()
