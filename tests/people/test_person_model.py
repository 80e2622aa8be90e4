"""The Person model (contract §12) in-process: field-named errors, the CLI's ``--quiet``
form, and hypothesis over any JSON body a client may PUT."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.people.model import Person, parse_person, parse_quiet, quiet_text
from gateway.pipeline.models import InputError
from tests.helpers.fuzz import examples


ANNA = {"person_id": "anna", "name": "Anna K.", "account": "anna", "devices": ["anna-phone", "anna-browser"],
        "timezone": "Europe/Berlin",
        "quiet_hours": [{"days": ["mon", "tue", "wed", "thu", "fri"], "from": "22:00", "to": "06:00"}],
        "bypass_priority": "high", "muted": {"segments": [], "rules": ["door-open"]}, "reach_after_s": 120}


def test_the_contracts_example_round_trips():
    person = parse_person(ANNA)
    assert person.as_json() == ANNA
    assert parse_person(json.loads(json.dumps(person.as_json()))) == person


@pytest.mark.parametrize(("change", "field"), [
    ({"person_id": "a b"}, "person_id"),
    ({"person_id": ".."}, "person_id"),
    ({"person_id": "x" * 65}, "person_id"),
    ({"timezone": "Europe/Atlantis"}, "timezone"),
    ({"timezone": "../../etc/passwd"}, "timezone"),
    ({"devices": ["p", "p"]}, "devices"),
    ({"devices": ["bad id"]}, "devices.0"),
    ({"quiet_hours": [{"days": ["mon"], "from": "24:00", "to": "06:00"}]}, "quiet_hours.0.from"),
    ({"quiet_hours": [{"days": ["monday"], "from": "22:00", "to": "06:00"}]}, "quiet_hours.0.days.0"),
    ({"quiet_hours": [{"days": ["mon"], "from": "22:00", "to": "22:60"}]}, "quiet_hours.0.to"),
    ({"quiet_hours": [{"days": [], "from": "22:00", "to": "06:00"}]}, "quiet_hours.0.days"),
    ({"bypass_priority": "urgent"}, "bypass_priority"),
    ({"muted": {"rules": ["x"], "segmnts": []}}, "muted.segmnts"),
    ({"reach_after_s": -1}, "reach_after_s"),
    ({"reach_after_s": "120"}, "reach_after_s"),
    ({"account": "a b"}, "account"),
    ({"tiemzone": "UTC"}, "tiemzone"),
])
def test_bad_input_names_the_field(change, field):
    with pytest.raises(InputError) as err:
        parse_person({**ANNA, **change})
    assert err.value.code == "invalid_person"
    assert [f.field for f in err.value.fields] == [field], err.value.message
    assert err.value.message.startswith(f"{field}: ")


def test_the_urls_id_fills_in_or_must_agree():
    assert parse_person({"devices": []}, "ben").person_id == "ben"
    with pytest.raises(InputError, match="person_id: 'anna' differs from the URL's 'ben'"):
        parse_person(ANNA, "ben")


@pytest.mark.parametrize(("text", "days", "span"), [
    ("mon-fri 22:00-06:00", ["mon", "tue", "wed", "thu", "fri"], ("22:00", "06:00")),
    ("sat,sun 00:00-09:00", ["sat", "sun"], ("00:00", "09:00")),
    ("fri-mon 23:00-07:00", ["mon", "fri", "sat", "sun"], ("23:00", "07:00")),
    ("daily 12:00 - 13:00", ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], ("12:00", "13:00")),
    ("WED 01:00-02:00", ["wed"], ("01:00", "02:00")),
])
def test_the_clis_quiet_form(text, days, span):
    window = parse_quiet(text)
    assert window == {"days": days, "from": span[0], "to": span[1]}
    assert parse_quiet(quiet_text(window)) == window


def test_a_window_ending_when_it_starts_is_a_whole_day():
    assert parse_quiet("sun 00:00-00:00") == {"days": ["sun"], "from": "00:00", "to": "00:00"}


@pytest.mark.parametrize(("text", "says"), [
    ("mon-fry 22:00-06:00", "'fry' is not a day"),
    ("mon 22:00", "expected DAYS HH:MM-HH:MM"),
    ("mon 22:00-24:30", "to: must be a time of day"),
])
def test_a_bad_quiet_form_says_what_is_wrong(text, says):
    with pytest.raises(ValueError) as err:
        parse_quiet(text)
    assert str(err.value).startswith("--quiet: ") and says in str(err.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8)
KEYS = ["person_id", "name", "account", "devices", "timezone", "quiet_hours", "bypass_priority", "muted",
        "reach_after_s", "tiemzone"]
windows = st.fixed_dictionaries({"days": st.lists(st.sampled_from(["mon", "tue", "sun", "xyz"]), max_size=3),
                                 "from": st.sampled_from(["22:00", "06:00", "7:00", "23:59"]),
                                 "to": st.sampled_from(["06:00", "22:00", "24:00"])})
person_like = st.dictionaries(st.sampled_from(KEYS), json_values | st.lists(windows, max_size=2)
                              | st.sampled_from(["UTC", "Europe/Berlin", "Nowhere/X", "high", "anna", "a b"]),
                              max_size=6)


@settings(max_examples=examples(150), deadline=None)
@given(body=person_like)
def test_any_body_is_a_person_that_round_trips_or_an_error_naming_a_field_it_has(body):
    try:
        person = parse_person(body, "p-1")
    except InputError as err:
        assert err.code == "invalid_person" and err.fields
        for f in err.fields:
            assert f.field.split(".")[0] in body or f.field == "person", (f, body)
            assert f.message.startswith(f"{f.field}: ")
        return
    assert isinstance(person, Person)
    assert parse_person(json.loads(json.dumps(person.as_json()))) == person
