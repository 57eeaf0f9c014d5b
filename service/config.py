"""Run-time settings of the service, all read from environment variables once at start-up.

    variable                   meaning                                     default
    SYNTHGEN_EXPORTED_DIR      folder holding manifest.json                exported/ next to service/
    SYNTHGEN_BACKEND           onnxruntime | torchscript                   onnxruntime
    SYNTHGEN_DEVICE            torchscript device: cpu, cuda or cuda:N     cuda when available, else cpu
                               (torchscript only; cuda must be there)
    SYNTHGEN_MAX_N             largest n of one /generate                  10000
    SYNTHGEN_MAX_STEPS         largest steps of one /interpolate           256
    SYNTHGEN_MAX_BODY_BYTES    largest request body (413 above)            1048576 (1 MiB)
    SYNTHGEN_BATCH_ROWS        most rows of one model call (merge/split    1024
                               unit)
    SYNTHGEN_CALL_MS           a model call takes at most about this       50
                               long: large requests of a slow model run
                               as several calls, so that other requests
                               wait less (0: always SYNTHGEN_BATCH_ROWS)
    SYNTHGEN_WORKERS           server processes, each loads every model    1
    SYNTHGEN_ORT_THREADS       ONNX Runtime intra-op threads per worker    usable CPUs (affinity, capped by
                               (each worker may use every CPU for one      a cgroup v2 or v1 CPU quota)
                               large call; several workers' calls share)
    SYNTHGEN_ORT_PART_ROWS     ONNX Runtime calls of more rows run in      128
                               parts side by side, one thread each
                               (0: one call on all the threads)
    SYNTHGEN_ORT_SPINNING      1: idle ONNX Runtime threads spin (faster    1
                               large calls; 0 where idle CPU is billed)
    SYNTHGEN_ORT_ARENA         1: the models share one ONNX Runtime arena   1
                               (faster large calls; RSS keeps about the
                               largest call's memory); 0: none
    SYNTHGEN_MEMORY_BUDGET_MB  image memory of a worker's requests in      1024 (further requests wait)
                               flight, held until each answer is sent
    SYNTHGEN_SEND_TIMEOUT_S    a client must take each MiB of an answer    30
                               within this, or its connection is dropped
    SYNTHGEN_API_TOKEN         bearer token for the API routes             unset: no auth

A malformed value fails start-up with a message naming the variable (never a silent fallback).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_EXPORTED_DIR = Path(__file__).resolve().parent.parent / "exported"
BACKENDS = ("onnxruntime", "torchscript")
REQUEST_TIMEOUT_S = 300  # a request without its answer by then gets a 504 (BentoML's traffic timeout)


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the environment variable."""


def _cpu_quota() -> float | None:
    """The container's CPU limit in CPUs, from cgroup v2 (cpu.max) or v1 (cpu.cfs_quota_us); None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _cpu_count() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (a container's limit)."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    quota = _cpu_quota()
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def _int(env: dict, name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={value} is outside {low}..{high}")
    return value


def _flag(env: dict, name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw not in ("0", "1", "true", "false"):
        raise ConfigError(f"{name}={raw!r} is not one of 0, 1, true, false")
    return raw in ("1", "true")


def _token(env: dict, name: str) -> str | None:
    """The bearer token, without the surrounding whitespace a secret file often ends with (a trailing newline
    would make every request a 401). Set but blank is refused: auth must not turn off because a secret is empty."""
    if name not in env:
        return None
    token = env[name].strip()
    if not token:
        raise ConfigError(f"{name} is set but blank; give a token, or unset it to serve without authentication")
    return token


@dataclass(frozen=True)
class Settings:
    exported_dir: Path = DEFAULT_EXPORTED_DIR
    backend: str = "onnxruntime"
    device: str | None = None
    max_n: int = 10_000
    max_steps: int = 256
    max_body_bytes: int = 1 << 20
    batch_rows: int = 1024
    call_ms: int = 50
    workers: int = 1
    ort_threads: int = field(default_factory=_cpu_count)
    ort_part_rows: int = 128
    ort_spinning: bool = True
    ort_arena: bool = True
    memory_budget_bytes: int = 1 << 30
    send_timeout_s: int = 30
    api_token: str | None = None

    @classmethod
    def from_env(cls, env: dict | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        backend = env.get("SYNTHGEN_BACKEND", "").strip().lower() or cls.backend
        if backend not in BACKENDS:
            raise ConfigError(f"SYNTHGEN_BACKEND={backend!r} is not one of {', '.join(BACKENDS)}")
        exported = env.get("SYNTHGEN_EXPORTED_DIR", "").strip()
        device = env.get("SYNTHGEN_DEVICE", "").strip().lower() or None
        if device is not None and backend != "torchscript":
            raise ConfigError(f"SYNTHGEN_DEVICE={device!r} picks the torchscript backend's device; SYNTHGEN_BACKEND is "
                              f"{backend} (ONNX Runtime here runs on the CPU): unset SYNTHGEN_DEVICE or set "
                              "SYNTHGEN_BACKEND=torchscript")
        if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
            raise ConfigError(f"SYNTHGEN_DEVICE={device!r} is not cpu, cuda or cuda:N")
        if backend == "torchscript" and importlib.util.find_spec("torch") is None:
            raise ConfigError("SYNTHGEN_BACKEND=torchscript needs torch, which is not installed here (pip install "
                              "torch, or the .[train] extra); the default onnxruntime backend does not")
        return cls(
            exported_dir=Path(exported).expanduser().resolve() if exported else DEFAULT_EXPORTED_DIR,
            backend=backend,
            device=device,
            max_n=_int(env, "SYNTHGEN_MAX_N", cls.max_n, 1, 1_000_000),
            max_steps=_int(env, "SYNTHGEN_MAX_STEPS", cls.max_steps, 2, 10_000),
            max_body_bytes=_int(env, "SYNTHGEN_MAX_BODY_BYTES", cls.max_body_bytes, 1024, 1 << 30),
            batch_rows=_int(env, "SYNTHGEN_BATCH_ROWS", cls.batch_rows, 1, 1_000_000),
            call_ms=_int(env, "SYNTHGEN_CALL_MS", cls.call_ms, 0, 60_000),
            workers=_int(env, "SYNTHGEN_WORKERS", cls.workers, 1, 64),
            ort_threads=_int(env, "SYNTHGEN_ORT_THREADS", _cpu_count(), 1, 1024),
            ort_part_rows=_int(env, "SYNTHGEN_ORT_PART_ROWS", cls.ort_part_rows, 0, 1_000_000),
            ort_spinning=_flag(env, "SYNTHGEN_ORT_SPINNING", cls.ort_spinning),
            ort_arena=_flag(env, "SYNTHGEN_ORT_ARENA", cls.ort_arena),
            memory_budget_bytes=_int(env, "SYNTHGEN_MEMORY_BUDGET_MB", cls.memory_budget_bytes >> 20, 64, 1 << 20) << 20,
            send_timeout_s=_int(env, "SYNTHGEN_SEND_TIMEOUT_S", cls.send_timeout_s, 1, 3600),
            api_token=_token(env, "SYNTHGEN_API_TOKEN"),
        )


@functools.cache
def current() -> Settings:
    """The settings of this process, read once (schemas need max_n when they are defined)."""
    return Settings.from_env()
