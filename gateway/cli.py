"""``homepot-gateway`` command line (contract §3).

Exit codes: 0 ok, 1 the operation ran and failed, 2 bad usage or invalid config/input.
Errors go to stderr as ``KEY: message`` lines. A command that fails on its files or its
database (disk full, read-only, permissions, locked) prints one line that names the command
and the cause, exit 1 (:func:`main`): never a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional, TypedDict, TypeVar

import typer
from typer.core import TyperArgument

from gateway.states import DELIVERY_STATES, AlarmState, JobState

# The configuration (pydantic and every model), the clock and storage (structlog, asyncio)
# are imported by the commands that use them: `--help` and a usage error need none of it.
if TYPE_CHECKING:
    import sqlite3

    import click

    from devices.models import Device
    from gateway.alarms.engine import AlarmRow
    from gateway.config import Config, LoadedConfig
    from gateway.device_import import Parsed
    from gateway.progress import Until

T = TypeVar("T")


class _PlainHelp(TypedDict):
    """Typed, so that ``**PLAIN`` reaches ``typer.Typer`` as its ``rich_markup_mode`` argument."""

    rich_markup_mode: None


# Plain (click) help: rich markup would eat bracketed words such as [[rules]] and [broker.acl].
PLAIN: _PlainHelp = {"rich_markup_mode": None}


def _argument_metavar_only(self: object, ctx: click.Context) -> str | None:
    """Typer labels every argument with its Python type (``ID <str>``); the metavar says it."""
    return None


TyperArgument.display_type_rich = _argument_metavar_only  # type: ignore[method-assign]  # typer pinned in pyproject
# No locals in a traceback if one ever shows: they would include passwords read from stdin.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False, **PLAIN,
                  help="homepot-gateway: edge MQTT broker and durable push fan-out for a HOMEPOT site.")
users_app = typer.Typer(no_args_is_help=True, **PLAIN, help="Broker accounts (argon2 password file).")
app.add_typer(users_app, name="users")
devices_app = typer.Typer(no_args_is_help=True, **PLAIN, help="The device registry (works while the daemon runs).")
app.add_typer(devices_app, name="devices")
jobs_app = typer.Typer(no_args_is_help=True, **PLAIN, help="Jobs and their status.")
app.add_typer(jobs_app, name="jobs")
FULL_DISK_BYTES = 64 * 1024  # less free space than this: a write failure is called a full disk
GROUPS = {"users", "devices", "jobs", "alarms", "people"}  # commands with subcommands (alarms: below)


class _State:
    config_path: str | None = None
    command: str | None = None  # "devices import": for the one-line failure of main()
    db_path: Path | None = None  # the database the command opened, named when it fails

    def __init__(self) -> None:
        # Connections the command opened, closed by main() when it ends: a process exit would
        # close them anyway, but main() also runs in-process (the tests' cli_in_process), where
        # an open connection kept the daemon's -wal file alive after the daemon stopped.
        self.connections: list[sqlite3.Connection] = []


state = _State()


@app.callback()
def _global(config: Annotated[Optional[str], typer.Option("--config", metavar="FILE", help="Config file (else $HOMEPOT_GATEWAY_CONFIG, ./config.toml, /etc/homepot-gateway/config.toml)")] = None) -> None:
    state.config_path = config


def fail(lines: list[str] | str, code: int = 2) -> NoReturn:
    """Print the error lines and exit with ``code``. ``NoReturn``: after ``if row is None:
    fail(...)`` mypy knows the row is there (the checks in tests/test_wiring.py)."""
    for line in [lines] if isinstance(lines, str) else lines:
        typer.echo(line, err=True)
    raise typer.Exit(code)


def get_config(tighten: bool = True) -> Config:
    """The configuration alone (see :func:`get_loaded`)."""
    return get_loaded(tighten).config


def get_loaded(tighten: bool = True) -> LoadedConfig:
    """The config and its secrets by the contract's lookup order; then, run as root against a
    data dir that another user owns (the service's), become that user (gateway/privileges.py);
    then make whatever this command creates owner-only, and tighten a data dir left loose
    (gateway/filemodes.py; ``run`` leaves that to the daemon, which logs it)."""
    from gateway import filemodes
    from gateway.config import ConfigError, load_config, shadow_note
    from gateway.privileges import become_owner_of

    state.command = _command_name()
    try:
        loaded = load_config(state.config_path)
    except ConfigError as exc:
        fail(exc.lines())
    cfg = loaded.config
    from gateway.storage import SqliteTooOld, check_sqlite

    try:
        check_sqlite()
    except SqliteTooOld as exc:
        fail(str(exc))
    note = shadow_note(state.config_path)
    if note:
        typer.echo(note, err=True)
    try:
        become_owner_of(cfg.data_dir)
    except OSError as exc:
        fail(f"gateway.data_dir: cannot switch to the owner of {cfg.data_dir}: {exc.strerror}")
    filemodes.restrict_umask()
    if tighten:
        done = filemodes.tighten(cfg.data_dir)
        if done.changed:
            typer.echo(f"note: {cfg.data_dir} made owner-only ({len(done.changed)} entries: {done.summary(5)})",
                       err=True)
    return loaded


def _command_name(argv: list[str] | None = None) -> str | None:
    """The running (sub)command as typed, e.g. "devices import": the first words of the
    command line that are not options (``--config`` takes a value)."""
    words: list[str] = []
    args = iter((sys.argv if argv is None else argv)[1:])
    for arg in args:
        if arg == "--config":
            next(args, None)
        elif not arg.startswith("-"):
            words.append(arg)
            if len(words) == 2 or arg not in GROUPS:
                break
    return " ".join(words) or None


def failure_cause(exc: BaseException, db_path: Path | None = None) -> str:
    """One line for a failed file or database operation: the system's words and the file."""
    import sqlite3

    if isinstance(exc, OSError):
        text = exc.strerror or str(exc) or type(exc).__name__
        where = exc.filename or (db_path if exc.filename is None and db_path is not None else None)
        return f"{text} ({where})" if where else text
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, sqlite3.Error) and db_path is not None:
        # SQLite says "disk I/O error" when a full disk stops it creating its -wal file.
        return f"{text} ({db_path}){_full_disk_note(db_path.parent, text)}"
    return text


