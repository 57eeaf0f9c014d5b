"""Smoke test of benchmarks/ (python -m benchmarks.run): every part runs in --quick mode on tiny sizes and the
JSON has the keys the README tables and the targets are read from. No timing assertions: numbers from a
smoke run on a shared machine mean nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from benchmarks import run as bench
from benchmarks.common import interleaved
from service.config import Settings

SERVING = (("mnist", "cdcgan", {"width": 16}),)  # one model keeps the test well under 30 s (zoo export + server start)
TRAINING = (("mnist", "cdcgan", {"width": 32}),)


@pytest.mark.slow
def test_quick_benchmark_writes_the_expected_json(tmp_path):
    out = tmp_path / "bench.json"
    result = bench.run(quick=True, serving_models=SERVING, training_models=TRAINING, workdir=tmp_path, out=out)
    result = json.loads(json.dumps(result))  # plain JSON
    assert json.loads(out.read_text()) == result  # what --out holds: the whole run, no longer "partial"

    assert result["format"] == "synthgen-bench/1" and result["quick"] is True
    machine = set(result["machine"])
    assert {"cpu", "usable_cpus", "torch", "onnxruntime", "loadavg_at_start", "loadavg_at_end"} <= machine
    assert {"zoo", "in_process", "server_start", "http", "paired", "training", "total"} <= set(result["wall_s"])
    cfg = result["settings"]

    serving = result["serving"]
    # The service's runner splits calls into row parts when it has threads to run them on; the plain one-call
    # session is then measured too, to show what the split gains.
    backends = ("torch_eager", "onnxruntime") + (("onnxruntime_one_call",) if serving["threads"] > 1 else ())
    assert serving["ort_part_rows"] == Settings().ort_part_rows
    assert {(r["backend"], r["n"]) for r in serving["in_process"]} == {(b, n) for b in backends for n in cfg["ns"]}
    for r in serving["in_process"]:
        assert (r["dataset"], r["model"]) == ("mnist", "cdcgan")
        assert r["calls"] >= 3 and r["images_per_s"] > 0 and r["median_ms"] > 0

    cells = {(r["n"], r["format"], r["clients"]) for r in serving["http"]}
    assert cells == {(n, f, c) for n in cfg["ns"] for f in cfg["formats"] for c in cfg["clients"]}
    for r in serving["http"]:
        assert r["errors"] == 0, r
        assert r["requests"] >= r["clients"]
        assert {"requests_per_s", "images_per_s", "p50_ms", "p99_ms", "p99_is_slowest", "wall_s"} <= set(r)
        assert 0 < r["p50_ms"] <= r["p99_ms"]
    assert [r["clients"] for r in serving["http_floor"]] == list(cfg["clients"])

    (mixed,) = serving["mixed"]  # one model here: its n=1 requests behind its own bulk ones
    assert mixed["small"] == mixed["bulk"] == "mnist/cdcgan" and serving["call_ms"] == Settings().call_ms
    assert mixed["errors"] == 0 and mixed["small_requests"] >= 1 and mixed["bulk_images_per_s"] > 0
    assert 0 < mixed["small_p50_ms"] <= mixed["small_p99_ms"]

    (paired,) = serving["paired"]
    assert paired["n"] == cfg["paired_n"] and paired["errors"] == 0 and paired["rounds"] >= 3
    assert {"http_images_per_s", "onnxruntime_images_per_s", "torch_eager_images_per_s", "http_vs_onnxruntime",
            "http_vs_torch_eager"} <= set(paired)

    (train,) = result["training"]
    assert (train["dataset"], train["model"], train["device"]) == ("mnist", "cdcgan", "cpu")
    for loop in ("ours", "ours_no_mode_seeking", "ours_in_batch_pairs", "reference"):  # cdcgan is conditional: mode-seeking is on
        assert {"batch", "steps", "median_step_s", "images_per_s", "epoch_s", "data_share", "precision",
                "flops_per_image", "gflops", "share_of_peak"} <= set(train[loop])
        assert train[loop]["flops_per_image"] > 0 and train[loop]["share_of_peak"] > 0 and train[loop]["warmup_s"] > 0
    assert train["reference"]["precision"] == "fp32" and ("ours_fp32" in train) == (train["ours"]["precision"] == "bf16")
    # The mode-seeking term's second generator pass is arithmetic the reference does not do.
    assert train["ours"]["flops_per_image"] > train["ours_no_mode_seeking"]["flops_per_image"]
    # The textbook step also computes D's weight gradients in G's step, which ours skips (objectives.frozen).
    assert train["ours_no_mode_seeking"]["flops_per_image"] < train["reference"]["flops_per_image"]
    # Pairs within the batch need no second pass (the term itself is elementwise).
    assert train["ours_in_batch_pairs"]["flops_per_image"] == train["ours_no_mode_seeking"]["flops_per_image"]
    assert train["matmul_peak_gflops"]["fp32"] > 0 and train["fp32_ceiling_vs_reference"] > 0
    assert train["ours"]["batch"] == 128 and train["reference"]["batch"] == 64
    assert train["reference"]["steps"] == 2 * train["ours"]["steps"]  # the same number of images
    assert train["ratio"] > 0

    names = {t["target"] for t in result["targets"]}
    assert any(n.startswith("HTTP npz") and "ORT" in n for n in names)
    assert any("torch eager" in n for n in names)
    assert "n=1 npz p50 ms, 1 Python client" in names and "training images/s vs reference loop" in names
    assert all(isinstance(t["met"], bool) for t in result["targets"])
    assert {t["comparison"] for t in result["targets"]} == {">=", "<="}
    assert {t["unit"] for t in result["targets"]} == {"x", "ms"}
    assert serving["server_env"]["SYNTHGEN_ORT_PART_ROWS"] == str(serving["ort_part_rows"])

    text = bench.markdown(result)
    for heading in ("In-process", "HTTP `POST /generate`", "paired", "Training throughput", "Targets"):
        assert heading in text


def test_a_target_whose_cell_had_failed_requests_is_not_met():
    cell = {"dataset": "mnist", "model": "cdcgan", "n": 1, "format": "npz", "p50_ms": 1.0}
    http = [{**cell, "clients": 1, "requests_per_s": 100.0, "errors": 0},
            {**cell, "clients": 16, "requests_per_s": 900.0, "errors": 3}]
    result = {"serving": {"paired": [], "http": http, "wrk": []}}
    by_name = {t["target"]: t for t in bench.targets(result)}
    assert by_name["n=1 npz p50 ms, 1 Python client"]["met"]
    gain = by_name["n=1 npz req/s, 16 clients vs 1"]
    assert gain["value"] == 9.0 and not gain["met"] and gain["errors"] == 3
    http[0].update(requests_per_s=0.0, errors=40)  # every 1-client request failed: no ratio, no crash
    gain = {t["target"]: t for t in bench.targets(result)}["n=1 npz req/s, 16 clients vs 1"]
    assert gain["value"] != gain["value"] and not gain["met"]  # nan



def test_the_training_benchmark_runs_with_torch_alone_as_on_a_gpu_host(tmp_path):
    """The device machine has torch but no httpx, BentoML or medmnist: the training part must not need them."""
    import subprocess
    import sys

    blocked = ("httpx", "bentoml", "medmnist", "onnx", "service")
    script = (f"import sys, runpy\nfor m in {blocked!r}: sys.modules[m] = None\n"
              f"sys.argv = ['benchmarks.run', '--quick', '--parts', 'training', '--training-models', 'mnist/cdcgan', "
              f"'--device', 'cpu', '--out', {str(tmp_path / 'gpu.json')!r}]\n"
              "runpy.run_module('benchmarks.run', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert "serving" not in result and [(r["dataset"], r["model"]) for r in result["training"]] == [("mnist", "cdcgan")]


def test_on_a_gpu_the_training_target_is_the_rate_of_the_mnist_cdcgan_not_the_cpu_ratio():
    def loop(images_per_s, batch=128):
        return {"images_per_s": images_per_s, "batch": batch}

    gpu = {"dataset": "mnist", "model": "cdcgan", "device": "NVIDIA H200", "ours": loop(80_000),
           "ours_compiled": loop(150_000), "ours_batch1024_compiled": loop(90_000, 1024), "ours_batch4096_compiled": loop(120_000, 4096),
           "ratio": 9.0}
    rows = bench.targets({"training": [gpu]})
    assert [(r["target"], r["met"]) for r in rows] == [
        ("GPU training images/s, ours (batch 128)", False), ("GPU training images/s, ours_compiled (batch 128)", True),
        ("GPU training images/s, ours_batch1024_compiled (batch 1024)", False),
        ("GPU training images/s, ours_batch4096_compiled (batch 4096)", True)]
    assert all(r["threshold"] == 100_000 and r["subject"] == "mnist/cdcgan on NVIDIA H200" for r in rows)
    cpu = dict(gpu, device="cpu")
    assert [r["target"] for r in bench.targets({"training": [cpu]})] == ["training images/s vs reference loop"]


def test_the_profiler_reports_every_node_and_its_rewrite_computes_the_same_images(exported_dir):
    import onnx
    import onnxruntime as ort

    from benchmarks import ort_layers

    model = onnx.load(str(exported_dir / "bloodmnist_64" / "dcgan" / "generator.onnx"))
    rewritten = ort_layers.projection_as_gemm(model)
    assert [n.op_type for n in rewritten.graph.node].count("ConvTranspose") == \
        [n.op_type for n in model.graph.node].count("ConvTranspose") - 1
    shipped, gemm = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (model, rewritten))
    feeds = ort_layers.feeds_for(shipped, 5)
    assert abs(shipped.run(None, feeds)[0] - gemm.run(None, feeds)[0]).max() < 1e-5

    text = ort_layers.report(exported_dir / "bloodmnist_64" / "dcgan", n=4, threads=1)
    assert text.count("| ConvTranspose |") == 5 and "first layer as Gemm + Reshape" in text
    assert "No stride-1 ConvTranspose" in ort_layers.report(exported_dir / "mnist" / "mlp_vae", n=4, threads=1)


def test_the_memory_benchmark_serves_every_model_with_and_without_the_arena(exported_dir, tmp_path, capsys):
    from benchmarks import memory

    rows = memory.main(["--quick", "--exported", str(exported_dir), "--out", str(tmp_path / "memory.json")])

    assert [(r["arena"], r["part_rows"]) for r in rows] == [(False, 128), (True, 0), (True, 128)]
    served = len(json.loads((exported_dir / "manifest.json").read_text())["models"])
    for r in rows:
        assert r["models"] == served and r["large_s"] > 0
        assert r["rss_idle"] > 0 and r["rss_after_large"] > 0, r  # the worker processes were found
    assert json.loads((tmp_path / "memory.json").read_text())["rows"] == json.loads(json.dumps(rows))
    assert "| shared |" in capsys.readouterr().out


def test_the_data_parallel_training_loop_runs_our_batch_on_two_processes():
    from benchmarks import training_bench

    (row,) = training_bench.bench_training(models=(("mnist", "cdcgan", {"width": 8}),), steps=1, n_random=512,
                                           compile=False, data_parallel=2, log=lambda *_: None)
    assert (row["width"], row["disc_width"]) == (8, 8)  # the row says which networks it timed
    ddp = row["ours_ddp"]
    assert ddp["batch"] == row["ours"]["batch"] == 128 and ddp["steps"] == row["ours"]["steps"]
    assert ddp["flops_per_image"] == row["ours"]["flops_per_image"] and ddp["precision"] == row["ours"]["precision"]
    assert ddp["images_per_s"] > 0 and row["ratio_ddp"] > 0


def test_a_failing_data_parallel_process_fails_the_benchmark_instead_of_hanging_it():
    import time

    import pytest

    from benchmarks import training_bench

    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="process"):
        training_bench.DataParallelOurs(2, "mnist", "no_such_model", {"width": 8}, data_dir=None, n_random=64)
    assert time.perf_counter() - started < 120


def test_interleaved_timing_alternates_the_functions_and_stops_at_max_s():
    order = []
    times = interleaved({"a": lambda: order.append("a"), "b": lambda: (order.append("b"), time.sleep(0.01))},
                        min_rounds=1000, min_s=0, max_s=0.1, warmup=False)
    assert order[:4] == ["a", "b", "a", "b"] and len(times["a"]) == len(times["b"])
    assert 1 <= len(times["b"]) <= 20  # 10 ms a round: about 10 rounds, not min_rounds' 1000
    assert min(times["b"]) >= 0.01
