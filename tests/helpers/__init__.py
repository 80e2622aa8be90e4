"""Test helpers, one place for each: process starters (:mod:`.processes`), the polling wait
(:mod:`.waits`), database helpers (:mod:`.db`), config builders written with a TOML library
(:mod:`.config`), small disks (:mod:`.disks`), account files hashed cheaply (:mod:`.accounts`),
hypothesis example counts per profile (:mod:`.fuzz`), the browsers the page tests drive
(:mod:`.browser`). ``tests/support.py`` re-exports the same
names for older imports."""

from pathlib import Path

from tests.helpers.accounts import write_accounts
from tests.helpers.cli import CliResult, cli_in_process
from tests.helpers.config import base_config, deep_merge, to_toml, write_config
from tests.helpers.db import bulk_register, db_rows, job_status_from_db, open_database, put_persons
from tests.helpers.disks import fill_disk, mounted_tmpfs
from tests.helpers.processes import (
    MOSQUITTO, GatewayProcess, Mosquitto, MqttProbe, NotifySocket, cli, free_port, require_tool, wait_port,
)
from tests.helpers.waits import WaitTimeout, until, wait_until

ROOT = Path(__file__).resolve().parent.parent.parent

__all__ = [
    "MOSQUITTO", "ROOT", "CliResult", "GatewayProcess", "Mosquitto", "MqttProbe", "NotifySocket", "WaitTimeout",
    "base_config",
    "bulk_register",
    "put_persons", "cli", "cli_in_process", "db_rows", "deep_merge", "fill_disk", "free_port", "job_status_from_db",
    "mounted_tmpfs", "open_database", "require_tool", "to_toml", "until", "wait_port", "wait_until",
    "write_accounts", "write_config",
]
