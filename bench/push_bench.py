"""Push bridge benchmark: a 4,000-device job (by default) over APNs and FCM against the HTTP/2 fakes.

For each platform the same run sends N deliveries twice to the same fake:

* through the bridge (``bridge.send(Delivery)``: request building, JWT/OAuth handling,
  answer classification), ``--concurrency`` at a time like the dispatcher's
  ``max_in_flight``;
* with a bare ``httpx.AsyncClient`` (HTTP/2, same TLS) POSTing pre-built requests with the
  same headers and bodies at the same concurrency — the floor for this transport.

The fakes run in a child process so their CPU is not charged to the client's event loop.
The ratio is bridge throughput / bare throughput (1.0 = the bridge costs nothing on top of
httpx); the two alternate in slices so that load changes hit both. CPU per request is
reported for the client (this process) and for the fake (during the bridge's and the bare
client's slices apart: the two clients frame requests differently, which the fake pays for);
peak RSS is this process's. ``--h2load`` also measures the fake alone with nghttp2's h2load
(Debian package ``nghttp2-client``), the same request, ``--concurrency`` streams on one
connection and on four: what the fake can serve when the client costs it nothing.

    python -m bench.push_bench [--devices 4000] [--concurrency 200] [--h2load]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.summary import row as _row

ROUNDS = 4  # slices per mode, alternated
GOAL_RATE = 1000  # requests/s per platform (issue 11)


def _serve(kind: str, workdir: str, queue: "mp.Queue[Any]") -> None:
    """Child process: run one fake until killed; report what the client needs."""
    import logging

    logging.disable(logging.CRITICAL)

    from tests.fakes.apns import FakeApns
    from tests.fakes.common import Pki
    from tests.fakes.fcm import FakeFcm

    async def main() -> None:
        pki = Pki(Path(workdir) / kind)
        if kind == "apns":
            fake: Any = await FakeApns(pki).start()
            info = {"endpoint": fake.endpoint, "key_pem": fake.key_pem, "team_id": fake.team_id,
                    "key_id": fake.key_id, "topic": fake.topic}
        else:
            fake = await FakeFcm(pki).start()
            info = {"endpoint": fake.endpoint, "service_account": fake.service_account()}
        # Keep the fake's request log from growing for 40k requests.
        fake.seen = _Discard()
        fake.accepted = _Discard()
        queue.put({**info, "ca_file": str(pki.ca_file)})
        await asyncio.Event().wait()

    asyncio.run(main())


class _Discard(list):  # type: ignore[type-arg]
    def append(self, _item: Any) -> None:
        pass


def _deliveries(platform: str, n: int) -> list[Any]:
    from pydantic import TypeAdapter

    from bridges.base import Delivery, Notification
    from devices.models import Channel
    from gateway.timeutil import utcnow

    adapter = TypeAdapter(Channel)
    now = utcnow()
    note = Notification(title="Config update", body="Version 2.1.0 is ready",
                        data={"config_url": "https://cfg.example/2.1.0", "config_version": "2.1.0"})
    out = []
    for i in range(n):
        channel = {"platform": "apns", "token": f"{i:064x}"} if platform == "apns" else \
            {"platform": "fcm", "token": f"fcm-device-token-{i:08d}-" + "x" * 100}
        out.append(Delivery(message_id=str(uuid.uuid4()), job_id="bench-job", device_id=f"dev-{i}",
                            channel=adapter.validate_python(channel), notification=note, options={},
                            sent_at=now, expires_at=now + timedelta(hours=1)))
    return out


async def _pool(n: int, concurrency: int, fn: Any) -> float:
    """Run ``fn(i)`` for i < n with at most ``concurrency`` in flight; seconds taken."""
    next_i = 0

    async def worker() -> None:
        nonlocal next_i
        while next_i < n:
            i = next_i
            next_i += 1
            await fn(i)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def _bench_platform(platform: str, info: dict[str, Any], n: int, concurrency: int, tmp: Path,
                          fake_pid: int, with_h2load: bool = False) -> dict[str, Any]:
    import httpx

    from bridges import _http, apns, fcm
    from bridges.base import BridgeContext, OutcomeKind
    from gateway.config import parse_config
    from gateway.topics import Topics

    if platform == "apns":
        (tmp / "key.p8").write_text(info["key_pem"])
        section = {"enabled": True, "team_id": info["team_id"], "key_id": info["key_id"],
                   "key_file": str(tmp / "key.p8"), "topic": info["topic"], "endpoint": info["endpoint"],
                   "ca_file": info["ca_file"]}
    else:
        (tmp / "sa.json").write_text(json.dumps(info["service_account"]))
        section = {"enabled": True, "service_account_file": str(tmp / "sa.json"), "endpoint": info["endpoint"],
                   "ca_file": info["ca_file"]}
    cfg, secrets = parse_config({"gateway": {"data_dir": str(tmp)}, "broker": {"listeners": [{"name": "l"}]},
                                 "bridges": {platform: section}}, environ={})
    module: Any = apns if platform == "apns" else fcm
    bridge = module.build(getattr(cfg.bridges, platform), BridgeContext(None, Topics("b/s"), tmp),
                          secrets.bridge(platform))
    await bridge.start()

    deliveries = _deliveries(platform, n)
    # Warm up (TLS, HTTP/2 connection, JWT or OAuth token) outside the timing.
    await bridge.send(deliveries[0])

    # Pre-build the identical requests for the bare client (auth included).
    requests: list[tuple[str, dict[str, str], bytes]] = []
    for d in deliveries:
        if platform == "apns":
            headers, body = bridge.build(d)
            headers = dict(headers, authorization=f"bearer {apns.JWTS.get(bridge.cfg.team_id, bridge.cfg.key_id, bridge._key)}")
            requests.append((f"{bridge.base}/3/device/{d.channel.token}", headers, body))
        else:
            body = json.dumps(bridge.build(d)).encode()
            token = await bridge._access_token()
            requests.append((bridge.url, {"authorization": f"Bearer {token}", "content-type": "application/json"}, body))

    bare = httpx.AsyncClient(verify=_http.tls_context(Path(info["ca_file"])), http1=platform != "apns", http2=True,
                             limits=httpx.Limits(max_connections=100, max_keepalive_connections=100))
    await bare.post(requests[0][0], headers=requests[0][1], content=requests[0][2])
    bare_ok = 0

    async def bare_send(i: int) -> None:
        nonlocal bare_ok
        url, headers, body = requests[i]
        r = await bare.post(url, headers=headers, content=body)
        bare_ok += r.status_code == 200

    bridge_ok = 0
    reasons: dict[str, int] = {}

    async def bridge_send(i: int) -> None:
        nonlocal bridge_ok
        outcome = await bridge.send(deliveries[i])
        if outcome.kind is OutcomeKind.ACCEPTED:
            bridge_ok += 1
        else:
            key = f"{outcome.kind.value}: {outcome.reason}"
            reasons[key] = reasons.get(key, 0) + 1

    # Alternate the two in ROUNDS slices (bare, bridge, bare, bridge, ...) so that a change
    # in the machine's load during the run falls on both alike.
    bare_s = bridge_s = 0.0
    bare_cpu = bridge_cpu = 0.0
    fake_cpu = {"bare": 0.0, "bridge": 0.0}
    per_round = -(-n // ROUNDS)
    for start in range(0, n, per_round):
        count = min(per_round, n - start)
        for which in ("bare", "bridge"):
            fn = bare_send if which == "bare" else bridge_send
            cpu0, fake0 = time.process_time(), _cpu_seconds(fake_pid)
            took = await _pool(count, concurrency, lambda i, fn=fn, start=start: fn(start + i))
            cpu = time.process_time() - cpu0
            if which == "bare":
                bare_s, bare_cpu = bare_s + took, bare_cpu + cpu
            else:
                bridge_s, bridge_cpu = bridge_s + took, bridge_cpu + cpu
            fake_cpu[which] += _cpu_seconds(fake_pid) - fake0
    await bare.aclose()
    await bridge.close()
    h2load = [_h2load(requests[0], n, connections, concurrency, fake_pid, tmp)
              for connections in (1, 4)] if with_h2load else None
    return {"platform": platform, "deliveries": n, "concurrency": concurrency,
            "bridge_s": round(bridge_s, 2), "bridge_per_s": round(n / bridge_s), "bridge_accepted": bridge_ok,
            "bare_s": round(bare_s, 2), "bare_per_s": round(n / bare_s), "bare_accepted": bare_ok,
            "ratio": round(bare_s / bridge_s, 2), "not_accepted": reasons,
            "bridge_cpu_us": round(1e6 * bridge_cpu / n), "bare_cpu_us": round(1e6 * bare_cpu / n),
            "fake_cpu_us": round(1e6 * (fake_cpu["bare"] + fake_cpu["bridge"]) / (2 * n)),
            "fake_cpu_us_bridge": round(1e6 * fake_cpu["bridge"] / n),
            "fake_cpu_us_bare": round(1e6 * fake_cpu["bare"] / n),
            "h2load": h2load,
            "jwt_minted": apns.JWTS.minted if platform == "apns" else None,
            "oauth_refreshes": bridge.refreshes if platform == "fcm" else None}


def _h2load(request: tuple[str, dict[str, str], bytes], n: int, connections: int, concurrency: int,
            fake_pid: int, tmp: Path) -> dict[str, Any]:
    """h2load POSTs ``request`` n times (``concurrency`` streams over ``connections``)."""
    import re
    import shutil
    import subprocess

    exe = shutil.which("h2load")
    if exe is None:
        raise SystemExit("--h2load: h2load not found (apt-get install nghttp2-client)")
    url, headers, body = request
    (tmp / "h2load-body").write_bytes(body)
    args = [exe, "-n", str(n), "-c", str(connections), "-m", str(max(1, concurrency // connections)),
            "-d", str(tmp / "h2load-body")]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    fake0 = _cpu_seconds(fake_pid)
    out = subprocess.run(args + [url], capture_output=True, text=True, timeout=600).stdout
    fake_cpu = _cpu_seconds(fake_pid) - fake0
    rate = re.search(r"finished in [^,]+, ([0-9.]+) req/s", out)
    ok = re.search(r"status codes: (\d+) 2xx", out)
    return {"connections": connections, "per_s": round(float(rate.group(1))) if rate else None,
            "accepted": int(ok.group(1)) if ok else 0, "fake_cpu_us": round(1e6 * fake_cpu / n)}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (the fake's share of the work)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")



def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--platform", choices=["apns", "fcm", "both"], default="both")
    parser.add_argument("--h2load", action="store_true", help="also measure the fake alone with h2load")
    args = parser.parse_args(argv)
    import logging

    logging.disable(logging.INFO)
    results = []
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmpdir:
        for platform in (["apns", "fcm"] if args.platform == "both" else [args.platform]):
            queue: Any = ctx.Queue()
            proc = ctx.Process(target=_serve, args=(platform, tmpdir, queue), daemon=True)
            proc.start()
            try:
                info = queue.get(timeout=60)
                work = Path(tmpdir) / f"client-{platform}"
                work.mkdir()
                results.append(asyncio.run(_bench_platform(platform, info, args.devices, args.concurrency, work,
                                                           proc.pid, args.h2load)))
            finally:
                proc.terminate()
                proc.join(10)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for r in results:
        print(f"{r['platform']:5} {r['deliveries']} deliveries, {r['concurrency']} in flight: "
              f"bridge {r['bridge_s']} s ({r['bridge_per_s']}/s, {r['bridge_accepted']} accepted, "
              f"{r['bridge_cpu_us']} us CPU/request) | bare httpx {r['bare_s']} s ({r['bare_per_s']}/s, "
              f"{r['bare_accepted']} accepted, {r['bare_cpu_us']} us CPU/request) | fake {r['fake_cpu_us_bridge']} / "
              f"{r['fake_cpu_us_bare']} us CPU/request (bridge / bare) | bridge/bare throughput {r['ratio']}x")
        for h in r["h2load"] or []:
            print(f"{r['platform']:5} fake alone, h2load {h['connections']} connection(s) x "
                  f"{r['concurrency'] // h['connections']} streams: {h['per_s']}/s ({h['accepted']} accepted), "
                  f"fake {h['fake_cpu_us']} us CPU/request")
    print(f"peak RSS of the client process: {peak_kib / 1024:.0f} MiB")
    print(json.dumps({"results": results, "peak_rss_mib": round(peak_kib / 1024)}))
    rows = []
    for r in results:
        name = {"apns": "APNs", "fcm": "FCM"}[r["platform"]]
        complete = r["bridge_accepted"] == r["deliveries"] and r["bare_accepted"] == r["deliveries"]
        rows.append(_row(f"push {name} via bridge vs bare httpx, requests/s", r["bridge_per_s"], "req/s",
                         baseline=r["bare_per_s"], goal=">= 1.0x bare httpx, all accepted",
                         met=complete and r["bridge_per_s"] >= r["bare_per_s"]))
        rows.append(_row(f"push {name} via bridge, requests/s ({r['concurrency']} in flight)", r["bridge_per_s"],
                         "req/s", goal=f">= {GOAL_RATE:,}/s", met=r["bridge_per_s"] >= GOAL_RATE))
    return rows

if __name__ == "__main__":
    main()