def _full_disk_note(directory: Path, text: str) -> str:
    """"; the file system is full" when it is and the error does not already say so."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return ""
    full = st.f_bavail * st.f_frsize < FULL_DISK_BYTES
    return "; the file system is full" if full and "full" not in text else ""


def daemon_running(cfg: Config) -> bool | None:
    """True/False from the daemon's lock (gateway/lock.py); None when it cannot be told."""
    from gateway.lock import daemon_pid

    try:
        return daemon_pid(cfg.data_dir) is not None
    except OSError:
        return None


@app.command("check-config")
def check_config() -> None:
    """Validate the configuration; print each problem as KEY: message."""
    cfg, secrets = get_loaded()
    from bridges.keys import problems
    from bridges.registry import bridge_of_key

    # A push key the bridge would refuse at start (the daemon would run with that bridge,
    # or that app of it, unhealthy): found here, by the same loaders, before the service starts.
    found = [tuple(fault.split(": ", 1)) for fault in secrets.bridge_faults.values()]
    found += [p for p in problems(cfg, secrets) if bridge_of_key(p[0]) not in secrets.bridge_faults]
    if found:
        fail([f"{key}: {msg}" for key, msg in found])
    typer.echo(f"ok: {cfg.source}")


@app.command("run")
def run() -> None:
    """Run the daemon in the foreground."""
    loaded = get_loaded(tighten=False)
    from gateway.daemon import run_daemon
    from gateway.logs import setup_logging

    setup_logging(loaded.config.logging.level, loaded.config.logging.format)
    raise typer.Exit(run_daemon(loaded))


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(metavar="NAME", help="the account's username")],
    role: Annotated[str, typer.Option("--role", metavar="ROLE", help="ACL role: device, technician, controller, monitor, admin, or one from [broker.acl]")],
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from stdin (first line)")] = False,
) -> None:
    """Add or replace a broker account."""
    from gateway.broker.passwords import PasswordFileError, add_user

    cfg = get_config()
    if role not in cfg.broker.roles():
        fail(f"--role: unknown role {role!r} (known: {', '.join(sorted(cfg.broker.roles()))})")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        add_user(Path(cfg.broker.auth.password_file), name, password, role)
    except PasswordFileError as exc:
        fail(str(exc))
    except OSError as exc:  # the file is replaced whole or not at all: nothing changed
        fail(f"users add: {cfg.broker.auth.password_file} not written, user {name} not added: "
             f"{exc.strerror or exc}", 1)
    typer.echo(f"user {name} ({role}) written to {cfg.broker.auth.password_file}")


