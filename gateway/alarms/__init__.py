"""Sensor alarms: ``[[rules]]`` that turn telemetry on the broker into notification jobs.

Modules, each owning one thing:
- :mod:`gateway.alarms.rules` — compiled rules and the key's topic form (the ``[[rules]]``
  model, its checks and templates are :mod:`gateway.rule_schema`, which the config uses
  without importing this package);
- :mod:`gateway.alarms.values` — reducing a payload to a number or string;
- :mod:`gateway.alarms.engine` — the state machine and its timers, pure (no I/O);
- :mod:`gateway.alarms.jobs` — alarm job ids and job bodies;
- :mod:`gateway.alarms.store` — the SQLite tables and the transactions that change them;
- :mod:`gateway.alarms.service` — the daemon service that ties them to the MQTT client.

Nothing is imported here on purpose: the service imports the config and the pipeline.
"""
