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


def main() -> None:
    app()
