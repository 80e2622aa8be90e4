"""SSRF guard for device-supplied URLs (Web Push endpoints, WNS channel URIs).

A device registers the URL we will POST to, so a hostile or broken device could aim the
gateway at ``https://127.0.0.1:8080/admin`` or a LAN printer. Two layers stop that:

1. :func:`check_url` — syntax, before any I/O: https only, a host, no user-info, and (for
   WNS) the host must be one of the operator's allowed domains.
2. :class:`GuardedBackend` — at *connect* time the host is resolved once and the
   connection is made to a checked address. Checking at connect time (not in a separate
   resolution before the request) closes the DNS-rebinding window where a name resolves
   to a public address for the check and to 127.0.0.1 for the connection.

A refusal raises :class:`AddressRefused`; the bridges map it to ``invalid_address`` (this
address can never be used with this configuration), while a failed DNS lookup stays a
transient error.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpcore
import httpx
import structlog

log = structlog.get_logger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]


class AddressRefused(httpcore.ConnectError):
    """The URL or the address it resolves to is not allowed (reason in ``args[0]``)."""


@dataclass(frozen=True, slots=True)
class Policy:
    """What a bridge lets devices point it at."""

    allow_private: bool = False  # loopback/private/link-local allowed (tests, private deployments)
    allowed_hosts: tuple[str, ...] = ()  # empty = any host; else host == h or endswith "." + h


def address_allowed(ip: IPAddress, allow_private: bool) -> bool:
    """Public unicast only, unless private targets were configured.

    Multicast and the unspecified address are never a push service, whatever the config.
    IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.
    """
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_multicast or ip.is_unspecified:
        return False
    if allow_private:
        return True
    if ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_reserved:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return False
    return ip.is_global


def host_allowed(host: str, allowed_hosts: typing.Iterable[str]) -> bool:
    """``host`` equals an allowed name or is a subdomain of it (label boundary)."""
    host = host.lower().rstrip(".")
    for allowed in allowed_hosts:
        allowed = allowed.lower().strip().rstrip(".")
        if allowed and (host == allowed or host.endswith("." + allowed)):
            return True
    return False


def check_url(url: str, policy: Policy) -> httpx.URL:
    """Validate a device-supplied URL before any I/O; raise :class:`AddressRefused`."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise AddressRefused("not a valid URL") from None
    if parsed.scheme != "https":
        raise AddressRefused("only https:// URLs are allowed")
    if not parsed.host:
        raise AddressRefused("URL has no host")
    if parsed.userinfo:
        raise AddressRefused("URL must not carry user-info")
    if policy.allowed_hosts and not host_allowed(parsed.host, policy.allowed_hosts):
        raise AddressRefused(f"host {parsed.host!r} is not under an allowed host")
    try:
        literal = ipaddress.ip_address(parsed.host)
    except ValueError:
        literal = None
    if literal is not None and not address_allowed(literal, policy.allow_private):
        raise AddressRefused(f"address {literal} is not public")
    return parsed


def origin(url: str) -> str:
    """``scheme://host[:port]`` as RFC 6454 serialises it (default port omitted)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    default = {"https": 443, "http": 80}.get(parts.scheme)
    port = parts.port
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


async def system_resolver(host: str, port: int) -> list[str]:
    """All addresses of ``host`` (the loop's getaddrinfo runs in a thread: non-blocking)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        addr = str(sockaddr[0])
        if addr not in seen:
            seen.append(addr)
    return seen


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """A network backend that connects only to addresses the policy allows.

    httpcore starts TLS on the returned stream with the *original* host name as SNI and
    for certificate checks, so connecting to the vetted IP changes nothing else.
    """

    def __init__(self, policy: Policy, resolver: Resolver = system_resolver):
        self.policy = policy
        self.resolver = resolver
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable[typing.Any] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        try:
            candidates = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                resolved = await asyncio.wait_for(self.resolver(host, port), timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                raise httpcore.ConnectError(f"cannot resolve host: {type(exc).__name__}") from None
            candidates = [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolved]
        allowed = [ip for ip in candidates if address_allowed(ip, self.policy.allow_private)]
        if not allowed:
            refused = ", ".join(str(ip) for ip in candidates) or "no address"
            raise AddressRefused(f"host resolves to non-public address ({refused})")
        last: Exception | None = None
        for ip in allowed:
            try:
                return await self._inner.connect_tcp(str(ip), port, timeout=timeout,
                                                     local_address=local_address,
                                                     socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: typing.Iterable[typing.Any] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:
        raise AddressRefused("unix sockets are not a push target")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with the pool's network backend replaced by :class:`GuardedBackend`.

    httpx exposes no backend parameter, so the pool is rebuilt with the same settings; the
    rest of the transport (request/response mapping, error mapping) is httpx's own.
    """

    def __init__(self, policy: Policy, ssl_context: typing.Any, *, http1: bool = True,
                 http2: bool = False, max_connections: int = 100,
                 resolver: Resolver = system_resolver):
        super().__init__(verify=ssl_context, http1=http1, http2=http2, trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context, max_connections=max_connections,
            max_keepalive_connections=max_connections, keepalive_expiry=30.0,
            http1=http1, http2=http2, network_backend=GuardedBackend(policy, resolver))


def refusal(exc: BaseException) -> AddressRefused | None:
    """The :class:`AddressRefused` behind an httpx error, if that is what it was."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, AddressRefused):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
