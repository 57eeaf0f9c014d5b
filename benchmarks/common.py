"""Timing helpers, the machine description and Markdown tables shared by the benchmarks."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

from training.hardware import cpu_model


def machine() -> dict:
    """What the numbers were measured on: CPU, cores, load, library versions."""
    import numpy
    import onnxruntime
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }
    try:
        import bentoml

        info["bentoml"] = bentoml.__version__
    except ImportError:
        pass
    return info


def machine_line(info: dict) -> str:
    load = "/".join(f"{x:.1f}" for x in info["loadavg_at_start"])
    return (f"{info['cpu']}, {info['usable_cpus']} usable of {info['logical_cpus']} logical CPUs, load average "
            f"{load} at start; Python {info['python']}, torch {info['torch']} ({info['torch_threads']} threads), "
            f"onnxruntime {info['onnxruntime']}, bentoml {info.get('bentoml', '-')}, numpy {info['numpy']}")


def interleaved(fns: dict[str, Callable[[], object]], min_rounds: int = 3, min_s: float = 1.0,
                max_rounds: int = 1000, max_s: float = 30.0, warmup: bool = True,
                lead_in: bool = False) -> dict[str, list[float]]:
    """Seconds of each call of several functions called in turn (a, b, c, a, b, c, ...), so that drifts of a
    shared machine's speed hit all of them alike and their ratios stay meaningful: at least min_rounds rounds
    and min_s seconds, unless max_rounds rounds or max_s seconds come first (one round at least).
    lead_in: one untimed call of the same function right before every timed one, so the timed call runs in
    that function's steady state (its own threads warm) and not against threads still spinning after another
    function's call."""
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while True:
        for name, fn in fns.items():
            if lead_in:
                fn()
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        rounds += 1
        spent = time.perf_counter() - start
        if rounds >= max_rounds or spent >= max_s or (rounds >= min_rounds and spent >= min_s):
            return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): an observed value, never interpolated."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100)
    return ordered[int(rank) - 1]


def fmt(value: float | None, digits: int | None = None) -> str:
    """Numbers for tables: 3 significant figures-ish, thousands separated."""
    if value is None or value != value:
        return "-"
    if digits is not None:
        return f"{value:,.{digits}f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    numeric = [all(_numeric(r[i]) for r in cells) if cells else False for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if numeric[i] else "---" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    text = text.replace(",", "").replace("x", "").replace("%", "").strip()
    if text in ("-", ""):
        return True
    try:
        float(text)
        return True
    except ValueError:
        return False
