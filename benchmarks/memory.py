"""Worker memory of the running service, with and without the shared ONNX Runtime arena (SYNTHGEN_ORT_ARENA),
and with the arena, model calls in row parts or as one call (SYNTHGEN_ORT_PART_ROWS).

    python -m benchmarks.memory                          # the shipped zoo, about 1.5 minutes on 2 cores
    python -m benchmarks.memory --exported DIR --out bench-results/memory.json
    python -m benchmarks.memory --quick                  # small requests, a smoke run (tests/test_benchmarks.py)

For each setting: `bentoml serve` on loopback with the zoo, then the resident memory (RSS) of its worker
processes, idle; after one npz request of n=1024 to every model; after three of n=10,000 to the model with
the largest images (and the seconds those three took). With the arena, every model of a worker draws from one
arena that keeps about the largest model call's memory (SYNTHGEN_BATCH_ROWS bounds a call's rows; in row
parts, the working memory of the parts running at once); without it, each call's memory goes back to the OS
when the call ends. Prints a Markdown table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

from service.config import Settings

from .common import fmt, machine, machine_line, table
from .serving import start_server

REPO = Path(__file__).resolve().parent.parent
# (SYNTHGEN_ORT_ARENA, SYNTHGEN_ORT_PART_ROWS) of each measured server: no arena; the shared arena with one call
# on all threads per model call; the shared arena with calls in row parts (both service defaults).
SETTINGS = ((False, Settings.ort_part_rows), (True, 0), (True, Settings.ort_part_rows))


def generate(client: httpx.Client, dataset: str, model: str, n: int) -> None:
    response = client.post("/generate", json={"dataset": dataset, "model": model, "n": n, "seed": 0})
    if response.status_code != 200:
        raise RuntimeError(f"{dataset}/{model} n={n}: HTTP {response.status_code} {response.text[:300]}")


def measure(exported: Path, arena: bool, part_rows: int, workdir: Path, n_each: int, n_large: int,
            repeats: int = 3) -> dict:
    server = start_server(workdir, exported, SYNTHGEN_ORT_ARENA=str(int(arena)), SYNTHGEN_ORT_PART_ROWS=str(part_rows))
    try:
        with httpx.Client(base_url=server.url, timeout=600) as client:
            models = client.get("/models").json()["models"]
            largest = max(models, key=lambda m: m["image_shape"][0] * m["image_shape"][1] * m["image_shape"][2])
            idle = server.worker_rss()
            for m in models:
                generate(client, m["dataset"], m["model"], n_each)
            after_each = server.worker_rss()
            started = time.perf_counter()
            for _ in range(repeats):
                generate(client, largest["dataset"], largest["model"], n_large)
            large_s = time.perf_counter() - started
            after_large = server.worker_rss()
    finally:
        server.stop()
    return {"arena": arena, "part_rows": part_rows, "models": len(models), "largest": f"{largest['dataset']}/{largest['model']}",
            "n_each": n_each, "n_large": n_large, "repeats": repeats, "rss_idle": idle,
            "rss_after_each": after_each, "rss_after_large": after_large, "large_s": large_s}


def format_rows(rows: list[dict]) -> str:
    first, mib = rows[0], 2**20
    headers = ["arena", "row parts", "models", "RSS idle MiB", f"after n={first['n_each']} to each, MiB",
               f"after {first['repeats']} x n={first['n_large']} to {first['largest']}, MiB", "their seconds"]
    return table(headers, [["shared" if r["arena"] else "off", r["part_rows"] or "off (one call)", r["models"], fmt(r["rss_idle"] / mib, 0),
                            fmt(r["rss_after_each"] / mib, 0), fmt(r["rss_after_large"] / mib, 0), fmt(r["large_s"], 1)]
                           for r in rows])


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exported", type=Path, default=REPO / "exported", help="zoo folder (default: exported/)")
    parser.add_argument("--out", default="bench-results/memory.json", help="JSON results (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="n=16 each and n=64 for the largest model")
    args = parser.parse_args(argv)
    n_each, n_large = (16, 64) if args.quick else (1024, 10_000)
    with tempfile.TemporaryDirectory(prefix="synthgen-memory-") as tmp:
        rows = [measure(args.exported.resolve(), arena, part_rows, Path(tmp) / f"arena{int(arena)}-parts{part_rows}",
                        n_each, n_large) for arena, part_rows in SETTINGS]
    info = machine()
    print(f"Machine: {machine_line(info)}\n\n{format_rows(rows)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    print(f"\nresults: {out}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
