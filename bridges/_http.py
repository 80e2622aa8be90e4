"""Shared HTTP plumbing of the cloud bridges: TLS contexts, HTTP clients, answer helpers.

Every cloud bridge must be pointable at a private deployment or a test fake (contract
§4: endpoint/token URL overridable, ``ca_file`` trusted), so the TLS context is built in
one place: the system's trust store *plus* the configured CA, TLS 1.2 or newer. The
helpers that read ``Retry-After`` and classify transport errors are shared so that every
bridge turns the same network failure into the same :class:`~bridges.base.Outcome`.

Two clients: httpx (Web Push and WNS, whose endpoints come from devices and so go through
the SSRF-guarded transports of :mod:`bridges.ssrf`) and :class:`PushClient` (APNs and FCM,
fixed configured hosts): libcurl with nghttp2 through ``curl_cffi``, which needs about a
quarter of httpx's CPU per HTTP/2 request.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Protocol

import httpx

from bridges.base import Outcome

# A push request is small; a slow platform must not hold a delivery slot for long.
DEFAULT_TIMEOUT = httpx.Timeout(15.0, connect=10.0)


def tls_context(ca_file: Path | None = None, cert_file: Path | None = None,
                key_file: Path | None = None, alpn: list[str] | None = None) -> ssl.SSLContext:
    """A client TLS context trusting the system CAs and ``ca_file``; optional client cert."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None and str(ca_file):
        ctx.load_verify_locations(cafile=str(ca_file))
    if cert_file is not None and str(cert_file):
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file and str(key_file) else None)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def async_client(ca_file: Path | None = None, *, http1: bool = True, http2: bool = False,
                 cert_file: Path | None = None, key_file: Path | None = None,
                 max_connections: int = 100, transport: httpx.AsyncBaseTransport | None = None,
                 timeout: httpx.Timeout = DEFAULT_TIMEOUT) -> httpx.AsyncClient:
    """One long-lived pooled client per bridge (connections are the expensive part).

    ``trust_env`` is off: a daemon must not silently route pushes through a proxy picked
    up from the environment of whoever started it.
    """
    if transport is None:
        transport = httpx.AsyncHTTPTransport(
            verify=tls_context(ca_file, cert_file, key_file), http1=http1, http2=http2,
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
            trust_env=False)
    return httpx.AsyncClient(transport=transport, timeout=timeout, trust_env=False,
                             follow_redirects=False)


# Requests one PushClient runs at once (one curl handle each); more wait for a free handle.
# Above the dispatcher's default max_in_flight (200), so the bridge is never what queues.
PUSH_MAX_IN_FLIGHT = 256
# Configured curl handles a PushClient keeps between requests (each holds ~45 KiB): enough for
# a steady trickle; a burst creates more (~30 us each) and frees those beyond this afterwards.
PUSH_IDLE_HANDLES = 32


class NoAnswer(Exception):
    """A :class:`PushClient` request that got no usable HTTP answer."""


class UnsafeHeader(NoAnswer):
    """A header libcurl would not send as one field (CR, LF or NUL in it, or a bad name)."""


# RFC 9110 §5.1 field names (a token) and §5.5 values: libcurl takes header *lines*, so a CR
# or LF in a value would start another header (httpx/h2 refused those; libcurl does not).
FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
FIELD_VALUE_FORBIDDEN = re.compile(r"[\r\n\x00]")


def header_problem(name: str, value: str) -> str | None:
    """Why ``name: value`` cannot be sent as one header field, or None."""
    if not FIELD_NAME.fullmatch(name):
        return f"header name {name!r} is not a token"
    if FIELD_VALUE_FORBIDDEN.search(value):
        return f"header {name!r}: CR, LF or NUL in the value"
    return None


class NotHttp2(NoAnswer):
    """An answer that did not come over HTTP/2 where HTTP/2 is mandatory (APNs)."""


class Answer(Protocol):
    """What the bridges read from an HTTP answer (an httpx response or a :class:`PushAnswer`)."""

    status_code: int

    @property
    def headers(self) -> Any: ...

    def json(self) -> Any: ...


@dataclass(slots=True)
class PushAnswer:
    status_code: int
    headers: dict[str, str]  # lower-case names, last value wins
    content: bytes
    http_version: int  # libcurl's CURL_HTTP_VERSION_* code

    def json(self) -> Any:
        return json.loads(self.content)


