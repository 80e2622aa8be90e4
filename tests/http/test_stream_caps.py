"""Event streams are capped per account, whatever the authentication (gateway/http/streams.py).

One account must not hold the streams every other operator needs: HTTP Basic requests, which
carry no session, used to bypass the per-session cap, so one monitor could open all of the
gateway's streams and every operator's page got 503.

The cap is the HTTP service's own (its routes and :class:`gateway.http.streams.StreamSlots`),
so the service is served in-process (tests/helpers/http_app.py) with the pipeline's real
intake: no daemon is started.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.http_app import ServedApi, serve_api
from tests.http.conftest import PASSWORDS, error_of
from tests.http.test_operator_api import session

DEFAULT_CAP = 20  # [http] max_streams_per_account


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[ServedApi]:
    with serve_api(tmp_path, {"bridges": {"simulation": {"latency_ms": 0}}}, users=PASSWORDS) as a:
        yield a


def open_stream(stack: contextlib.ExitStack, client: httpx.Client, path: str = "/ui/api/events") -> httpx.Response:
    """An open stream (headers received; the body is left unread, as a slow page leaves it)."""
    return stack.enter_context(client.stream("GET", path))


def refused(client: httpx.Client, path: str = "/ui/api/events") -> httpx.Response:
    """The answer to one more stream; one that was (wrongly) opened is closed, not read for ever."""
    with client.stream("GET", path) as r:
        if r.status_code == 200:
            return r
        r.read()
        return r


def test_one_account_gets_its_cap_of_streams_and_the_others_still_get_theirs(gw: ServedApi):
    basic_mon = httpx.Client(base_url=gw.base, auth=("mon", "mon-pw"), timeout=30,
                             limits=httpx.Limits(max_connections=100))
    with contextlib.ExitStack() as stack:
        stack.callback(basic_mon.close)
        held = [open_stream(stack, basic_mon) for _ in range(DEFAULT_CAP)]
        assert [r.status_code for r in held] == [200] * DEFAULT_CAP
        # The next one from the same account, by Basic or by a session of the same account,
        # is refused with the cap named; the job stream of the API counts too.
        over = refused(basic_mon)
        assert over.status_code == 429 and over.headers["Retry-After"] == "5"
        err = error_of(over)
        assert err["code"] == "too_many_streams" and "max_streams_per_account = 20" in err["message"], err
        assert "'mon'" in err["message"]
        mon_page, _ = session(gw, "mon", "mon-pw")
        stack.callback(mon_page.close)
        assert refused(mon_page).status_code == 429
        r = httpx.post(f"{gw.base}/v1/jobs", auth=("ctrl", "ctrl-pw"),
                       json={"job_id": "capped-1", "target": {"all": True}, "notification": {"title": "t"}})
        assert r.status_code == 202, r.text
        assert refused(basic_mon, "/v1/jobs/capped-1/events").status_code == 429

        # Every other account still gets streams: an operator's page, a controller's script.
        tech_page, _ = session(gw, "tech", "tech-pw")
        stack.callback(tech_page.close)
        assert open_stream(stack, tech_page).status_code == 200
        ctrl = httpx.Client(base_url=gw.base, auth=("ctrl", "ctrl-pw"), timeout=30)
        stack.callback(ctrl.close)
        assert open_stream(stack, ctrl).status_code == 200
        with ctrl.stream("GET", "/v1/jobs/capped-1/events") as job_stream:
            assert job_stream.status_code == 200
            assert any(line.startswith("event: status") for line in job_stream.iter_lines())

        # A stream the account closes gives its slot back.
        held[0].close()
        deadline = time.monotonic() + 10
        while True:
            with basic_mon.stream("GET", "/ui/api/events") as again:
                if again.status_code == 200:
                    break
            assert time.monotonic() < deadline, "the closed stream's slot never came back"
            time.sleep(0.1)


def test_the_cap_is_a_setting(tmp_path: Path):
    with serve_api(tmp_path, {"http": {"max_streams_per_account": 2}}, users=PASSWORDS) as a:
        mon = httpx.Client(base_url=a.base, auth=("mon", "mon-pw"), timeout=30)
        with contextlib.ExitStack() as stack:
            stack.callback(mon.close)
            assert [open_stream(stack, mon).status_code for _ in range(2)] == [200, 200]
            over = refused(mon)
            assert over.status_code == 429 and "max_streams_per_account = 2" in error_of(over)["message"]
