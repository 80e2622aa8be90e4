"""``homepot-gateway`` command line (contract §3).

Exit codes: 0 ok, 1 the operation ran and failed, 2 bad usage or invalid config/input.
Errors go to stderr as ``KEY: message`` lines.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from gateway.config import Config, ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="homepot-gateway: edge MQTT broker and durable push fan-out for a HOMEPOT site.")
users_app = typer.Typer(no_args_is_help=True, help="Broker accounts (argon2 password file).")
app.add_typer(users_app, name="users")
devices_app = typer.Typer(no_args_is_help=True, help="The device registry (works while the daemon runs).")
app.add_typer(devices_app, name="devices")
jobs_app = typer.Typer(no_args_is_help=True, help="Jobs and their status.")
app.add_typer(jobs_app, name="jobs")


class _State:
    config_path: str | None = None


state = _State()


@app.callback()
def _global(config: Annotated[Optional[str], typer.Option("--config", help="Config file (else $HOMEPOT_GATEWAY_CONFIG, ./config.toml, /etc/homepot-gateway/config.toml)")] = None) -> None:
    state.config_path = config


def fail(lines: list[str] | str, code: int = 2) -> None:
    for line in [lines] if isinstance(lines, str) else lines:
        typer.echo(line, err=True)
    raise typer.Exit(code)


def get_config() -> Config:
    try:
        return load_config(state.config_path)
    except ConfigError as exc:
        fail(exc.lines())
        raise  # unreachable


@app.command("check-config")
def check_config() -> None:
    """Validate the configuration; print each problem as KEY: message."""
    cfg = get_config()
    typer.echo(f"ok: {cfg.source}")


@app.command("run")
def run() -> None:
    """Run the daemon in the foreground."""
    cfg = get_config()
    from gateway.daemon import run_daemon
    from gateway.logs import setup_logging

    setup_logging(cfg.logging.level, cfg.logging.format)
    raise typer.Exit(run_daemon(cfg))


@users_app.command("add")
def users_add(
    name: str,
    role: Annotated[str, typer.Option("--role", help="ACL role: device, technician, controller, monitor, admin, or one from [broker.acl]")],
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
    typer.echo(f"user {name} ({role}) written to {cfg.broker.auth.password_file}")


@users_app.command("remove")
def users_remove(name: str) -> None:
    """Remove a broker account."""
    from gateway.broker.passwords import PasswordFileError, remove_user

    cfg = get_config()
    try:
        removed = remove_user(Path(cfg.broker.auth.password_file), name)
    except PasswordFileError as exc:
        fail(str(exc))
    if not removed:
        fail(f"NAME: no such user {name!r}", 1)
    typer.echo(f"user {name} removed")


@app.command("vapid-keys")
def vapid_keys() -> None:
    """Create the Web Push VAPID key pair if missing; print the public key (base64url)."""
    from gateway import vapid

    cfg = get_config()
    path = cfg.bridges.webpush.vapid_private_key_file
    try:
        key = vapid.load_or_create(path)
    except ValueError as exc:
        fail(f"bridges.webpush.vapid_private_key_file: {exc}")
    typer.echo(vapid.public_key_b64(key))


# ---------------------------------------------------------------------- pipeline commands
def _db(cfg: Config):  # noqa: ANN202 - sqlite3.Connection, imported lazily
    from gateway.pipeline import schema
    from gateway.storage import connect, transaction

    conn = connect(cfg.db_path)
    transaction(conn, schema.migrate)
    return conn


def _tx(conn, fn):  # noqa: ANN001, ANN202
    from gateway.storage import transaction

    return transaction(conn, fn)


@app.command("send")
def send(
    title: Annotated[Optional[str], typer.Option("--title")] = None,
    body: Annotated[Optional[str], typer.Option("--body")] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", help="K=V (repeatable)")] = None,
    priority: Annotated[str, typer.Option("--priority")] = "normal",
    ttl: Annotated[int, typer.Option("--ttl")] = 3600,
    collapse_key: Annotated[Optional[str], typer.Option("--collapse-key")] = None,
    job_id: Annotated[Optional[str], typer.Option("--job-id")] = None,
    device: Annotated[Optional[list[str]], typer.Option("--device", help="target device (repeatable)")] = None,
    segment: Annotated[Optional[str], typer.Option("--segment")] = None,
    all_devices: Annotated[bool, typer.Option("--all")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="show progress until the job is complete")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="seconds to wait with --wait")] = 300.0,
) -> None:
    """Submit a job to the running gateway; print its job_id."""
    from gateway.pipeline import store
    from gateway.pipeline.models import InputError, parse_job

    cfg = get_config()
    chosen = [name for name, given in (("--device", bool(device)), ("--segment", segment is not None),
                                       ("--all", all_devices)) if given]
    if len(chosen) != 1:
        fail("target: give exactly one of --device, --segment, --all")
    pairs: dict[str, str] = {}
    for item in data or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--data: expected K=V, got {item!r}")
        pairs[key] = value
    target = {"devices": device} if device else {"segment": segment} if segment is not None else {"all": True}
    notification: dict = {"data": pairs, "priority": priority, "ttl": ttl}
    for k, v in (("title", title), ("body", body), ("collapse_key", collapse_key)):
        if v is not None:
            notification[k] = v
    obj: dict = {"target": target, "notification": notification}
    if job_id is not None:
        obj["job_id"] = job_id
    try:
        parsed = parse_job(obj)
    except InputError as err:
        fail(err.message)
    conn = _db(cfg)
    _tx(conn, lambda c: store.submit_job(c, parsed, "cli"))
    typer.echo(parsed.job_id)
    if wait:
        raise typer.Exit(_wait_for(conn, parsed.job_id, timeout))


def _wait_for(conn, job_id: str, timeout: float) -> int:  # noqa: ANN001
    import time

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from gateway.pipeline import store

    console = Console(stderr=True)
    deadline = time.monotonic() + timeout
    status = None
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console,
                  transient=not console.is_terminal) as progress:
        task = progress.add_task(job_id, total=None, detail="")
        while time.monotonic() < deadline:
            status = store.job_status(conn, job_id)
            if status is not None:
                c = status["counts"]
                done = c["targets"] - c["queued"]
                detail = (f"{status['state']} sent={c['sent']} acked={c['acknowledged']} failed={c['failed']} "
                          f"expired={c['expired']} invalid={c['invalid_address']}")
                progress.update(task, total=c["targets"] or None, completed=done, detail=detail)
                if status["state"] in ("completed", "acknowledged"):
                    break
            time.sleep(0.2)
    if status is None or status["state"] not in ("completed", "acknowledged"):
        typer.echo(f"timeout: job {job_id} not complete after {timeout:g} s", err=True)
        return 1
    c = status["counts"]
    typer.echo(f"{status['state']}: targets={c['targets']} sent={c['sent']} acknowledged={c['acknowledged']} "
               f"failed={c['failed']} expired={c['expired']} invalid_address={c['invalid_address']}", err=True)
    return 1 if c["failed"] or c["expired"] or c["invalid_address"] else 0


_ADDRESS_FIELD = {"fcm": "token", "apns": "token", "wns": "channel_uri"}


@devices_app.command("add")
def devices_add(
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    platform: Annotated[list[str], typer.Option("--platform", help="fcm|apns|wns|webpush|mqtt|simulation (repeat, in order of preference)")],
    address: Annotated[Optional[list[str]], typer.Option("--address", help="token, channel URI, subscription JSON, or empty")] = None,
    segment: Annotated[Optional[str], typer.Option("--segment")] = None,
    tag: Annotated[Optional[list[str]], typer.Option("--tag")] = None,
) -> None:
    """Register (or replace) a device."""
    import json

    from pydantic import ValidationError

    from devices.models import Device
    from gateway.pipeline import store
    from gateway.pipeline.models import field_errors

    cfg = get_config()
    addresses = list(address or [])
    if len(addresses) > len(platform):
        fail("--address: more addresses than --platform options")
    addresses += [""] * (len(platform) - len(addresses))
    channels = []
    for i, (plat, addr) in enumerate(zip(platform, addresses)):
        if plat in _ADDRESS_FIELD:
            channels.append({"platform": plat, _ADDRESS_FIELD[plat]: addr})
        elif plat == "webpush":
            try:
                channels.append({"platform": plat, "subscription": json.loads(addr)})
            except json.JSONDecodeError:
                fail(f"--address[{i}]: webpush needs the subscription JSON")
        elif plat in ("mqtt", "simulation"):
            if addr:
                fail(f"--address[{i}]: {plat} takes no address (give an empty one)")
            channels.append({"platform": plat})
        else:
            fail(f"--platform[{i}]: unknown platform {plat!r}")
    try:
        dev = Device.model_validate({"device_id": device_id, "segment": segment, "tags": tag or [], "channels": channels})
    except ValidationError as exc:
        fail(field_errors(exc))
    conn = _db(cfg)
    _tx(conn, lambda c: store.upsert_device(c, dev, "cli"))
    typer.echo(f"device {device_id} registered ({', '.join(platform)})")


@devices_app.command("list")
def devices_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List registered devices."""
    import json

    from gateway.pipeline import store

    devices = list(store.iter_devices(_db(get_config())))
    if as_json:
        typer.echo(json.dumps(devices, indent=2))
        return
    for d in devices:
        chans = ",".join(c["platform"] + ("(invalid)" if "invalid" in c else "") for c in d["channels"])
        typer.echo(f"{d['device_id']}\t{d['segment'] or '-'}\t{chans}\t{','.join(d['tags']) or '-'}")


