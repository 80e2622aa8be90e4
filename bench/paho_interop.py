"""Run the Eclipse Paho MQTT 5 interoperability suite against the embedded broker (and Mosquitto).

    PAHO_TESTING=/path/to/paho.mqtt.testing python -m bench.paho_interop [--brokers gateway,mosquitto]
        [--keepalive-max 60] [--timeout 120] [--json out.json]

The suite (``interoperability/client_test5.py`` of https://github.com/eclipse/paho.mqtt.testing,
EPL/EDL) is third-party code: it is not in this repository and nothing here fetches it; give
the path of a checkout in ``PAHO_TESTING``. Not part of ``make test`` or ``make bench``.

Each of its 27 tests runs in its own process (``client_test5.py -p PORT Test.<name>``) with a
time limit: the suite waits for ever for a DISCONNECT in ``test_flow_control2`` when a broker
sends none, which would stop a whole-suite run. Every test starts with the suite's own
clean-up (sessions of its two client ids, retained messages).

``gateway``: the daemon in a temporary directory with what an outside tester needs, one
loopback listener whose anonymous clients get a role ``interop`` that may publish and
subscribe to ``#`` except the suite's ``test/nosubscribe`` (its subscribe-failure test).
``mosquitto``: ``mosquitto`` with ``allow_anonymous true`` (nothing else). ``--keepalive-max``
sets the broker's maximum keepalive (``[broker.limits] max_keepalive`` / Mosquitto's
``max_keepalive``): the suite's ``test_server_keep_alive`` expects a Server Keep Alive of 60
for a client asking 120, a choice of the server's configuration.

Prints one line per test (``ok``/``FAIL``/``ERROR``/``TIMEOUT``) per broker and the totals;
the daemon's log is checked for warnings, errors and tracebacks afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = [
    "test_assigned_clientid", "test_basic", "test_client_topic_alias", "test_dollar_topics",
    "test_flow_control1", "test_flow_control2", "test_keepalive", "test_maximum_packet_size",
    "test_offline_message_queueing", "test_overlapping_subscriptions", "test_payload_format",
    "test_publication_expiry", "test_redelivery_on_reconnect", "test_request_response",
    "test_retained_message", "test_server_keep_alive", "test_server_topic_alias", "test_session_expiry",
    "test_shared_subscriptions", "test_subscribe_failure", "test_subscribe_identifiers",
    "test_subscribe_options", "test_unsubscribe", "test_user_properties", "test_will_delay",
    "test_will_message", "test_zero_length_clientid",
]

GATEWAY_CONFIG = """\
[gateway]
site_id = "interop"
topic_prefix = "homepot"
data_dir = "{data}"

[broker]
mode = "embedded"

[[broker.listeners]]
name = "interop"
type = "tcp"
bind = "127.0.0.1:{port}"
allow_anonymous = true
anonymous_role = "interop"

[broker.acl.interop]
publish = ["#"]
subscribe = ["#"]
deny = ["test/nosubscribe"]

[broker.auth]
password_file = "{data}/passwd"

{limits}
[logging]
level = "info"
format = "console"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port} after {timeout} s")


def start_broker(kind: str, workdir: Path, keepalive_max: int) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = _free_port()
    log = workdir / f"{kind}.log"
    if kind == "gateway":
        data = workdir / "data"
        cfg = workdir / "gateway.toml"
        limits = f"[broker.limits]\nmax_keepalive = {keepalive_max}\n" if keepalive_max else ""
        cfg.write_text(GATEWAY_CONFIG.format(data=data, port=port, limits=limits), encoding="utf-8")
        cmd = [sys.executable, "-m", "gateway", "--config", str(cfg), "run"]
    elif kind == "mosquitto":
        cfg = workdir / "mosquitto.conf"
        extra = f"max_keepalive {keepalive_max}\n" if keepalive_max else ""
        cfg.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n{extra}", encoding="utf-8")
        cmd = ["mosquitto", "-c", str(cfg)]
    else:
        raise SystemExit(f"unknown broker {kind!r} (gateway, mosquitto)")
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    _wait_port(port, proc)
    return proc, port, log


def run_test(suite: Path, port: int, name: str, timeout: float) -> tuple[str, str]:
    """(verdict, last lines of output) of one test of the suite in its own process."""
    try:
        out = subprocess.run([sys.executable, "client_test5.py", "-p", str(port), f"Test.{name}"], cwd=suite,
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "TIMEOUT", f"no result within {timeout} s"
    text = out.stdout + out.stderr
    if re.search(rf"^(FAIL|ERROR): {name}\b", text, re.M):
        verdict = re.search(rf"^(FAIL|ERROR): {name}\b", text, re.M).group(1)  # type: ignore[union-attr]
    elif re.search(r"^OK\b", text, re.M):
        verdict = "ok"
    else:
        verdict = "ERROR"
    return verdict, "\n".join(text.strip().splitlines()[-6:])


def log_problems(log: Path) -> list[str]:
    return [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines()
            if re.search(r"\[(warning|error|critical)|Traceback|Exception", line)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", default="gateway,mosquitto")
    parser.add_argument("--keepalive-max", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--only", default="", help="comma-separated test names (default: all 27)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    root = os.environ.get("PAHO_TESTING")
    if not root:
        raise SystemExit("PAHO_TESTING: the path of a paho.mqtt.testing checkout (or its interoperability/ directory)")
    suite = Path(root)
    if not (suite / "client_test5.py").exists():
        suite = suite / "interoperability"
    if not (suite / "client_test5.py").exists():
        raise SystemExit(f"PAHO_TESTING={root}: no client_test5.py there or in interoperability/")
    tests = [t for t in args.only.split(",") if t] or TESTS
    results: dict[str, dict[str, str]] = {}
    for kind in args.brokers.split(","):
        with tempfile.TemporaryDirectory(prefix=f"paho-{kind}-") as tmp:
            proc, port, log = start_broker(kind, Path(tmp), args.keepalive_max)
            try:
                results[kind] = {}
                for name in tests:
                    verdict, tail = run_test(suite, port, name, args.timeout)
                    results[kind][name] = verdict
                    print(f"{kind:10} {name:34} {verdict}", flush=True)
                    if verdict != "ok":
                        print("    " + tail.replace("\n", "\n    "), flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
            problems = log_problems(log)
            print(f"{kind}: {sum(v == 'ok' for v in results[kind].values())}/{len(tests)} passed; "
                  f"log lines with warnings/errors/tracebacks: {len(problems)}", flush=True)
            for line in problems[:20]:
                print("    " + line[:300])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
