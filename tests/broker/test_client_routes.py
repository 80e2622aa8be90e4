"""The gateway's MQTT client (gateway/mqtt.py) hands each incoming message to the first
route, in the order they were added, whose filter matches its topic. It finds that route in
a tree of filter levels (one walk per message instead of one match per route, issue 11);
this checks the tree against MQTT 3.1.1 matching done the plain way, filter by filter."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.broker.matching import matches, valid_topic_filter
from gateway.mqtt import _RouteIndex
from tests.helpers.fuzz import examples


LEVEL = st.sampled_from(["a", "b", "c", "", "$SYS", "$x", "dev-1"])
TOPICS = st.lists(LEVEL, min_size=1, max_size=5).map("/".join)
FILTERS = st.lists(st.one_of(LEVEL, st.just("+"), st.just("#")), min_size=1, max_size=5).map("/".join).filter(
    valid_topic_filter)


@settings(max_examples=examples(300), deadline=None)
@given(filters=st.lists(FILTERS, min_size=1, max_size=12), topics=st.lists(TOPICS, min_size=1, max_size=20))
def test_first_matching_route_is_the_one_a_filter_by_filter_scan_finds(filters, topics):
    index = _RouteIndex()
    for n, topic_filter in enumerate(filters):
        index.add(topic_filter, n)
    for topic in topics:
        expected = next((n for n, f in enumerate(filters) if matches(topic, f)), None)
        assert index.first(topic) == expected, (filters, topic)


def test_dollar_topics_skip_leading_wildcards_and_hash_matches_the_parent_level():
    index = _RouteIndex()
    for n, topic_filter in enumerate(["#", "+/x", "$SYS/#", "a/#"]):
        index.add(topic_filter, n)
    assert index.first("$SYS/x") == 2        # not "#" nor "+/x" [MQTT-4.7.2-1]
    assert index.first("q/x") == 0
    assert index.first("a") == 0             # "#" was added first; "a/#" would match too
    only = _RouteIndex()
    only.add("a/#", 0)
    assert only.first("a") == 0 and only.first("a/b/c") == 0 and only.first("b") is None
