"""The browsers the page and service-worker tests drive, one definition for all of them.

Playwright for Python drives them over the DevTools protocol with ``executable_path``: no
browser download. Two Debian packages of the same Chromium release:

* :data:`HEADLESS_SHELL` (``chromium-headless-shell``) for the pages (the operator page,
  /me without notifications): the same Blink, V8, layout, fetch, EventSource and cookies
  as ``chromium``, built without the desktop browser's layer, as Playwright itself runs
  headless Chromium. That layer is what a test pays for with every page: on a 2-core
  machine a new page of the full browser in ``--headless`` mode costs ~0.8 s of CPU in its
  renderer, one of the headless shell ~0.13 s, and the page tests open a few dozen.
* :data:`CHROMIUM` (``chromium``) where a service worker shows notifications: the headless
  shell has no notification platform (``showNotification()`` keeps nothing, so
  ``getNotifications()`` is empty), and what the worker shows is what those tests check.
"""

from __future__ import annotations

HEADLESS_SHELL = "/usr/bin/chromium-headless-shell"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def require_browser(path: str = HEADLESS_SHELL) -> str:
    """``path`` when it is the installed command of its name; a missing one fails the test
    (never a skip: make test installs both packages)."""
    from tests.helpers.processes import require_tool

    found = require_tool(path.rsplit("/", 1)[-1])
    assert found == path, f"Debian's {path} is required (found {found})"
    return path


__all__ = ["CHROMIUM", "FLAGS", "HEADLESS_SHELL", "require_browser"]
