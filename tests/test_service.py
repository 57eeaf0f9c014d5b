"""The public contract, through a real `bentoml serve` on 127.0.0.1 serving the tiny zoo of `exported_dir`.

Every format round-trips, the same request and seed give the same bytes, classes can be chosen by id or
name, the catalog and interpolation work, every error is a 4xx JSON body naming the field, and BentoML's
health, metrics and OpenAPI routes keep working.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import re
import socket
import time
import tomllib
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from openapi_spec_validator import validate as validate_openapi

import service
from service import encoders, schemas
from service_harness import main_server

REPO = Path(__file__).resolve().parent.parent
MNIST = {"dataset": "mnist", "model": "cdcgan"}


@pytest.fixture(scope="module")
def server(exported_dir, tmp_path_factory):
    return main_server(exported_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def generate(http, **body) -> httpx.Response:
    return http.post("/generate", json=body)


def ok(response: httpx.Response) -> httpx.Response:
    assert response.status_code == 200, response.text[:500]
    return response


def npz(http, **body) -> encoders.Batch:
    return encoders.decode_npz(ok(generate(http, format="npz", **body)).content)


def error(response: httpx.Response, status: int | tuple[int, ...]) -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    assert "Traceback" not in response.text and 'File "' not in response.text
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"]
    return body


def named_fields(body: dict) -> set[str]:
    return {str(item["loc"][0]) for item in body.get("detail", []) if item.get("loc")}


# --- formats ------------------------------------------------------------------------------------------------

def test_npz_holds_uint8_nhwc_images_labels_class_names_and_seed(http):
    response = ok(generate(http, n=10, seed=0, **MNIST))
    assert response.headers["content-type"] == "application/x-npz"
    assert response.headers["x-seed"] == "0" and response.headers["x-model"] == "cdcgan"
    batch = encoders.decode_npz(response.content)
    assert batch.images.shape == (10, 28, 28, 1) and batch.images.dtype == np.uint8
    assert batch.labels.dtype == np.int64 and batch.labels.tolist() == list(range(10))
    assert batch.class_names == [str(i) for i in range(10)]
    assert batch.meta == {"dataset": "mnist", "model": "cdcgan", "seed": 0}


@pytest.mark.parametrize("fmt", ["png_grid", "zip", "json"])
def test_every_format_carries_the_same_images_as_npz(http, fmt):
    request = {"dataset": "pneumoniamnist", "n": 7, "seed": 3}
    reference = npz(http, **request)
    response = ok(generate(http, format=fmt, **request))
    assert response.headers["content-type"].startswith(encoders.MEDIA_TYPES[fmt])
    if fmt == "png_grid":
        images = encoders.split_png_grid(response.content, 7, 28, 28)
        assert np.array_equal(images, reference.images)
        about = encoders.png_grid_metadata(response.content)
        assert about["labels"] == reference.labels.tolist() and about["seed"] == 3
        return
    decoded = encoders.decode_zip(response.content) if fmt == "zip" else encoders.decode_json(response.content)
    assert np.array_equal(decoded.images, reference.images)
    assert decoded.labels.tolist() == reference.labels.tolist() == [0, 1, 0, 1, 0, 1, 0]
    assert decoded.class_names == ["normal", "pneumonia"] and decoded.meta["seed"] == 3


def test_zip_has_one_png_per_image_and_a_labels_csv(http):
    import io
    import zipfile

    body = ok(generate(http, format="zip", n=3, seed=0, labels=[2, 0, 9], **MNIST)).content
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        names = archive.namelist()
        table = archive.read("labels.csv").decode()
    assert names[:3] == [f"images/{i:06d}.png" for i in range(3)] and "labels.csv" in names
    assert table.splitlines() == ["filename,label,class_name", "images/000000.png,2,2", "images/000001.png,0,0",
                                  "images/000002.png,9,9"]


def test_rgb_64px_model_gives_n_64_64_3(http):
    batch = npz(http, dataset="bloodmnist_64", n=3, seed=1)
    assert batch.images.shape == (3, 64, 64, 3) and len(batch.class_names) == 8


def test_unconditional_model_labels_every_image_minus_one(http):
    batch = npz(http, dataset="mnist", model="mlp_vae", n=4, seed=0)
    assert batch.labels.tolist() == [-1, -1, -1, -1]


# --- reproducibility ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", encoders.FORMATS)
def test_same_seed_gives_same_bytes(http, fmt):
    request = {"n": 12, "seed": 42, "format": fmt, **MNIST}
    assert ok(generate(http, **request)).content == ok(generate(http, **request)).content


def test_different_seeds_give_different_images(http):
    assert not np.array_equal(npz(http, n=4, seed=1, **MNIST).images, npz(http, n=4, seed=2, **MNIST).images)


def test_missing_seed_is_drawn_returned_and_reproducible(http):
    first = ok(generate(http, n=3, **MNIST))
    seed = int(first.headers["x-seed"])
    assert encoders.decode_npz(first.content).meta["seed"] == seed
    assert ok(generate(http, n=3, seed=seed, **MNIST)).content == first.content


def test_null_for_an_optional_field_means_its_default(http):
    omitted = ok(generate(http, dataset="mnist", seed=5)).content
    assert ok(generate(http, dataset="mnist", model=None, n=None, labels=None, seed=5, format=None)).content == omitted
    path = {"dataset": "mnist", "seed_start": 2, "seed_end": 3}
    assert ok(http.post("/interpolate", json={**path, "steps": None, "label": None, "method": None})).content == \
        ok(http.post("/interpolate", json=path)).content


def test_the_download_filename_names_dataset_model_seed_and_count(http):
    npz_file = ok(generate(http, n=7, seed=3, **MNIST)).headers["content-disposition"]
    assert npz_file == 'attachment; filename="synthgen-mnist-cdcgan-seed3-n7.npz"'
    grid = ok(generate(http, n=7, seed=3, format="png_grid", **MNIST)).headers["content-disposition"]
    assert grid == 'inline; filename="synthgen-mnist-cdcgan-seed3-n7.png"'
    path = ok(http.post("/interpolate", json={**MNIST, "seed_start": 1, "seed_end": 2, "steps": 4}))
    assert path.headers["content-disposition"] == 'inline; filename="synthgen-mnist-cdcgan-seed1-to-2-steps4.png"'
    path = ok(http.post("/interpolate", json={**MNIST, "seed_start": 1, "seed_end": 2, "steps": 4, "method": "lerp"}))
    assert path.headers["content-disposition"] == 'inline; filename="synthgen-mnist-cdcgan-seed1-to-2-steps4-lerp.png"'


def test_larger_n_with_the_same_seed_starts_with_the_same_images(http):
    small, large = npz(http, n=5, seed=9, **MNIST), npz(http, n=23, seed=9, **MNIST)
    assert np.array_equal(large.images[:5], small.images)


def test_concurrent_requests_share_model_calls_and_stay_byte_identical(http, server):
    requests = [{"n": 1 + i % 3, "seed": i, "labels": i % 10, **MNIST} for i in range(32)]
    alone = [ok(generate(http, **r)).content for r in requests]
    calls_before = model_calls(http)
    with concurrent.futures.ThreadPoolExecutor(17) as pool:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            # A large request to another model first: every model shares one inference thread, so the small
            # requests queue behind its calls and merge even on a loaded machine where they would not overlap.
            busy = pool.submit(lambda: ok(generate(client, dataset="bloodmnist_64", n=4096, seed=0, format="npz")))
            together = list(pool.map(lambda r: ok(generate(client, **r)).content, requests))
            busy.result()
    assert together == alone
    assert model_calls(http) - calls_before < len(requests)  # some requests were merged


def counter(http, name: str, **labels: str) -> float:
    """The value of one Prometheus counter series in /metrics (0 before its first increment)."""
    has_labels = "".join(rf'(?=[^}}]*{key}="{re.escape(value)}")' for key, value in labels.items())
    match = re.search(rf'^{name}_total\{{{has_labels}[^}}]*\}} (\S+)$', ok(http.get("/metrics")).text, re.M)
    return float(match.group(1)) if match else 0.0


def model_calls(http) -> float:
    return counter(http, "synthgen_model_calls", dataset="mnist", model="cdcgan")


def images_made(http, dataset: str, model: str) -> float:
    return counter(http, "synthgen_images", dataset=dataset, model=model)


def cancelled(http) -> float:
    return counter(http, "synthgen_requests_cancelled", route="/generate")


def test_a_client_that_goes_away_cancels_the_rows_of_its_request_not_yet_computed(server, http):
    request = {"dataset": "bloodmnist_64", "model": "dcgan", "n": schemas.SETTINGS.max_n, "seed": 0}
    started = time.monotonic()
    ok(generate(http, **request))
    whole_s = time.monotonic() - started
    before, since, cancelled_before = images_made(http, "bloodmnist_64", "dcgan"), len(server.log_text()), cancelled(http)
    body = json.dumps(request).encode()
    with socket.create_connection(server.url.removeprefix("http://").split(":"), timeout=30) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    time.sleep(whole_s)  # as long as the whole request took
    made = images_made(http, "bloodmnist_64", "dcgan") - before
    assert made < request["n"] / 2, (made, whole_s)
    said = server.wait_for_log(lambda t: "went away" in t, since)
    assert re.search(r"Client went away: cancelled /generate \[POST\] from 127\.0\.0\.1:\d+ after \d+\.\d+ s", said), said
    assert cancelled(http) == cancelled_before + 1
    assert ok(generate(http, **{**request, "n": 4})).headers["x-count"] == "4"

# --- labels -------------------------------------------------------------------------------------------------

def test_balanced_is_the_default_for_conditional_models(http):
    assert npz(http, n=12, seed=0, **MNIST).labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_class_by_name_equals_class_by_id(http):
    request = {"dataset": "pneumoniamnist", "n": 4, "seed": 5}
    by_name = ok(generate(http, labels="pneumonia", **request)).content
    assert by_name == ok(generate(http, labels=1, **request)).content
    assert by_name == ok(generate(http, labels=["pneumonia", 1, "pneumonia", 1], **request)).content
    assert encoders.decode_npz(by_name).labels.tolist() == [1, 1, 1, 1]


def test_labels_for_an_unconditional_model_give_400_saying_so(http):
    body = error(generate(http, dataset="mnist", model="mlp_vae", n=2, labels=3), 400)
    assert "unconditional" in body["error"] and named_fields(body) == {"labels"}


# --- catalog ------------------------------------------------------------------------------------------------

def test_catalog_lists_every_dataset_model_and_default(http):
    catalog = ok(http.post("/models", json={})).json()
    assert ok(http.get("/models")).json() == catalog
    assert set(catalog["datasets"]) == {"mnist", "bloodmnist_64", "pneumoniamnist"}
    assert catalog["datasets"]["mnist"]["default_model"] == "cdcgan"
    assert catalog["datasets"]["mnist"]["best_for_training"] is None  # no card of the tiny zoo has a CAS
    assert catalog["datasets"]["mnist"]["models"] == ["cdcgan", "mlp_vae"]
    assert catalog["failed"] == [] and catalog["backend"] == "onnxruntime" and catalog["max_n"] == 10_000
    models = {(m["dataset"], m["model"]): m for m in catalog["models"]}
    cvae = models[("pneumoniamnist", "cvae")]
    assert cvae["conditional"] and cvae["classes"] == ["normal", "pneumonia"] and cvae["image_shape"] == [1, 28, 28]
    assert not models[("mnist", "mlp_vae")]["conditional"] and models[("bloodmnist_64", "dcgan")]["image_shape"] == [3, 64, 64]
    assert all(isinstance(m["metrics"], dict) and m["latent_dim"] > 0 and m["merges_requests"] for m in models.values())
    assert all({"epochs", "steps", "wall_time_s", "hardware", "precision"} <= set(m["training"]) for m in models.values())
    assert {m["training"]["precision"] for m in models.values()} <= {"fp32", "bf16"}
    assert {key for key, m in models.items() if m["weight_storage"] == "float16"} == {("mnist", "cdcgan")}
    assert {m["weight_storage"] for m in models.values()} == {"float16", "float32"}


def test_default_model_is_used_when_none_is_named(http):
    assert ok(generate(http, dataset="mnist", n=1, seed=0)).headers["x-model"] == "cdcgan"


# --- temperature --------------------------------------------------------------------------------------------

def test_temperature_one_is_the_default_byte_for_byte(http):
    assert ok(generate(http, n=6, seed=4, temperature=1, **MNIST)).content == \
        ok(generate(http, n=6, seed=4, **MNIST)).content


def test_a_temperature_is_reproducible_recorded_and_named_in_the_filename(http):
    response = ok(generate(http, n=6, seed=4, temperature=0.5, **MNIST))
    assert ok(generate(http, n=6, seed=4, temperature=0.5, **MNIST)).content == response.content
    batch = encoders.decode_npz(response.content)
    assert batch.meta["temperature"] == 0.5
    assert response.headers["content-disposition"] == 'attachment; filename="synthgen-mnist-cdcgan-seed4-n6-t0.5.npz"'
    near_one = ok(generate(http, n=1, seed=4, temperature=1.0000001, **MNIST)).headers["content-disposition"]
    assert near_one.endswith('-n1-t1.0000001.npz"')  # never rounded to a name that reads as another temperature
    assert not np.array_equal(batch.images, npz(http, n=6, seed=4, **MNIST).images)
    info = json.loads(ok(generate(http, n=2, seed=4, temperature=0.5, format="json", **MNIST)).content)
    assert info["temperature"] == 0.5


def test_a_lower_temperature_keeps_images_nearer_the_centre_of_their_class(http):
    centre = npz(http, n=1, seed=0, labels=3, temperature=0, **MNIST).images.astype(float)
    assert np.array_equal(npz(http, n=8, seed=5, labels=3, temperature=0, **MNIST).images,
                          np.repeat(centre.astype(np.uint8), 8, axis=0))  # 0: one image per class
    spread = {t: np.abs(npz(http, n=64, seed=1, labels=3, temperature=t, **MNIST).images - centre).mean()
              for t in (0.25, 1.0, 2.0)}
    assert spread[0.25] < spread[1.0] < spread[2.0], spread


def test_an_interpolation_at_a_temperature_ends_at_the_images_generate_gives_at_it(http):
    path = encoders.decode_npz(ok(http.post("/interpolate", json={
        **MNIST, "seed_start": 4, "seed_end": 11, "steps": 5, "label": 2, "temperature": 0.7, "format": "npz"})).content)
    assert np.array_equal(path.images[0], npz(http, n=1, seed=4, labels=2, temperature=0.7, **MNIST).images[0])
    assert np.array_equal(path.images[-1], npz(http, n=1, seed=11, labels=2, temperature=0.7, **MNIST).images[0])
    assert path.meta["temperature"] == 0.7


def test_a_temperature_out_of_range_gives_its_range(http):
    for bad in (2.5, -1, "hot", True):
        body = error(generate(http, **MNIST, n=2, temperature=bad), 400)
        assert body["detail"] == [{"loc": ["temperature"], "msg": "temperature must be a number from 0.0 to 2.0",
                                   "type": body["detail"][0]["type"],
                                   "allowed": {"type": "number", "minimum": 0.0, "maximum": 2.0}}], body


# --- interpolation ------------------------------------------------------------------------------------------

def test_interpolation_starts_and_ends_at_the_seed_images(http):
    path = encoders.decode_npz(ok(http.post("/interpolate", json={
        **MNIST, "seed_start": 4, "seed_end": 11, "steps": 6, "label": "7", "format": "npz"})).content)
    assert path.images.shape == (6, 28, 28, 1) and path.labels.tolist() == [7] * 6
    assert np.array_equal(path.images[0], npz(http, n=1, seed=4, labels=7, **MNIST).images[0])
    assert np.array_equal(path.images[-1], npz(http, n=1, seed=11, labels=7, **MNIST).images[0])


def test_interpolation_png_grid_is_one_row(http):
    response = ok(http.post("/interpolate", json={"dataset": "bloodmnist_64", "steps": 5}))
    assert response.headers["content-type"] == "image/png"
    grid = encoders.decode_png(response.content)
    assert grid.shape == (64 + 2 * encoders.GRID_PAD, 5 * 64 + 6 * encoders.GRID_PAD, 3)


def test_interpolation_label_on_an_unconditional_model_gives_400(http):
    body = error(http.post("/interpolate", json={"dataset": "mnist", "model": "mlp_vae", "label": 1}), 400)
    assert named_fields(body) == {"label"}



@pytest.mark.parametrize("field, value, allowed", [
    ("steps", 1, {"minimum": 2, "maximum": schemas.SETTINGS.max_steps}),
    ("steps", schemas.SETTINGS.max_steps + 1, {"minimum": 2, "maximum": schemas.SETTINGS.max_steps}),
    ("method", "cubic", ["slerp", "lerp"]), ("seed_start", -1, {"minimum": 0}), ("seed_end", 2**63, {"maximum": 2**63 - 1}),
    ("label", "not-a-digit", [str(i) for i in range(10)]), ("format", "gif", ["npz", "png_grid", "zip", "json"]),
])
def test_a_bad_interpolation_field_gives_400_naming_it_and_what_it_allows(http, field, value, allowed):
    body = error(http.post("/interpolate", json={**MNIST, field: value}), 400)
    assert named_fields(body) == {field}
    given = body["detail"][0]["allowed"]
    assert given == allowed if isinstance(allowed, list) else allowed.items() <= given.items(), given

# --- errors -------------------------------------------------------------------------------------------------

def test_unknown_dataset_gives_404_listing_datasets(http):
    body = error(generate(http, dataset="cifar10", n=1), 404)
    assert named_fields(body) == {"dataset"}
    assert body["datasets"] == {"bloodmnist_64": ["dcgan"], "mnist": ["cdcgan", "mlp_vae"], "pneumoniamnist": ["cvae"]}


def test_unknown_model_gives_404_listing_the_dataset_models(http):
    body = error(generate(http, dataset="mnist", model="stylegan", n=1), 404)
    assert named_fields(body) == {"model"} and body["detail"][0]["allowed"] == ["cdcgan", "mlp_vae"]


def test_path_like_names_are_just_unknown(http):
    for name in ("../mnist", "mnist/cdcgan", "/etc/passwd", "mnist\x00"):
        error(generate(http, dataset=name, n=1), 404)
        error(generate(http, dataset="mnist", model="../" + name, n=1), 404)


@pytest.mark.parametrize("change, field", [
    ({"n": 0}, "n"), ({"n": 10_001}, "n"), ({"n": "64"}, "n"), ({"n": 2.5}, "n"),
    ({"seed": -1}, "seed"), ({"seed": "abc"}, "seed"), ({"format": "gif"}, "format"),
    ({"labels": 10}, "labels"), ({"labels": "eleven"}, "labels"), ({"labels": [1, 2]}, "labels"),
    ({"labels": 1.5}, "labels"), ({"labels": -1}, "labels"), ({"label": 3}, "label"), ({"dataset": None}, "dataset"),
])
def test_invalid_fields_give_400_naming_the_field_and_what_it_allows(http, change, field):
    body = error(generate(http, **{**MNIST, "n": 3, **change}), 400)
    assert field in named_fields(body) and field in body["error"]
    assert all(item.get("allowed") for item in body["detail"]), body


def test_a_number_out_of_range_gives_its_range(http):
    body = error(generate(http, **MNIST, n=10_001), 400)
    assert body["detail"] == [{"loc": ["n"], "msg": "n must be an integer in 1..10000", "type": "less_than_equal",
                               "allowed": {"type": "integer", "minimum": 1, "maximum": 10_000}}]


def test_a_bad_labels_item_is_one_error_at_its_index_not_one_per_union_branch(http):
    body = error(generate(http, **MNIST, n=2, labels=[1, 2.5]), 400)
    assert [item["loc"] for item in body["detail"]] == [["labels", 1]]
    assert [branch["type"] for branch in body["detail"][0]["allowed"]["oneOf"]] == ["integer", "string"]  # an item's forms
    body = error(generate(http, **MNIST, labels={"3": -1}), 400)
    assert [item["loc"] for item in body["detail"]] == [["labels", "3"]] and "0..10000" in body["error"]
    assert body["detail"][0]["allowed"] == {"type": "integer", "minimum": 0, "maximum": 10_000}
    body = error(generate(http, **MNIST, labels=2.5), 400)
    assert [item["loc"] for item in body["detail"]] == [["labels"]] and "balanced" in body["error"]


def test_class_counts_give_that_many_of_each_class_in_their_order(http):
    counted = ok(generate(http, **MNIST, labels={"7": 3, "2": 0, "3": 2}, seed=4))
    assert counted.headers["x-count"] == "5" and "-n5." in counted.headers["content-disposition"]
    batch = encoders.decode_npz(counted.content)
    assert batch.labels.tolist() == [7, 7, 7, 3, 3]
    listed = npz(http, **MNIST, n=5, labels=["7", "7", "7", "3", "3"], seed=4)
    assert np.array_equal(batch.images, listed.images)  # the list the counts stand for, byte for byte
    assert np.array_equal(npz(http, **MNIST, n=5, labels={"7": 3, "3": 2}, seed=4).images, batch.images)


def test_bad_class_counts_give_400_naming_the_class_or_n(http):
    body = error(generate(http, **MNIST, labels={"seven": 2, "3": 1, "cat": 1}), 400)
    assert [item["loc"] for item in body["detail"]] == [["labels", "seven"], ["labels", "cat"]]
    assert body["detail"][0]["allowed"] == [str(i) for i in range(10)] and "'seven'" in body["error"]
    body = error(generate(http, **MNIST, n=4, labels={"1": 2, "2": 1}), 400)
    assert body["detail"] == [{"loc": ["n"], "msg": "n is 4 but the labels' counts add up to 3; leave n out or make "
                                                    "them equal", "type": "value_error", "allowed": [3]}]
    for counts, total in (({}, 0), ({"1": 0}, 0), ({"1": 6_000, "2": 5_000}, 11_000)):
        body = error(generate(http, **MNIST, labels=counts), 400)
        assert named_fields(body) == {"labels"} and f"add up to {total};" in body["error"]
    body = error(generate(http, dataset="mnist", model="mlp_vae", labels={"1": 2}), 400)
    assert "unconditional" in body["error"] and named_fields(body) == {"labels"}


def test_every_bad_item_of_a_labels_list_is_reported_at_its_index(http):
    body = error(generate(http, **MNIST, n=4, labels=["seven", 1, 10, "3"]), 400)
    assert [item["loc"] for item in body["detail"]] == [["labels", 0], ["labels", 2]]
    assert "labels[0]" in body["error"] and "'seven'" in body["error"] and "labels[2]" in body["error"]
    assert body["detail"][0]["allowed"] == [str(i) for i in range(10)]
    assert body["detail"][1]["allowed"] == list(range(10))
    many = error(generate(http, **MNIST, n=50, labels=[99] * 50), 400)
    assert len(many["detail"]) == 10 and many["error"].endswith("and 40 more")


def test_a_rejected_body_is_logged_as_one_line_without_a_traceback(server, http):
    before = len(server.log_text())
    error(generate(http, **MNIST, n=2_000, labels=[1.5] * 2_000), 400)
    error(generate(http, **MNIST, n=0), 400)
    written = server.wait_for_log(lambda text: text.count("Rejected /generate [POST]") >= 2, since=before)
    assert written.count("Rejected /generate [POST]") == 2, written[-2000:]
    assert "Traceback" not in written and "ValidationError" not in written and len(written) < 4000


def test_an_unknown_field_lists_the_fields(http):
    body = error(generate(http, **MNIST, lables=[1]), 400)
    assert body["detail"][0]["allowed"] == ["dataset", "model", "n", "labels", "seed", "temperature", "format"]


def test_a_long_unknown_name_is_not_echoed_whole(http):
    long_name = "x" * 100_000
    for body in (error(generate(http, **MNIST, **{long_name: 1}), 400),
                 error(generate(http, dataset="pneumoniamnist", labels={long_name: 1}), 400)):
        assert len(json.dumps(body)) < 2_000 and body["detail"][0]["loc"][-1] == "x" * 64 + "..."
    twice = b'{"dataset": "mnist", "%s": {"a": 1, "a": 2}}' % long_name.encode()
    body = error(http.post("/generate", content=twice, headers={"Content-Type": "application/json"}), 400)
    assert len(json.dumps(body)) < 2_000 and "twice" in body["error"]


def test_wrong_methods_and_unknown_routes_get_json_errors_without_detail(http):
    body = error(http.get("/generate"), 405)
    assert "GET" in body["error"] and "POST" in body["error"] and "detail" not in body
    assert "detail" not in error(http.put("/interpolate", json={}), 405)
    assert "GET, POST" in error(http.put("/models"), 405)["error"]
    for path in ("/livez", "/metrics"):  # BentoML's routes: Starlette's plain-text 405 once
        assert "method POST is not allowed" in error(http.post(path), 405)["error"]
    body = error(http.get("/no-such-route"), 404)
    assert "/generate" in body["error"] and "detail" not in body


@pytest.mark.parametrize("path, raw, field, key", [
    ("/generate", b'{"dataset": "mnist", "n": 1, "n": 2}', "n", "n"),
    ("/generate", b'{"dataset": "pneumoniamnist", "labels": {"normal": 3, "normal": 5}}', "labels", "normal"),
    ("/interpolate", b'{"dataset": "mnist", "seed_start": 0, "seed_end": 1, "seed_end": 2}', "seed_end", "seed_end"),
])
def test_a_key_given_twice_gives_400_naming_it_instead_of_keeping_the_last(http, path, raw, field, key):
    body = error(http.post(path, content=raw, headers={"content-type": "application/json"}), 400)
    assert named_fields(body) == {field} and repr(key) in body["error"] and "twice" in body["error"]


def test_bad_class_name_lists_the_allowed_names(http):
    body = error(generate(http, dataset="pneumoniamnist", n=1, labels="covid"), 400)
    assert body["detail"][0]["allowed"] == ["normal", "pneumonia"]


def test_format_error_names_the_allowed_formats(http):
    body = error(generate(http, format="tiff", **MNIST), 400)
    assert all(fmt in json.dumps(body) for fmt in encoders.FORMATS)


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'"mnist"', b"null", b"", b"\xff\xfe"])
def test_malformed_bodies_give_400(http, content):
    error(http.post("/generate", content=content, headers={"Content-Type": "application/json"}), 400)


def test_models_takes_no_fields_as_the_other_routes_take_no_unknown_ones(http):
    body = error(http.post("/models", json={"x": 1}), 400)
    assert named_fields(body) == {"x"} and "takes no fields" in body["error"]


def test_a_body_in_another_charset_than_utf8_gives_415(http):
    body = '{"dataset": "mnist"}'.encode("utf-16")
    answer = http.post("/generate", content=body, headers={"Content-Type": "application/json; charset=utf-16"})
    assert "UTF-8" in error(answer, 415)["error"]
    ok(http.post("/generate", content=b'{"dataset": "mnist", "n": 1}',
                 headers={"Content-Type": "application/json; charset=UTF-8"}))


@pytest.mark.parametrize("content", [b"{", b"[]", b"null"])
def test_a_malformed_models_body_gets_the_same_error_format(http, content):
    body = error(http.post("/models", content=content, headers={"Content-Type": "application/json"}), 400)
    assert body["error"].startswith("body") and [item["loc"] for item in body["detail"]] == [["body"]]
    assert "errors.pydantic.dev" not in json.dumps(body)


def test_deeply_nested_json_gives_400_fast(http):
    deep = b'{"dataset": "mnist", "labels": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    started = time.perf_counter()
    error(http.post("/generate", content=deep, headers={"Content-Type": "application/json"}), 400)
    error(http.post("/models", content=b"[" * 50_000 + b"]" * 50_000, headers={"Content-Type": "application/json"}),
          400)
    assert time.perf_counter() - started < 5  # about 10 ms here; a parser that recursed would take seconds or crash


def test_huge_labels_list_gives_4xx_without_generating(http):
    before = images_made(http, "mnist", "cdcgan")
    error(generate(http, **MNIST, n=2, labels=[0] * 200_000), (400, 413))
    assert images_made(http, "mnist", "cdcgan") == before


def test_oversized_body_gives_413(http):
    body = json.dumps({"dataset": "mnist", "model": "x" * (2 << 20)}).encode()
    error(http.post("/generate", content=body, headers={"Content-Type": "application/json"}), 413)


def test_non_json_content_type_gives_415(http):
    error(http.post("/generate", content=b"dataset=mnist", headers={"Content-Type": "application/x-www-form-urlencoded"}), 415)
    error(http.post("/generate", content=b"x", headers={"Content-Type": "application/vnd.bentoml+pickle"}), 415)
    two = [("Content-Type", "text/plain"), ("Content-Type", "application/json")]  # every one is checked, not the last
    assert "text/plain" in error(http.post("/generate", content=b'{"dataset": "mnist"}', headers=two), 415)["error"]



@pytest.mark.parametrize("encoding", ["gzip", "br"])
def test_a_compressed_body_gives_415_naming_its_encoding_not_a_json_error_or_a_silent_read(http, encoding):
    body = gzip.compress(b'{"dataset": "mnist", "n": 1}') if encoding == "gzip" else b'{"dataset": "mnist", "n": 1}'
    answer = error(http.post("/generate", content=body, headers={"Content-Type": "application/json",
                                                                  "Content-Encoding": encoding}), 415)
    assert encoding in answer["error"] and "uncompressed" in answer["error"]
    assert http.post("/generate", json={"dataset": "mnist", "n": 1}, headers={"Content-Encoding": "identity"}).status_code == 200
    two = http.post("/generate", content=body, headers=[("Content-Type", "application/json"),
                                                        ("Content-Encoding", encoding), ("Content-Encoding", "identity")])
    assert encoding in error(two, 415)["error"]

# --- BentoML's own routes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/livez", "/readyz", "/healthz", "/metrics", "/docs.json"])
def test_health_metrics_and_docs_routes_work(http, path):
    ok(http.get(path))


def test_made_up_paths_share_one_metrics_label_so_metrics_stay_small(http):
    """Each made-up path was a new series of BentoML's request metrics: 5,000 of them made /metrics 18 MB."""
    before = counter(http, "bentoml_service_request", endpoint="other", http_response_code="404")
    for i in range(20):
        error(http.get(f"/made-up-{i}"), 404)
    metrics = ok(http.get("/metrics")).text
    assert "made-up" not in metrics
    assert counter(http, "bentoml_service_request", endpoint="other", http_response_code="404") == before + 20
    ok(http.get("/livez"))
    assert 'endpoint="/generate"' in metrics  # a route keeps its own label


