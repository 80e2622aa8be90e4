"""How many examples a hypothesis test runs, by profile. ``make test`` runs the full
counts each test names (the fuzz bar); ``make test-fast`` sets ``HYPOTHESIS_PROFILE=fast``
and runs a tenth of them, so the edit-test loop stays quick while every property still
runs on a few dozen inputs. A test writes ``@settings(max_examples=examples(400))``:
hypothesis gives an explicit ``max_examples`` priority over the profile, so the profile
alone could not shorten those tests.

The profiles are registered and loaded here (imported by tests/conftest.py, before any
test module is imported); ``HYPOTHESIS_PROFILE`` names one, default ``full``."""

from __future__ import annotations

import os

from hypothesis import settings

FULL, FAST = "full", "fast"
# The share of each test's own example count a profile runs, and the floor under it.
SHARE = {FULL: 1.0, FAST: 0.1}
FLOOR = 10

# "full" is hypothesis' own defaults (100 examples where a test names none).
settings.register_profile(FULL)
settings.register_profile(FAST, max_examples=round(100 * SHARE[FAST]))
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", FULL)
if PROFILE not in SHARE:
    raise ValueError(f"HYPOTHESIS_PROFILE: {PROFILE!r} is not one of {sorted(SHARE)}")
settings.load_profile(PROFILE)


def examples(n: int) -> int:
    """``n`` under the full profile; its profile's share of ``n`` (at least FLOOR, at most
    ``n``) under another."""
    return n if SHARE[PROFILE] >= 1 else min(n, max(FLOOR, round(n * SHARE[PROFILE])))
