"""The broker's subscription index (gateway/broker/matching.py) keeps wildcard filters in a
tree of levels (issue 11); it must route exactly like matching every filter one by one,
through any sequence of subscribes and unsubscribes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.broker.matching import SubscriptionIndex, matches, valid_topic_filter
from tests.helpers.fuzz import examples


LEVEL = st.sampled_from(["a", "b", "c", "", "$SYS", "$x", "dev-1"])
TOPICS = st.lists(LEVEL, min_size=1, max_size=5).map("/".join)
FILTERS = st.lists(st.one_of(LEVEL, st.just("+"), st.just("#")), min_size=1, max_size=5).map("/".join).filter(
    valid_topic_filter)
STEPS = st.lists(st.tuples(st.booleans(), FILTERS, st.sampled_from(["c1", "c2", "c3"]), st.integers(0, 2)),
                 min_size=1, max_size=40)


def _expected(subs: dict[tuple[str, str], int], topic: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for (topic_filter, client_id), qos in subs.items():
        if matches(topic, topic_filter):
            out[client_id] = max(qos, out.get(client_id, -1))
    return out


@settings(max_examples=examples(300), deadline=None)
@given(steps=STEPS, topics=st.lists(TOPICS, min_size=1, max_size=15))
def test_index_routes_like_matching_every_filter(steps, topics):
    index: SubscriptionIndex[str] = SubscriptionIndex()
    subs: dict[tuple[str, str], int] = {}
    for add, topic_filter, client_id, qos in steps:
        if add:
            index.add(topic_filter, client_id, client_id, qos)
            subs[(topic_filter, client_id)] = qos
        else:
            index.remove(topic_filter, client_id)
            subs.pop((topic_filter, client_id), None)
        assert len(index) == len(subs)
        for topic in topics:
            got = {client_id: entry[1] for client_id, entry in index.match(topic).items()}
            assert got == _expected(subs, topic), (topic, subs)


def test_removing_every_filter_leaves_an_empty_tree():
    index: SubscriptionIndex[str] = SubscriptionIndex()
    filters = ["a/+/c", "a/#", "+/b", "#", "a/+/+/d"]
    for topic_filter in filters:
        index.add(topic_filter, "c1", "c1", 1)
    assert set(index.match("a/b/c")) == {"c1"}
    for topic_filter in filters:
        index.remove(topic_filter, "c1")
    assert len(index) == 0 and index.match("a/b/c") == {}
    assert index._tree._root.empty()  # noqa: SLF001 - no node outlives its last filter
