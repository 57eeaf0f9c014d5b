"""Serving benchmarks: in-process baselines (torch eager, ONNX Runtime) and the running service over HTTP.

In-process: the generator as exported (`training.export.inference_module`: generate + clamp) in torch eager
under inference_mode, and the ONNX Runtime session with the service's own options (`OnnxRuntimeRunner`:
the service's thread count, row parts, spinning and arena settings, read from the same environment as the
server); both get the same thread count (the service default: usable CPUs). Where the service
splits calls into row parts (SYNTHGEN_ORT_PART_ROWS), a third baseline is the plain ORT session making one
call on all the threads (`onnxruntime_one_call`), so the table shows what the split gains. Calls alternate,
so drift hits all alike, each timed right after an untimed call of its own (LEAD_IN) so that none runs
against the threads still spinning after another. images/s = n / median call.

HTTP: `bentoml serve` on 127.0.0.1 with the benchmark zoo and default settings, driven by an asyncio loop of
httpx clients on the same machine (client CPU competes with the server: that is the loopback setup the issue
asks for). Each cell: a warm-up (one n=1 request per client, then one at the cell's n), then every client
sends its next request as soon as its last one is answered until the cell's time is up, and at least one
request per client (so a cell of 16 clients at n=1024 is at least 16 x 1024 images). Answers are read in full
and checked (200, X-Count == n). req/s and images/s = completed requests / wall time of the cell; p50/p99
are nearest-rank percentiles of per-request latencies (send to last byte read).

The n=1024 npz targets use a separate paired run: one HTTP request (sync httpx client), one in-process ORT
call, one in-process torch call, in turn (each with its lead-in call), several rounds, so the ratios come from the
same minutes.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from .common import interleaved, median, percentile

REPO = Path(__file__).resolve().parent.parent
NS = (1, 64, 1024)
# Every timed in-process or paired call comes right after an untimed call of the same function (`interleaved`'s
# lead_in). On 2 cores, threads spinning after one call take the CPU from the next: an n=1024 MLP GAN torch call
# took 25.7 ms right after a spinning ORT call against 12-13 ms after its own, so without the lead-in call the
# ratios depended on the order of the calls (benchmarks/README.md, 2026-12-03).
LEAD_IN = True
FORMATS = ("npz", "png_grid")
CLIENTS = (1, 16)


@dataclass
class Baselines:
    """In-process callables of one model: torch eager, the service's ORT runner and (where the runner splits
    calls into row parts) a plain one-call ORT session, each taking (z, labels)."""

    dataset: str
    model: str
    latent_dim: int
    num_classes: int
    conditional: bool
    torch_fn: object
    ort_fn: object
    ort_one_call_fn: object | None = None

    def inputs(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        from service.sampling import latents

        return latents(seed, n, self.latent_dim), np.arange(n, dtype=np.int64) % self.num_classes


def load_baselines(exported: Path, runs: Path, threads: int, spinning: bool, arena: bool,
                   part_rows: int) -> list[Baselines]:
    """One `Baselines` per served model of the zoo; torch uses `threads` intra-op threads, as ORT does."""
    import torch

    from service.backends import OnnxRuntimeRunner
    from service.catalog import load_catalog
    from training.export import inference_module
    from training.train import load_checkpoint

    torch.set_num_threads(threads)
    out = []
    for entry in load_catalog(exported, "onnxruntime").usable():
        card = entry.card
        runner = OnnxRuntimeRunner(entry.model_path, card, threads, spinning, arena, part_rows)
        one_call = OnnxRuntimeRunner(entry.model_path, card, threads, spinning, arena, 0) if runner.part_rows else None
        model, _ = load_checkpoint(runs / entry.dataset / entry.model)
        module = inference_module(model)

        def torch_fn(z, labels, module=module, conditional=card.conditional):
            with torch.inference_mode():
                args = (torch.from_numpy(z), torch.from_numpy(labels)) if conditional else (torch.from_numpy(z),)
                return module(*args).numpy()

        out.append(Baselines(entry.dataset, entry.model, card.latent_dim, card.num_classes, card.conditional,
                             torch_fn, runner.run, one_call.run if one_call else None))
    return out


def bench_in_process(models: list[Baselines], ns=NS, min_s: float = 1.0, max_s: float = 20.0,
                     log=print) -> list[dict]:
    rows = []
    for m in models:
        for n in ns:
            z, labels = m.inputs(n)
            calls = {"torch_eager": lambda: m.torch_fn(z, labels)}
            if m.ort_one_call_fn is not None:
                calls["onnxruntime_one_call"] = lambda: m.ort_one_call_fn(z, labels)
            calls["onnxruntime"] = lambda: m.ort_fn(z, labels)
            times = interleaved(calls, min_rounds=3, min_s=min_s, max_s=max_s, lead_in=LEAD_IN)
            for backend, t in times.items():
                rows.append({"dataset": m.dataset, "model": m.model, "backend": backend, "n": n, "calls": len(t),
                             "median_ms": median(t) * 1e3, "images_per_s": n / median(t)})
            log(f"in-process {m.dataset}/{m.model} n={n}: torch {n / median(times['torch_eager']):,.0f} img/s, "
                f"ORT {n / median(times['onnxruntime']):,.0f} img/s")
    return rows


# ---------------------------------------------------------------------------------------------- HTTP


def start_server(workdir: Path, exported: Path, **settings: str):
    """`bentoml serve` on a free loopback port with this zoo (the test harness's way); returns its Server."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from service_harness import start
    finally:
        sys.path.remove(str(REPO / "tests"))
    return start(workdir, wait_s=120, SYNTHGEN_EXPORTED_DIR=str(exported), **settings)


def _check(response: httpx.Response, n: int | None) -> bool:
    if response.status_code != 200:
        return False
    return n is None or response.headers.get("x-count") == str(n)


async def _load(url: str, method: str, path: str, body: dict | None, n: int | None, clients: int,
                duration_s: float, max_requests: int) -> dict:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        async def one(seed: int) -> tuple[float, bool]:
            payload = None if body is None else {**body, "seed": seed}
            t = time.perf_counter()
            response = await client.request(method, path, json=payload)
            await response.aread()
            return time.perf_counter() - t, _check(response, n)

        # Warm-up: every connection opened with a cheap request (n=1 for /generate), then one at this size.
        warm = {"n": 1} if body is not None else {}
        async def cheap(seed: int) -> None:
            payload = None if body is None else {**body, **warm, "seed": seed}
            (await client.request(method, path, json=payload)).raise_for_status()

        await asyncio.gather(*(cheap(i) for i in range(clients)))
        await one(0)
        latencies: list[float] = []  # of good answers only: a failed request is no image served
        errors = 0
        issued = 0
        start = time.perf_counter()
        deadline = start + duration_s

        async def worker() -> None:
            nonlocal issued, errors
            while issued < max_requests and (time.perf_counter() < deadline or issued < clients):
                issued += 1
                latency, ok = await one(issued)
                if ok:
                    latencies.append(latency)
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    done = len(latencies)
    return {"requests": done, "errors": errors, "wall_s": wall, "requests_per_s": done / wall,
            "images_per_s": done * (n or 0) / wall, "p50_ms": percentile(latencies, 50) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3, "mean_ms": sum(latencies) / done * 1e3 if done else float("nan"),
            "p99_is_slowest": done < 100}  # nearest rank: below 100 requests the p99 is simply the slowest one


def load(url: str, body: dict | None, n: int | None, clients: int, duration_s: float, max_requests: int = 5000,
         method: str = "POST", path: str = "/generate") -> dict:
    return asyncio.run(_load(url, method, path, body, n, clients, duration_s, max_requests))


def bench_http(url: str, models: list[tuple[str, str]], ns=NS, formats=FORMATS, clients=CLIENTS,
               duration_s: float = 1.5, log=print) -> list[dict]:
    rows = []
    for dataset, model in models:
        for n in ns:
            for fmt in formats:
                for c in clients:
                    body = {"dataset": dataset, "model": model, "n": n, "format": fmt}
                    result = load(url, body, n, c, duration_s)
                    rows.append({"dataset": dataset, "model": model, "n": n, "format": fmt, "clients": c, **result})
                    log(f"http {dataset}/{model} n={n} {fmt} x{c}: {result['requests_per_s']:,.1f} req/s, "
                        f"{result['images_per_s']:,.0f} img/s, p50 {result['p50_ms']:.1f} ms, "
                        f"p99 {result['p99_ms']:.1f} ms ({result['requests']} requests, {result['errors']} errors)")
    return rows


SMALL_EVERY_S = 0.02  # the mixed benchmark's n=1 requests: 50 a second, a small share of what one worker serves


async def _mixed(url: str, small: tuple[str, str], bulk: tuple[str, str], bulk_n: int, duration_s: float) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        stop, latencies, bulk_done, errors = False, [], 0, 0

        async def post(model: tuple[str, str], n: int, seed: int) -> bool:
            response = await client.post("/generate", json={"dataset": model[0], "model": model[1], "n": n,
                                                            "seed": seed})
            await response.aread()
            return _check(response, n)

        async def bulk_loop() -> None:
            nonlocal bulk_done, errors
            seed = 0
            while not stop:
                seed += 1
                ok = await post(bulk, bulk_n, seed)
                errors += not ok
                bulk_done += ok  # a failed request is no images served

        async def small_one(seed: int) -> None:
            nonlocal errors
            t = time.perf_counter()
            if await post(small, 1, seed):
                latencies.append(time.perf_counter() - t)
            else:
                errors += 1

        async def small_loop() -> None:
            # Open loop: a request every SMALL_EVERY_S whether or not the last has answered, so each arrives at
            # a moment independent of the bulk work (a closed loop would send most of its requests in the gaps
            # between bulk calls and report those).
            pending, seed = [], 0
            while not stop:
                seed += 1
                pending.append(asyncio.create_task(small_one(seed)))
                await asyncio.sleep(SMALL_EVERY_S)
            await asyncio.gather(*pending)

        await post(small, 1, 0)
        await post(bulk, bulk_n, 0)
        tasks = [asyncio.create_task(bulk_loop()), asyncio.create_task(small_loop())]
        start = time.perf_counter()
        await asyncio.sleep(duration_s)
        stop = True
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return {"small": f"{small[0]}/{small[1]}", "bulk": f"{bulk[0]}/{bulk[1]}", "bulk_n": bulk_n,
            "small_requests": len(latencies), "small_p50_ms": percentile(latencies, 50) * 1e3,
            "small_p99_ms": percentile(latencies, 99) * 1e3, "bulk_images_per_s": bulk_done * bulk_n / wall,
            "errors": errors}


def bench_mixed(url: str, small: tuple[str, str], bulk: tuple[str, str], bulk_n: int = 1024,
                duration_s: float = 10.0, log=print) -> dict:
    """n=1 requests of one model (50 a second, open loop) while another client streams bulk requests of
    another model: what a small request waits for behind a large one (every model shares the
    worker's inference thread; SYNTHGEN_CALL_MS bounds each call of a large request)."""
    row = asyncio.run(_mixed(url, small, bulk, bulk_n, duration_s))
    log(f"mixed: {row['small']} n=1 p50 {row['small_p50_ms']:.1f} ms, p99 {row['small_p99_ms']:.1f} ms while "
        f"{row['bulk']} n={bulk_n} streams at {row['bulk_images_per_s']:,.0f} img/s ({row['errors']} errors)")
    return row


def bench_http_floor(url: str, clients=CLIENTS, duration_s: float = 1.0) -> list[dict]:
    """The HTTP stack alone: GET /livez (no model, no body) from the same client loop."""
    return [{"route": "GET /livez", "clients": c, **load(url, None, None, c, duration_s, method="GET", path="/livez")}
            for c in clients]


def bench_paired(url: str, models: list[Baselines], n: int = 1024, fmt: str = "npz", min_rounds: int = 5,
                 min_s: float = 4.0, max_s: float = 40.0, log=print) -> list[dict]:
    """HTTP generate, in-process ORT and in-process torch eager at the same n, called in turn."""
    rows = []
    with httpx.Client(base_url=url, timeout=600) as client:
        for m in models:
            z, labels = m.inputs(n)
            body = {"dataset": m.dataset, "model": m.model, "n": n, "format": fmt, "seed": 0}
            bad = []

            def http_call():
                response = client.post("/generate", json=body)
                if not _check(response, n):
                    bad.append(response.status_code)

            times = interleaved({"http": http_call, "onnxruntime": lambda: m.ort_fn(z, labels),
                                 "torch_eager": lambda: m.torch_fn(z, labels)}, min_rounds=min_rounds, min_s=min_s,
                                max_s=max_s, lead_in=LEAD_IN)
            med = {k: median(v) for k, v in times.items()}
            row = {"dataset": m.dataset, "model": m.model, "n": n, "format": fmt, "rounds": len(times["http"]),
                   "errors": len(bad), **{f"{k}_median_ms": v * 1e3 for k, v in med.items()},
                   **{f"{k}_images_per_s": n / v for k, v in med.items()},
                   "http_vs_onnxruntime": med["onnxruntime"] / med["http"],
                   "http_vs_torch_eager": med["torch_eager"] / med["http"]}
            rows.append(row)
            log(f"paired {m.dataset}/{m.model} n={n} {fmt}: HTTP {row['http_images_per_s']:,.0f} img/s = "
                f"{row['http_vs_onnxruntime']:.2f}x ORT, {row['http_vs_torch_eager']:.2f}x torch eager")
    return rows


# ----------------------------------------------------------------------------- HTTP with a compiled client

WRK_SCRIPT = """
local counter = 0
local prefix = '{"dataset": "%s", "model": "%s", "n": 1, "format": "npz", "seed": '
request = function()
  counter = counter + 1
  return wrk.format("POST", "/generate", {["Content-Type"] = "application/json"}, prefix .. counter .. "}")
end
done = function(summary, latency, requests)
  local errors = summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format('{"requests": %d, "errors": %d, "wall_s": %.6f, "p50_ms": %.4f, "p99_ms": %.4f, "mean_ms": %.4f}\\n',
    summary.requests, errors, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, latency.mean / 1e3))
end
"""


def wrk_available() -> bool:
    import shutil

    return shutil.which("wrk") is not None


def bench_wrk(url: str, models: list[tuple[str, str]], clients=CLIENTS, duration_s: float = 3.0, workdir: Path | None = None,
              rounds: int = 3, log=print) -> list[dict]:
    """n=1 npz at 1 and 16 connections with wrk (apt install wrk): a C client that needs ~0.1 ms of CPU per
    request where the Python loop needs ~2 ms, so on a 2-core box the server, not the client, is measured.
    Each request carries a new seed; non-2xx answers count as errors. The connection counts alternate for
    `rounds` rounds, and each cell reports its median round (by req/s), so a ratio of two cells does not hang
    on one window of a shared machine's drift; `rounds_requests_per_s` keeps every round."""
    import json
    import subprocess
    import tempfile

    rows = []
    for dataset, model in models:
        with tempfile.NamedTemporaryFile("w", suffix=".lua", dir=workdir, delete=False) as f:
            f.write(WRK_SCRIPT.replace("%s", dataset, 1).replace("%s", model, 1))
            script = f.name
        try:
            by_clients: dict[int, list[dict]] = {c: [] for c in clients}
            for _ in range(rounds):
                for c in clients:
                    seconds = max(1, round(duration_s))
                    run = subprocess.run(["wrk", "-t1", f"-c{c}", f"-d{seconds}s", "--latency", "-s", script, url],
                                         capture_output=True, text=True)
                    try:
                        result = json.loads(run.stdout.strip().splitlines()[-1])
                    except (IndexError, ValueError):
                        raise RuntimeError(f"wrk exited {run.returncode} without its summary: {run.stderr.strip()[-500:]}") from None
                    result["requests_per_s"] = result["requests"] / result["wall_s"]
                    by_clients[c].append(result)
        finally:
            Path(script).unlink()
        for c, results in by_clients.items():
            ordered = sorted(results, key=lambda r: r["requests_per_s"])
            result = {**ordered[(len(ordered) - 1) // 2], "rounds": len(results),
                      "rounds_requests_per_s": [r["requests_per_s"] for r in results],
                      "errors": sum(r["errors"] for r in results)}
            result["images_per_s"] = result["requests_per_s"]
            rows.append({"dataset": dataset, "model": model, "n": 1, "format": "npz", "clients": c, "client": "wrk", **result})
            log(f"wrk {dataset}/{model} n=1 npz x{c}: {result['requests_per_s']:,.1f} req/s, p50 {result['p50_ms']:.2f} ms, "
                f"p99 {result['p99_ms']:.2f} ms (median round: {result['requests']} requests; all rounds: "
                f"{result['errors']} errors)")
    return rows