@users_app.command("remove")
def users_remove(name: Annotated[str, typer.Argument(metavar="NAME", help="the account's username")]) -> None:
    """Remove a broker account."""
    from gateway.broker.passwords import PasswordFileError, remove_user

    cfg = get_config()
    try:
        removed = remove_user(Path(cfg.broker.auth.password_file), name)
    except PasswordFileError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"users remove: {cfg.broker.auth.password_file} not written, user {name} not removed: "
             f"{exc.strerror or exc}", 1)
    if not removed:
        fail(f"NAME: no such user {name!r}", 1)
    typer.echo(f"user {name} removed")


@app.command("vapid-keys")
def vapid_keys(
    app_name: Annotated[Optional[str], typer.Option("--app", metavar="NAME", help="the key of [bridges.webpush.apps.NAME] instead of the section's")] = None,
) -> None:
    """Create the Web Push VAPID key pair if missing; print the public key (base64url)."""
    from gateway import vapid

    cfg = get_config()
    section: Any = cfg.bridges.webpush
    key_name = "bridges.webpush.vapid_private_key_file"
    if app_name is not None:
        if app_name not in section.apps:
            fail(f"--app: no app {app_name!r} in [bridges.webpush.apps] "
                 f"(configured: {', '.join(sorted(section.apps)) or 'none'})")
        section = section.apps[app_name]
        key_name = f"bridges.webpush.apps.{app_name}.vapid_private_key_file"
    path = section.vapid_private_key_file
    try:
        key = vapid.load_or_create(path)
    except ValueError as exc:
        fail(f"{key_name}: {exc}")
    except OSError as exc:
        fail(f"{key_name}: cannot write {path}: {exc.strerror or exc}", 1)
    typer.echo(vapid.public_key_b64(key))


# ---------------------------------------------------------------------- pipeline commands
def _db(cfg: Config) -> sqlite3.Connection:
    from gateway import clock, migrations
    from gateway.storage import connect, transaction

    state.db_path = cfg.db_path
    conn = connect(cfg.db_path)
    try:
        transaction(conn, migrations.migrate)  # the schema registry, as the daemon runs it at start
    except migrations.SchemaTooNew as exc:
        conn.close()
        fail(f"{cfg.db_path}: {exc}", 1)
    clock.attach(conn)  # write times on the daemon's timeline (gateway.clock)
    state.connections.append(conn)
    return conn


