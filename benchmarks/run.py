"""Run the serving and training benchmarks; print Markdown tables and write JSON.

    python -m benchmarks.run                          # full run (a few minutes), JSON to bench-results/bench.json
    python -m benchmarks.run --quick                  # smoke run: tiny models and sizes, numbers not meaningful
    python -m benchmarks.run --parts serving --out bench-results/serving.json
    python -m benchmarks.run --parts training --device cuda --out bench-results/gpu.json   # on a GPU host

The training part needs torch (and torchvision) only, so it runs on a GPU host without the serving stack.

Tables go to stdout (paste them into the README), progress to stderr. Everything is measured in this one run
on this machine: the benchmark trains its own zoo (1 step on random data, the shipped sizes) in a temp dir,
starts its own `bentoml serve` on 127.0.0.1, and reads MNIST from --data-dir for the training benchmark
(random data of the same shape when it is not there; BloodMNIST-64 is always random data of its shape).
Absolute numbers on a shared machine drift: compare the ratios, which come from interleaved measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import training_bench
from .common import fmt, machine, machine_line, table
from .zoo import SERVING_MODELS

REPO = Path(__file__).resolve().parent.parent
PARTS = ("serving", "training")

# Targets of the issue.
HTTP_VS_ORT = 0.9
HTTP_VS_TORCH = 1.5
P50_N1_MS = 5.0
CONCURRENCY_GAIN = 3.0
TRAINING_GAIN = 3.0  # on CPU
GPU_TRAINING_IMAGES_PER_S = 100_000  # MNIST cDCGAN


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_data_dir() -> str | None:
    for candidate in (os.environ.get("SYNTHGEN_DATA_DIR"), REPO / "data", REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "MNIST" / "raw").is_dir():
            return str(candidate)
    return None


def settings(quick: bool, parts=PARTS) -> dict:
    """Sizes and durations of a run; the serving ones only when it benchmarks serving, whose module needs the
    serving stack (httpx, BentoML): the training part runs without it, on a GPU host with torch alone."""
    cfg = dict(train_steps=1, train_width=8, n_random=256) if quick else dict(train_steps=6, train_width=None,
                                                                               n_random=4096)
    if "serving" in parts:
        from . import serving

        if quick:
            cfg.update(ns=(1, 64), clients=(1, 2), formats=serving.FORMATS, http_s=0.2, in_process_s=0.05,
                       paired_n=64, paired_rounds=3, paired_s=0.1, mixed_s=0.5)
        else:
            cfg.update(ns=serving.NS, clients=serving.CLIENTS, formats=serving.FORMATS, http_s=1.5, in_process_s=1.0,
                       paired_n=1024, paired_rounds=5, paired_s=4.0, mixed_s=10.0)
    return cfg


def run(quick: bool = False, parts=PARTS, data_dir: str | None = None, serving_models=SERVING_MODELS,
        training_models=training_bench.TRAINING_MODELS, workdir: Path | None = None, device: str = "cpu",
        out: Path | None = None) -> dict:
    """All benchmarks of `parts`; returns the results (what --out holds). device: where training runs. With `out`,
    the results so far are written there after each part ("partial": true until the end), so a failure in a
    later part keeps the earlier ones."""
    cfg = settings(quick, parts)
    t_start = time.perf_counter()
    result: dict = {"format": "synthgen-bench/1", "quick": quick, "machine": machine(), "settings": cfg,
                    "wall_s": {}}
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="synthgen-bench-")))
        if "serving" in parts:
            result["serving"] = bench_serving(workdir, cfg, quick, serving_models, result["wall_s"])
            if out is not None:
                write_json(out, {**result, "partial": True})
        if "training" in parts:
            t = time.perf_counter()
            result["training"] = training_bench.bench_training(
                training_models, steps=cfg["train_steps"], data_dir=None if quick else data_dir,
                n_random=cfg["n_random"], width=cfg["train_width"], compile=not quick,
                data_parallel=1 if quick else min(2, result["machine"]["usable_cpus"]), device=torch.device(device),
                log=log)
            result["wall_s"]["training"] = time.perf_counter() - t
    result["targets"] = targets(result)
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"]["total"] = time.perf_counter() - t_start
    if out is not None:
        write_json(out, result)
    return result


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def bench_serving(workdir: Path, cfg: dict, quick: bool, models, wall: dict) -> dict:
    from service.config import Settings

    from . import serving
    from .zoo import build_zoo

    t = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the trainer prints its epoch rows
        exported = build_zoo(workdir, quick=quick, models=models, log=log)
    wall["zoo"] = time.perf_counter() - t

    service = Settings.from_env()  # the service's settings, as `bentoml serve` below reads them from this env
    threads = service.ort_threads
    t = time.perf_counter()
    baselines = serving.load_baselines(exported, workdir / "runs", threads, service.ort_spinning, service.ort_arena,
                                       service.ort_part_rows)
    in_process = serving.bench_in_process(baselines, cfg["ns"], min_s=cfg["in_process_s"], log=log)
    wall["in_process"] = time.perf_counter() - t

    t = time.perf_counter()
    # Every SYNTHGEN_* setting of this environment reaches the server, with the ones the in-process baselines used
    # written out; not the exported dir (the zoo's folder replaces it) nor the API token (the load sends none).
    server_env = {k: v for k, v in os.environ.items()
                  if k.startswith("SYNTHGEN_") and k not in ("SYNTHGEN_EXPORTED_DIR", "SYNTHGEN_API_TOKEN")}
    server_env.update(SYNTHGEN_ORT_SPINNING=str(int(service.ort_spinning)), SYNTHGEN_ORT_ARENA=str(int(service.ort_arena)),
                      SYNTHGEN_ORT_PART_ROWS=str(service.ort_part_rows), SYNTHGEN_WORKERS=str(service.workers),
                      SYNTHGEN_ORT_THREADS=str(threads), SYNTHGEN_CALL_MS=str(service.call_ms),
                      SYNTHGEN_BATCH_ROWS=str(service.batch_rows))
    server = serving.start_server(workdir / "serve", exported, **server_env)
    wall["server_start"] = time.perf_counter() - t
    log(f"server ready at {server.url} after {wall['server_start']:.1f} s")
    try:
        t = time.perf_counter()
        floor = serving.bench_http_floor(server.url, cfg["clients"], duration_s=cfg["http_s"])
        http = serving.bench_http(server.url, [(m.dataset, m.model) for m in baselines], cfg["ns"], cfg["formats"],
                                  cfg["clients"], duration_s=cfg["http_s"], log=log)
        wall["http"] = time.perf_counter() - t
        t = time.perf_counter()
        wrk, wrk_skipped = [], None
        if not serving.wrk_available():
            wrk_skipped = "wrk is not installed (apt-get install wrk)"
        else:
            try:
                wrk = serving.bench_wrk(server.url, [(m.dataset, m.model) for m in baselines], cfg["clients"],
                                        duration_s=cfg["http_s"] * 2, workdir=workdir, rounds=1 if quick else 3, log=log)
            except RuntimeError as exc:  # wrk's own failure: the other parts still count
                wrk_skipped = str(exc)
        if wrk_skipped:
            log(f"wrk cells skipped: {wrk_skipped}")
        wall["wrk"] = time.perf_counter() - t
        t = time.perf_counter()
        paired = serving.bench_paired(server.url, baselines, n=cfg["paired_n"], min_rounds=cfg["paired_rounds"],
                                      min_s=cfg["paired_s"], log=log)
        wall["paired"] = time.perf_counter() - t
        t = time.perf_counter()
        by_size = sorted(baselines, key=lambda m: m.dataset.endswith("_64"))
        small, bulk = (by_size[0].dataset, by_size[0].model), (by_size[-1].dataset, by_size[-1].model)
        mixed = [serving.bench_mixed(server.url, a, bulk, cfg["paired_n"], duration_s=cfg["mixed_s"], log=log)
                 for a in dict.fromkeys((small, bulk))]  # n=1 of a 28x28 model behind a 64x64 one, then of the 64x64 one
        wall["mixed"] = time.perf_counter() - t
    except BaseException:
        log(server.log_tail())
        raise
    finally:
        server.stop()
    return {"threads": threads, "workers": service.workers, "ort_part_rows": service.ort_part_rows, "ort_spinning": service.ort_spinning,
            "ort_arena": service.ort_arena,
            "call_ms": service.call_ms, "batch_rows": service.batch_rows,
            "server_env": server_env, "in_process": in_process, "http_floor": floor, "http": http, "wrk": wrk,
            "wrk_skipped": wrk_skipped, "paired": paired, "mixed": mixed}


def _n1_gains(rows: list[dict], many: int):
    """(model, its 1-client row, its `many`-client row, req/s at `many` over req/s at 1) for each model's n=1 npz
    cells."""
    cells = {(r["dataset"], r["model"], r["clients"]): r for r in rows if r["n"] == 1 and r["format"] == "npz"}
    for (dataset, model, clients), one in cells.items():
        if clients == 1:
            many_row = cells[(dataset, model, many)]
            gain = many_row["requests_per_s"] / one["requests_per_s"] if one["requests_per_s"] else float("nan")
            yield f"{dataset}/{model}", one, many_row, gain  # nan when every request of the 1-client cell failed


def targets(result: dict) -> list[dict]:
    rows = []

    def add(name, subject, value, threshold, higher_is_better=True, unit="x", errors=0):
        """A cell with failed requests does not count as met: its figure leaves out what failed."""
        met = (value >= threshold if higher_is_better else value <= threshold) and not errors
        rows.append({"target": name, "subject": subject, "value": value, "comparison": ">=" if higher_is_better else "<=",
                     "threshold": threshold, "unit": unit, "met": bool(met), "errors": errors})

    s = result.get("serving")
    if s:
        for p in s["paired"]:
            subject = f"{p['dataset']}/{p['model']}"
            add(f"HTTP npz n={p['n']} vs in-process ORT", subject, p["http_vs_onnxruntime"], HTTP_VS_ORT, errors=p["errors"])
            add(f"HTTP npz n={p['n']} vs in-process torch eager", subject, p["http_vs_torch_eager"], HTTP_VS_TORCH,
                errors=p["errors"])
        many = max(r["clients"] for r in s["http"])
        for subject, one, many_row, gain in _n1_gains(s["http"], many):
            add("n=1 npz p50 ms, 1 Python client", subject, one["p50_ms"], P50_N1_MS, higher_is_better=False, unit="ms",
                errors=one["errors"])
            add(f"n=1 npz req/s, {many} clients vs 1", subject, gain, CONCURRENCY_GAIN,
                errors=one["errors"] + many_row["errors"])
        for subject, one, many_row, gain in _n1_gains(s.get("wrk", []), many):
            add("n=1 npz p50 ms, 1 wrk connection", subject, one["p50_ms"], P50_N1_MS, higher_is_better=False, unit="ms",
                errors=one["errors"])
            add(f"n=1 npz req/s, {many} vs 1 wrk connections", subject, gain, CONCURRENCY_GAIN,
                errors=one["errors"] + many_row["errors"])
    for r in result.get("training", []):
        if r.get("device", "cpu") != "cpu":  # the GPU target is a rate; the 3x-the-reference one is the CPU's
            if (r["dataset"], r["model"]) == ("mnist", "cdcgan"):
                large = [training_bench.large_batch_loop(b) for b in training_bench.GPU_LARGE_BATCHES]
                for name in ("ours", "ours_compiled", *large):
                    if name in r:
                        add(f"GPU training images/s, {name} (batch {r[name]['batch']})", f"mnist/cdcgan on {r['device']}",
                            r[name]["images_per_s"], GPU_TRAINING_IMAGES_PER_S, unit="images/s")
            continue
        for key, flags in (("ratio", ""), ("ratio_compiled", ", --compile"),
                           ("ratio_in_batch_pairs", ", --mode-seeking-in-batch"),
                           ("ratio_in_batch_pairs_compiled", ", --mode-seeking-in-batch, --compile"),
                           ("ratio_ddp", ", 2 processes (torchrun)"),
                           ("ratio_ddp_compiled", ", 2 processes, --compile"),
                           ("ratio_ddp_in_batch_pairs_compiled", ", 2 processes, --mode-seeking-in-batch, --compile")):
            if key in r:
                add(f"training images/s vs reference loop{flags}", f"{r['dataset']}/{r['model']}", r[key], TRAINING_GAIN)
    return rows


def markdown(result: dict) -> str:
    out = [f"Machine: {machine_line(result['machine'])}; load average at end "
           f"{'/'.join(f'{x:.1f}' for x in result['machine'].get('loadavg_at_end', []))}."
           + (" QUICK RUN: tiny models and sizes, numbers not meaningful." if result["quick"] else "")]
    if result.get("serving"):
        out += _serving_markdown(result["serving"])
    if result.get("training"):
        out += _training_markdown(result["training"])
    if result.get("targets"):
        out += _targets_markdown(result["targets"])
    wall = ", ".join(f"{k} {v:.0f} s" for k, v in result["wall_s"].items())
    out.append(f"\nWall time: {wall}.")
    return "\n".join(out)


def _serving_markdown(s: dict) -> list[str]:
    """The serving part's tables: in-process, HTTP, wrk, paired, mixed."""
    out = []
    ort = (f"ONNX Runtime row parts of {s.get('ort_part_rows', 0)} rows (0: one call), "
           f"spinning {'on' if s.get('ort_spinning') else 'off'}, arena {'on' if s.get('ort_arena') else 'off'}: "
           "SYNTHGEN_ORT_PART_ROWS / _SPINNING / _ARENA, the same for the service")
    out.append(f"\n### In-process generator calls ({s['threads']} threads each; {ort})\n")
    by = {}
    for r in s["in_process"]:
        by.setdefault((r["dataset"], r["model"], r["n"]), {})[r["backend"]] = r
    rows = []
    for (dataset, model, n), b in by.items():
        te, ort, one = b["torch_eager"], b["onnxruntime"], b.get("onnxruntime_one_call")
        rows.append([f"{dataset}/{model}", n, fmt(te["images_per_s"]), fmt(te["median_ms"]),
                     fmt(one["images_per_s"]) if one else "-", fmt(ort["images_per_s"]), fmt(ort["median_ms"]),
                     f"{ort['images_per_s'] / te['images_per_s']:.2f}x"])
    out.append(table(["model", "n", "torch eager img/s", "torch ms", "ORT one call img/s", "ORT img/s (service)",
                      "ORT ms", "ORT / torch"], rows))

    out.append("\n### HTTP `POST /generate` over loopback (httpx asyncio clients on the same machine)\n")
    rows = [[f"{r['dataset']}/{r['model']}", r["format"], r["n"], r["clients"], fmt(r["requests_per_s"]),
             fmt(r["images_per_s"]), fmt(r["p50_ms"]), fmt(r["p99_ms"]) + (" (max)" if r.get("p99_is_slowest") else ""),
             r["requests"], r["errors"]]
            for r in s["http"]]
    out.append(table(["model", "format", "n", "clients", "req/s", "img/s", "p50 ms", "p99 ms", "requests",
                      "errors"], rows))
    out.append("\n(max): under 100 requests, the p99 is the slowest request. Req/s, img/s and the percentiles "
               "count good answers only; failed requests are in `errors`.")
    rows = [[r["route"], r["clients"], fmt(r["requests_per_s"]), fmt(r["p50_ms"]), fmt(r["p99_ms"]),
             r["requests"]] for r in s["http_floor"]]
    out.append("\nThe HTTP stack alone, same client loop (no model, no body):\n")
    out.append(table(["route", "clients", "req/s", "p50 ms", "p99 ms", "requests"], rows))

    if s.get("wrk"):
        out.append("\nn=1 `npz` with wrk (a C load generator, ~0.1 ms CPU per request; each request a new seed; "
                   "1 and 16 connections in turn, each cell its median round):\n")
        rows = [[f"{r['dataset']}/{r['model']}", r["clients"], fmt(r["requests_per_s"]),
                 " / ".join(fmt(x) for x in r.get("rounds_requests_per_s", [])), fmt(r["p50_ms"]),
                 fmt(r["p99_ms"]), r["requests"], r["errors"]] for r in s["wrk"]]
        out.append(table(["model", "connections", "req/s", "rounds' req/s", "p50 ms", "p99 ms", "requests",
                          "errors (all rounds)"], rows))
    elif s.get("wrk_skipped"):
        out.append(f"\nwrk cells skipped: {s['wrk_skipped']}.")

    out.append("\n### HTTP vs in-process at the same n, measured in turn (paired)\n")
    rows = [[f"{p['dataset']}/{p['model']}", p["n"], p["format"], fmt(p["http_images_per_s"]),
             fmt(p["onnxruntime_images_per_s"]), fmt(p["torch_eager_images_per_s"]),
             f"{p['http_vs_onnxruntime']:.2f}x", f"{p['http_vs_torch_eager']:.2f}x", p["rounds"]]
            for p in s["paired"]]
    out.append(table(["model", "n", "format", "HTTP img/s", "ORT img/s", "torch img/s", "HTTP / ORT",
                      "HTTP / torch", "rounds"], rows))
    if s.get("mixed"):
        out.append(f"\n### Small requests behind a bulk one (SYNTHGEN_CALL_MS={s.get('call_ms')})\n")
        out.append(table(["n=1 requests of", "while streaming", "n=1 p50 ms", "n=1 p99 ms", "n=1 requests",
                          "bulk img/s", "errors"],
                         [[m["small"], f"{m['bulk']} n={m['bulk_n']}", fmt(m["small_p50_ms"]),
                           fmt(m["small_p99_ms"]), m["small_requests"], fmt(m["bulk_images_per_s"]), m["errors"]]
                          for m in s["mixed"]]))
    return out


