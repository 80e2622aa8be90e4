"""Every id the gateway accepts is one clean MQTT topic level and one URL path segment.

Ids (device_id, job_id, account names, alarm rule names, site_id) become a level of the
topics the gateway publishes on and a segment of the API's URLs. Each validator is fed
arbitrary text, including what ``re.match`` with ``^...$`` used to let through ("dev-z\\n")
and the dot-segments "." and ".."; whatever it accepts must survive both uses unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from devices.models import Device
from gateway.rule_schema import RuleSection, check_rule
from gateway.broker import passwords
from gateway.config import GatewaySection
from gateway.pipeline.models import InputError, JobIn, decode_json_object, parse_device, parse_job, readable_job_id
from gateway.topics import Topics
from tests.helpers.fuzz import examples


PREFIX = "homepot/site-t"
# RFC 3986 pchar without percent-escapes: what a path segment may carry as it is.
PCHAR = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*,;=:@+")

candidates = st.one_of(
    st.text(max_size=140),
    st.from_regex(r"[A-Za-z0-9._:@-]{1,130}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9._:@-]{1,60}", fullmatch=True).map(lambda s: s + "\n"),
    st.sampled_from([".", "..", "...", "dev-z\n", "nl\n", "a/b", "+", "#", "", " a", "a\r", "\x00", "é"]),
)


def assert_clean(value: str) -> None:
    """One topic level and one URL path segment, sent and read back unchanged."""
    assert value and value not in (".", ".."), value
    assert set(value) <= PCHAR, value  # no '/', '#', '?', '%', whitespace, control or non-ASCII
    assert "+" not in value and "#" not in value, value  # MQTT wildcards
    levels = Topics(PREFIX).device_notify(value).split("/")
    assert levels[3] == value and len(levels) == 5, value
    url = httpx.URL(f"http://gw.example/v1/devices/{value}")
    assert url.path == f"/v1/devices/{value}" and url.raw_path.decode() == f"/v1/devices/{value}", value


def accepted(fn: Any, *args: Any) -> bool:
    try:
        fn(*args)
    except (InputError, ValueError, passwords.PasswordFileError):
        return False
    return True


def _device(value: str) -> Device:
    return Device.model_validate({"device_id": value, "channels": [{"platform": "mqtt"}]})


@settings(max_examples=examples(400), deadline=None)
@given(value=candidates)
@example(value="dev-z\n")
@example(value="nl\n")
@example(value="..")
def test_every_accepted_device_or_job_id_is_one_topic_level_and_one_url_segment(value: str):
    job = {"job_id": value, "target": {"all": True}, "notification": {"title": "t"}}
    checks = {
        "Device.device_id": lambda: _device(value),
        "register topic id": lambda: parse_device(json.dumps({"device_id": value, "channels": [{"platform": "mqtt"}]})
                                                  .encode(), value),
        "target.devices": lambda: JobIn.model_validate({"target": {"devices": [value]}, "notification": {"title": "t"}}),
        "job_id": lambda: parse_job(job),
        "job_id over MQTT/HTTP": lambda: parse_job(decode_json_object(json.dumps(job).encode(), 1 << 20, "job")),
    }
    for name, check in checks.items():
        if accepted(check):
            assert_clean(value)
    # The id a rejection is addressed to (its status topic) is held to the same rule.
    readable = readable_job_id({"job_id": value})
    if readable is not None:
        assert_clean(readable)
        assert Topics(PREFIX).job_status(readable).split("/")[3] == readable


@settings(max_examples=examples(200), deadline=None)
@given(value=candidates)
@example(value="site-a\n")
@example(value="freezer\n")
@example(value="homepot\n")
def test_every_accepted_site_id_and_rule_name_is_one_topic_level(value: str):
    if accepted(lambda: GatewaySection(site_id=value)):
        assert_clean(value)
    if accepted(lambda: GatewaySection(topic_prefix=value)):  # not one level, but every topic starts with it
        assert value.isprintable() and not set(value) & set("+#\0"), value
    rule = RuleSection.model_validate({"name": value, "topic": "{prefix}/devices/+/t", "above": 1.0,
                                       "target": {"segment": "s"}, "title": "x"})
    if not any(field == "name" for field, _ in check_rule(rule)):
        assert_clean(value)


@pytest.fixture(scope="module")
def password_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the names are written, with a cheap argon2 while this module runs: what is
    checked is the name in the file, and the real parameters (64 MiB, 3 passes) cost a
    tenth of a second per example. The hashing itself is checked in test_cli_accounts."""
    from argon2 import PasswordHasher

    real = passwords._hasher
    passwords._hasher = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    try:
        yield tmp_path_factory.mktemp("passwd")
    finally:
        passwords._hasher = real


@settings(max_examples=examples(60), deadline=None)
@given(value=candidates)
@example(value="tech\n")
@example(value="..")
@example(value="a:b")
def test_every_accepted_account_name_is_one_topic_level_and_reads_back(value: str, password_dir: Path):
    path = password_dir / "passwd"
    path.unlink(missing_ok=True)
    if accepted(passwords.add_user, path, value, "pw", "device"):
        assert_clean(value)
        # An accepted name must also be readable from the file it was written to.
        assert set(passwords.parse(path.read_text(encoding="utf-8"), path)) == {value}
