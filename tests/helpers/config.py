"""Config builders for tests: the base daemon config as a dict, merged and written as TOML
(by ``tomli_w``, so quoting and nesting are the library's job, not ours).

Ports: :func:`base_config` binds the broker listener to port 0 unless given a port; the
daemon reports what the kernel picked in ``runtime.json`` (see :mod:`tests.helpers.processes`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w


def _plain(value: Any) -> Any:
    """Paths as strings (TOML has no path type); everything else as given."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_toml(data: dict[str, Any]) -> str:
    return tomli_w.dumps(_plain(data))


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``; tables merge key by key, anything else (lists too) replaces."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def base_config(tmp: Path, port: int = 0, **extra: Any) -> dict[str, Any]:
    """A daemon config: embedded broker with one anonymous-admin TCP listener on ``port``
    (0: the kernel picks, and the gateway's own client follows it), simulation and MQTT bridges."""
    cfg: dict[str, Any] = {
        "gateway": {"site_id": "site-t", "topic_prefix": "homepot", "data_dir": str(tmp / "var")},
        "broker": {
            "mode": "embedded",
            "url": f"mqtt://127.0.0.1:{port}",
            "listeners": [{"name": "local", "type": "tcp", "bind": f"127.0.0.1:{port}",
                           "allow_anonymous": True, "anonymous_role": "admin"}],
            "auth": {"password_file": str(tmp / "var" / "passwd")},
        },
        "bridges": {"simulation": {"enabled": True, "latency_ms": 0}, "mqtt": {"enabled": True}},
        "logging": {"level": "info", "format": "json"},
    }
    return deep_merge(cfg, extra)


def write_config(tmp: Path, data: dict[str, Any], name: str = "config.toml") -> Path:
    path = tmp / name
    path.write_text(to_toml(data))
    return path
