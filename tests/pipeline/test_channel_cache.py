"""The channel choice kept per stored channels text answers as a fresh choice would: for
the same text, for a changed text, with invalid marks, and past the cache size."""

from __future__ import annotations

import json

from gateway.pipeline import routing as store


def fresh(text: str, invalid: dict, enabled) -> object:
    return store._choose_channel(json.loads(text), invalid, enabled, None)


def test_the_kept_choice_is_what_a_fresh_choice_gives():
    cache = store.ChannelCache(size=1024)
    enabled = {"fcm": 1, "mqtt": 1}
    texts = ['[{"platform": "mqtt"}]', '[{"platform": "apns", "token": "abababababababababababababababababababababababababababababababab"}, {"platform": "fcm", "token": "f1"}]',
             '[{"platform": "fcm", "token": "f2"}]', '[{"platform": "wns", "channel_uri": "https://x.notify.windows.com/?t=1"}]']
    for _ in range(2):  # the second round answers from the cache
        for text in texts:
            assert store.choose_channel(cache.get(text), {}, enabled) == fresh(text, {}, enabled)
    shared = cache.get(texts[1])
    assert store.choose_channel(shared, {}, enabled) is store.choose_channel(cache.get(texts[1]), {}, enabled)
    # Marks are never answered from the cache: the fcm channel is marked, nothing is left.
    assert store.choose_channel(shared, {"fcm|f1": {}}, enabled) == ("invalid_address",
                                                                     "every channel's address is invalid")
    assert store.choose_channel(shared, {}, enabled, also_invalid="fcm|f1") == fresh(texts[1], {"fcm|f1": {}}, enabled)
    # Another set of enabled bridges is another question.
    assert store.choose_channel(shared, {}, {"apns": 1}).platform == "apns"
    assert store.choose_channel(shared, {}, enabled).platform == "fcm"
    # Past the cache size (unique tokens, as a push fleet has) the answers stay right.
    for i in range(cache.size * 2 + 5):
        text = f'[{{"platform": "fcm", "token": "t{i}"}}]'
        got = store.choose_channel(cache.get(text), {}, enabled)
        assert got.key == f"fcm|t{i}" and got.channel.token == f"t{i}"
    assert len(cache) <= cache.size
