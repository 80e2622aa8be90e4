"""The retained-message trie: the same answers as plain MQTT matching, only what a filter
can match is visited, limits hold, and clearing frees the index."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.broker.matching import matches, valid_topic_filter
from gateway.broker.retained import RetainedStore
from tests.helpers.fuzz import examples


LEVEL = st.sampled_from(["a", "b", "c", "", "$SYS", "$x", "dev-1"])
TOPICS = st.lists(LEVEL, min_size=1, max_size=4).map("/".join)
FILTERS = st.lists(st.one_of(LEVEL, st.just("+"), st.just("#")), min_size=1, max_size=4).map("/".join).filter(
    valid_topic_filter)


@settings(max_examples=examples(150), deadline=None)
@given(topics=st.lists(TOPICS, max_size=30), filters=st.lists(FILTERS, min_size=1, max_size=10))
def test_trie_matches_like_mqtt(topics, filters):
    """[MQTT-4.7.1-2] '#' also matches the parent level, [MQTT-4.7.1-3] '+' one level,
    [MQTT-4.7.2-1] no leading wildcard matches a '$' topic."""
    store: RetainedStore[str] = RetainedStore()
    for topic in topics:
        assert store.put(topic, topic, len(topic))
    for topic_filter in filters:
        expected = sorted({t for t in topics if matches(t, topic_filter)})
        got = sorted(t for t, _ in store.match(topic_filter))
        assert got == expected, topic_filter


def test_a_subscription_visits_only_what_it_can_match():
    """20,000 retained job statuses do not make a device's subscription walk them all."""
    store: RetainedStore[int] = RetainedStore()
    for i in range(20_000):
        assert store.put(f"homepot/s/jobs/job-{i}/status", i, 10)
    assert store.put("homepot/s/devices/pos-1/cfg", -1, 10)
    visited: list[int] = []
    original = store._walk

    def counting_walk(node, skip_dollar):  # noqa: ANN001
        for entry in original(node, skip_dollar):
            visited.append(1)
            yield entry

    store._walk = counting_walk  # type: ignore[method-assign]
    assert [t for t, _ in store.match("homepot/s/devices/pos-1/#")] == ["homepot/s/devices/pos-1/cfg"]
    assert [t for t, _ in store.match("homepot/s/devices/+/cfg")] == ["homepot/s/devices/pos-1/cfg"]
    assert len(visited) == 1


def test_limits_refuse_new_topics_but_allow_replacing_and_clearing():
    store: RetainedStore[str] = RetainedStore(max_messages=2, max_bytes=100, max_nodes=10)
    assert store.put("a/1", "x", 10) and store.put("a/2", "y", 10)
    assert not store.put("a/3", "z", 10)           # count limit
    assert store.put("a/1", "x2", 50)              # replacing never adds a topic
    assert not store.put("a/2", "big", 100)        # but must fit in bytes
    assert (len(store), store.bytes) == (2, 60)
    assert store.remove("a/1") and store.put("a/3", "z", 10)
    deep = RetainedStore[str](max_nodes=5)
    assert not deep.put("/".join(["x"] * 6), "v", 1)  # one node per level
    assert deep.put("/".join(["x"] * 5), "v", 1)


def test_clearing_frees_every_node_of_the_path():
    store: RetainedStore[str] = RetainedStore()
    store.put("p/jobs/j1/status", "s1", 1)
    store.put("p/jobs/j2/status", "s2", 1)
    store.put("p/jobs", "parent", 1)
    nodes = store.nodes
    assert store.remove("p/jobs/j1/status")
    assert store.nodes == nodes - 2                  # j1 and j1/status
    assert not store.remove("p/jobs/j1/status")
    assert store.remove("p/jobs/j2/status") and store.remove("p/jobs")
    assert (len(store), store.bytes, store.nodes) == (0, 0, 0)
    assert list(store.match("#")) == []


def test_very_deep_filters_do_not_recurse():
    store: RetainedStore[str] = RetainedStore()
    deep = "/".join(["l"] * 5000)
    store.put(deep, "v", 1)
    assert [t for t, _ in store.match("/".join(["+"] * 5000))] == [deep]
    assert [t for t, _ in store.match("l/#")] == [deep]
