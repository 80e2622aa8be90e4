"""Static files: the operator page's (``/ui/static/``) and the Web Push client's (``/web/``).

One handler and one MIME table for both trees, so a file type is answered the same
wherever it is served. A name is looked up in its directory only (no ``..``, no
subdirectories, no symlink out) and only with a listed suffix; anything else is the API's
JSON 404.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from aiohttp import web

from gateway.http.errors import ApiError

# Text is served as UTF-8; the page's files and the Web Push client are UTF-8 on disk.
MIME_TYPES: Mapping[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
BASE_HEADERS: Mapping[str, str] = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def file_response(path: Path, headers: Mapping[str, str] | None = None) -> web.FileResponse:
    """``path`` with its type from :data:`MIME_TYPES`, revalidated on every use (``no-cache``)."""
    return web.FileResponse(path, headers={"Content-Type": MIME_TYPES[path.suffix], **BASE_HEADERS,
                                           **(headers or {})})


class StaticFiles:
    """The files directly in ``directory`` with one of ``suffixes``, served under ``url_prefix``."""

    def __init__(self, directory: Path, url_prefix: str, suffixes: frozenset[str]):
        unknown = suffixes - MIME_TYPES.keys()
        if unknown:
            raise ValueError(f"no MIME type for {sorted(unknown)}")
        self.directory = directory.resolve()
        self.url_prefix = url_prefix
        self.suffixes = suffixes

    def response(self, name: str, headers: Mapping[str, str] | None = None) -> web.FileResponse:
        path = (self.directory / name).resolve()
        if path.parent != self.directory or path.suffix not in self.suffixes or not path.is_file():
            raise ApiError(404, "not_found", f"no such file: {self.url_prefix}{name}"[:200])
        return file_response(path, headers)


__all__ = ["MIME_TYPES", "StaticFiles", "file_response"]
