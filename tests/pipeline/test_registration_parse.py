"""parse_device first gives a payload to the model as JSON (issue 11); whatever the
input, it must give what the model gives for ``json.loads`` of it: the same device
(fields, fields set, what is stored of it) or the same error, word for word."""

from __future__ import annotations

import json

from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from devices.models import Device
from gateway.pipeline.models import MAX_DEVICE_BYTES, InputError, decode_json_object, field_errors, parse_device
from tests.helpers.fuzz import examples


values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
                   st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))
ids = st.one_of(st.sampled_from(["dev-1", "a" * 128, "a" * 129, "bad id", "", "x/y"]), st.text(max_size=12), values)
subscription = st.fixed_dictionaries(
    {}, optional={"endpoint": st.one_of(st.sampled_from(["https://push.example/1", ""]), values),
                  "keys": st.one_of(st.fixed_dictionaries({}, optional={"p256dh": st.one_of(st.just("p"), values),
                                                                           "auth": st.one_of(st.just("a"), values),
                                                                           "x": values}), values),
                  "expirationTime": st.one_of(st.integers(), st.floats(allow_nan=False), st.just(10**30), values),
                  "extra": values})
channel = st.one_of(
    st.fixed_dictionaries({"platform": st.sampled_from(["fcm", "apns", "wns", "webpush", "mqtt", "simulation", "sms"])},
                          optional={"token": st.one_of(st.sampled_from(["t", "ab" * 32, "AB" * 32, "ab" * 33 + "a", ""]),
                                                       values),
                                    "channel_uri": st.one_of(st.sampled_from(["https://wns.example/c", "http://x"]), values),
                                    "subscription": st.one_of(subscription, values),
                                    "extra": values}),
    values)
devices = st.fixed_dictionaries(
    {},
    optional={"device_id": ids,
              "segment": st.one_of(st.none(), st.text(max_size=10), st.just("s" * 129), values),
              "tags": st.one_of(st.lists(st.one_of(st.text(max_size=5), st.just("")), max_size=3), values),
              "channels": st.one_of(st.lists(channel, max_size=3), values),
              "extra": values})
good_channel = st.one_of(
    st.builds(lambda t: {"platform": "fcm", "token": t}, st.text(min_size=1, max_size=8)),
    st.builds(lambda t: {"platform": "apns", "token": t}, st.sampled_from(["ab" * 32, "AB" * 32, "0f" * 100])),
    st.builds(lambda u: {"platform": "wns", "channel_uri": "https://wns.example/" + u}, st.text(max_size=5)),
    st.builds(lambda e, x: {"platform": "webpush", "subscription": {"endpoint": "https://p.example/" + e,
                                                                   "keys": {"p256dh": "p", "auth": "a"}, **x}},
              st.text(max_size=5), st.fixed_dictionaries({}, optional={"expirationTime": st.one_of(
                  st.none(), st.integers(), st.floats(allow_nan=False))})),
    st.sampled_from([{"platform": "mqtt"}, {"platform": "simulation"}]))
good_devices = st.fixed_dictionaries(
    {"device_id": st.just("dev-1"), "channels": st.lists(good_channel, min_size=1, max_size=4)},
    optional={"segment": st.one_of(st.none(), st.text(max_size=10)),
              "tags": st.lists(st.text(min_size=1, max_size=5), max_size=3)})

