"""``python -m bench`` (``make bench``): run every benchmark module in turn, then ONE table.

Each ``bench/*_bench.py`` module's ``main()`` returns a list of summary rows (see
``bench/summary.py``); this runner collects them and prints one table of figures, ratios
and goals at the end. A module that fails is reported as a failed row, and the run goes on.
``python -m bench pipeline registration`` runs only the modules whose names contain one of
the words given.
"""

import importlib
import pkgutil
import sys
import time
import traceback
from pathlib import Path

from bench.summary import row, table

# Arguments that keep ``make bench`` within its 10 minutes on the 2-core box (each module's
# own defaults are its full run: ``python -m bench.<name>``). The goals of issue 11 are
# always measured at full size: the 100,000-device fan-out, 100,000 devices + 10,000
# retained for start-up.
QUICK_ARGS = {
    "alarms_bench": ["--messages", "3000"],
    "http_bench": ["--acks", "1000", "--devices", "20000", "--scrapes", "10"],
    "upstream_bench": ["--acks", "5000"],
    "push_bench": ["--devices", "3000"],
}


def _main() -> int:
    wanted = sys.argv[1:]
    rows = []
    started = time.perf_counter()
    failed = False
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda i: i.name):
        if not info.name.endswith("_bench") or (wanted and not any(w in info.name for w in wanted)):
            continue
        print(f"== bench.{info.name}", flush=True)
        t0 = time.perf_counter()
        sys.argv = [info.name, *QUICK_ARGS.get(info.name, [])]
        try:
            module = importlib.import_module(f"bench.{info.name}")
            got = module.main() or []
        except Exception:  # noqa: BLE001 — a failed module is a row in the table, not the end of the run
            traceback.print_exc()
            got = [row(f"{info.name}: FAILED (see above)", float("nan"), "", goal="runs", met=False)]
            failed = True
        spent = time.perf_counter() - t0
        print(f"== bench.{info.name}: {spent:.0f} s", flush=True)
        rows += got
    total = time.perf_counter() - started
    rows.append(row("make bench, total wall time", total, "s", goal="< 600 s", met=total < 600))
    print()
    print(table(rows), flush=True)
    return 1 if failed else 0


sys.exit(_main())