def _tx(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    from gateway.storage import transaction

    return transaction(conn, fn)


@app.command("send")
def send(
    title: Annotated[Optional[str], typer.Option("--title", metavar="TEXT", help="notification title (give --title, --body or --data)")] = None,
    body: Annotated[Optional[str], typer.Option("--body", metavar="TEXT", help="notification text")] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", metavar="K=V", help="data for the app (repeatable); a data-only job is valid")] = None,
    priority: Annotated[str, typer.Option("--priority", metavar="LEVEL", help="low|normal|high|critical")] = "normal",
    ttl: Annotated[int, typer.Option("--ttl", metavar="SECONDS", help="how long the job may wait for a device; 0 = now or never")] = 3600,
    collapse_key: Annotated[Optional[str], typer.Option("--collapse-key", metavar="KEY", help="a newer job with the same key replaces this one on the device")] = None,
    job_id: Annotated[Optional[str], typer.Option("--job-id", metavar="ID", help="idempotency key (default: generated)")] = None,
    device: Annotated[Optional[list[str]], typer.Option("--device", metavar="ID", help="target: this device (repeatable)")] = None,
    segment: Annotated[Optional[str], typer.Option("--segment", metavar="NAME", help="target: every device of this segment")] = None,
    all_devices: Annotated[bool, typer.Option("--all", help="target: every registered device (asks first; see --yes)")] = False,
    person: Annotated[Optional[list[str]], typer.Option("--person", metavar="ID", help="target: this person, reached device by device (repeatable)")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="send to --all or to more than [cli] confirm_above devices without asking")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="show progress until the job reaches --until")] = False,
    timeout: Annotated[float, typer.Option("--timeout", metavar="SECONDS", help="how long --wait waits")] = 300.0,
    until: Annotated[str, typer.Option("--until", metavar="STATE", help="completed (nothing queued) | acknowledged (every target acked)")] = "completed",
) -> None:
    """Submit a job to the running gateway; print its job_id.

    Needs one target (--device, --segment, --all or --person) and something to say (--title, --body
    or --data). Sending to --all, or to more devices than [cli] confirm_above, asks for
    confirmation on a terminal; without one it needs --yes.
    """
    from pydantic import ValidationError

    from gateway.cli_input import OptionError, job_errors, parse_data
    from gateway.pipeline import registry
    from gateway.pipeline import jobs as pipeline_jobs
    from gateway.pipeline.models import InputError, JobIn, parse_job

    if until not in (JobState.COMPLETED, JobState.ACKNOWLEDGED):
        fail(f"--until: expected completed or acknowledged, got {until!r}")
    chosen = [name for name, given in (("--device", bool(device)), ("--segment", segment is not None),
                                       ("--all", all_devices), ("--person", bool(person))) if given]
    if len(chosen) != 1:
        fail("target: give exactly one of --device, --segment, --all, --person")
    try:
        pairs = parse_data(data or [])
    except OptionError as exc:
        fail(str(exc))
    target = ({"devices": device} if device else {"segment": segment} if segment is not None
              else {"people": person} if person else {"all": True})
    notification: dict[str, Any] = {"data": pairs, "priority": priority, "ttl": ttl}
    for k, v in (("title", title), ("body", body), ("collapse_key", collapse_key)):
        if v is not None:
            notification[k] = v
    obj: dict[str, Any] = {"target": target, "notification": notification}
    if job_id is not None:
        obj["job_id"] = job_id
    try:
        JobIn.model_validate(obj)
    except ValidationError as exc:
        fail(job_errors(exc, device))
    try:
        parsed = parse_job(obj)
    except InputError as err:
        fail(err.message)
    cfg = get_config()
    import sqlite3

    from gateway.storage import NotStored

    try:
        conn = _db(cfg)
        if not yes:
            _confirm_reach(cfg, registry.count_targets(conn, parsed.job.target.as_json()), all_devices, segment)
        _tx(conn, lambda c: pipeline_jobs.submit_job(c, parsed, "cli"))
    except (sqlite3.Error, OSError, NotStored) as exc:  # disk full, read-only, locked: not queued
        fail(f"send: the job was not stored, nothing was queued: {failure_cause(exc, cfg.db_path)}", 1)
    typer.echo(parsed.job_id)
    running = daemon_running(cfg)
    if running is False:
        typer.echo(f"warning: no homepot-gateway daemon runs on {cfg.data_dir.resolve()} (config {cfg.source}): job "
                   f"{parsed.job_id} is stored and goes out when the daemon starts", err=True)
        if wait:
            typer.echo("--wait: nothing would make progress; not waiting", err=True)
            raise typer.Exit(1)
    if wait:
        from gateway.progress import wait_for_job

        goal: Until = "acknowledged" if until == JobState.ACKNOWLEDGED else "completed"  # checked at the start
        raise typer.Exit(wait_for_job(conn, parsed.job_id, timeout, goal,
                                      pipeline_jobs.job_status, lambda: daemon_running(cfg) is not False, cfg.data_dir))


def _confirm_reach(cfg: Config, count: int, all_devices: bool, segment: str | None) -> None:
    """A big send is one keystroke from a typo: ask on a terminal, else demand --yes."""
    if not all_devices and count <= cfg.cli.confirm_above:
        return
    what = "every registered device" if all_devices else f"segment {segment!r}" if segment is not None else "the devices given"
    question = f"Send to {count} device(s) ({what})?"
    if sys.stdin.isatty():
        # The question goes to stderr whole (click's confirm leaves a space on stdout, where
        # the job id goes).
        typer.echo(f"{question} [y/N]: ", err=True, nl=False)
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            fail("send: not confirmed; nothing was queued", 1)
        return
    fail(f"--yes: this job goes to {count} device(s) ({what}); confirm with --yes "
         f"(asked on a terminal; [cli] confirm_above = {cfg.cli.confirm_above})")


