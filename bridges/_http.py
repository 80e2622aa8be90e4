"""Shared HTTP plumbing of the cloud bridges: TLS contexts, httpx clients, answer helpers.

Every cloud bridge must be pointable at a private deployment or a test fake (contract
§4: endpoint/token URL overridable, ``ca_file`` trusted), so the TLS context is built in
one place: the system's trust store *plus* the configured CA, TLS 1.2 or newer. The
helpers that read ``Retry-After`` and classify transport errors are shared so that every
bridge turns the same network failure into the same :class:`~bridges.base.Outcome`.
"""

from __future__ import annotations

import ssl
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

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


def retry_after(headers: httpx.Headers, default: float | None = None,
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


def json_or_empty(response: httpx.Response) -> dict[str, Any]:
    """The answer's JSON object, or ``{}`` when the body is empty or not a JSON object."""
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


__all__ = ["DEFAULT_TIMEOUT", "async_client", "json_or_empty", "retry_after", "tls_context",
           "transport_outcome"]
