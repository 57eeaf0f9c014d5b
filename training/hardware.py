"""The name of the machine a run or a benchmark used, for checkpoints, model cards and benchmark JSON.

No torch at import: the benchmarks' machine description imports this module too (`hardware_name` imports torch
when called).
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


def hardware_name(device) -> str:
    """The hardware a training run or an evaluation used, as checkpoints and cards record it: the GPU's name, or
    "CPU <model> (<torch's vector ISA>) x<threads> threads" for a `torch.device` of type cpu."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()} ({torch.backends.cpu.get_cpu_capability()}) x{torch.get_num_threads()} threads"