@devices_app.command("add")
def devices_add(
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    platform: Annotated[list[str], typer.Option("--platform", metavar="PLATFORM", help="fcm|apns|wns|webpush|mqtt|simulation (repeat, in order of preference)")],
    address: Annotated[Optional[list[str]], typer.Option("--address", metavar="ADDRESS", help="token, channel URI, subscription JSON, or empty")] = None,
    segment: Annotated[Optional[str], typer.Option("--segment", metavar="NAME", help="the device's segment (a group jobs can target)")] = None,
    tag: Annotated[Optional[list[str]], typer.Option("--tag", metavar="TAG", help="a tag (repeatable)")] = None,
    app: Annotated[Optional[list[str]], typer.Option("--app", metavar="NAME", help="the channel's app of [bridges.<platform>.apps]; pairs up with --platform in order like --address (empty: the section's own credentials)")] = None,
    owner: Annotated[Optional[str], typer.Option("--owner", metavar="PERSON", help="the person the device belongs to (a label; reach order is the person's --device list)")] = None,
) -> None:
    """Register (or replace) a device."""
    from pydantic import ValidationError

    from bridges.registry import app_names
    from devices.models import PUSH_PLATFORMS, Device
    from gateway.cli_input import OptionError, add_device_errors, build_channel
    from gateway.pipeline import registry

    addresses = list(address or [])
    if len(addresses) > len(platform):
        fail("--address: more --address than --platform options (they pair up in order)")
    addresses += [""] * (len(platform) - len(addresses))
    apps = list(app or [])
    if len(apps) > len(platform):
        fail("--app: more --app than --platform options (they pair up in order)")
    apps += [""] * (len(platform) - len(apps))
    many = len(platform) > 1
    cfg = get_config()
    known = app_names(cfg)
    channels = []
    for i, (plat, addr, name) in enumerate(zip(platform, addresses, apps)):
        try:
            channel = build_channel(plat, addr, where=f"--address[{i}] ({plat})" if many else "--address",
                                    platform_where=f"--platform[{i}]" if many else "--platform")
        except OptionError as exc:
            fail(str(exc))
        if name:
            where = f"--app[{i}] ({plat})" if many else "--app"
            if plat not in PUSH_PLATFORMS:
                fail(f"{where}: {plat} has no apps (only {', '.join(PUSH_PLATFORMS)} do)")
            if name not in known.get(plat, ()):
                fail(f"{where}: no app {name!r} in [bridges.{plat}.apps] "
                     f"(configured: {', '.join(sorted(known.get(plat, ()))) or 'none'})")
            channel["app"] = name
        channels.append(channel)
    try:
        dev = Device.model_validate({"device_id": device_id, "segment": segment, "tags": tag or [], "channels": channels,
                                     "owner": owner or None})
    except ValidationError as exc:
        fail(add_device_errors(exc, platform))
    conn = _db(cfg)
    _tx(conn, lambda c: registry.upsert_device(c, dev, "cli"))
    typer.echo(f"device {device_id} registered ({', '.join(platform)})")


@devices_app.command("import")
def devices_import(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="JSON lines of Device objects, or CSV id,platform,address,segment,tags")],
    fmt: Annotated[Optional[str], typer.Option("--format", metavar="FORMAT", help="jsonl|csv (default: from the file name, else its content)")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="N", min=1, max=100000, help="devices per transaction")] = 500,
) -> None:
    """Register many devices from a file, a batch per transaction; refused lines are listed."""
    from rich.console import Console

    from bridges.registry import app_names
    from gateway.device_import import ImportFileError, read_file
    from gateway.pipeline import registry
    from gateway.progress import progress_bar

    try:
        parsed = read_file(file, fmt, app_names(get_config()))
    except ImportFileError as exc:
        fail(str(exc))
    import sqlite3

    from gateway.storage import NotStored

    cfg = get_config()
    devices = parsed.devices
    committed = 0
    try:
        conn = _db(cfg)
        console = Console(stderr=True)
        with progress_bar(console) as bar:
            task = bar.add_task("importing", total=len(devices))
            for start in range(0, len(devices), batch_size):
                batch = devices[start:start + batch_size]

                def write(c: sqlite3.Connection, batch: list[Device] = batch) -> None:
                    for dev in batch:
                        registry.upsert_device(c, dev, "import")

                _tx(conn, write)
                committed += len(batch)
                bar.advance(task, len(batch))
    except (sqlite3.Error, OSError, NotStored) as exc:
        # Each batch is one transaction: the ones before the failure are in, the rest not.
        fail(f"devices import: {committed} of {len(devices)} device(s) committed "
             f"({_lines_of(parsed, committed)}), the rest not: {failure_cause(exc, cfg.db_path)}", 1)
    typer.echo(f"imported {len(devices)} device(s) from {file}"
               + (f"; refused {len(parsed.refused)} line(s):" if parsed.refused else ""), err=bool(parsed.refused))
    if parsed.refused:
        fail([f"line {line}: {message}" for line, message in parsed.refused])


def _table(headers: list[str], rows: list[list[str]]) -> None:
    """Columns padded to their widest cell, a header line first; the last column is not padded."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    for line in [headers, *rows]:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths)) + ("  " if len(line) > 1 else "")
                   + line[-1])


def _fields(pairs: list[tuple[str, str]]) -> None:
    """A readable record: one ``key: value`` line each, keys aligned."""
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        typer.echo(f"{key + ':':<{width + 1}} {value}")


def _channels_text(dev: dict[str, Any]) -> str:
    from devices.models import raw_bridge_key

    # A channel of another app of its platform reads as its bridge: fcm:shop-app.
    return ",".join((raw_bridge_key(c) or "?") + ("(invalid)" if "invalid" in c else "") for c in dev["channels"])


def _lines_of(parsed: Parsed, committed: int) -> str:
    """How many of the file's device lines the first ``committed`` devices came from."""
    return f"{sum(parsed.line_counts[:committed])} of {sum(parsed.line_counts)} device lines"