class PushClient:
    """The HTTP/2 client of the APNs and FCM bridges: libcurl (nghttp2, BoringSSL) via curl_cffi.

    Why not httpx here: with httpx/httpcore/h2 each request costs 2.2–3.6 ms of CPU in
    Python (client layer, connection pool, h2 state machine, HPACK, anyio), which caps a
    bridge at about 300 requests/s on one core; libcurl does the HTTP/2 framing, HPACK and
    TLS in C. APNs and FCM are fixed, configured hosts, so the SSRF guard of the
    device-given Web Push/WNS endpoints (httpcore-based) is not needed on this path.

    It drives curl_cffi's documented low-level API (``Curl`` easy handles on an
    ``AsyncCurl`` multi handle) rather than its requests-like ``AsyncSession``: the session
    resets each handle and sets some thirty options again for every request, which was
    half of the client's CPU; here a handle is configured once (TLS, HTTP version,
    timeouts, proxy off) and a request sets only its URL, headers and body.

    What is kept from the httpx client: the same trust (the system CAs plus ``ca_file``,
    verified, TLS 1.2 or newer), the optional client certificate (APNs certificate auth),
    no proxy from the environment, no redirects, the same timeouts, TLS material checked
    when the bridge starts. ``http2_only`` (APNs) offers only ``h2`` in ALPN and speaks
    nothing else; an answer that is not HTTP/2 raises :class:`NotHttp2`. Requests to one
    host share connections: each carries up to 100 concurrent streams (curl's default), and
    ``PIPEWAIT`` makes requests that start together wait for the first connection to
    multiplex on it rather than each opening one. At most ``max_in_flight`` requests run
    at once; transport failures raise one of :attr:`errors`.
    """

    def __init__(self, ca_file: Path | None = None, *, http2_only: bool,
                 cert_file: Path | None = None, key_file: Path | None = None,
                 max_in_flight: int = PUSH_MAX_IN_FLIGHT,
                 timeout: httpx.Timeout = DEFAULT_TIMEOUT):
        # Load the TLS material once with the ssl module: unreadable files raise OSError /
        # ValueError here, at start(), as they did with httpx, not on the first push.
        tls_context(ca_file, cert_file, key_file)
        import certifi
        from curl_cffi import CurlError, CurlHttpVersion, CurlOpt, CurlSslVersion

        self.errors: tuple[type[Exception], ...] = (CurlError, NoAnswer)
        self._http2_only = http2_only
        self._max_in_flight = max_in_flight
        system = ssl.get_default_verify_paths()
        if ca_file is not None and str(ca_file):
            cainfo = str(ca_file)
        elif system.cafile and Path(system.cafile).is_file():
            cainfo = system.cafile
        else:
            cainfo = certifi.where()
        total_ms = int(1000 * (timeout.read or 15.0))
        self._options: list[tuple[Any, Any]] = [
            (CurlOpt.POST, 1),
            (CurlOpt.HTTP_VERSION,
             CurlHttpVersion.V2_PRIOR_KNOWLEDGE if http2_only else CurlHttpVersion.V2TLS),
            (CurlOpt.PIPEWAIT, 1),
            (CurlOpt.SSLVERSION, CurlSslVersion.TLSv1_2),
            (CurlOpt.SSL_VERIFYPEER, 1),
            (CurlOpt.SSL_VERIFYHOST, 2),
            (CurlOpt.CAINFO, cainfo),
            (CurlOpt.PROXY, ""),  # empty: no proxy, whatever the environment says
            (CurlOpt.NOPROXY, ""),
            (CurlOpt.FOLLOWLOCATION, 0),
            (CurlOpt.NOSIGNAL, 1),
            # Push requests and answers are a few KiB; libcurl's default buffers (16 KiB down,
            # 64 KiB up) made each kept handle cost about 80 KiB of RSS.
            (CurlOpt.BUFFERSIZE, 4096),
            (CurlOpt.UPLOAD_BUFFERSIZE, 16384),  # libcurl's minimum
            (CurlOpt.TIMEOUT_MS, total_ms),
            (CurlOpt.CONNECTTIMEOUT_MS, int(1000 * timeout.connect) if timeout.connect else total_ms),
        ]
        if system.capath and Path(system.capath).is_dir():
            self._options.append((CurlOpt.CAPATH, system.capath))  # and the system's CAs, as tls_context()
        if cert_file is not None and str(cert_file):
            self._options.append((CurlOpt.SSLCERT, str(cert_file)))
            if key_file is not None and str(key_file):
                self._options.append((CurlOpt.SSLKEY, str(key_file)))
        self._multi: Any = None  # curl_cffi.AsyncCurl, made on the running loop at first use
        self._slots: asyncio.Semaphore | None = None
        self._idle: list[Any] = []  # configured easy handles not in use
        self._closed = False

    def _handle(self) -> Any:
        if self._idle:
            return self._idle.pop()
        from curl_cffi import Curl

        curl = Curl()
        for option, value in self._options:
            curl.setopt(option, value)
        return curl

    async def post(self, url: str, headers: dict[str, str], body: bytes) -> PushAnswer:
        """POST ``body``; the answer, or one of :attr:`errors` when none came."""
        from curl_cffi import CurlError, CurlHttpVersion, CurlInfo, CurlOpt
        from curl_cffi.requests.exceptions import code2error

        if self._closed:
            raise NoAnswer("client closed")
        if self._multi is None:
            from curl_cffi import AsyncCurl

            self._multi = AsyncCurl()
            self._slots = asyncio.Semaphore(self._max_in_flight)
        assert self._slots is not None
        async with self._slots:
            curl = self._handle()
            content, head = io.BytesIO(), io.BytesIO()
            reusable = False
            try:
                curl.clean_handles_and_buffers()  # frees the previous request's header list
                curl.setopt(CurlOpt.URL, url)
                curl.setopt(CurlOpt.HTTPHEADER, _header_lines(headers))
                curl.setopt(CurlOpt.POSTFIELDS, body)  # not copied: ``body`` outlives the transfer
                curl.setopt(CurlOpt.POSTFIELDSIZE, len(body))
                curl.setopt(CurlOpt.WRITEDATA, content)
                curl.setopt(CurlOpt.HEADERDATA, head)
                try:
                    await self._multi.add_handle(curl)
                except CurlError as exc:
                    reusable = True  # finished (with an error): the multi handle let go of it
                    # The specific class (ConnectionError, SSLError, Timeout...) names the cause.
                    raise code2error(exc.code, str(exc))(str(exc), exc.code) from None
                reusable = True
                status = int(curl.getinfo(CurlInfo.RESPONSE_CODE))
                version = int(curl.getinfo(CurlInfo.HTTP_VERSION))
            finally:
                if reusable and not self._closed and len(self._idle) < PUSH_IDLE_HANDLES:
                    self._idle.append(curl)
                elif reusable:  # more handles than an idle bridge needs: give the memory back
                    curl.close()
                else:  # cancelled mid-transfer, or closed: this handle is not reused
                    if self._multi is not None and not self._closed:
                        self._multi.remove_handle(curl)
                    curl.close()
        if status == 0:
            raise NoAnswer("no HTTP status")
        if self._http2_only and version != CurlHttpVersion.V2_0:
            raise NotHttp2(f"answered over HTTP version code {version}")
        return PushAnswer(status, _header_block(head.getvalue()), content.getvalue(), version)

    async def aclose(self) -> None:
        self._closed = True
        for curl in self._idle:
            curl.close()
        self._idle.clear()
        if self._multi is not None:
            await self._multi.close()
            self._multi = None


