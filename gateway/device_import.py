"""``devices import FILE``: many devices in one process, a batch per transaction.

``devices add`` costs a process start per device (about a second); a site with 5,000
terminals registers them from a file instead. Two formats:

- JSON lines: one Device object (contract §7) per line, exactly as on
  ``P/devices/<id>/register``. Blank lines are skipped.
- CSV: ``id,platform,address,segment,tags`` (a header row with these names is optional
  and may order the columns; ``address``, ``segment`` and ``tags`` may be left out).
  ``address`` is what ``devices add --address`` takes; ``tags`` are separated by ``;``.
  Several rows with the same id give that device several channels, in row order (its
  fallback order); its segment and tags come from the first row that gives them.

The whole file is read and checked first; each refused line is reported as
``line N: FIELD: message`` and a device with a refused line is not imported. The rest is
written ``batch_size`` devices per transaction (upserts, as ``devices add``).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from devices.models import Device, app_problems
from gateway.cli_input import OptionError, build_channel, device_errors

Format = Literal["jsonl", "csv"]
CSV_COLUMNS = ("id", "platform", "address", "segment", "tags")


class ImportFileError(ValueError):
    """The file as a whole cannot be read (not a line's fault)."""


@dataclass
class Parsed:
    devices: list[Device] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)  # (line, "FIELD: message")
    lines: int = 0
    line_counts: list[int] = field(default_factory=list)  # the file lines of each of ``devices``

    def refuse(self, line: int, message: str) -> None:
        self.refused.append((line, message))


def detect_format(path: Path, text: str, given: str | None) -> Format:
    if given:
        if given not in ("jsonl", "csv"):
            raise ImportFileError(f"--format: expected jsonl or csv, got {given!r}")
        return given  # type: ignore[return-value]
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    return "jsonl" if text.lstrip().startswith("{") else "csv"


def read_file(path: Path, fmt: str | None = None, apps: Mapping[str, Collection[str]] | None = None) -> Parsed:
    """``apps``: platform → its ``[bridges.<platform>.apps]`` names (a channel naming another
    app is a refused line)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ImportFileError(f"FILE: not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise ImportFileError(f"FILE: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ImportFileError(f"FILE: cannot read {path}: {exc.strerror}") from None
    return parse_jsonl(text, apps) if detect_format(path, text, fmt) == "jsonl" else parse_csv(text)


def parse_jsonl(text: str, apps: Mapping[str, Collection[str]] | None = None) -> Parsed:
    out = Parsed()
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        out.lines = lineno
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            out.refuse(lineno, f"not valid JSON: {exc.msg} at column {exc.colno}")
            continue
        except (ValueError, RecursionError) as exc:  # a number over the digit limit, deep nesting
            out.refuse(lineno, f"not valid JSON: {exc.__class__.__name__}: {str(exc)[:80]}")
            continue
        if not isinstance(obj, dict):
            out.refuse(lineno, "must be a JSON object (a Device)")
            continue
        try:
            device = Device.model_validate(obj)
        except ValidationError as exc:
            for where, message in device_errors(exc, lambda i: f"channels.{i}",
                                                {"device_id": "device_id", "segment": "segment", "tags": "tags",
                                                 "channels": "channels"}):
                out.refuse(lineno, f"{where}: {message}")
            continue
        unknown = app_problems(device, apps) if apps is not None else []
        for where, message in unknown:
            out.refuse(lineno, f"{where}: {message}")
        if unknown:
            continue
        if device.device_id in first_line:
            out.refuse(lineno, f"device_id: {device.device_id!r} is already on line {first_line[device.device_id]}")
            continue
        first_line[device.device_id] = lineno
        out.devices.append(device)
        out.line_counts.append(1)
    return out


@dataclass
class _Rows:
    first: int
    segment: str | None = None
    tags: list[str] | None = None
    channels: list[dict[str, Any]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    bad: bool = False


def _columns(header: list[str]) -> list[str] | None:
    names = [h.strip().lower() for h in header]
    if names[:1] != ["id"]:
        return None
    unknown = [n for n in names if n not in CSV_COLUMNS]
    if unknown:
        raise ImportFileError(f"line 1: unknown column {unknown[0]!r} (columns: {', '.join(CSV_COLUMNS)})")
    if "platform" not in names:
        raise ImportFileError("line 1: the header needs a platform column")
    return names


def parse_csv(text: str) -> Parsed:
    out = Parsed()
    reader = csv.reader(io.StringIO(text, newline=""))
    groups: dict[str, _Rows] = {}
    columns: list[str] = list(CSV_COLUMNS)
    for row in reader:
        lineno = reader.line_num
        out.lines = lineno
        if not row or all(not cell.strip() for cell in row):
            continue
        if not groups and not out.refused and (header := _columns(row)) is not None:
            columns = header
            continue
        if len(row) > len(columns):
            out.refuse(lineno, f"{len(row)} columns, expected at most {len(columns)} ({','.join(columns)})")
            continue
        cells = dict(zip(columns, (c.strip() for c in row)))
        device_id = cells.get("id", "")
        if not device_id:
            out.refuse(lineno, "id: required")
            continue
        group = groups.setdefault(device_id, _Rows(first=lineno))
        group.lines.append(lineno)
        segment = cells.get("segment") or None
        tags = [t.strip() for t in cells.get("tags", "").split(";") if t.strip()] or None
        for name, value, current in (("segment", segment, group.segment), ("tags", tags, group.tags)):
            if value is not None and current is not None and value != current:
                out.refuse(lineno, f"{name}: differs from an earlier row of {device_id!r} (line {group.first})")
                group.bad = True
        group.segment = group.segment or segment
        group.tags = group.tags or tags
        try:
            channel = build_channel(cells.get("platform", ""), cells.get("address", ""), where="address",
                                    platform_where="platform")
        except OptionError as exc:
            out.refuse(lineno, str(exc))
            group.bad = True
            channel = None
        group.channels.append(channel or {})
    for device_id, group in groups.items():
        if group.bad:
            continue
        try:
            out.devices.append(Device.model_validate({"device_id": device_id, "segment": group.segment,
                                                      "tags": group.tags or [], "channels": group.channels}))
            out.line_counts.append(len(group.lines))
        except ValidationError as exc:
            lines = group.lines

            def where(index: int, lines: list[int] = lines) -> tuple[int, str]:
                return (lines[index] if index < len(lines) else lines[0], "address")

            names = {key: (group.first, column) for key, column in
                     (("device_id", "id"), ("segment", "segment"), ("tags", "tags"), ("channels", "platform"))}
            for place, message in device_errors(exc, where, names):
                line, column = place if isinstance(place, tuple) else (group.first, place)
                out.refuse(line, f"{column}: {message}")
    out.refused.sort()
    return out


__all__ = ["CSV_COLUMNS", "ImportFileError", "Parsed", "detect_format", "parse_csv", "parse_jsonl", "read_file"]