def _presence(cfg: Any) -> dict[str, Any] | None:
    """The running daemon's device presence (its runtime snapshot), None when it is not running."""
    from gateway import health

    snap, why = health.read_snapshot(cfg.data_dir)
    return None if snap is None or why else (snap.get("presence") or {})


def _presence_text(p: dict[str, Any] | None) -> str:
    if p is None:
        return "presence unknown (gateway not running)"
    if p["connected"]:
        return f"connected since {p['since']}"
    return f"not connected (last seen {p['last_seen']})" if p["last_seen"] else "not connected (not seen since start)"


def _connected_cell(p: dict[str, Any] | None) -> str:
    """The list's short form of a presence (``devices show`` has the long one)."""
    return "?" if p is None else ("yes" if p["connected"] else "no")


@devices_app.command("list")
def devices_list(
    segment: Annotated[Optional[str], typer.Option("--segment", metavar="NAME", help="only this segment")] = None,
    platform: Annotated[Optional[str], typer.Option("--platform", metavar="PLATFORM", help="only devices with a channel on this platform")] = None,
    tag: Annotated[Optional[list[str]], typer.Option("--tag", metavar="TAG", help="only devices with this tag (repeat: all of them)")] = None,
    limit: Annotated[int, typer.Option("--limit", metavar="N", min=0, help="at most N devices; 0 = all")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="JSON: a list of Device objects")] = False,
) -> None:
    """List registered devices, by id."""
    import json

    from gateway.pipeline import registry

    from gateway.broker.presence import device_presence

    cfg = get_config()
    presence = _presence(cfg)
    devices = []
    for d in registry.iter_devices(_db(cfg)):
        if segment is not None and d["segment"] != segment:
            continue
        if platform is not None and platform not in {c["platform"] for c in d["channels"]}:
            continue
        if tag and not set(tag) <= set(d["tags"]):
            continue
        d["presence"] = device_presence(presence, d["device_id"]) if presence is not None else None
        devices.append(d)
        if limit and len(devices) >= limit:
            break
    if as_json:
        typer.echo(json.dumps(devices, indent=2))
        return
    _table(["DEVICE", "SEGMENT", "CHANNELS", "TAGS", "OWNER", "CONNECTED"],
           [[d["device_id"], d["segment"] or "-", _channels_text(d), ",".join(d["tags"]) or "-",
             d.get("owner") or "-", _connected_cell(d["presence"])] for d in devices])


@devices_app.command("show")
def devices_show(device_id: Annotated[str, typer.Argument(metavar="ID")],
                 as_json: Annotated[bool, typer.Option("--json", help="JSON: the Device object")] = False) -> None:
    """Show one device: segment, tags and each channel in order of preference."""
    import json

    from gateway.pipeline import registry

    from gateway.broker.presence import device_presence

    cfg = get_config()
    dev = registry.get_device(_db(cfg), device_id)
    if dev is None:
        fail(f"ID: no such device {device_id!r}", 1)
    presence = _presence(cfg)
    dev["presence"] = device_presence(presence, device_id) if presence is not None else None
    if as_json:
        typer.echo(json.dumps(dev, indent=2))
        return
    pairs = [("device", dev["device_id"]), ("segment", dev["segment"] or "-"),
             ("tags", ",".join(dev["tags"]) or "-"), ("owner", dev.get("owner") or "-"), ("updated", dev["updated_at"]),
             ("presence", _presence_text(dev["presence"]))]
    for i, ch in enumerate(dev["channels"]):
        address = {k: v for k, v in ch.items() if k not in ("platform", "invalid")}
        text = ch["platform"] + (f" {json.dumps(address)}" if address else "")
        if "invalid" in ch:
            text += f"  INVALID: {json.dumps(ch['invalid'])}"
        pairs.append((f"channel {i + 1}", text))
    _fields(pairs)