def _training_markdown(training: list[dict]) -> list[str]:
    """The training part's table and its notes (matmul peak, data)."""
    out = []
    where = training[0].get("device", "cpu")
    out.append(f"\n### Training throughput ({'CPU' if where == 'cpu' else where})\n")
    rows = []
    for r in training:
        for name, label in (("ours", "ours: uint8 tensor + index slices, GANObjective.step"),
                            ("ours_compiled", "ours with --compile (torch.compile)"),
                            *((training_bench.large_batch_loop(b),
                               f"ours at batch {b} with --compile (quality not measured)")
                              for b in training_bench.GPU_LARGE_BATCHES),
                            ("ours_fp32", "ours in fp32 (diagnostic)"),
                            ("ours_no_mode_seeking", "ours without the mode-seeking term (diagnostic)"),
                            ("ours_in_batch_pairs", "ours, mode seeking on in-batch pairs (--mode-seeking-in-batch)"),
                            ("ours_in_batch_pairs_compiled", "the same with --compile"),
                            ("ours_ddp", "ours on 2 single-threaded processes (torchrun, DDP over gloo)"),
                            ("ours_ddp_compiled", "the same with --compile"),
                            ("ours_ddp_in_batch_pairs_compiled", "the same with --mode-seeking-in-batch too"),
                            ("reference", "reference: DataLoader + ToTensor/Normalize, textbook step")):
            if name not in r:
                continue
            x = r[name]
            rows.append([f"{r['dataset']}/{r['model']}", label, x["precision"], x["batch"], x["steps"],
                         fmt(x["images_per_s"]), fmt(x["epoch_s"]), fmt(x.get("warmup_s", float("nan"))),
                         fmt(x["median_step_s"] * 1e3),
                         f"{x['data_share'] * 100:.1f}%",
                         fmt(x["flops_per_image"] / 1e6), f"{fmt(x['gflops'])} ({100 * x['share_of_peak']:.0f}%)",
                         f"{x['images_per_s'] / r['reference']['images_per_s']:.2f}x"])
    out.append(table(["model", "loop", "precision", "batch", "steps", "img/s", "s/epoch", "warm-up s", "ms/step", "data share",
                      "MFLOP/img", "GFLOP/s (of peak)", "vs reference"], rows))
    out.append("\ns/epoch is the training split at the median step; it leaves out the warm-up step (for "
               "--compile loops, the compilation), which a run pays once.")
    peak = training[0]["matmul_peak_gflops"]
    out.append(f"\nMatmul peak {'at the same threads (2048x2048)' if where == 'cpu' else '(8192x8192)'}: "
               + ", ".join(f"{k} {fmt(v)} GFLOP/s" for k, v in peak.items())
               + ". Most a loop doing the reference's arithmetic in fp32 could gain over it: "
               + ", ".join(f"{r['dataset']}/{r['model']} {r['fp32_ceiling_vs_reference']:.2f}x"
                           for r in training) + ".")
    out.append("\nData: " + "; ".join(f"{r['dataset']}: {r['data']}" for r in training) + ".")
    return out


