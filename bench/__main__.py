"""``python -m bench`` (``make bench``): run every benchmark module in turn."""

import importlib
import pkgutil
import sys
from pathlib import Path

for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda i: i.name):
    if info.name.endswith("_bench"):
        print(f"== bench.{info.name}", flush=True)
        module = importlib.import_module(f"bench.{info.name}")
        sys.argv = [info.name]
        module.main()