@devices_app.command("remove")
def devices_remove(device_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Remove a device; its queued deliveries fail as 'device removed'."""
    from gateway.pipeline import registry

    conn = _db(get_config())
    if not _tx(conn, lambda c: registry.remove_device(c, device_id)):
        fail(f"ID: no such device {device_id!r}", 1)
    typer.echo(f"device {device_id} removed")


JOB_STATES = (JobState.ACCEPTED, JobState.REJECTED, JobState.DISPATCHING, JobState.COMPLETED, JobState.ACKNOWLEDGED)


@jobs_app.command("list")
def jobs_list(
    job_state: Annotated[Optional[str], typer.Option("--state", metavar="STATE", help="only jobs in this state: " + "|".join(JOB_STATES))] = None,
    limit: Annotated[int, typer.Option("--limit", metavar="N", min=1, help="at most N jobs")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON: a list of job status objects")] = False,
) -> None:
    """List jobs, newest first, with their delivery counts."""
    import json

    from gateway.pipeline import jobs as pipeline_jobs

    if job_state is not None and job_state not in JOB_STATES:
        fail(f"--state: expected one of {', '.join(JOB_STATES)}, got {job_state!r}")
    jobs = pipeline_jobs.list_jobs(_db(get_config()), limit, job_state)
    if as_json:
        typer.echo(json.dumps(jobs, indent=2))
        return
    keys = [("targets", "TARGETS"), ("queued", "QUEUED"), ("sent", "SENT"), ("acknowledged", "ACKED"),
            ("failed", "FAILED"), ("expired", "EXPIRED"), ("invalid_address", "INVALID"), ("suppressed", "MUTED")]
    _table(["JOB", "STATE", *[h for _, h in keys], "CREATED"],
           [[j["job_id"], j["state"], *[str(j["counts"][k]) for k, _ in keys], j["created_at"]] for j in jobs])


@jobs_app.command("show")
def jobs_show(job_id: Annotated[str, typer.Argument(metavar="ID")],
              as_json: Annotated[bool, typer.Option("--json", help="JSON: the job status object (with --deliveries, its deliveries too)")] = False,
              deliveries: Annotated[bool, typer.Option("--deliveries", help="list the job's devices by state, with the platform's reason")] = False) -> None:
    """Show one job's status (and, with --deliveries, where each device stands)."""
    import json

    from gateway.pipeline import deliveries as pipeline_deliveries
    from gateway.pipeline import jobs as pipeline_jobs

    conn = _db(get_config())
    status = pipeline_jobs.job_status(conn, job_id)
    if status is None:
        fail(f"ID: no such job {job_id!r}", 1)
    rows = pipeline_deliveries.delivery_rows(conn, job_id) if deliveries else []
    if as_json:
        typer.echo(json.dumps({**status, "deliveries": rows} if deliveries else status, indent=2))
        return
    counts = status["counts"]
    _fields([("job", status["job_id"]), ("state", status["state"]),
             ("targets", str(counts["targets"])),
             ("counts", "  ".join(f"{k}={v}" for k, v in counts.items() if k != "targets")),
             ("created", status["created_at"]), ("updated", status["updated_at"])])
    if "people" in status:
        from gateway.pipeline import reach

        p = status["people"]
        typer.echo(f"people: targets={p['targets']}  reached={p['reached']}  held={p['held']}")
        for row in reach.people_of_job(conn, job_id):
            how = f" by {row['reached_by']} at {row['reached_at']}" if row["reached_by"] else ""
            typer.echo(f"  {row['person_id']}  {row['state']}{how}" + (f"  ({row['note']})" if row["note"] else ""))
    error = status.get("error")
    if error:
        typer.echo(f"error: {error.get('code')}: {error.get('message')}", err=True)
    if deliveries:
        order = list(DELIVERY_STATES)
        for st in sorted({r["state"] for r in rows}, key=lambda x: order.index(x) if x in order else len(order)):
            group = [r for r in rows if r["state"] == st]
            typer.echo(f"{st} ({len(group)}):")
            for r in group:
                extra = [r["platform"] or "-", f"attempts={r['attempts']}"]
                if r.get("latency_ms") is not None:
                    extra.append(f"latency={r['latency_ms']:.0f}ms")
                if r.get("acks"):
                    extra.append("acks=" + ",".join(a["status"] + (f"(+{a['repeats']} repeats)" if a["repeats"] else "")
                                                    for a in r["acks"]))
                text = r.get("reason") or r.get("last_error")
                reason = f"  {text}" if text else ""
                if r.get("moved") and r.get("moved") != text:
                    reason += f"  ({r['moved']})"
                typer.echo(f"  {r['device_id']}  {' '.join(extra)}{reason}")


# ---------------------------------------------------------------------- alarms
alarms_app = typer.Typer(no_args_is_help=True, **PLAIN, help="Sensor alarms ([[rules]]) and their states.")
app.add_typer(alarms_app, name="alarms")


def _alarms_db(cfg: Config) -> sqlite3.Connection:
    return _db(cfg)


@alarms_app.command("list")
def alarms_list(as_json: Annotated[bool, typer.Option("--json", help="JSON: a list of AlarmState objects")] = False) -> None:
    """List alarm states (AlarmState objects), by rule and key."""
    import json

    from gateway.alarms import store as alarm_store

    states = alarm_store.list_states(_alarms_db(get_config()))
    if as_json:
        typer.echo(json.dumps(states, indent=2))
        return
    for s in states:
        typer.echo(f"{s['rule']}\t{s['key']}\t{s['state']}\tvalue={json.dumps(s['value'])}\tsince={s['since']}\t"
                   f"fired_at={s['fired_at'] or '-'}\tacknowledged_by={s['acknowledged_by'] or '-'}\t"
                   f"escalation_step={s['escalation_step']}\tjobs={','.join(s['jobs']) or '-'}")


@alarms_app.command("ack")
def alarms_ack(
    rule: Annotated[str, typer.Argument(metavar="RULE")],
    key: Annotated[str, typer.Argument(metavar="KEY")],
    by: Annotated[Optional[str], typer.Option("--by", metavar="NAME", help="who acknowledges (recorded as cli:NAME; default the login name)")] = None,
    note: Annotated[Optional[str], typer.Option("--note", metavar="TEXT", help="recorded with the acknowledgement")] = None,
) -> None:
    """Acknowledge a firing alarm: its escalation stops."""
    import getpass
    import time

    from gateway.alarms import store as alarm_store
    from gateway.alarms.rules import key_from_level

    cfg = get_config()
    if rule not in {r.name for r in cfg.rules}:
        fail(f"RULE: no rule {rule!r} in the config (rules: {', '.join(r.name for r in cfg.rules) or 'none'})")
    if by is None:
        try:
            by = getpass.getuser()
        except (KeyError, OSError):
            by = ""
    by = f"cli:{by}" if by else "cli"  # the channel, then who said so
    conn = _alarms_db(cfg)
    row = alarm_store.get_row(conn, rule, key) or alarm_store.get_row(conn, rule, key_from_level(key))
    if row is None or row.state == AlarmState.IDLE:
        fail(f"KEY: no alarm {key!r} of rule {rule!r}", 1)
    if row.state == AlarmState.ACKNOWLEDGED:
        typer.echo(f"{rule} {row.key}: already acknowledged by {row.acknowledged_by}")
        return
    if row.state != AlarmState.FIRING:
        fail(f"KEY: alarm {row.key!r} of rule {rule!r} is {row.state}, not firing", 1)
    from gateway import clock

    _tx(conn, lambda c: alarm_store.request_ack(c, rule, row.key, by, note, clock.now()))
    # The running daemon applies it within a fraction of a second; show that it did.
    deadline = time.monotonic() + 3.0
    current: AlarmRow | None = row
    while time.monotonic() < deadline:
        current = alarm_store.get_row(conn, rule, row.key)
        if current is None or current.state != AlarmState.FIRING or current.episode != row.episode:
            break
        time.sleep(0.1)
    if current is not None and current.state == AlarmState.ACKNOWLEDGED:
        typer.echo(f"{rule} {row.key}: acknowledged by {current.acknowledged_by}")
    else:
        typer.echo(f"{rule} {row.key}: ack recorded; the gateway applies it when it runs")


@app.command("status")
def status(as_json: Annotated[bool, typer.Option("--json", help="print the status as JSON")] = False) -> None:
    """The running gateway at a glance; exit 0 healthy, 1 degraded, 2 unreachable."""
    from gateway.status import main as status_main

    raise typer.Exit(status_main(get_config(), as_json))


import gateway.cli_people  # noqa: E402,F401 - registers the people commands on app


def main() -> None:
    """Run the command line. A file or database failure that a command did not word itself
    (disk full, read-only file system, permissions, a locked database) ends in one line
    naming the command and the cause, exit 1, instead of a traceback."""
    import sqlite3

    try:
        app()
    except Exception as exc:
        from gateway.storage import NotStored  # imported on a failure only: it brings structlog and asyncio

        if not isinstance(exc, (OSError, sqlite3.Error, NotStored)):
            raise
        typer.echo(f"{state.command or 'homepot-gateway'}: not done: {failure_cause(exc, state.db_path)}", err=True)
        raise SystemExit(1) from None
    finally:
        while state.connections:
            state.connections.pop().close()
