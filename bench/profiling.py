"""Sample a running process with py-spy (an optional tool: ``pip install py-spy``) and say
where its time went: share of samples per thread, and the functions with the most samples
(self, and inclusive). Used by the benchmarks' ``--profile`` option; the profile is for
reading, never part of a figure (sampling costs CPU on a small machine).
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
from pathlib import Path


def start(pid: int, out: Path, rate: int = 100, idle: bool = False) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args = [spy, "record", "--pid", str(pid), "--format", "raw", "--threads", "--nonblocking",
            "--rate", str(rate), "-o", str(out)]
    if idle:
        args.append("--idle")
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
    proc.wait(30)


def summary(raw: Path, top: int = 25) -> str:
    """Folded stacks ("thread (id);frame;frame N") → per-thread shares and top functions."""
    threads: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        frames = stack.split(";")
        total += count
        threads[frames[0]] += count
        self_[_short(frames[-1])] += count
        for f in {_short(f) for f in frames[1:]}:
            incl[f] += count
    lines = [f"{total} samples"]
    for name, n in threads.most_common():
        lines.append(f"  {100 * n / total:5.1f}%  {name}")
    lines.append("self:")
    for name, n in self_.most_common(top):
        lines.append(f"  {100 * n / total:5.1f}%  {name}")
    lines.append("inclusive:")
    for name, n in incl.most_common(top * 2):
        lines.append(f"  {100 * n / total:5.1f}%  {name}")
    return "\n".join(lines)


def _short(frame: str) -> str:
    # "func (path/to/module.py:123)" → "func (module.py)"
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1] if where else ""
    return f"{name} ({file})" if file else name


if __name__ == "__main__":
    print(summary(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 25))
