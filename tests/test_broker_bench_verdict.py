"""The broker bench's MQTT 5.0 vs 3.1.1 verdict: alternated pairs, order flipped every pair,
more pairs for short runs, and the median of the pairs' ratios with its spread.

The runs are replaced by a recorder that returns given figures (the bench's own arithmetic is
what is tested; the measuring is `python -m bench.broker_bench`)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import bench.broker_bench as bb


def _run(rate: float, delivered: int = 1000, cpu: float = 10.0) -> dict[str, float]:
    return {"delivered": delivered, "expected": delivered, "msgs_per_s": rate, "p50_ms": 1.0, "p99_ms": 2.0,
            "cpu_us_per_msg": cpu, "client_cpu_us_per_msg": 5.0}


def _bench(monkeypatch: pytest.MonkeyPatch, rates: dict[int, list[float]], min_measured_s: float,
           repeats: int = 3) -> tuple[list[int], dict[int, dict[str, dict[str, Any]]]]:
    """bench_broker over one scenario whose runs give ``rates`` per level in turn; returns the
    order the levels ran in and the results."""
    order: list[int] = []
    left = {p: list(r) for p, r in rates.items()}

    async def measured(pid: int, port: int, qos: int, subs: int, n: int, persistent: bool = False,
                       protocol: int = 0) -> dict[str, float]:
        order.append(protocol)
        return _run(left[protocol].pop(0), delivered=n)

    async def paced(port: int, qos: int, subs: int, messages: int, paced: bool, persistent: bool = False,
                    protocol: int = 0) -> dict[str, float]:
        assert paced
        return _run(0.0, delivered=messages)

    monkeypatch.setattr(bb, "_measured", measured)
    monkeypatch.setattr(bb, "run_scenario", paced)
    res = asyncio.run(bb.bench_broker(1, 1, 1000, 20, (4, 5), repeats, frozenset({"qos0 1->1"}), min_measured_s))
    return order, res


def test_levels_alternate_in_flipped_order_and_short_runs_get_more_pairs(monkeypatch):
    # 5,000 deliveries (QoS 0 runs send 5x) at 25,000/s: 0.2 s a run, so 1.5 s takes 8 pairs.
    order, res = _bench(monkeypatch, {4: [25_000.0] * 9, 5: [25_000.0] * 9}, min_measured_s=1.5)
    assert order == [4, 5, 5, 4] * 4
    assert res[5]["qos0 1->1"]["vs_311"]["pairs"] == 8


def test_long_runs_keep_the_given_pairs_and_the_extra_pairs_are_capped(monkeypatch):
    order, _ = _bench(monkeypatch, {4: [1_000.0] * 3, 5: [1_000.0] * 3}, min_measured_s=1.5)  # 5 s a run
    assert order == [4, 5, 5, 4, 4, 5]
    order, _ = _bench(monkeypatch, {4: [1e9] * 9, 5: [1e9] * 9}, min_measured_s=1.5)       # never long enough
    assert len(order) == 2 * 9


def test_the_verdict_is_the_median_of_the_pairs_ratios_with_the_spread(monkeypatch):
    # Each 5.0 run is 0.95x the 3.1.1 run beside it but one, disturbed (0.5x); the machine's speed
    # drifted over the pairs. Compared apart, the median runs of each level read 190 / 300 = 0.63x.
    v4 = [100.0, 200.0, 300.0, 400.0, 500.0]
    v5 = [95.0, 190.0, 150.0, 380.0, 475.0]
    _, res = _bench(monkeypatch, {4: v4, 5: v5}, min_measured_s=0.0, repeats=5)
    assert res[5]["qos0 1->1"]["msgs_per_s"] / res[4]["qos0 1->1"]["msgs_per_s"] == pytest.approx(190 / 300)
    both = {"gateway": res[4], "gateway:5": res[5]}
    rows = [r for r in bb._summary(both) if "MQTT 5.0 vs 3.1.1, msg/s" in r["name"]]
    assert len(rows) == 1
    row = rows[0]
    assert row["ratio"] == pytest.approx(0.95)
    assert row["met"] is True
    assert "median of 5 alternated pairs, range 0.50-0.95" in row["name"]


def test_a_run_that_lost_deliveries_counts_as_rate_zero_in_its_pair(monkeypatch):
    order: list[int] = []

    async def measured(pid: int, port: int, qos: int, subs: int, n: int, persistent: bool = False,
                       protocol: int = 0) -> dict[str, float]:
        order.append(protocol)
        run = _run(1000.0, delivered=n)
        if protocol == 5:
            run["delivered"] = n - 1
        return run

    async def paced(*args: Any, **kwargs: Any) -> dict[str, float]:
        return _run(0.0)

    monkeypatch.setattr(bb, "_measured", measured)
    monkeypatch.setattr(bb, "run_scenario", paced)
    res = asyncio.run(bb.bench_broker(1, 1, 1000, 20, (4, 5), 3, frozenset({"qos0 1->1"}), 0.0))
    rows = [r for r in bb._summary({"gateway": res[4], "gateway:5": res[5]}) if "msg/s (ratio" in r["name"]]
    assert rows[0]["ratio"] == 0.0 and rows[0]["met"] is False
