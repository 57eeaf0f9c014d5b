"""The name of the machine a run or a benchmark used, for checkpoints, model cards and benchmark JSON.

No torch here: the benchmarks' machine description imports it too.
"""

from __future__ import annotations

import platform


def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC", "Intel(R) Xeon(R) Platinum 8488C") from /proc/cpuinfo, else what
    the platform module knows (often only "x86_64")."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