@devices_app.command("show")
def devices_show(device_id: Annotated[str, typer.Argument(metavar="ID")],
                 as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show one device."""
    import json

    from gateway.pipeline import store

    dev = store.get_device(_db(get_config()), device_id)
    if dev is None:
        fail(f"ID: no such device {device_id!r}", 1)
    typer.echo(json.dumps(dev) if as_json else json.dumps(dev, indent=2))


@devices_app.command("remove")
def devices_remove(device_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Remove a device; its queued deliveries fail as 'device removed'."""
    from gateway.pipeline import store

    conn = _db(get_config())
    if not _tx(conn, lambda c: store.remove_device(c, device_id)):
        fail(f"ID: no such device {device_id!r}", 1)
    typer.echo(f"device {device_id} removed")


@jobs_app.command("list")
def jobs_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List jobs, newest first."""
    import json

    from gateway.pipeline import store

    jobs = store.list_jobs(_db(get_config()))
    if as_json:
        typer.echo(json.dumps(jobs, indent=2))
        return
    for j in jobs:
        c = j["counts"]
        typer.echo(f"{j['job_id']}\t{j['state']}\ttargets={c['targets']} queued={c['queued']} sent={c['sent']} "
                   f"acked={c['acknowledged']} failed={c['failed']} expired={c['expired']} "
                   f"invalid={c['invalid_address']}\t{j['created_at']}")


@jobs_app.command("show")
def jobs_show(job_id: Annotated[str, typer.Argument(metavar="ID")],
              as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show one job's status."""
    import json

    from gateway.pipeline import store

    status = store.job_status(_db(get_config()), job_id)
    if status is None:
        fail(f"ID: no such job {job_id!r}", 1)
    typer.echo(json.dumps(status) if as_json else json.dumps(status, indent=2))


@app.command("status")
def status(as_json: Annotated[bool, typer.Option("--json", help="print the status as JSON")] = False) -> None:
    """The running gateway at a glance; exit 0 healthy, 1 degraded, 2 unreachable."""
    from gateway.status import main as status_main

    raise typer.Exit(status_main(get_config(), as_json))


def main() -> None:
    app()
