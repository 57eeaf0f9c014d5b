"""The service's parts in-process (no server): manifest verification, the reproducibility rules, the
micro-batcher, the encoders and request validation. Fast; the HTTP behaviour is in test_service.py."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from service import encoders, schemas
from service.backends import load_runner, row_parts
from service.batching import MicroBatcher
from service.catalog import ManifestError, load_catalog
from service.config import ConfigError, Settings
from service.errors import ApiError
from service.sampling import interpolation_latents, latents, quantize_into, resolve_labels

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def catalog(exported_dir):
    return load_catalog(exported_dir)


@pytest.fixture(scope="module")
def runners(catalog):
    return {key: load_runner(entry, "onnxruntime", threads=1) for key, entry in catalog.entries.items()}


def damaged_copy(exported_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "exported"
    shutil.copytree(exported_dir, root)
    return root


def manifest_of(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


# --- manifest and file verification -------------------------------------------------------------------------

def test_every_model_of_a_good_manifest_is_usable(catalog):
    assert {key for key, e in catalog.entries.items() if e.ok} == {
        ("mnist", "cdcgan"), ("mnist", "mlp_vae"), ("bloodmnist_64", "dcgan"), ("pneumoniamnist", "cvae")}
    assert catalog.default_model("mnist") == "cdcgan"


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "sha256"), ("flip_byte", "sha256"), ("delete", "missing"),
])
def test_damaged_model_file_is_refused_with_the_file_named(exported_dir, tmp_path, damage, reason):
    root = damaged_copy(exported_dir, tmp_path)
    onnx = root / "mnist" / "mlp_vae" / "generator.onnx"
    data = onnx.read_bytes()
    if damage == "truncate":
        onnx.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        onnx.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        onnx.unlink()
    catalog = load_catalog(root)
    entry = catalog.entries[("mnist", "mlp_vae")]
    assert not entry.ok and reason in entry.error and "mnist/mlp_vae/generator.onnx" in entry.error
    assert catalog.entries[("mnist", "cdcgan")].ok  # the others keep working


def test_manifest_paths_cannot_leave_the_exported_folder(exported_dir, tmp_path):
    root = damaged_copy(exported_dir, tmp_path)
    manifest = manifest_of(root)
    manifest["models"][0]["files"]["onnx"]["path"] = "../../../../etc/passwd"
    (root / "manifest.json").write_text(json.dumps(manifest))
    entry = load_catalog(root).entries[(manifest["models"][0]["dataset"], manifest["models"][0]["model"])]
    assert not entry.ok and "leaves the exported folder" in entry.error


def test_default_falls_back_to_a_usable_model_when_the_manifest_default_is_broken(exported_dir, tmp_path):
    root = damaged_copy(exported_dir, tmp_path)
    (root / "mnist" / "cdcgan" / "generator.onnx").write_bytes(b"not a model")
    assert load_catalog(root).default_model("mnist") == "mlp_vae"


def test_the_fallback_default_follows_the_manifests_rule_conditional_then_lowest_fid(tmp_path):
    """The shipped MNIST models with both conditional ones broken: the unconditional model of lowest FID (the
    conv VAE), as training/manifest.py would have picked, not the first family in order (the DCGAN)."""
    root = tmp_path / "exported"
    shutil.copytree(REPO / "exported" / "mnist", root / "mnist")
    shutil.copy2(REPO / "exported" / "manifest.json", root / "manifest.json")
    for broken in ("cdcgan", "cvae"):
        (root / "mnist" / broken / "generator.onnx").write_bytes(b"not a model")
    catalog = load_catalog(root)
    fids = {e.model: e.card.metrics["fid"] for e in catalog.usable() if e.dataset == "mnist"}
    assert catalog.default_model("mnist") == min(fids, key=fids.get) == "conv_vae"


def test_best_for_training_is_the_conditional_model_with_the_highest_cas(exported_dir, tmp_path):
    """What to ask for when the images are a training set: the CAS on the cards decides, and only conditional
    models count (an unconditional model's images come without labels)."""
    assert load_catalog(exported_dir).best_for_training("mnist") is None  # the tiny cards have no CAS
    root = damaged_copy(exported_dir, tmp_path)
    for model, cas in (("cdcgan", 0.9), ("mlp_vae", 0.99)):
        card_path = root / "mnist" / model / "card.json"
        card = json.loads(card_path.read_text())
        card["metrics"] = {**card.get("metrics", {}), "cas": cas}
        card_path.write_text(json.dumps(card))
    from training.manifest import write_manifest

    write_manifest(root)
    catalog = load_catalog(root)
    assert catalog.best_for_training("mnist") == "cdcgan"
    assert catalog.best_for_training("bloodmnist_64") is None and catalog.best_for_training("cifar10") is None


@pytest.mark.parametrize("content, message", [
    (None, "no manifest"),
    ("{not json", "not valid JSON"),
    ('{"format": "other/1", "models": []}', "expected 'synthgen-manifest/1'"),
    ('{"format": "synthgen-manifest/1", "models": {}}', "'models' must be a list"),
    ('[1, 2]', "format 'list'"),
])
def test_malformed_manifest_is_one_clear_error(tmp_path, content, message):
    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(ManifestError, match=message):
        load_catalog(tmp_path)


def test_a_card_that_disagrees_with_the_model_is_refused(exported_dir, tmp_path):
    """A card whose image_shape lies is caught by the smoke run at load, not by the first user."""
    root = damaged_copy(exported_dir, tmp_path)
    card_path = root / "mnist" / "cdcgan" / "card.json"
    card = json.loads(card_path.read_text())
    card["image_shape"] = [3, 28, 28]
    card_path.write_text(json.dumps(card))
    from training.manifest import write_manifest  # re-hash so only the content is wrong, not the sha256

    write_manifest(root)
    entry = load_catalog(root).entries[("mnist", "cdcgan")]
    with pytest.raises(Exception, match="from the card"):
        load_runner(entry, "onnxruntime", threads=1)


# --- configuration ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env, name", [
    ({"SYNTHGEN_MAX_N": "lots"}, "SYNTHGEN_MAX_N"),
    ({"SYNTHGEN_MAX_N": "0"}, "SYNTHGEN_MAX_N"),
    ({"SYNTHGEN_BACKEND": "tensorrt"}, "SYNTHGEN_BACKEND"),
    ({"SYNTHGEN_MAX_BODY_BYTES": "-1"}, "SYNTHGEN_MAX_BODY_BYTES"),
    ({"SYNTHGEN_ORT_SPINNING": "yes"}, "SYNTHGEN_ORT_SPINNING"),
    ({"SYNTHGEN_ORT_ARENA": "2"}, "SYNTHGEN_ORT_ARENA"),
    ({"SYNTHGEN_ORT_PART_ROWS": "-1"}, "SYNTHGEN_ORT_PART_ROWS"),
    ({"SYNTHGEN_API_TOKEN": ""}, "SYNTHGEN_API_TOKEN"),  # a blank secret must not turn authentication off
    ({"SYNTHGEN_API_TOKEN": " \n"}, "SYNTHGEN_API_TOKEN"),
    ({"SYNTHGEN_SEND_TIMEOUT_S": "0"}, "SYNTHGEN_SEND_TIMEOUT_S"),
    ({"SYNTHGEN_DEVICE": "cuda"}, "SYNTHGEN_DEVICE"),  # ONNX Runtime, the default backend, runs on the CPU here
    ({"SYNTHGEN_BACKEND": "torchscript", "SYNTHGEN_DEVICE": "gpu0"}, "SYNTHGEN_DEVICE"),
])
def test_bad_settings_fail_naming_the_variable(env, name):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env(env)


