"""Load: 32 concurrent clients on loopback for 20 s, mixed formats, sizes, models and a few bad requests.

Zero errors (no 5xx, no 503, no connection failures, every 200 decodes to what was asked), and the server's
RSS grows by less than 50 MB between the end of a warm-up round of the same mix and the end of the load.
A dedicated server, so the measurement sees only this traffic.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time

import httpx
import pytest

from service import encoders
from service_harness import start

pytestmark = pytest.mark.slow
CLIENTS = 32
LOAD_S = 20
WARMUP_S = 5
MAX_RSS_GROWTH = 50 * 2**20

SMALL = [("mnist", "cdcgan"), ("mnist", "mlp_vae"), ("pneumoniamnist", "cvae"), ("bloodmnist_64", "dcgan")]


def next_request(rng: random.Random) -> tuple[str, dict, int]:
    """(route, body, expected status) drawn from the mix: mostly small requests, some large, some invalid."""
    roll = rng.random()
    dataset, model = rng.choice(SMALL)
    if roll < 0.05:
        return "/generate", {"dataset": dataset, "n": 0}, 400
    if roll < 0.08:
        return "/generate", {"dataset": "cifar10"}, 404
    if roll < 0.13:
        return "/interpolate", {"dataset": dataset, "model": model, "steps": 8, "seed_start": rng.randrange(99),
                                "format": rng.choice(["png_grid", "npz"])}, 200
    if roll < 0.18:
        return "/generate", {"dataset": dataset, "model": model, "n": 1024, "seed": rng.randrange(99)}, 200
    n = rng.choice([1, 1, 1, 1, 2, 4, 16, 64, 256])
    fmt = rng.choice(["npz", "npz", "npz", "png_grid", "zip", "json"] if n <= 64 else ["npz", "zip"])
    return "/generate", {"dataset": dataset, "model": model, "n": n, "seed": rng.randrange(10**6), "format": fmt}, 200


def checked(route: str, body: dict, expected: int, response: httpx.Response) -> str | None:
    """None when the answer is right, else what is wrong."""
    if response.status_code != expected:
        return f"{route} {body}: {response.status_code} {response.text[:200]}"
    if expected == 200 and body.get("format", "npz") == "npz":
        images = encoders.decode_npz(response.content).images
        if len(images) != body.get("n", body.get("steps")):
            return f"{route} {body}: {len(images)} images"
    return None


async def run_load(url: str, seconds: float, seed: int) -> tuple[collections.Counter, list[str]]:
    counts, problems = collections.Counter(), []
    deadline = time.monotonic() + seconds

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            while time.monotonic() < deadline:
                route, body, expected = next_request(rng)
                try:
                    response = await http.post(route, json=body)
                except httpx.HTTPError as exc:
                    problems.append(f"{route} {body}: {type(exc).__name__} {exc}")
                    continue
                counts[response.status_code] += 1
                if (problem := checked(route, body, expected, response)) is not None:
                    problems.append(problem)

    await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    return counts, problems


def test_32_clients_for_20_s_get_no_errors_and_rss_stays_flat(exported_dir, tmp_path):
    server = start(tmp_path, SYNTHGEN_EXPORTED_DIR=str(exported_dir))
    try:
        warm_counts, warm_problems = asyncio.run(run_load(server.url, WARMUP_S, seed=1))
        assert not warm_problems, warm_problems[:5]
        rss_before = server.worker_rss()
        counts, problems = asyncio.run(run_load(server.url, LOAD_S, seed=2))
        time.sleep(1)
        rss_after = server.worker_rss()
        assert httpx.get(f"{server.url}/readyz").status_code == 200
    finally:
        server.stop()
    print(f"load: {sum(counts.values())} requests in {LOAD_S} s {dict(counts)}; "
          f"RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
    assert not problems, problems[:10]
    assert counts[200] > 100 and not any(status >= 500 for status in counts)
    assert rss_after - rss_before < MAX_RSS_GROWTH, (rss_before, rss_after)
