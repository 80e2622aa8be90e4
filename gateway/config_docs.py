"""Render the configuration reference (``docs/configuration.md``) from the pydantic models.

The reference is generated so it cannot drift from what :mod:`gateway.config` accepts:
every section and key with its type, default and the field's ``description``. The file's
hand-written part (everything up to :data:`MARKER`) is kept; the rest is replaced.

``python -m gateway.config_docs`` prints the generated part; ``--write`` updates
``docs/configuration.md``; ``--check`` exits 1 when the file differs (``tests/test_docs.py``
does the same).
"""

from __future__ import annotations

import argparse
import enum
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from gateway.config import (AclRule, ApnsApp, Config, FcmApp, ListenerSection, RoleLimits, WebpushApp, WnsApp,
                            default_acl)
from gateway.rule_schema import EscalateStep, RuleSection

MARKER = "<!-- generated below by `python -m gateway.config_docs --write`; do not edit by hand -->"
DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

# Tables whose keys are documented as their own section, and the heading each gets.
_LIST_OF = {ListenerSection: "[[broker.listeners]]", RuleSection: "[[rules]]",
            EscalateStep: "[[rules]] escalate = [{...}]"}
_DICT_OF = {AclRule: "[broker.acl.<role>]", RoleLimits: "[broker.limits.<role>]",
            FcmApp: "[bridges.fcm.apps.<name>]", ApnsApp: "[bridges.apns.apps.<name>]",
            WnsApp: "[bridges.wns.apps.<name>]", WebpushApp: "[bridges.webpush.apps.<name>]"}


def _inner(ann: Any) -> tuple[Any, bool]:
    """(annotation without ``| None``, whether None is allowed)."""
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return ann, False


def _type_name(ann: Any) -> str:
    ann, optional = _inner(ann)
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        name = _type_name(typing.get_args(ann)[0])
    elif origin is typing.Literal:
        name = " | ".join(json.dumps(v) for v in typing.get_args(ann))
    elif origin is list:
        (item,) = typing.get_args(ann)
        sub = _inner(item)[0]
        name = "list of tables" if isinstance(sub, type) and issubclass(sub, BaseModel) else f"list of {_type_name(item)}"
    elif origin is dict:
        name = "table"
    elif ann is typing.Any:
        name = "string, number or boolean"
    elif isinstance(ann, type) and issubclass(ann, BaseModel):
        name = "table"
    elif isinstance(ann, type) and issubclass(ann, Path):
        name = "path"
    else:
        name = {str: "string", bool: "boolean", int: "integer", float: "number"}.get(ann, getattr(ann, "__name__", str(ann)))
    return name


def _bounds(field: FieldInfo) -> str:
    marks = {annotated_types.Ge: ("≥", "ge"), annotated_types.Gt: (">", "gt"),
             annotated_types.Le: ("≤", "le"), annotated_types.Lt: ("<", "lt")}
    metadata = list(field.metadata)
    ann, _ = _inner(field.annotation)
    if typing.get_origin(ann) is typing.Annotated:
        for extra in typing.get_args(ann)[1:]:
            metadata.extend(getattr(extra, "metadata", []))
    out = []
    for m in metadata:
        for cls, (sign, attr) in marks.items():
            if isinstance(m, cls):
                out.append(f"{sign} {getattr(m, attr)}")
    return ", ".join(out)


def _value(v: Any) -> str:
    if isinstance(v, enum.Enum):
        v = v.value
    if isinstance(v, Path):
        return f'`"{v}"`'
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    if isinstance(v, (str, list, int, float)):
        return f"`{json.dumps(v)}`"
    return f"`{v}`"


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "(table)"
        return _value(value) if value not in ({}, []) or isinstance(value, list) else "`{}`"
    if field.default is PydanticUndefined:
        return "**required**"
    if field.default is None:
        return "unset"
    return _value(field.default)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _is_table(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _fields(model: type[BaseModel]) -> list[tuple[str, FieldInfo]]:
    return [(n, f) for n, f in model.model_fields.items() if not f.exclude and n != "source"]


def _table(model: type[BaseModel]) -> list[str]:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in _fields(model):
        kind = _type_name(field.annotation)
        bounds = _bounds(field)
        if bounds:
            kind += f" ({bounds})"
        lines.append(f"| `{name}` | {_cell(kind)} | {_cell(_default(field))} | {_cell(field.description or '')} |")
    return lines


def _sections(model: type[BaseModel], heading: str, out: list[tuple[str, type[BaseModel]]]) -> None:
    """Depth-first: the model's own keys, then each nested table as its own section."""
    out.append((heading, model))
    for name, field in _fields(model):
        ann, _ = _inner(field.annotation)
        origin = typing.get_origin(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            sub = f"[{heading.strip('[]')}.{name}]" if heading else f"[{name}]"
            _sections(ann, sub, out)
        elif origin is list and typing.get_args(ann)[0] in _LIST_OF:
            item = typing.get_args(ann)[0]
            _sections(item, _LIST_OF[item], out)
        elif origin is dict and typing.get_args(ann)[1] in _DICT_OF:
            item = typing.get_args(ann)[1]
            _sections(item, _DICT_OF[item], out)


def render() -> str:
    """The generated part of ``docs/configuration.md`` (after :data:`MARKER`)."""
    sections: list[tuple[str, type[BaseModel]]] = []
    _sections(Config, "", sections)
    lines = ["", "## Every key", "",
             "Generated from the models in `gateway/config.py` and `gateway/rule_schema.py`. "
             "A key given as an environment variable is `HOMEPOT_<SECTION>_<KEY>` (see above).", ""]
    for heading, model in sections:
        if heading and all(_is_table(f.annotation) for _, f in _fields(model)):
            continue  # only sub-tables, each documented below
        if not heading:
            lines += ["### Top-level tables", ""]
        else:
            lines += [f"### `{heading}`", ""]
        lines += _table(model) + [""]
    lines += ["### Default roles", "",
              "A `[broker.acl.<role>]` table replaces that role's defaults; `{prefix}` is P, "
              "`{username}` the account's name.", "",
              "| role | publish | subscribe |", "|---|---|---|"]
    for role, rule in default_acl().items():
        pub = ", ".join(f"`{t}`" for t in rule.publish) or "—"
        sub = ", ".join(f"`{t}`" for t in rule.subscribe) or "—"
        lines.append(f"| `{role}` | {pub} | {sub} |")
    return "\n".join(lines) + "\n"


def document(current: str) -> str:
    """``current`` with everything after :data:`MARKER` replaced by :func:`render`."""
    head, sep, _ = current.partition(MARKER)
    if not sep:
        raise ValueError(f"{DOC_PATH}: the marker line is missing: {MARKER}")
    return head + MARKER + "\n" + render()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.config_docs", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"update {DOC_PATH.name}")
    mode.add_argument("--check", action="store_true", help=f"exit 1 if {DOC_PATH.name} is out of date")
    args = parser.parse_args(argv)
    if not args.write and not args.check:
        sys.stdout.write(render())
        return 0
    current = DOC_PATH.read_text(encoding="utf-8")
    wanted = document(current)
    if args.check:
        if current != wanted:
            sys.stderr.write(f"{DOC_PATH} is out of date: run python -m gateway.config_docs --write\n")
            return 1
        return 0
    DOC_PATH.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