def test_settings_defaults():
    s = Settings.from_env({})
    assert (s.ort_spinning, s.ort_arena, s.ort_part_rows) == (True, True, 128)
    assert not Settings.from_env({"SYNTHGEN_ORT_SPINNING": "0", "SYNTHGEN_ORT_ARENA": "false"}).ort_arena
    assert (s.backend, s.max_n, s.max_body_bytes, s.api_token) == ("onnxruntime", 10_000, 1 << 20, None)
    assert s.exported_dir == REPO / "exported"
    assert Settings() == s  # one set of defaults, whether from the environment or not


def test_an_api_token_from_a_secret_file_loses_its_trailing_newline():
    assert Settings.from_env({"SYNTHGEN_API_TOKEN": "s3cret\n"}).api_token == "s3cret"


# --- reproducibility rules ----------------------------------------------------------------------------------

def test_latents_follow_the_documented_rule():
    expected = np.random.Generator(np.random.PCG64(123)).standard_normal((5, 7), dtype=np.float32)
    assert np.array_equal(latents(123, 5, 7), expected)
    assert np.array_equal(latents(123, 9, 7)[:5], expected)  # a larger n extends a smaller one
    assert np.array_equal(latents(123, 5, 7, temperature=0.7), expected * np.float32(0.7))
    assert np.array_equal(latents(123, 5, 7, temperature=1.0), expected)
    assert not latents(123, 5, 7, temperature=0.0).any()


@pytest.mark.parametrize("method", ["slerp", "lerp"])
def test_interpolation_ends_are_exactly_the_seed_latents(method):
    path = interpolation_latents(3, 8, 5, 16, method)
    assert path.shape == (5, 16) and path.dtype == np.float32
    assert np.array_equal(path[0], latents(3, 1, 16)[0]) and np.array_equal(path[-1], latents(8, 1, 16)[0])
    cooler = interpolation_latents(3, 8, 5, 16, method, temperature=0.6)
    assert np.array_equal(cooler[0], latents(3, 1, 16, 0.6)[0]) and np.array_equal(cooler[-1], latents(8, 1, 16, 0.6)[0])
    assert np.allclose(cooler, path * 0.6, atol=1e-6)  # the same path, nearer the centre


def test_an_interpolation_at_temperature_zero_stays_at_the_centre():
    assert not interpolation_latents(3, 8, 5, 16, "slerp", temperature=0.0).any()


def test_labels_rules(catalog):
    cond = catalog.entries[("pneumoniamnist", "cvae")].card
    uncond = catalog.entries[("mnist", "mlp_vae")].card
    assert resolve_labels(None, 5, cond).tolist() == [0, 1, 0, 1, 0]
    assert resolve_labels("pneumonia", 3, cond).tolist() == [1, 1, 1]
    assert resolve_labels(["normal", 1, "pneumonia"], 3, cond).tolist() == [0, 1, 1]
    assert resolve_labels("balanced", 2, uncond).tolist() == [-1, -1]
    for bad, field in ((2, "labels"), ("covid", "labels"), ([0], "labels"), (-1, "labels")):
        with pytest.raises(ApiError) as info:
            resolve_labels(bad, 3, cond)
        assert info.value.status == 400 and info.value.field == field and info.value.allowed
    with pytest.raises(ApiError, match="unconditional"):
        resolve_labels(3, 2, uncond)
    with pytest.raises(ApiError) as info:
        resolve_labels(["covid", 0, 7], 3, cond)
    assert [item["loc"] for item in info.value.body()["detail"]] == [["labels", 0], ["labels", 2]]


def test_class_counts_repeat_each_class_in_the_objects_order(catalog):
    cond = catalog.entries[("pneumoniamnist", "cvae")].card
    assert resolve_labels({"pneumonia": 3, "normal": 1}, None, cond, 10).tolist() == [1, 1, 1, 0]
    assert resolve_labels({"normal": 0, "pneumonia": 2}, 2, cond, 10).tolist() == [1, 1]
    for counts, n, field in (({"covid": 1}, None, "labels"), ({"normal": 11}, None, "labels"),
                             ({"normal": 0}, None, "labels"), ({"normal": 2}, 3, "n")):
        with pytest.raises(ApiError) as info:
            resolve_labels(counts, n, cond, 10)
        assert info.value.status == 400 and info.value.body()["detail"][0]["loc"][0] == field


def test_quantization_is_round_half_to_even_in_nhwc():
    x = np.array([0.0, 0.5 / 255, 1.5 / 255, 0.2, 1.0, 1.2, -0.1], dtype=np.float32).reshape(1, 7, 1, 1)
    out = np.empty((1, 1, 1, 7), dtype=np.uint8)
    quantize_into(x.copy(), out)
    expected = np.clip(np.rint(x.reshape(-1) * np.float32(255)), 0, 255).astype(np.uint8)
    assert out.reshape(-1).tolist() == expected.tolist()


