"""The person registry against the real daemon (contract §3, §10, §12): ``/v1/people`` for
the roles that manage devices, the CLI while the daemon runs (each sees what the other
wrote), a device's owner, and hypothesis over what a client may PUT.

The CLI runs in the test's process (tests/helpers/cli.py): still another process than the
daemon whose database it shares, without an interpreter start per command."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import cli_in_process as cli
from tests.http.conftest import PASSWORDS, ApiGateway, dumps, error_of, make_api_gateway
from tests.people.test_person_model import ANNA, person_like


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiGateway]:
    a = make_api_gateway(tmp_path_factory.mktemp("people"), {"bridges": {"simulation": {"latency_ms": 0}}},
                         users={k: PASSWORDS[k] for k in ("tech", "ctrl", "mon", "root", "plc-1")})
    yield a
    a.close()
    a.gw.kill()


def test_people_crud_over_http(api):
    tech = api.client("tech")
    created = tech.put("/v1/people/anna", content=dumps(ANNA))
    assert created.status_code == 201, created.text
    assert created.json() == ANNA and created.headers["location"] == "/v1/people/anna"
    assert tech.get("/v1/people/anna").json() == ANNA
    # The body may leave the id out; what it leaves out takes the defaults (null = [people]'s).
    again = tech.put("/v1/people/anna", content=dumps({"name": "Anna", "devices": ["anna-phone"]}))
    assert again.status_code == 200
    assert again.json() == {"person_id": "anna", "name": "Anna", "account": None, "devices": ["anna-phone"],
                            "timezone": "UTC", "quiet_hours": None, "bypass_priority": "critical",
                            "muted": {"segments": [], "rules": []}, "reach_after_s": None}
    assert api.client("ctrl").put("/v1/people/ben", content=dumps({"devices": []})).status_code == 201
    assert [p["person_id"] for p in tech.get("/v1/people").json()] == ["anna", "ben"]
    page = tech.get("/v1/people", params={"limit": 1})
    assert [p["person_id"] for p in page.json()] == ["anna"] and "after=anna" in page.headers["link"]
    assert api.client("root").delete("/v1/people/ben").status_code == 204
    assert tech.get("/v1/people/ben").status_code == 404
    assert error_of(tech.delete("/v1/people/ben"))["code"] == "not_found"


def test_only_the_roles_that_manage_devices_manage_people(api):
    api.client("tech").put("/v1/people/carl", content=dumps({"devices": []}))
    for user in ("mon", "plc-1"):
        c = api.client(user)
        for r in (c.get("/v1/people"), c.get("/v1/people/carl"), c.put("/v1/people/carl", content=b"{}"),
                  c.delete("/v1/people/carl")):
            assert r.status_code == 403 and error_of(r)["code"] == "forbidden", (user, r.request.method)
    anonymous = httpx.get(f"{api.base}/v1/people")
    assert anonymous.status_code == 401
    assert api.client("tech").get("/v1/people/carl").status_code == 200  # nothing was changed


def test_bad_people_are_refused_naming_the_field(api):
    tech = api.client("tech")
    for body, field in ((b"{", "person"), (b"[]", "person"), (dumps({"timezone": "Mars/Olympus"}), "timezone"),
                        (dumps({"quiet_hours": [{"days": ["mon"], "from": "22:00", "to": "25:00"}]}), "quiet_hours.0.to"),
                        (dumps({"person_id": "other"}), "person_id"), (dumps({"devise": []}), "devise")):
        r = tech.put("/v1/people/dora", content=body)
        assert r.status_code == 400, r.text
        assert error_of(r)["message"].startswith(f"{field}: "), error_of(r)
    assert error_of(tech.put("/v1/people/a%20b", content=b"{}"))["code"] == "invalid_person"
    assert tech.get("/v1/people/dora").status_code == 404
    # One account logs in as one person.
    assert tech.put("/v1/people/eve", content=dumps({"account": "eve"})).status_code == 201
    taken = tech.put("/v1/people/fay", content=dumps({"account": "eve"}))
    assert taken.status_code == 400 and error_of(taken)["message"] == \
        "account: 'eve' is already the account of person 'eve'"


def test_the_cli_and_the_api_share_the_registry_while_the_daemon_runs(api):
    cfg = api.config
    added = cli(cfg, "people", "add", "gus", "--name", "Gus", "--device", "gus-phone", "--device", "gus-tab",
                "--timezone", "Europe/Berlin")
    assert added.returncode == 0, added.stderr
    assert api.client("tech").get("/v1/people/gus").json()["devices"] == ["gus-phone", "gus-tab"]
    changed = cli(cfg, "people", "set", "gus", "--quiet", "mon-fri 22:00-06:00", "--bypass", "high",
                  "--mute-rule", "door-open", "--mute-segment", "lobby", "--reach-after", "30")
    assert changed.returncode == 0, changed.stderr
    shown = api.client("tech").get("/v1/people/gus").json()
    assert shown["quiet_hours"] == [{"days": ["mon", "tue", "wed", "thu", "fri"], "from": "22:00", "to": "06:00"}]
    assert (shown["bypass_priority"], shown["muted"], shown["reach_after_s"]) == \
        ("high", {"segments": ["lobby"], "rules": ["door-open"]}, 30)
    api.client("tech").put("/v1/people/hal", content=dumps({"name": "Hal", "devices": ["hal-1"]}))
    listed = json.loads(cli(cfg, "people", "list", "--json").stdout)
    assert {"gus", "hal"} <= {p["person_id"] for p in listed}
    text = cli(cfg, "people", "show", "gus").stdout
    assert "mon-fri 22:00-06:00" in text and "gus-phone  (not registered)" in text
    bad = cli(cfg, "people", "set", "gus", "--quiet", "mon-fry 22:00-06:00")
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "--quiet: 'fry' is not a day (one of mon, tue, wed, thu, fri, sat, sun, or daily)"
    bad = cli(cfg, "people", "add", "ivy", "--timezone", "Nowhere/Town")
    assert bad.returncode == 2 and bad.stderr.startswith("--timezone: 'Nowhere/Town' is not an IANA time zone")
    assert cli(cfg, "people", "show", "ivy").returncode == 1
    removed = cli(cfg, "people", "remove", "hal")
    assert removed.returncode == 0 and api.client("tech").get("/v1/people/hal").status_code == 404
    assert cli(cfg, "people", "remove", "hal").returncode == 1


def test_a_device_names_its_owner(api):
    tech = api.client("tech")
    dev = {"device_id": "gus-phone", "channels": [{"platform": "simulation"}], "owner": "gus"}
    assert tech.put("/v1/devices/gus-phone", content=dumps(dev)).status_code == 201
    assert tech.get("/v1/devices/gus-phone").json()["owner"] == "gus"
    bad = tech.put("/v1/devices/gus-phone", content=dumps({**dev, "owner": "a b"}))
    assert bad.status_code == 400 and error_of(bad)["message"].startswith("owner: ")
    added = cli(api.config, "devices", "add", "gus-tab", "--platform", "simulation", "--owner", "gus")
    assert added.returncode == 0, added.stderr
    shown = json.loads(cli(api.config, "devices", "show", "gus-tab", "--json").stdout)
    assert shown["owner"] == "gus"
    assert "owner:     gus" in cli(api.config, "devices", "show", "gus-tab").stdout
    assert "gus-tab  (not registered)" not in cli(api.config, "people", "show", "gus").stdout


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(body=person_like)
def test_any_put_body_is_stored_as_given_back_or_refused_naming_a_field(api, body):
    tech = api.client("tech")
    r = tech.put("/v1/people/fuzz-1", content=dumps(body))
    if r.status_code in (200, 201):
        assert tech.get("/v1/people/fuzz-1").json() == r.json()
        return
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["code"] == "invalid_person"
    assert err["message"].split(":")[0].split(".")[0] in body, (err, body)


def test_a_job_for_people_over_http_carries_their_counts(api):
    tech = api.client("tech")
    tech.put("/v1/devices/jo-phone", content=dumps({"device_id": "jo-phone", "channels": [{"platform": "simulation"}]}))
    tech.put("/v1/people/jo", content=dumps({"devices": ["jo-phone"]}))
    r = tech.post("/v1/jobs", content=dumps({"job_id": "for-jo", "target": {"people": ["jo", "nobody-here"]},
                                             "notification": {"title": "T"}}))
    assert r.status_code == 202, r.text
    assert r.json()["people"] == {"targets": 2, "reached": 0, "held": 0}
    plain = tech.post("/v1/jobs", content=dumps({"job_id": "for-devices", "target": {"devices": ["jo-phone"]},
                                                 "notification": {"title": "T"}}))
    assert "people" not in plain.json()  # only a job that targets people has them
    bad = tech.post("/v1/jobs", content=dumps({"target": {"people": ["a b"]}, "notification": {"title": "T"}}))
    assert bad.status_code == 400 and error_of(bad)["message"].startswith("target.people.0: ")
    both = tech.post("/v1/jobs", content=dumps({"target": {"people": ["jo"], "all": True}, "notification": {"title": "T"}}))
    assert error_of(both)["message"] == "target: exactly one of devices, segment, all or people is required"
