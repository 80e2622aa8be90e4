"""Older import path of the test helpers: everything lives in :mod:`tests.helpers`; these
are the same objects under the names tests have always imported."""

from tests.helpers import (  # noqa: F401 - re-exported
    MOSQUITTO, ROOT, GatewayProcess, Mosquitto, MqttProbe, NotifySocket, WaitTimeout, base_config, bulk_register,
    cli, db_rows, deep_merge, fill_disk, free_port, job_status_from_db, mounted_tmpfs, open_database, require_tool,
    to_toml, until, wait_port, wait_until, write_config,
)