# --- micro-batching -----------------------------------------------------------------------------------------

async def _generate_all(batcher: MicroBatcher, jobs: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    return await asyncio.gather(*(batcher.generate(z, labels) for z, labels in jobs))


@pytest.mark.parametrize("key", [("mnist", "cdcgan"), ("mnist", "mlp_vae"), ("bloodmnist_64", "dcgan"),
                                 ("pneumoniamnist", "cvae")])
def test_batched_requests_are_byte_identical_to_unbatched(catalog, runners, key):
    card, runner = catalog.entries[key].card, runners[key]
    sizes = [1, 3, 1, 40, 2, 1, 17, 1]
    jobs = [(latents(seed, n, card.latent_dim), np.arange(n, dtype=np.int64) % card.num_classes)
            for seed, n in enumerate(sizes)]
    with ThreadPoolExecutor(1) as pool:
        alone = [asyncio.run(_generate_all(MicroBatcher(runner, pool, 1024, card.image_shape), [job]))[0]
                 for job in jobs]
        merged = MicroBatcher(runner, pool, 16, card.image_shape)  # 16 rows a call: merges AND splits
        together = asyncio.run(_generate_all(merged, jobs))
    assert merged.calls < len(jobs) and merged.rows == sum(sizes)
    for a, b in zip(alone, together):
        assert a.dtype == np.uint8 and a.shape[1:] == (card.image_shape[1], card.image_shape[2], card.image_shape[0])
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("n, threads, part_rows, expected", [
    (1, 2, 128, [(0, 1)]),
    (20, 2, 128, [(0, 20)]),  # two parts would each have under MIN_PART_ROWS (16)
    (40, 2, 128, [(0, 20), (20, 40)]),
    (64, 2, 128, [(0, 16), (16, 32), (32, 48), (48, 64)]),  # as many as keep 16 rows each, up to 4 per thread
    (50, 2, 128, [(0, 25), (25, 50)]),  # 3 parts of 16 would leave a thread idle for the third: 2 of 25
    (113, 2, 128, [(i * 113 // 6, (i + 1) * 113 // 6) for i in range(6)]),  # 7 rounded to a multiple of 2
    (300, 3, 128, [(i * 300 // 12, (i + 1) * 300 // 12) for i in range(12)]),
    (300, 2, 128, [(i * 300 // 8, (i + 1) * 300 // 8) for i in range(8)]),  # 4 per thread, none over part_rows
    (1024, 2, 128, [(i, i + 128) for i in range(0, 1024, 128)]),
    (2048, 2, 128, [(i, i + 128) for i in range(0, 2048, 128)]),  # more than 4 per thread: none over part_rows
    (1024, 1, 128, [(0, 1024)]),  # one thread: one call
    (1024, 4, 0, [(0, 1024)]),  # 0: never split
])
def test_row_parts_cover_every_row_once_in_order(n, threads, part_rows, expected):
    assert row_parts(n, threads, part_rows) == expected


@pytest.mark.parametrize("key", [("mnist", "cdcgan"), ("mnist", "mlp_vae"), ("bloodmnist_64", "dcgan"),
                                 ("pneumoniamnist", "cvae")])
def test_row_parallel_calls_give_the_bytes_of_one_call(catalog, key):
    card = catalog.entries[key].card
    z, labels = latents(3, 150, card.latent_dim), np.arange(150, dtype=np.int64) % card.num_classes
    one_call = load_runner(catalog.entries[key], "onnxruntime", threads=2, part_rows=0)
    in_parts = load_runner(catalog.entries[key], "onnxruntime", threads=2, part_rows=32)  # 5 parts of 30 rows
    assert (one_call.part_rows, in_parts.part_rows) == (0, 32)
    assert one_call.run(z, labels).tobytes() == in_parts.run(z, labels).tobytes()


def test_a_failing_row_part_fails_the_whole_call(catalog):
    entry = catalog.entries[("mnist", "cdcgan")]
    runner = load_runner(entry, "onnxruntime", threads=2, part_rows=32)
    labels = np.arange(150, dtype=np.int64) % 10
    labels[100] = 10**6  # out of the embedding's range: only the part holding row 100 fails
    with pytest.raises(Exception, match="(?i)index|indices|out of") as failure:
        runner.run(latents(3, 150, entry.card.latent_dim), labels)
    assert type(failure.value).__module__.startswith("onnxruntime")  # the model's own error, not one of row_parts'


@pytest.mark.parametrize("key", [("mnist", "cdcgan"), ("bloodmnist_64", "dcgan")])
def test_requests_merged_into_calls_in_row_parts_get_the_bytes_of_lone_calls(catalog, runners, key):
    """Each row part is quantized into its requests as soon as it is computed: part and request boundaries
    cross here (calls of up to 16 rows, parts of up to 5)."""
    card = catalog.entries[key].card
    sizes = [1, 3, 1, 40, 2, 1, 17, 1]
    jobs = [(latents(seed, n, card.latent_dim), np.arange(n, dtype=np.int64) % card.num_classes)
            for seed, n in enumerate(sizes)]
    in_parts = load_runner(catalog.entries[key], "onnxruntime", threads=2, part_rows=5)
    with ThreadPoolExecutor(1) as pool:
        alone = [asyncio.run(_generate_all(MicroBatcher(runners[key], pool, 1024, card.image_shape), [job]))[0]
                 for job in jobs]
        merged = MicroBatcher(in_parts, pool, 16, card.image_shape)
        together = asyncio.run(_generate_all(merged, jobs))
    assert merged.calls < len(jobs) and merged.rows == sum(sizes)
    assert [a.tobytes() for a in alone] == [b.tobytes() for b in together]


class SlowRows:
    """A row-independent stand-in model that takes `row_s` seconds per row and logs each call as (tag, rows)."""

    def __init__(self, tag: str, row_s: float, log: list):
        self.tag, self.row_s, self.log = tag, row_s, log

    def run_into(self, z, labels, sink):
        self.log.append((self.tag, len(z)))
        time.sleep(self.row_s * len(z))
        sink(0, len(z), np.repeat(np.clip(z[:, :1, None, None], 0, 1), 4, axis=2).repeat(4, axis=3))


def test_a_slow_models_large_request_runs_as_calls_of_about_the_target_time():
    log = []
    batcher = MicroBatcher(SlowRows("big", 0.001, log), None, 1024, (1, 4, 4), call_s=0.05)
    z = latents(0, 1000, 8)
    with ThreadPoolExecutor(1) as pool:
        batcher.executor = pool
        images = asyncio.run(batcher.generate(z, np.zeros(1000, dtype=np.int64)))
        whole = asyncio.run(MicroBatcher(SlowRows("one", 0.0, []), pool, 1024, (1, 4, 4)).generate(z, np.zeros(1000)))
    rows = [r for _, r in log]
    assert sum(rows) == 1000 and rows[0] == 64  # the first call, before the model's seconds per row are known
    # then about 50 rows of 1 ms: 50 ms a call (the last two may split what is left evenly, below MIN_CALL_ROWS)
    assert all(25 <= r <= 75 for r in rows[1:-2]), rows
    assert images.tobytes() == whole.tobytes()


def test_a_cancelled_request_waiting_behind_another_frees_its_latents_at_once():
    import gc
    import weakref

    async def cancelled_request(batcher: MicroBatcher, latents_freed: list) -> None:
        z = latents(1, 640, 8)
        latents_freed.append(lambda ref=weakref.ref(z): ref() is None)
        request = asyncio.ensure_future(batcher.generate(z, np.zeros(640, dtype=np.int64)))
        await asyncio.sleep(0.02)
        request.cancel()
        await asyncio.wait({request})

    log = []
    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(SlowRows("rows", 0.001, log), pool, 64, (1, 4, 4), merge=False)

        async def scenario():
            first = asyncio.ensure_future(batcher.generate(latents(0, 640, 8), np.zeros(640, dtype=np.int64)))
            latents_freed = []
            await cancelled_request(batcher, latents_freed)
            gc.collect()
            assert latents_freed[0]() and not first.done()  # freed while the first request still computes
            await first

        asyncio.run(scenario())
    assert sum(rows for _, rows in log) == 640  # and none of its rows computed


def test_a_request_cancelled_during_its_model_call_ends_when_the_call_does():
    """The call writes into the request's output, the memory its reservation covers, until it ends."""
    log = []
    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(SlowRows("rows", 0.003, log), pool, 1024, (1, 4, 4), merge=False)

        async def scenario() -> float:
            request = asyncio.ensure_future(batcher.generate(latents(0, 100, 8), np.zeros(100, dtype=np.int64)))
            while not log:  # its one call of 100 rows (0.3 s) has started
                await asyncio.sleep(0.005)
            started = time.perf_counter()
            request.cancel()
            await asyncio.wait({request})
            return time.perf_counter() - started

        waited_s = asyncio.run(scenario())
    assert waited_s >= 0.2, waited_s  # most of the 0.3 s call was still to run when it was cancelled


def test_a_cancelled_request_waits_for_its_running_thread_work_through_a_second_cancel_and_drops_queued_work(caplog):
    """So the memory it reserved is not handed on while a thread still uses it, and no thread works for it
    when none has started."""
    from service.service import thread_work

    ran = []

    def encode(tag: str, seconds: float, fail: bool = False):
        ran.append(tag)
        time.sleep(seconds)
        if fail:
            raise RuntimeError("encoder failed")

    with ThreadPoolExecutor(1) as pool:
        async def scenario() -> float:
            started = time.perf_counter()
            running = asyncio.ensure_future(thread_work(pool, encode, "running", 0.3, True))
            queued = asyncio.ensure_future(thread_work(pool, encode, "queued", 0.3))
            while not ran:  # the first work is running on the pool's one thread
                await asyncio.sleep(0.005)
            queued.cancel()
            running.cancel()  # the client went away...
            await asyncio.sleep(0.05)
            running.cancel()  # ...and then the timeout came
            for request in (queued, running):
                with pytest.raises(asyncio.CancelledError):
                    await request
            return time.perf_counter() - started

        running_s = asyncio.run(scenario())
    assert running_s >= 0.29 and ran == ["running"]  # waited for the running work; the queued one never ran
    assert "encode failed for a cancelled request: RuntimeError('encoder failed')" in caplog.text
    assert "never retrieved" not in caplog.text


def test_a_small_request_waits_for_one_short_call_of_a_large_request_not_all_of_it():
    """Every model shares the one inference thread: a request that arrives while another model computes a
    large request runs after that model's current call, which the call target keeps short."""
    log = []
    with ThreadPoolExecutor(1) as pool:
        big = MicroBatcher(SlowRows("big", 0.0005, log), pool, 1024, (1, 4, 4), call_s=0.02)
        small = MicroBatcher(SlowRows("small", 0.0005, log), pool, 1024, (1, 4, 4), call_s=0.02)

        async def scenario():
            large = asyncio.ensure_future(big.generate(latents(0, 1000, 8), np.zeros(1000, dtype=np.int64)))
            while len(log) < 3:  # the large request is into its third call
                await asyncio.sleep(0.001)
            await small.generate(latents(1, 1, 8), np.zeros(1, dtype=np.int64))
            assert not large.done()
            await large

        asyncio.run(scenario())
    first_small = [tag for tag, _ in log].index("small")
    assert first_small == 3, log  # right after the call that was running when it came
    assert sum(rows for _, rows in log[:first_small]) <= 64 + 2 * 60, log  # not after all 1000 rows


def test_a_small_request_behind_a_large_one_of_the_same_model_rides_in_its_next_call():
    log = []
    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(SlowRows("model", 0.0005, log), pool, 1024, (1, 4, 4), call_s=0.02)

        async def scenario():
            large = asyncio.ensure_future(batcher.generate(latents(0, 1000, 8), np.zeros(1000, dtype=np.int64)))
            while len(log) < 3:
                await asyncio.sleep(0.001)
            calls_before = len(log)
            small = await batcher.generate(latents(1, 3, 8), np.zeros(3, dtype=np.int64))
            assert len(log) <= calls_before + 2 and not large.done()  # the call running, then the one it rode in
            return small, await large

        small, large = asyncio.run(scenario())
    alone = MicroBatcher(SlowRows("alone", 0.0, []), None, 1024, (1, 4, 4))
    with ThreadPoolExecutor(1) as pool:
        alone.executor = pool
        assert small.tobytes() == asyncio.run(alone.generate(latents(1, 3, 8), np.zeros(3))).tobytes()
        assert large.tobytes() == asyncio.run(alone.generate(latents(0, 1000, 8), np.zeros(1000))).tobytes()


def test_a_call_target_of_zero_keeps_whole_batch_rows_calls():
    log = []
    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(SlowRows("big", 0.0, log), pool, 256, (1, 4, 4), call_s=0.0)
        asyncio.run(batcher.generate(latents(0, 1000, 8), np.zeros(1000, dtype=np.int64)))
    assert [r for _, r in log] == [256, 256, 256, 232]


def test_onnxruntime_models_pass_the_row_independence_check(runners):
    assert all(runner.row_independent for runner in runners.values())


def test_unmerged_batcher_runs_each_request_alone_in_fixed_chunks(catalog):
    """The TorchScript path: PyTorch CPU kernels are not row-independent, so nothing is merged and a
    request's chunks start at its own row 0 - its bytes depend on the request alone."""
    entry = load_catalog(catalog.root, "torchscript").entries[("mnist", "cdcgan")]
    runner, card = load_runner(entry, "torchscript", threads=1, device="cpu"), entry.card
    sizes = [3, 20, 1, 9]
    jobs = [(latents(seed, n, card.latent_dim), np.arange(n, dtype=np.int64) % 10) for seed, n in enumerate(sizes)]
    with ThreadPoolExecutor(1) as pool:
        alone = [asyncio.run(_generate_all(MicroBatcher(runner, pool, 8, card.image_shape, merge=False), [job]))[0]
                 for job in jobs]
        batcher = MicroBatcher(runner, pool, 8, card.image_shape, merge=False)
        together = asyncio.run(_generate_all(batcher, jobs))
    assert batcher.calls == sum(-(-n // 8) for n in sizes)
    assert [a.tobytes() for a in alone] == [b.tobytes() for b in together]


def test_a_failing_model_call_fails_its_requests_not_the_batcher(catalog, runners):
    card = catalog.entries[("mnist", "mlp_vae")].card

    class Flaky:
        calls = 0

        def run_into(self, z, labels, sink):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("boom")
            runners[("mnist", "mlp_vae")].run_into(z, labels, sink)

    async def scenario():
        batcher = MicroBatcher(Flaky(), pool, 1024, card.image_shape)
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.generate(latents(0, 2, card.latent_dim), np.full(2, -1))
        return await batcher.generate(latents(0, 2, card.latent_dim), np.full(2, -1))

    with ThreadPoolExecutor(1) as pool:
        assert asyncio.run(scenario()).shape == (2, 28, 28, 1)


def test_requests_over_the_memory_budget_wait_for_it_and_are_not_refused():
    from service.budget import MemoryBudget

    async def scenario():
        budget, events = MemoryBudget(100), []

        async def request(name: str, nbytes: int, hold_s: float):
            share = await budget.acquire(nbytes)
            events.append(("in", name))
            await asyncio.sleep(hold_s)
            events.append(("out", name))
            share.release()
            share.release()  # a second call gives back nothing more

        await asyncio.gather(request("a", 80, 0.05), request("b", 50, 0.0), request("huge", 500, 0.0))
        return events, budget.used

    events, used = asyncio.run(scenario())
    assert events.index(("in", "b")) > events.index(("out", "a"))  # b waited for a's share
    assert ("out", "huge") in events and used == 0  # over the whole budget: it waits to run alone, not refused


def test_an_answer_keeps_its_memory_share_until_sent_in_chunks_and_a_stalled_client_is_dropped():
    """A body waiting on a slow client counted against no budget: 60 clients that did not read took a worker
    from 207 MB to 1.6 GB."""
    from service.budget import SEND_CHUNK_BYTES, BudgetedResponse, MemoryBudget

    body = bytes(range(256)) * (SEND_CHUNK_BYTES // 256 * 2 + 3)  # two chunks and a bit

    async def scenario(stall_after: int | None):
        budget, messages = MemoryBudget(1 << 30), []
        share = await budget.acquire(4 * len(body))  # images, body and the encoder's copies

        async def send(message):
            if stall_after is not None and len(messages) > stall_after:
                await asyncio.sleep(3600)  # a client that stopped reading: uvicorn's send waits for its socket
            messages.append(message)

        response = BudgetedResponse(body, share, send_timeout_s=0.2, media_type="application/octet-stream")
        used_before = budget.used
        started = time.perf_counter()
        await response({"type": "http", "path": "/generate", "method": "POST", "client": ("127.0.0.1", 1)},
                       None, send)
        return used_before, budget.used, messages, time.perf_counter() - started

    used_before, used_after, messages, _ = asyncio.run(scenario(None))
    chunks = [m for m in messages if m["type"] == "http.response.body"]
    assert used_before == len(body) and used_after == 0 and b"".join(m["body"] for m in chunks) == body
    assert [m["more_body"] for m in chunks] == [True, True, False]
    assert max(len(m["body"]) for m in chunks) == SEND_CHUNK_BYTES

    used_before, used_after, messages, seconds = asyncio.run(scenario(stall_after=1))  # start and the first chunk
    assert used_before == len(body) and used_after == 0 and 0.2 <= seconds < 5
    assert messages[-1]["more_body"]  # left incomplete: uvicorn closes the connection


def test_an_answer_stalled_before_its_first_byte_is_dropped_too():
    """On a reused connection uvicorn's send first waits for what an earlier answer left in the socket's buffer:
    a client that stopped reading then held the whole share, with no timeout, until it disconnected."""
    from service.budget import BudgetedResponse, MemoryBudget

    async def scenario():
        budget = MemoryBudget(1 << 30)

        async def stalled(message):
            await asyncio.sleep(3600)

        started = time.perf_counter()
        response = BudgetedResponse(b"x" * 100, await budget.acquire(400), send_timeout_s=0.2)
        await asyncio.wait_for(response({"type": "http", "path": "/generate", "method": "POST"}, None, stalled), 10)
        return budget.used, time.perf_counter() - started

    used, seconds = asyncio.run(scenario())
    assert used == 0 and 0.2 <= seconds < 5


def test_an_answer_dropped_unsent_or_unbuildable_gives_its_memory_share_back_and_a_sent_one_runs_its_tasks():
    from starlette.background import BackgroundTask

    from service.budget import BudgetedResponse, MemoryBudget

    async def scenario():
        budget, ran = MemoryBudget(100), []
        BudgetedResponse(b"x", await budget.acquire(70), send_timeout_s=1)  # cancelled before BentoML sent it
        await asyncio.sleep(0)
        dropped = budget.used
        with pytest.raises(UnicodeEncodeError):  # a header outside latin-1
            BudgetedResponse(b"x", await budget.acquire(70), send_timeout_s=1, headers={"X-Dataset": "мнист"})
        await asyncio.sleep(0)
        unbuildable = budget.used
        response = BudgetedResponse(b"x", await budget.acquire(70), send_timeout_s=1,
                                    background=BackgroundTask(ran.append, "closed"))

        async def send(message):
            pass

        await response({"type": "http", "path": "/generate", "method": "POST"}, None, send)
        return dropped, unbuildable, budget.used, ran

    assert asyncio.run(scenario()) == (0, 0, 0, ["closed"])


def test_a_failed_model_call_answers_503_with_retry_after(catalog):
    """The client retries it (it may pass); a model that failed to load gets one without (test_reliability)."""
    from service.budget import MemoryBudget
    from service.service import RETRY_AFTER_S, SyntheticImages

    class Failing:
        async def generate(self, z, labels):
            raise RuntimeError("boom")

    service = SyntheticImages.inner.__new__(SyntheticImages.inner)
    service.budget, service.batchers = MemoryBudget(1 << 30), {("mnist", "mlp_vae"): Failing()}
    entry = catalog.entries[("mnist", "mlp_vae")]
    response = asyncio.run(service._render(entry, latents(0, 2, entry.card.latent_dim), np.full(2, -1), "npz",
                                           {"seed": 0}, "stem"))
    assert response.status_code == 503 and response.headers["retry-after"] == str(RETRY_AFTER_S)
    assert "failed to compute" in json.loads(response.body)["error"]


# --- encoders: every format round-trips ---------------------------------------------------------------------

@st.composite
def batches(draw):
    n = draw(st.integers(1, 6))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    c = draw(st.sampled_from([1, 3]))
    k = draw(st.integers(1, 5))
    images = draw(st.binary(min_size=n * h * w * c, max_size=n * h * w * c))
    labels = draw(st.lists(st.integers(-1, k - 1), min_size=n, max_size=n))
    # Class names come from cards; NUL is excluded because numpy's str arrays drop trailing NULs.
    name = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), min_size=1, max_size=12)
    names = draw(st.lists(name, min_size=k, max_size=k, unique=True))
    seed = draw(st.integers(0, schemas.MAX_SEED))
    return encoders.Batch(images=np.frombuffer(images, np.uint8).reshape(n, h, w, c),
                          labels=np.asarray(labels, dtype=np.int64), class_names=names,
                          meta={"dataset": "d", "model": "m", "seed": seed})


def _same(a: encoders.Batch, b: encoders.Batch) -> None:
    assert b.images.dtype == np.uint8 and b.images.shape == a.images.shape
    assert np.array_equal(a.images, b.images) and b.labels.tolist() == a.labels.tolist()
    assert b.class_names == a.class_names and b.meta == a.meta


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_npz_zip_and_json_round_trip(batch):
    _same(batch, encoders.decode_npz(encoders.encode_npz(batch)))
    _same(batch, encoders.decode_zip(encoders.encode_zip(batch)))
    _same(batch, encoders.decode_json(encoders.encode_json(batch)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.none() | st.integers(1, 8))
def test_png_grid_holds_every_image(batch, columns):
    n, h, w, _ = batch.images.shape
    grid = encoders.encode_png_grid(batch, columns)
    assert np.array_equal(encoders.split_png_grid(grid, n, h, w, columns), batch.images)
    about = encoders.png_grid_metadata(grid)
    assert about["labels"] == batch.labels.tolist() and about["class_names"] == batch.class_names
    assert about["seed"] == batch.meta["seed"] and about["n"] == n


@settings(max_examples=10, deadline=None)
@given(batches())
def test_encoders_are_pure_functions_of_their_inputs_not_of_the_clock(batch):
    import unittest.mock

    now = {fmt: encoders.encode(batch, fmt) for fmt in encoders.FORMATS}
    a_year_on = time.time() + 365 * 86400
    with unittest.mock.patch("time.time", return_value=a_year_on), \
            unittest.mock.patch("time.localtime", return_value=time.localtime(a_year_on)), \
            unittest.mock.patch("time.gmtime", return_value=time.gmtime(a_year_on)):
        assert {fmt: encoders.encode(batch, fmt) for fmt in encoders.FORMATS} == now


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_npz_is_byte_for_byte_what_zipfile_and_numpy_write(batch):
    """encode_npz packs the zip records itself; the bytes must be those of the plain zipfile +
    np.lib.format.write_array path (np.savez's, with fixed timestamps), so a seed's bytes never change. The
    zipfile path it keeps for archives over 4 GiB must write them too."""
    import io
    import zipfile

    arrays = {"images": batch.images, "labels": batch.labels, "class_names": np.asarray(batch.class_names, np.str_)}
    arrays.update({key: np.asarray(value) for key, value in batch.meta.items()})
    reference = io.BytesIO()
    with zipfile.ZipFile(reference, mode="w", compression=zipfile.ZIP_STORED) as archive:
        for key, value in arrays.items():
            entry = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            entry.external_attr = 0o644 << 16
            with archive.open(entry, "w") as f:
                np.lib.format.write_array(f, value, allow_pickle=False)
    assert encoders.encode_npz(batch) == reference.getvalue()
    assert encoders._encode_npz_with_zipfile(encoders._npz_arrays(batch)) == reference.getvalue()


def test_npz_member_names_outside_ascii_are_stored_as_zipfile_stores_them():
    import io
    import zipfile

    batch = encoders.Batch(images=np.zeros((1, 2, 2, 1), np.uint8), labels=np.array([0]), class_names=["a"],
                           meta={"größe": 3})
    data = encoders.encode_npz(batch)
    assert data == encoders._encode_npz_with_zipfile(encoders._npz_arrays(batch))
    assert zipfile.ZipFile(io.BytesIO(data)).namelist()[-1] == "größe.npy"


def test_npz_loads_with_plain_numpy_and_no_pickle(catalog):
    batch = encoders.Batch(images=np.zeros((2, 4, 4, 1), np.uint8), labels=np.array([0, 1]), class_names=["a", "b"],
                           meta={"seed": 5})
    import io

    with np.load(io.BytesIO(encoders.encode_npz(batch)), allow_pickle=False) as npz:
        assert npz["images"].shape == (2, 4, 4, 1) and npz["labels"].dtype == np.int64
        assert npz["class_names"].tolist() == ["a", "b"] and int(npz["seed"]) == 5


# --- request validation -------------------------------------------------------------------------------------

generate_requests = st.fixed_dictionaries(
    {"dataset": st.text(min_size=1, max_size=64)},
    optional={"model": st.text(max_size=64), "n": st.integers(1, schemas.SETTINGS.max_n),
              "labels": st.one_of(st.just("balanced"), st.integers(0, 9), st.text(max_size=10),
                                  st.lists(st.integers(0, 9) | st.text(max_size=5), max_size=20),
                                  st.dictionaries(st.text(max_size=5), st.integers(0, 100), max_size=10)),
              "seed": st.integers(0, schemas.MAX_SEED), "format": st.sampled_from(encoders.FORMATS),
              "temperature": st.floats(0.0, schemas.MAX_TEMPERATURE) | st.integers(0, 2)})


@settings(max_examples=60, deadline=None)
@given(generate_requests)
def test_every_request_inside_the_schema_validates(body):
    request = schemas.GenerateRequest.model_validate_json(json.dumps(body))
    assert request.dataset == body["dataset"] and request.n == body.get("n", 64)


@settings(max_examples=60, deadline=None)
@given(generate_requests, st.sampled_from([
    ("n", 0), ("n", schemas.SETTINGS.max_n + 1), ("n", "64"), ("n", 2.5), ("seed", -1), ("seed", 2**63),
    ("format", "gif"), ("labels", 1.5), ("labels", {"a": -1}), ("labels", {"a": 1.5}),
    ("labels", {str(i): 1 for i in range(schemas.MAX_CLASSES + 1)}), ("dataset", None), ("dataset", "x" * 65),
    ("label", 3), ("model", 7), ("temperature", -0.1), ("temperature", 2.5), ("temperature", "0.5"),
    ("temperature", True), ("temperature", float("nan")), ("temperature", float("inf")),
]))
def test_a_bad_field_is_rejected_and_named(body, bad):
    field, value = bad
    body = {**body, field: value}
    with pytest.raises(ValidationError) as info:
        schemas.GenerateRequest.model_validate_json(json.dumps(body))
    assert any(error["loc"][0] == field for error in info.value.errors())


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200) | st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                                              lambda kids: st.lists(kids) | st.dictionaries(st.text(), kids))
       .map(lambda v: json.dumps(v).encode()))
def test_arbitrary_bodies_give_validation_errors_never_crashes(body):
    try:
        schemas.GenerateRequest.model_validate_json(body)
    except ValidationError:
        pass


def test_the_default_n_and_steps_stay_within_configured_limits_below_them():
    code = ("from service import schemas; "
            "print(schemas.GenerateRequest(dataset='mnist').n, schemas.InterpolateRequest(dataset='mnist').steps)")
    env = {"PATH": "", "SYNTHGEN_MAX_N": "10", "SYNTHGEN_MAX_STEPS": "5"}
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["10", "5"]


def test_a_temperature_of_minus_zero_is_zero():
    request = schemas.GenerateRequest.model_validate_json('{"dataset": "mnist", "temperature": -0.0}')
    assert request.temperature == 0.0 and str(request.temperature) == "0.0"


def test_deeply_nested_json_is_a_validation_error():
    with pytest.raises(ValidationError, match="recursion"):
        schemas.GenerateRequest.model_validate_json(b'{"dataset": "mnist", "labels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")


def test_the_examples_are_valid_requests():
    schemas.GenerateRequest.model_validate(schemas.EXAMPLE_GENERATE)
    schemas.GenerateRequest.model_validate(schemas.EXAMPLE_GENERATE_BY_NAME)
    schemas.InterpolateRequest.model_validate(schemas.EXAMPLE_INTERPOLATE)


# --- dependencies -------------------------------------------------------------------------------------------

def test_default_serving_path_never_imports_torch_or_training(exported_dir):
    code = f"""
import sys, numpy as np
import service.service, service.client
from service.catalog import load_catalog
from service.backends import load_runner
catalog = load_catalog({str(exported_dir)!r})
for entry in catalog.usable():
    load_runner(entry, "onnxruntime", threads=1).run(np.zeros((2, entry.card.latent_dim), np.float32), np.zeros(2, np.int64))
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "training", "medmnist", "torchvision"))
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_torchscript_backend_matches_onnxruntime(catalog, runners):
    for key, entry in catalog.entries.items():
        ts_catalog_entry = load_catalog(catalog.root, "torchscript").entries[key]
        runner = load_runner(ts_catalog_entry, "torchscript", threads=1, device="cpu")
        z = latents(0, 4, entry.card.latent_dim)
        labels = np.arange(4, dtype=np.int64) % entry.card.num_classes
        np.testing.assert_allclose(runner.run(z, labels), runners[key].run(z, labels), atol=1e-5)


# --- the log of rejected requests ------------------------------------------------------------------------

def test_a_rejected_body_becomes_one_info_line_and_other_exceptions_keep_their_traceback():
    import logging
    import sys

    from pydantic import BaseModel, ValidationError

    from service.patches import QuietClientErrors

    class Body(BaseModel):
        n: int

    def record(exc: Exception) -> logging.LogRecord:
        try:
            raise exc
        except Exception:
            info = sys.exc_info()
        return logging.LogRecord("bentoml", logging.ERROR, __file__, 1, "Exception on %s [%s]", ("/generate", "POST"), info)

    try:
        Body.model_validate({"n": "x" * 10_000})
    except ValidationError as exc:
        rejected = record(exc)
    assert QuietClientErrors().filter(rejected)
    assert rejected.levelno == logging.INFO and rejected.exc_info is None
    assert rejected.getMessage() == "Rejected /generate [POST]: 1 validation error(s), answered 400"
    crash = record(RuntimeError("boom"))
    assert QuietClientErrors().filter(crash)
    assert crash.levelno == logging.ERROR and crash.exc_info is not None


# --- the TimeoutMiddleware fix ------------------------------------------------------------------------------

def _timeout_middleware(app, timeout: float):
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    from service import patches

    patches.install()
    return TimeoutMiddleware(app, timeout=timeout)


async def _call(middleware) -> list[dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await middleware({"type": "http", "path": "/x", "method": "GET", "headers": []}, receive, send)
    return sent


def test_request_timers_are_cancelled_when_the_request_ends():
    from starlette.responses import PlainTextResponse

    async def scenario():
        loop, armed = asyncio.get_running_loop(), []
        call_later = loop.call_later

        def recording_call_later(*args, **kwargs):  # every timer the middleware arms
            armed.append(call_later(*args, **kwargs))
            return armed[-1]

        loop.call_later = recording_call_later
        middleware = _timeout_middleware(PlainTextResponse("ok"), timeout=300)
        for _ in range(3):
            sent = await _call(middleware)
        return sent, armed, [h for h in armed if not h.cancelled()]

    sent, armed, live_timers = asyncio.run(scenario())
    assert sent[0]["status"] == 200 and len(armed) == 3 and live_timers == []


def test_a_request_without_a_response_start_in_time_still_gets_504():
    async def slow(scope, receive, send):
        await asyncio.sleep(5)

    sent = asyncio.run(_call(_timeout_middleware(slow, timeout=0.05)))
    assert sent[0]["status"] == 504


def test_an_app_that_returns_without_responding_is_not_held_until_the_timeout():
    async def gone(scope, receive, send):  # what the guard does when a client leaves mid-upload
        return None

    async def scenario():
        started = time.perf_counter()
        await asyncio.wait_for(_call(_timeout_middleware(gone, timeout=300)), timeout=5)
        return time.perf_counter() - started

    assert asyncio.run(scenario()) < 1


def test_onnx_runtime_speed_settings_give_the_same_bytes(exported_dir):
    entry = load_catalog(exported_dir).entries[("mnist", "cdcgan")]
    z = latents(7, 300, entry.card.latent_dim)
    labels = np.arange(300, dtype=np.int64) % 10
    plain = load_runner(entry, "onnxruntime", threads=2, spinning=False, arena=False, part_rows=0).run(z, labels)
    fast = load_runner(entry, "onnxruntime", threads=2, spinning=True, arena=True, part_rows=128).run(z, labels)
    assert np.array_equal(plain, fast)


# Two sessions of a graph whose call needs 64 MiB of activations at n=256 (z [n, 8] -> [n, 65536] -> a
# mean per row), in a fresh process: the ONNX Runtime environment and RSS are process-wide.
ARENA_PROBE = """
import sys
import numpy as np
import onnx
from onnx import TensorProto, helper
from service.backends import OnnxRuntimeRunner
from service.catalog import ModelCard
from service.memory import pin_mmap_threshold

path, arena = sys.argv[1], sys.argv[2] == "1"
w = np.random.default_rng(0).standard_normal((8, 65536)).astype(np.float32)
graph = helper.make_graph(
    [helper.make_node("MatMul", ["z", "w"], ["h"]), helper.make_node("Sigmoid", ["h"], ["s"]),
     helper.make_node("ReduceMean", ["s", "axes"], ["m"], keepdims=1),
     helper.make_node("Reshape", ["m", "shape"], ["images"])],
    "probe", [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 8])],
    [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 1, 1, 1])],
    [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(np.array([1], np.int64), "axes"),
     onnx.numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "shape")])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
card = ModelCard("probe", "probe", "", ("x",), False, (1, 1, 1), 8, {}, {})

def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) << 10

pin_mmap_threshold()
first, second = (OnnxRuntimeRunner(path, card, threads=1, spinning=False, arena=arena) for _ in range(2))
z = np.ones((256, 8), np.float32)
before = rss()
for runner in (first, first):
    runner.run(z, None)
after_first = rss()
for runner in (second, second):
    runner.run(z, None)
print(after_first - before, rss() - after_first)
"""


@pytest.mark.parametrize("arena", [True, False])
def test_every_model_shares_one_arena_or_none(tmp_path, arena):
    """With the arena (the default) a large call's pages stay for the next call of any model, not once per
    model; without it they go back to the OS when the call ends."""
    done = subprocess.run([sys.executable, "-c", ARENA_PROBE, str(tmp_path / "probe.onnx"), str(int(arena))],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    kept_by_first, added_by_second = (int(v) for v in done.stdout.split())
    mb = 2**20
    if arena:
        assert kept_by_first > 48 * mb, f"the first call kept {kept_by_first / mb:.0f} MiB: no arena"
    else:
        assert kept_by_first < 16 * mb, f"the first call kept {kept_by_first / mb:.0f} MiB without an arena"
    assert added_by_second < 16 * mb, f"the second model's call added {added_by_second / mb:.0f} MiB"


def test_a_body_of_many_unknown_fields_is_answered_in_linear_time():
    """40,000 unknown keys (470 KB, under the body limit) once took 31 s of the event loop to describe."""
    from service.errors import MAX_DETAIL, validation_error_body

    schema = schemas.GenerateRequest.model_json_schema()
    errors = [{"loc": [f"k{i}"], "type": "extra_forbidden", "msg": "Extra inputs are not permitted"} for i in range(40_000)]
    started = time.perf_counter()
    body = validation_error_body(errors, schema)
    assert time.perf_counter() - started < 2  # about 0.1 s here
    assert len(body["detail"]) == MAX_DETAIL and body["error"].endswith(f"and {40_000 - MAX_DETAIL} more")
