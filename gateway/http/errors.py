"""JSON errors of the HTTP API (contract §10): ``{"error": {"code", "message"}}``.

Input errors reuse the MQTT side's codes and field-naming messages
(:class:`gateway.pipeline.models.InputError`: ``invalid_json``, ``too_large``,
``invalid_job``, ``invalid_device``, ``invalid_ack``); the rest are HTTP's own
(``unauthorized``, ``forbidden``, ``bad_signature``, ``not_found``, ``not_stored``, ...).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.pipeline.models import InputError


class ApiError(Exception):
    """Raised by a handler; the middleware answers it as a JSON error."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    @classmethod
    def from_input(cls, err: InputError) -> "ApiError":
        return cls(413 if err.code == "too_large" else 400, err.code, err.message)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    import json

    return web.Response(text=json.dumps(data, separators=(",", ":")), status=status,
                        content_type="application/json", headers=headers)


# aiohttp's own HTTP exceptions (router misses, its body limit) in the API's words.
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 408: "timeout", 413: "too_large", 415: "unsupported_media_type",
              429: "too_many_requests", 503: "not_ready"}
