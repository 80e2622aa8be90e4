"""The cyclic garbage collector's settings for the running daemon.

CPython frees an object by reference counting as soon as nothing refers to it; the
cyclic collector exists only for reference cycles. By default it runs a young
collection every 700 net container allocations and a full one whenever the objects
promoted since the last full collection exceed a quarter of the old generation. The
daemon allocates several containers per MQTT message (the broker's message and its
queue entry, paho's and aiomqtt's message objects, a future, a parsed model), and a
burst of registrations keeps tens of thousands of them alive in the broker's queue for
the gateway's session, so they are promoted, and every full collection walked the whole
heap again: everything imported and built at startup plus the backlog. Measured with a
``gc.callbacks`` probe on the registration bench (20,000 devices), collections took
well over a second of a run of about four seconds of daemon CPU, in pauses of
70-400 ms that stopped the event loop.

Two settings, applied by :func:`tune` and :func:`freeze`:

- ``gc.freeze()`` once the daemon is ready: what startup made (modules, classes,
  functions, the configuration, the services) moves to the permanent generation, which
  no collection walks again. A collection first, so no startup garbage is kept.
- a young collection every :data:`YOUNG_THRESHOLD` allocations instead of 700: most of a
  message's objects are freed by reference counting well before that, so far fewer
  survive into the older generations and fewer full collections follow.

Neither keeps memory that would otherwise be freed, except cyclic garbage made between
two young collections (bounded by the threshold) and cycles among the frozen startup
objects (made once).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000


def tune() -> None:
    """A young collection every YOUNG_THRESHOLD allocations; the older generations keep
    CPython's defaults (each collected after 10 collections of the one below)."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)


def freeze() -> None:
    """Collect what startup left as garbage, then move every object alive now out of
    the collector's sight for the life of the process."""
    gc.collect()
    gc.freeze()


__all__ = ["YOUNG_THRESHOLD", "freeze", "tune"]
