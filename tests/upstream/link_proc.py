"""An UpstreamLink in a process of its own, for tests that kill it or read its logs.

``python -m tests.upstream.link_proc CONFIG [--enqueue N --start K] [--stuck-intake]``:
queues N acks (one committed transaction each, as the pipeline does), prints
``ENQUEUED``, runs the link until SIGTERM, then prints ``METRICS <json>``. What the
link hands to the intake is appended (and fsynced) to ``<data_dir>/intake.jsonl``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from pathlib import Path

from gateway.config import load_config
from gateway.logs import setup_logging
from gateway.storage import Database
from gateway.upstream import outbox
from gateway.upstream.link import UpstreamLink


class FileIntake:
    def __init__(self, path: Path, stuck: bool):
        self.path = path
        self.stuck = stuck

    def _record(self, entry: dict[str, str]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    async def submit_job(self, payload: bytes, source: str) -> None:
        self._record({"job": payload.decode(errors="replace"), "source": source})
        if self.stuck:  # never commits: the process is killed while "storing" the job
            await asyncio.Event().wait()

    async def register_device(self, device_id: str, payload: bytes, source: str) -> None:
        self._record({"device": device_id, "payload": payload.decode(errors="replace"), "source": source})


async def main(args: argparse.Namespace) -> None:
    cfg, secrets = load_config(args.config, environ={})
    setup_logging(cfg.logging.level, cfg.logging.format)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    db = await Database(cfg.db_path).open()
    for i in range(args.start, args.start + args.enqueue):
        payload = json.dumps({"message_id": f"m-{i}", "n": i}).encode()
        await db.run(lambda conn, p=payload: outbox.Outbox().enqueue(conn, "ack", f"{cfg.prefix}/acks", p, False))
    print("ENQUEUED", flush=True)
    link = UpstreamLink(cfg, db, FileIntake(cfg.data_dir / "intake.jsonl", args.stuck_intake),
                        secrets=secrets.upstream, backoff_initial=args.backoff, backoff_max=args.backoff_max, poll_interval=0.2)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    await link.run(stopping)
    print("METRICS", json.dumps(link.metrics()), flush=True)
    await db.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--enqueue", type=int, default=0)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--stuck-intake", action="store_true")
    parser.add_argument("--backoff", type=float, default=0.05)
    parser.add_argument("--backoff-max", type=float, default=0.3)
    asyncio.run(main(parser.parse_args()))