def test_openapi_documents_every_endpoint_and_the_labels_shapes(http):
    spec = ok(http.get("/docs.json")).json()
    assert spec["info"]["version"] == service.VERSION == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert {"/generate", "/interpolate", "/models"} <= set(spec["paths"])
    labels = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]["labels"]
    assert {s["type"] for s in labels["oneOf"]} == {"integer", "string", "array", "object"}


def test_openapi_is_valid_and_documents_what_the_routes_answer(http):
    spec = ok(http.get("/docs.json")).json()
    validate_openapi(spec)
    answers = spec["paths"]["/generate"]["post"]["responses"]
    assert set(answers["200"]["content"]) == set(encoders.MEDIA_TYPES.values())
    assert {"X-Seed", "X-Count", "Content-Disposition"} <= set(answers["200"]["headers"])
    assert {"400", "401", "404", "413", "415", "503"} <= set(answers) and "500" not in answers
    assert answers["404"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert set(spec["paths"]["/models"]) == {"get", "post"}
    assert {"401", "413", "415"} <= set(spec["paths"]["/models"]["post"]["responses"])  # it takes a (JSON) body too
    assert "securitySchemes" not in spec["components"]  # no SYNTHGEN_API_TOKEN, no auth to declare
    request = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert request["properties"]["n"]["nullable"] and not request["properties"]["dataset"].get("nullable")


def test_error_and_json_bodies_match_their_documented_schemas(http):
    for response in (generate(http, dataset="cifar10"), generate(http, **MNIST, n=0),
                     generate(http, **MNIST, n=2, labels=[99, "x"]), generate(http, **MNIST, lables=1),
                     http.post("/generate", content=b"{", headers={"Content-Type": "application/json"}),
                     http.post("/generate", content=b"n=1", headers={"Content-Type": "text/plain"})):
        body = error(response, (400, 404, 415))
        assert set(body) <= set(schemas.Error.model_fields), body
        schemas.Error.model_validate(body)
    batch = ok(generate(http, **MNIST, n=2, seed=1, format="json")).json()
    assert set(batch) <= set(schemas.JsonBatch.model_fields) and schemas.JsonBatch.model_validate(batch).n == 2


def test_the_documented_examples_work(http):
    ok(generate(http, **schemas.EXAMPLE_GENERATE))
    ok(generate(http, **schemas.EXAMPLE_GENERATE_BY_NAME))
    ok(http.post("/interpolate", json=schemas.EXAMPLE_INTERPOLATE))


def mapped_files(server) -> set[str]:
    """Every file mapped by the server's processes (shared libraries included)."""
    processes = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]
    return {m.path for p in processes for m in p.memory_maps()}


def test_served_process_never_loads_torch(server, http):
    ok(generate(http, n=1, **MNIST))
    mapped = mapped_files(server)
    assert any("onnxruntime" in path for path in mapped)
    assert not [path for path in mapped if "libtorch" in path or "/torch/" in path]


def test_served_process_runs_on_uvloop_and_httptools(server, http):
    ok(generate(http, n=1, **MNIST))
    mapped = mapped_files(server)
    assert any("/uvloop/" in path for path in mapped), "uvicorn fell back to the pure-Python asyncio loop"
    assert any("/httptools/" in path for path in mapped), "uvicorn fell back to the pure-Python h11 parser"
