"""The one summary row shape every benchmark module's ``main()`` returns.

``python -m bench`` runs each ``*_bench`` module, collects the rows its ``main()`` returns and
prints them as ONE table at the end, so a run of every benchmark ends with the goals of
issue 11 met or not met side by side. A module that measures something without a goal
still returns rows (``goal=""``, ``met=None``): the table shows them as information.
"""

from __future__ import annotations

import math
from typing import Any

Row = dict[str, Any]
"""{"name": str, "value": float, "unit": str, "baseline": float | None, "ratio": float | None,
"goal": str, "met": bool | None} — see :func:`row`."""


def row(name: str, value: float, unit: str, *, baseline: float | None = None, ratio: float | None = None,
        goal: str = "", met: bool | None = None) -> Row:
    """One measured figure.

    name: what was measured ("fan-out 100k, deliveries/s"); value/unit: the figure;
    baseline: the same measure for the baseline run in the same process run (or None);
    ratio: value / baseline, or whatever ratio the goal is stated in (None if none);
    goal: the goal as text (">= 10,000/s", ">= 1.0x bare httpx", "<= 60 MB"), "" if none;
    met: whether the goal was reached in this run (None when there is no goal).
    """
    if ratio is None and baseline:
        ratio = value / baseline
    return {"name": name, "value": value, "unit": unit, "baseline": baseline, "ratio": ratio,
            "goal": goal, "met": met}


def _fmt(x: float | None, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 100 or digits == 0 and float(x).is_integer():
        return f"{x:,.0f}"
    return f"{x:,.{max(digits, 2)}f}"


def table(rows: list[Row]) -> str:
    """Render rows as one Markdown table (pasteable into bench/README.md)."""
    head = "| measure | value | unit | baseline | ratio | goal | met |"
    lines = [head, "|---|---:|---|---:|---:|---|---|"]
    for r in rows:
        met = {True: "yes", False: "**NO**", None: ""}[r.get("met")]
        ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['name']} | {_fmt(r['value'], 2)} | {r['unit']} | {_fmt(r.get('baseline'), 2)} | "
                     f"{ratio} | {r.get('goal', '')} | {met} |")
    return "\n".join(lines)