def _targets_markdown(targets: list[dict]) -> list[str]:
    """Each target, its value and whether it was met."""
    out = []
    out.append("\n### Targets\n")
    rows = [[t["target"], t["subject"], fmt(t["value"]), f"{t['comparison']} {fmt(t['threshold'])}",
             ("met" if t["met"] else "MISSED") + (f" ({t['errors']} failed requests)" if t["errors"] else "")]
            for t in targets]
    out.append(table(["target", "model", "value", "threshold", "result"], rows))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny models and sizes (seconds, not meaningful)")
    parser.add_argument("--out", default="bench-results/bench.json", help="JSON results (default: %(default)s)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of: " + ", ".join(PARTS))
    parser.add_argument("--data-dir", default=None,
                        help="folder holding MNIST/raw for the training benchmark (default: $SYNTHGEN_DATA_DIR, "
                             "./data, ../shared/data; random data of MNIST's shape when none has it)")
    parser.add_argument("--training-models", default=None,
                        help="comma-separated subset of the training benchmark's models: "
                             + ", ".join(f"{d}/{m}" for d, m, _ in training_bench.TRAINING_MODELS) + " (default: all)")
    parser.add_argument("--device", default="auto",
                        help="where the training part runs: cpu, cuda, cuda:N, or auto (cuda when there is one; default)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; known: {', '.join(PARTS)}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: this torch sees no CUDA device; use --device cpu")
    training_models = training_bench.TRAINING_MODELS
    if args.training_models:
        known = {f"{d}/{m}": (d, m, sizes) for d, m, sizes in training_bench.TRAINING_MODELS}
        asked = [name.strip() for name in args.training_models.split(",") if name.strip()]
        if not asked or set(asked) - set(known):
            parser.error(f"--training-models {args.training_models!r}: known: {', '.join(known)}")
        training_models = tuple(known[name] for name in asked)
    out = Path(args.out)
    result = run(quick=args.quick, parts=parts, data_dir=args.data_dir or default_data_dir(), device=device,
                 training_models=training_models, out=out)
    print(markdown(result))
    log(f"results: {out}")
    return result


if __name__ == "__main__":
    main()
