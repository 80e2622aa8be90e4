"""``homepot-gateway people ...`` (contract §3, §12): the person registry from the command
line. It writes the database in its own transaction, like ``devices``: it works while the
daemon runs, and the next job that targets a person uses what it wrote."""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer

from gateway.cli import PLAIN, _db, _fields, _table, _tx, app, fail, get_config

people_app = typer.Typer(no_args_is_help=True, **PLAIN,
                         help="People: who a notification is for, reached through their devices (works while the daemon runs).")
app.add_typer(people_app, name="people")


def _person_errors(exc: Any, options: dict[str, str]) -> list[str]:
    """The model's field errors in the options' words (``devices.1`` → ``--device[1]``)."""
    from gateway.pipeline.models import field_error_list

    out = []
    for err in field_error_list(exc):
        head, _, rest = err.field.partition(".")
        where = options.get(head, err.field)
        if head == "devices" and rest:
            where = f"--device[{rest}]"
        elif head == "quiet_hours" and rest:
            where = f"--quiet[{rest.partition('.')[0]}]"
        out.append(f"{where}: {err.message.split(': ', 1)[-1]}")
    return out


OPTION_OF = {"person_id": "ID", "name": "--name", "account": "--account", "devices": "--device",
             "timezone": "--timezone", "quiet_hours": "--quiet", "bypass_priority": "--bypass",
             "muted": "--mute-rule/--mute-segment", "reach_after_s": "--reach-after"}


