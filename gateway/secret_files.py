"""Reading the files a configuration names (secrets, certificates), problems reported by key.

Shared by the core's loader (:mod:`gateway.config`) and each platform's ``load_secrets``
(``bridges/<platform>.py``), so a missing or unreadable file reads the same whoever names it:
``KEY: file not found: PATH``. Secret contents are returned, never logged.
"""

from __future__ import annotations

from pathlib import Path

Problems = list[tuple[str, str]]


def given(path: Path | None) -> bool:
    """True when a ``*_file`` key is set (``""`` in TOML means unset)."""
    return path is not None and str(path) != ""


def read_secret(path: Path, key: str, problems: Problems) -> str | None:
    """The file's text, stripped; ``None`` with a problem under ``key`` when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        problems.append((key, f"file not found: {path}"))
        return None
    except OSError as exc:
        problems.append((key, f"cannot read {path}: {exc.strerror}"))
        return None
    return text.strip()


def require_file(path: Path | None, key: str, problems: Problems, required: bool = True) -> None:
    """Record a problem under ``key`` when the file is unset (and ``required``) or missing."""
    if not given(path):
        if required:
            problems.append((key, "required"))
        return
    assert path is not None
    if not path.is_file():
        problems.append((key, f"file not found: {path}"))