RAW = [
    b'{"device_id":"dev-1",' + b" " * MAX_DEVICE_BYTES + b'"channels":[{"platform":"mqtt"}]}',  # over the limit
    b'{"device_id":"dev-1","device_id":"dev-2","channels":[{"platform":"mqtt"}]}',  # duplicate key: the last wins
    b'{"device_id":"dev-1","segment":"x\\ud800","channels":[{"platform":"mqtt"}]}',  # a lone surrogate
    b'{"device_id":"dev-1","tags":["\\ud83d\\ude00"],"channels":[{"platform":"mqtt"}]}',
    b'{"device_id":"dev-1","channels":[{"platform":"mqtt"}]} x',  # trailing data
    b'{"device_id":"dev-1","channels":[{"platform":"mqtt"}]} \n',
    b'\xef\xbb\xbf{"device_id":"dev-1","channels":[{"platform":"mqtt"}]}',  # UTF-8 BOM: json.loads takes it
    '{"device_id":"dev-1","channels":[{"platform":"mqtt"}]}'.encode("utf-16"),  # so does UTF-16
    b'{"device_id":"dev-1","channels":[{"platform":"webpush","subscription":{"endpoint":"e",'
    b'"keys":{"p256dh":"p","auth":"a"},"expirationTime":NaN}}]}',
    b'{"device_id":"dev-1","channels":[{"platform":"webpush","subscription":{"endpoint":"e",'
    b'"keys":{"p256dh":"p","auth":"a"},"expirationTime":1e400}}]}',
    b'{"device_id":"dev-1","channels":[{"platform":"webpush","subscription":{"endpoint":"e",'
    b'"keys":{"p256dh":"p","auth":"a"},"expirationTime":1.0}}]}',
    b'{"device_id":"dev-1","segment":"\\u00e9\\u0000","channels":[{"platform":"mqtt"}]}',
    b'{"device_id":"dev-1","channels":[{"platform":"mqtt"}]',
    b'[' * 5000,
    b'"dev-1"',
    b'{"device_id":"dev-\xff","channels":[{"platform":"mqtt"}]}',
    b'',
    b'{"device_id":"dev-1","tags":["' + b"t" * MAX_DEVICE_BYTES + b'"],"channels":[{"platform":"mqtt"}]}',
]


def by_model(payload: bytes, topic_id: str) -> tuple | str:
    """What parse_device gave before the JSON path: json.loads, then the model."""
    try:
        obj = decode_json_object(payload, MAX_DEVICE_BYTES, "device")
        try:
            device = Device.model_validate(obj)
        except ValidationError as exc:
            raise InputError("invalid_device", field_errors(exc)) from None
    except InputError as err:
        return f"{err.code}: {err.message}"
    if device.device_id != topic_id:
        return "topic"
    return _seen(device)


def _seen(device: Device) -> tuple:
    # repr, not ==: it tells an int from an equal float, and NaN from NaN is "equal"
    return (repr(device), device.model_fields_set, [c.model_fields_set for c in device.channels],
            device.model_dump_json(exclude_none=True), [type(c) for c in device.channels])


def by_parse(payload: bytes, topic_id: str) -> tuple | str:
    try:
        return _seen(parse_device(payload, topic_id))
    except InputError as err:
        if err.message.startswith("device_id: ") and "does not match the topic" in err.message:
            return "topic"
        return f"{err.code}: {err.message}"


@settings(max_examples=examples(800), deadline=None)
@given(st.one_of(good_devices, devices))
@example({"device_id": "dev-1", "segment": "bench", "channels": [{"platform": "simulation"}]})
@example({"device_id": "dev-1", "channels": [{"platform": "apns", "token": "AB" * 32}]})
@example({"device_id": "dev-1", "channels": [{"platform": "webpush", "subscription": {
    "endpoint": "https://p.example/1", "keys": {"p256dh": "p", "auth": "a"}, "expirationTime": None}}]})
@example({"device_id": "dev-1", "channels": [{"platform": "webpush", "subscription": {
    "endpoint": "https://p.example/1", "keys": {"p256dh": "p", "auth": "a"}, "expirationTime": 10**30}}]})
@example({"device_id": "dev-1", "channels": [{"platform": "webpush", "subscription": {
    "endpoint": "https://p.example/1", "keys": {"p256dh": "p", "auth": "a"}, "expirationTime": 1.5}}]})
def test_parse_device_gives_what_the_model_gives(obj):
    payload = json.dumps(obj).encode()
    assert by_parse(payload, "dev-1") == by_model(payload, "dev-1")


@given(st.sampled_from(RAW))
def test_raw_payloads_give_what_the_model_gives(payload):
    assert by_parse(payload, "dev-1") == by_model(payload, "dev-1")


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=80))
def test_any_bytes_give_what_the_model_gives(payload):
    assert by_parse(payload, "dev-1") == by_model(payload, "dev-1")