def _validated(obj: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    from gateway.people.model import Person

    try:
        return Person.model_validate(obj)
    except ValidationError as exc:
        fail(_person_errors(exc, OPTION_OF))


def _store(person: Any) -> bool:
    from gateway.people import store

    conn = _db(get_config())
    try:
        return _tx(conn, lambda c: store.put(c, person))
    except store.AccountTaken as exc:
        fail(f"--account: {str(exc).partition(': ')[2]}")
        raise  # unreachable


def _quiet(values: list[str]) -> list[dict[str, Any]] | None:
    """--quiet values: windows; ``default`` = the config's; ``off`` = none."""
    from gateway.people.model import parse_quiet

    if values == ["default"]:
        return None
    if values == ["off"]:
        return []
    out = []
    for i, text in enumerate(values):
        try:
            out.append(parse_quiet(text, f"--quiet[{i}]" if len(values) > 1 else "--quiet"))
        except ValueError as exc:
            fail(str(exc))
    return out


@people_app.command("add")
def people_add(
    person_id: Annotated[str, typer.Argument(metavar="ID")],
    name: Annotated[Optional[str], typer.Option("--name", metavar="NAME", help="the person's name as shown")] = None,
    account: Annotated[Optional[str], typer.Option("--account", metavar="ACCOUNT", help="a broker account of role user that logs in as this person")] = None,
    device: Annotated[Optional[list[str]], typer.Option("--device", metavar="ID", help="a device of theirs (repeat, in reach order: the first is tried first)")] = None,
    timezone: Annotated[str, typer.Option("--timezone", metavar="TZ", help="IANA time zone of their quiet hours, e.g. Europe/Berlin")] = "UTC",
) -> None:
    """Add (or replace) a person."""
    person = _validated({"person_id": person_id, "name": name, "account": account, "devices": device or [],
                         "timezone": timezone})
    created = _store(person)
    typer.echo(f"person {person_id} {'added' if created else 'replaced'} ({len(person.devices)} device(s))")


@people_app.command("set")
def people_set(
    person_id: Annotated[str, typer.Argument(metavar="ID")],
    name: Annotated[Optional[str], typer.Option("--name", metavar="NAME", help="the person's name")] = None,
    account: Annotated[Optional[str], typer.Option("--account", metavar="ACCOUNT", help="their user account ('' = none)")] = None,
    device: Annotated[Optional[list[str]], typer.Option("--device", metavar="ID", help="their devices in reach order (repeat; replaces the list)")] = None,
    timezone: Annotated[Optional[str], typer.Option("--timezone", metavar="TZ", help="IANA time zone")] = None,
    quiet: Annotated[Optional[list[str]], typer.Option("--quiet", metavar="WINDOW", help='quiet hours "mon-fri 22:00-06:00" (repeat; replaces the list); "off" = none, "default" = [people] quiet_hours_default')] = None,
    bypass: Annotated[Optional[str], typer.Option("--bypass", metavar="PRIORITY", help="low|normal|high|critical: from this priority a notification goes through quiet hours")] = None,
    mute_rule: Annotated[Optional[list[str]], typer.Option("--mute-rule", metavar="RULE", help="an alarm rule they do not get (repeat; replaces the list; '' = none)")] = None,
    mute_segment: Annotated[Optional[list[str]], typer.Option("--mute-segment", metavar="SEGMENT", help="a segment they do not get (repeat; replaces the list; '' = none)")] = None,
    reach_after: Annotated[Optional[str], typer.Option("--reach-after", metavar="SECONDS", help="seconds without an ack before their next device is tried; 'default' = [people] reach_after_s")] = None,
) -> None:
    """Change a person's settings; options not given stay as they are."""
    from gateway.people import store

    cfg = get_config()
    current = store.get(_db(cfg), person_id)
    if current is None:
        fail(f"ID: no such person {person_id!r} (add it with: people add {person_id})", 1)
        return
    obj = current.as_json()
    if name is not None:
        obj["name"] = name or None
    if account is not None:
        obj["account"] = account or None
    if device is not None:
        obj["devices"] = [d for d in device if d]
    if timezone is not None:
        obj["timezone"] = timezone
    if quiet is not None:
        obj["quiet_hours"] = _quiet(quiet)
    if bypass is not None:
        obj["bypass_priority"] = bypass
    if mute_rule is not None:
        obj["muted"]["rules"] = [r for r in mute_rule if r]
    if mute_segment is not None:
        obj["muted"]["segments"] = [s for s in mute_segment if s]
    if reach_after is not None:
        if reach_after == "default":
            obj["reach_after_s"] = None
        else:
            try:
                seconds = float(reach_after)
                obj["reach_after_s"] = int(seconds) if seconds.is_integer() else seconds
            except ValueError:
                fail(f"--reach-after: expected seconds (a number) or 'default', got {reach_after!r}")
    person = _validated(obj)
    _store(person)
    typer.echo(f"person {person_id} changed")


@people_app.command("list")
def people_list(as_json: Annotated[bool, typer.Option("--json", help="JSON: a list of Person objects")] = False) -> None:
    """List persons, by id."""
    from gateway.people import store

    people = list(store.iter_all(_db(get_config())))
    if as_json:
        typer.echo(json.dumps([p.as_json() for p in people], indent=2))
        return
    _table(["PERSON", "NAME", "ACCOUNT", "DEVICES", "TIMEZONE"],
           [[p.person_id, p.name or "-", p.account or "-", ",".join(p.devices) or "-", p.timezone] for p in people])


@people_app.command("show")
def people_show(person_id: Annotated[str, typer.Argument(metavar="ID")],
                as_json: Annotated[bool, typer.Option("--json", help="JSON: the Person object")] = False) -> None:
    """Show one person: devices in reach order (and whether each is registered), quiet hours, mutes."""
    from gateway.people import store
    from gateway.people.model import quiet_text
    from gateway.pipeline import registry

    cfg = get_config()
    conn = _db(cfg)
    person = store.get(conn, person_id)
    if person is None:
        fail(f"ID: no such person {person_id!r}", 1)
        return
    if as_json:
        typer.echo(json.dumps(person.as_json(), indent=2))
        return
    known = registry.channels_of(conn, list(person.devices))
    eff = person.effective(cfg.people.quiet_hours_default, cfg.people.reach_after_s)
    windows = [quiet_text(w.as_json()) for w in eff.quiet_hours or []]
    pairs = [("person", person.person_id), ("name", person.name or "-"), ("account", person.account or "-"),
             ("timezone", person.timezone),
             ("quiet hours", ("; ".join(windows) or "none") + (" (the [people] default)" if person.quiet_hours is None else "")),
             ("bypass", f"{person.bypass_priority} and above go through quiet hours"),
             ("muted", f"segments={','.join(person.muted.segments) or '-'} rules={','.join(person.muted.rules) or '-'}"),
             ("reach after", f"{eff.reach_after_s:g} s" + (" (the [people] default)" if person.reach_after_s is None else ""))]
    for i, d in enumerate(person.devices):
        pairs.append((f"device {i + 1}", d + ("" if d in known else "  (not registered)")))
    if not person.devices:
        pairs.append(("devices", "none: a job cannot reach this person"))
    _fields(pairs)


@people_app.command("remove")
def people_remove(person_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Remove a person; what open jobs still had queued for them ends as failed ('person removed')."""
    from gateway import clock
    from gateway.pipeline import reach

    conn = _db(get_config())
    if not _tx(conn, lambda c: reach.remove_person(c, person_id, clock.now())):
        fail(f"ID: no such person {person_id!r}", 1)
    typer.echo(f"person {person_id} removed")


__all__ = ["people_app"]
