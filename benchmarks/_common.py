"""What the benchmark scripts share: the repository on sys.path, the machine a run reports, process CPU time
and the nearest-rank percentile.

A script runs as ``python benchmarks/NAME.py``, so this folder is first on sys.path and ``from _common import
...`` finds this module; ``on_path`` then makes the repository's packages (and the tests' helpers) importable.
"""
from __future__ import annotations

import math
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def on_path(*folders: Path) -> None:
    """Put the folders first on sys.path (each once), e.g. ``on_path(REPO, REPO / "tests")``."""
    for folder in reversed(folders):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> str:
    """CPUs (and how many this process may use), CPU model and Python version, for the 'machine:' line."""
    return (f"{os.cpu_count()} CPU(s) (nproc {len(os.sched_getaffinity(0))}), {cpu_model()}, "
            f"Python {platform.python_version()}")


def cpu_seconds(*pids: int) -> float:
    """User plus system CPU time the processes used so far, from /proc/PID/stat."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # Fields 14 and 15 (utime, stime) are at 11 and 12 after the ")" of the command name.
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in 0..1; NaN for no values."""
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))] if values else float("nan")
