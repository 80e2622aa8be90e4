"""parse_ack checks a plainly well-formed ack without running the model (issue 11);
whatever the input, it must give what the model gives: the same ack (and its time as
gateway.timeutil.iso writes it), or the same error."""

from __future__ import annotations

import json

from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.pipeline.models import Ack, AckIn, InputError, field_errors, parse_ack
from gateway.timeutil import iso
from tests.helpers.fuzz import examples


STATUSES = ["received", "displayed", "opened", "dismissed", "failed"]

values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=80),
                   st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))
times = st.one_of(st.sampled_from(["2030-01-01T10:00:00Z", "2030-01-01T10:00:00.123Z", "2030-01-01T10:00:00.12Z",
                                   "2030-01-01T10:00:00.123+00:00", "2030-01-01T10:00:00.123z",
                                   "\u0662030-01-01T10:00:00.123Z", "2030-01-01T10:00:00.123+02:00", "2030-01-01T10:00:00",
                                   "2030-01-01", "2030-13-01T00:00:00Z", "yesterday", " 2030-01-01T10:00:00Z ",
                                   "2030-01-01T10:00:00.1234567Z", "", "2030-01-01T10:00:00z"]),
                  st.text(max_size=70), values)
acks = st.fixed_dictionaries(
    {},
    optional={
        "message_id": st.one_of(st.text(min_size=0, max_size=70), st.sampled_from(["ABC-Def", "İx", "a" * 64, "a" * 65]),
                                values),
        "status": st.one_of(st.sampled_from(STATUSES + ["Received", "seen"]), values),
        "at": times,
        "error": st.one_of(st.none(), st.text(max_size=5), st.just("e" * 1024), st.just("e" * 1025), values),
        "extra": values,
    })


def by_model(obj: dict) -> AckIn | str:
    try:
        return AckIn.model_validate(obj)
    except ValidationError as exc:
        return field_errors(exc)


def by_parse(obj: dict) -> Ack | str:
    try:
        return parse_ack(json.dumps(obj).encode())
    except InputError as err:
        assert err.code == "invalid_ack", err.code
        return err.message


@settings(max_examples=examples(600), deadline=None)
@given(acks)
@example({"message_id": "ABC", "status": "received", "at": "2030-01-01T10:00:00+02:00"})
@example({"message_id": "abc", "status": "received", "at": "2030-01-01T10:00:00Z", "error": None})
@example({"message_id": "abc", "status": "failed", "at": "2030-01-01T10:00:00Z", "error": "boom"})
@example({"message_id": "abc", "status": "received"})  # no at: the model's default (now) is used
@example({"message_id": "abc", "status": "received", "at": "not a time"})
def test_parse_ack_gives_what_the_model_gives(obj):
    expected, got = by_model(obj), by_parse(obj)
    if isinstance(expected, str) or isinstance(got, str):
        assert got == expected
        return
    assert type(got) is Ack
    if "at" not in obj:  # both stamped "now", microseconds apart
        assert abs((got.at - expected.at).total_seconds()) < 5
        expected = expected.model_copy(update={"at": got.at})
    assert (got.message_id, got.status, got.at, got.error) == (expected.message_id, expected.status, expected.at,
                                                               expected.error)
    assert got.at.utcoffset() == expected.at.utcoffset() and got.at_text == iso(expected.at)
