"""The HTTP API (contract §10): jobs, devices, signed acks, health and metrics over aiohttp."""

from gateway.http.acks import AckSigner
from gateway.http.service import HttpService, HttpStartError

__all__ = ["AckSigner", "HttpService", "HttpStartError"]
