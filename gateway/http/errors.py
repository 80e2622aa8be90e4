"""JSON errors of the HTTP API (contract §10): ``{"error": {"code", "message"}}``.

Input errors reuse the MQTT side's codes and field-naming messages
(:class:`gateway.pipeline.models.InputError`: ``invalid_json``, ``too_large``,
``invalid_job``, ``invalid_device``, ``invalid_ack``); the rest are HTTP's own
(``unauthorized``, ``forbidden``, ``bad_signature``, ``not_found``, ``not_stored``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import web

from gateway.pipeline.models import FieldError, InputError


class ApiError(Exception):
    """Raised by a handler; the middleware answers it as a JSON error.

    ``fields`` holds the problems one per field (:class:`FieldError`), as validation found
    them; the operator page answers them as its ``fields`` list. Without any, the error is
    about the request as a whole (``field ""``).
    """

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 fields: Sequence[FieldError] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.fields: tuple[FieldError, ...] = tuple(fields) if fields else (FieldError("", message),)

    @classmethod
    def at(cls, status: int, code: str, field: str, text: str) -> "ApiError":
        """One problem of one field: the message is ``"<field>: <text>"``."""
        message = f"{field}: {text}"
        return cls(status, code, message, fields=[FieldError(field, message)])

    @classmethod
    def from_input(cls, err: InputError, headers: dict[str, str] | None = None) -> "ApiError":
        return cls(413 if err.code == "too_large" else 400, err.code, err.message, headers, err.fields)


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
