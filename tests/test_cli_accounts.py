"""``users add/remove`` and ``vapid-keys`` as an operator runs them (in this process: what
the commands say and store; tests/test_cli_ops.py and tests/test_filemodes.py run the CLI
as a process)."""

from __future__ import annotations

import base64
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from gateway.broker.passwords import PasswordFile
from tests.helpers import CliResult, cli_in_process
from tests.support import base_config, free_port, write_config


def cli(cfg: Path, *args: str, stdin: str | None = None) -> CliResult:
    return cli_in_process(cfg, *args, input=stdin)


def test_users_add_writes_argon2_and_remove(tmp_path: Path):
    cfg = write_config(tmp_path, base_config(tmp_path, free_port()))
    res = cli(cfg, "users", "add", "tech1", "--role", "technician", "--password-stdin", stdin="pa55word\n")
    assert res.returncode == 0, res.stderr
    passwd = tmp_path / "var" / "passwd"
    line = passwd.read_text().strip()
    name, hashed, role = line.split(":")
    assert (name, role) == ("tech1", "technician") and hashed.startswith("$argon2id$")
    assert "pa55word" not in passwd.read_text()
    assert oct(passwd.stat().st_mode & 0o777) == "0o600"
    pf = PasswordFile(passwd)
    assert pf.verify("tech1", "pa55word").role == "technician"
    assert pf.verify("tech1", "wrong") is None and pf.verify("nobody", "pa55word") is None

    bad = cli(cfg, "users", "add", "x", "--role", "wizard", "--password-stdin", stdin="p\n")
    assert bad.returncode == 2 and bad.stderr.startswith("--role: unknown role 'wizard'")
    assert cli(cfg, "users", "remove", "tech1").returncode == 0
    assert "tech1" not in passwd.read_text()
    missing = cli(cfg, "users", "remove", "tech1")
    assert missing.returncode == 1 and "no such user" in missing.stderr


def test_vapid_keys_created_once_and_printed(tmp_path: Path):
    cfg = write_config(tmp_path, base_config(tmp_path, free_port()))
    first = cli(cfg, "vapid-keys")
    assert first.returncode == 0, first.stderr
    public = first.stdout.strip()
    raw = base64.urlsafe_b64decode(public + "=" * (-len(public) % 4))
    assert len(raw) == 65 and raw[0] == 4  # uncompressed P-256 point
    key_file = tmp_path / "var" / "vapid_private.pem"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    assert key.curve.name == "secp256r1"
    assert cli(cfg, "vapid-keys").stdout.strip() == public  # idempotent