def _header_lines(headers: dict[str, str]) -> list[bytes]:
    """libcurl's header lines; refuses what would not be exactly one field each."""
    lines = []
    for name, value in headers.items():
        problem = header_problem(name, value)
        if problem is not None:
            raise UnsafeHeader(problem)
        # "name:" with nothing after it would make libcurl drop the header; "name;" sends it empty.
        lines.append(f"{name}: {value}".encode() if value.strip() else f"{name};".encode())
    return lines


def _header_block(raw: bytes) -> dict[str, str]:
    """The final answer's headers from libcurl's header lines (after any 1xx block)."""
    headers: dict[str, str] = {}
    for line in raw.decode("latin-1").split("\r\n"):
        if line.startswith("HTTP/"):
            headers = {}
        else:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
    return headers


def retry_after(headers: Any, default: float | None = None,
                now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP-date, RFC 9110 §10.2.3)."""
    raw = headers.get("retry-after")
    if raw is None:
        return default
    raw = raw.strip()
    if raw.isdigit():
        return float(raw)
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return default
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def transport_outcome(exc: Exception) -> Outcome:
    """A request that got no HTTP answer is transient: let the pipeline back off.

    The reason names the exception class only; messages can carry URLs with tokens.
    """
    return Outcome.retry(f"transport: {type(exc).__name__}")


def json_or_empty(response: Answer) -> dict[str, Any]:
    """The answer's JSON object, or ``{}`` when the body is empty or not a JSON object."""
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


__all__ = ["DEFAULT_TIMEOUT", "PUSH_MAX_IN_FLIGHT", "Answer", "NoAnswer", "NotHttp2", "PushAnswer", "PushClient", "UnsafeHeader", "header_problem", "async_client", "json_or_empty", "retry_after", "tls_context",
           "transport_outcome"]
