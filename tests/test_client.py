"""service.client.SynthClient and training.synthetic.SyntheticDataset against the real server."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from service import encoders
from service.client import MAX_RETRY_AFTER_S, SynthClient, SynthError, chunk_seed, retry_delay
from service_harness import REPO, main_server
from training.synthetic import SyntheticDataset


@pytest.fixture(scope="module")
def url(exported_dir, tmp_path_factory):
    return main_server(exported_dir, tmp_path_factory).url


@pytest.fixture(scope="module")
def client(url):
    with SynthClient(url) as client:
        yield client


def test_generate_returns_uint8_nhwc_images_labels_and_class_names(client):
    images, labels, names = client.generate("pneumoniamnist", n=6, seed=0)
    assert images.shape == (6, 28, 28, 1) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 0, 1, 0, 1] and names == ["normal", "pneumonia"]
    assert client.last_seed == 0


def test_generate_without_seed_reports_the_seed_it_got(client):
    images, _, _ = client.generate("mnist", n=2)
    again, _, _ = client.generate("mnist", n=2, seed=client.last_seed)
    assert np.array_equal(images, again)


def test_labels_by_name_and_model_choice(client):
    _, labels, _ = client.generate("mnist", n=3, model="cdcgan", labels=["3", 4, "5"], seed=1)
    assert labels.tolist() == [3, 4, 5]
    _, labels, _ = client.generate("mnist", n=2, model="mlp_vae", seed=1)
    assert labels.tolist() == [-1, -1]


def test_more_images_than_one_request_come_in_several_with_derived_seeds(url, client):
    with SynthClient(url, max_request_n=25) as small:
        assert small.chunk_rows("mnist") == 20  # balanced: a multiple of the 10 classes
        images, labels, _ = small.generate("mnist", n=47, seed=3)
        assert small.last_seed == 3 and images.shape == (47, 28, 28, 1)
        assert labels.tolist() == [i % 10 for i in range(47)]  # balanced across the requests too
        first, _, _ = client.generate("mnist", n=20, seed=3)
        second, _, _ = client.generate("mnist", n=20, seed=chunk_seed(3, 1))
        assert np.array_equal(images[:20], first) and np.array_equal(images[20:40], second)
        assert np.array_equal(small.generate("mnist", n=47, seed=3)[0], images)

        chosen = [7, "2", 5] * 11
        _, labels, _ = small.generate("mnist", n=33, labels=chosen, seed=1)  # a list is sliced, 25 + 8
        assert labels.tolist() == [int(x) for x in chosen]
        images, labels, _ = small.generate("mnist", model="mlp_vae", n=30)  # unconditional: 25 + 5, seed drawn
        assert labels.tolist() == [-1] * 30 and small.last_seed is not None
        assert np.array_equal(small.generate("mnist", model="mlp_vae", n=30, seed=small.last_seed)[0], images)


def test_class_counts_give_the_images_of_the_list_they_stand_for_in_one_request_or_several(url, client):
    counts, listed = {"3": 5, "1": 4}, ["3"] * 5 + ["1"] * 4
    images, labels, _ = client.generate("mnist", labels=counts, seed=2)  # n is the counts' sum
    assert labels.tolist() == [3] * 5 + [1] * 4
    assert np.array_equal(images, client.generate("mnist", n=9, labels=listed, seed=2)[0])
    with SynthClient(url, max_request_n=4) as small:  # 4 + 4 + 1, each request a slice of the list
        assert np.array_equal(small.generate("mnist", labels=counts, seed=2)[0],
                              small.generate("mnist", n=9, labels=listed, seed=2)[0])
        with pytest.raises(SynthError) as info:
            small.generate("mnist", n=10, labels=counts)
        assert info.value.status == 400 and info.value.body["detail"][0]["loc"] == ["n"]
        assert "n is 10 but the labels' counts add up to 9" in str(info.value)  # the n given, not a request's
        with pytest.raises(SynthError, match="exactly n=10 items, it has 5"):
            small.generate("mnist", n=10, labels=[1] * 5)


def test_balanced_stays_balanced_when_a_request_holds_fewer_images_than_classes(url, client):
    with SynthClient(url, max_request_n=7) as small:  # 7 + 7 + 7 + 4 images of 10 classes
        images, labels, _ = small.generate("mnist", n=25, seed=4)
    assert labels.tolist() == [i % 10 for i in range(25)]
    assert np.array_equal(images[:7], client.generate("mnist", n=7, seed=4)[0])  # the first request's own images


def test_numpy_numbers_and_label_arrays_are_taken_as_their_python_values(client):
    images, labels, _ = client.generate("mnist", n=np.int64(3), labels=np.array([3, 4, 5]), seed=np.int64(1),
                                        temperature=np.float32(0.5))
    assert labels.tolist() == [3, 4, 5] and client.last_seed == 1
    assert np.array_equal(images, client.generate("mnist", n=3, labels=[3, 4, 5], seed=1, temperature=0.5)[0])
    with pytest.raises(ValueError, match="temperature"):
        client.generate("mnist", n=3, temperature=float("nan"))


@pytest.mark.parametrize("call, field", [
    (lambda c: c.generate("mnist", n=True), "n"), (lambda c: c.generate("mnist", n=2, seed=False), "seed"),
    (lambda c: c.generate("mnist", n=2.0), "n"), (lambda c: c.interpolate("mnist", seed_start=True), "seed_start"),
    (lambda c: c.interpolate("mnist", steps=np.bool_(True)), "steps")])
def test_a_bool_or_a_float_for_an_integer_field_is_refused_naming_it_not_sent_as_a_number(call, field):
    with pytest.raises(TypeError, match=f"^{field} is an integer"):
        call(SynthClient("http://127.0.0.1:9"))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_a_request_size_below_one_is_refused_when_the_client_is_made(bad):
    with pytest.raises(ValueError, match="max_request_n"):
        SynthClient("http://127.0.0.1:9", max_request_n=bad)


def test_a_temperature_applies_to_every_request_of_a_batch(url, client):
    with SynthClient(url, max_request_n=20) as small:
        images, _, _ = small.generate("mnist", n=30, seed=3, temperature=0.5)
    first, _, _ = client.generate("mnist", n=20, seed=3, temperature=0.5)
    second, _, _ = client.generate("mnist", n=10, seed=chunk_seed(3, 1), temperature=0.5)
    assert np.array_equal(images, np.concatenate([first, second]))
    assert not np.array_equal(first, client.generate("mnist", n=20, seed=3)[0])
    path = client.interpolate("mnist", seed_start=3, seed_end=4, steps=3, temperature=0.5)
    assert np.array_equal(path[0], first[0])


def test_chunk_seeds_are_63_bit_and_unrelated_to_the_next_seed():
    seeds = [chunk_seed(s, i) for s in range(50) for i in range(1, 5)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    assert chunk_seed(0, 0) == 0 and chunk_seed(0, 1) not in range(100)


def test_models_and_interpolate(client):
    assert client.models()["datasets"]["mnist"]["default_model"] == "cdcgan"
    path = client.interpolate("bloodmnist_64", seed_start=0, seed_end=5, steps=4)
    assert path.shape == (4, 64, 64, 3) and path.dtype == np.uint8
    assert client.interpolate("mnist").shape == (8, 28, 28, 1)


def test_interpolate_leaves_steps_to_the_services_default_when_not_given():
    client, calls = scripted_client([npz_answer()])
    client.interpolate("mnist")
    assert "steps" not in json.loads(calls[0].content)  # a server whose SYNTHGEN_MAX_STEPS is below 8 takes it


def test_generate_bytes_gives_any_format_with_the_same_images(client):
    images = client.generate("mnist", n=4, seed=0)[0]
    for fmt in encoders.FORMATS:
        body = client.generate_bytes("mnist", fmt, n=4, seed=0)
        if fmt == "png_grid":
            decoded = encoders.split_png_grid(body, 4, 28, 28)
        else:
            decoded = {"npz": encoders.decode_npz, "zip": encoders.decode_zip, "json": encoders.decode_json}[fmt](body).images
        assert np.array_equal(decoded, images), fmt


def test_errors_are_synth_errors_with_the_json_body(client):
    with pytest.raises(SynthError) as info:
        client.generate("cifar10", n=1)
    assert info.value.status == 404 and "mnist" in info.value.body["datasets"]


def test_client_module_does_not_import_torch():
    code = "import sys, service.client; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_synthetic_dataset_mixes_with_real_data(url):
    synthetic = SyntheticDataset(url, "bloodmnist_64", n=10, seed=0)
    image, label = synthetic[3]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0.0 <= image.min() <= image.max() <= 1.0
    assert label.dtype == torch.int64 and label.item() == -1  # bloodmnist_64 in the tiny zoo is unconditional
    assert len(synthetic) == 10

    real = TensorDataset(torch.zeros(5, 3, 64, 64), torch.zeros(5, dtype=torch.long))  # as ImageData.loader()
    mixed = ConcatDataset([real, synthetic])
    images, labels = next(iter(DataLoader(mixed, batch_size=15)))
    assert images.shape == (15, 3, 64, 64) and len(labels) == 15


def test_synthetic_dataset_is_reproducible_and_follows_labels(url):
    a = SyntheticDataset(url, "mnist", n=12, seed=7, transform=lambda x: x * 2)
    b = SyntheticDataset(url, "mnist", n=12, seed=7)
    assert torch.equal(a.images, b.images) and torch.equal(a[5][0], b[5][0] * 2)
    assert [b[i][1].item() for i in range(12)] == [i % 10 for i in range(12)] and b.classes[3] == "3"
    counted = SyntheticDataset(url, "mnist", None, labels={"4": 3, "9": 1}, seed=7)
    assert len(counted) == 4 and counted.labels.tolist() == [4, 4, 4, 9]


def test_synthetic_images_collate_with_a_torchvision_dataset_given_int_labels(url):
    """torchvision's datasets give (tensor, int) items; beside them a 0-d tensor label failed in the first batch."""
    from torch.utils.data import ConcatDataset, DataLoader, Dataset

    class TorchvisionLike(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return torch.zeros(1, 28, 28), index

    synthetic = SyntheticDataset(url, "mnist", n=4, seed=0, target_transform=int)
    assert synthetic[3][1] == 3 and type(synthetic[3][1]) is int
    images, labels = next(iter(DataLoader(ConcatDataset([TorchvisionLike(), synthetic]), batch_size=8)))
    assert images.shape == (8, 1, 28, 28) and labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


# --- retries: transient failures are retried, request errors are not (httpx.MockTransport, no server) ---------

def npz_answer(n: int = 1) -> httpx.Response:
    batch = encoders.Batch(images=np.zeros((n, 28, 28, 1), np.uint8), labels=np.arange(n, dtype=np.int64),
                           class_names=[str(i) for i in range(10)], meta={"dataset": "mnist", "model": "cdcgan", "seed": 5})
    return httpx.Response(200, content=encoders.encode_npz(batch))


def scripted_client(answers: list, **options) -> tuple[SynthClient, list]:
    """A client whose requests get `answers` in turn (an httpx.Response, or an exception to raise)."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        answer = answers[min(len(calls), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    options.setdefault("backoff", 0.0)
    return SynthClient("http://synthgen.test", transport=httpx.MockTransport(handler), **options), calls


SERVICE_503 = httpx.Response(503, json={"error": "model mnist/cdcgan is not served: it failed to load at start-up"})


def test_a_dropped_connection_and_proxy_errors_are_retried_with_the_same_body():
    client, calls = scripted_client([httpx.ConnectError("refused"), httpx.Response(502, text="<html>bad gateway</html>"),
                                     httpx.Response(503, text="upstream restarting"), npz_answer()])
    images, _, _ = client.generate("mnist", n=1, seed=5)
    assert images.shape == (1, 28, 28, 1) and len(calls) == 4
    assert len({call.content for call in calls}) == 1  # every attempt asked for the same seed, so the same bytes


def test_the_service_503_for_a_failed_call_is_retried_after_its_retry_after():
    client, calls = scripted_client([httpx.Response(503, json={"error": "failed to compute"}, headers={"Retry-After": "0"}),
                                     npz_answer()], backoff=60.0)  # Retry-After 0 wins over the 60 s backoff
    assert client.generate("mnist", n=1, seed=5)[0].shape == (1, 28, 28, 1) and len(calls) == 2


@pytest.mark.parametrize("answer", [httpx.Response(400, json={"error": "n must be an integer in 1..10000"}),
                                    httpx.Response(404, json={"error": "unknown dataset 'cifar10'"}), SERVICE_503])
def test_request_errors_and_a_model_that_failed_to_load_are_raised_at_once(answer):
    client, calls = scripted_client([answer, npz_answer()])
    with pytest.raises(SynthError) as info:
        client.generate("mnist", n=1, seed=5)
    assert info.value.status == answer.status_code and len(calls) == 1


def test_a_read_timeout_is_raised_at_once_as_httpx_read_timeout():
    client, calls = scripted_client([httpx.ReadTimeout("no answer in time"), npz_answer()])
    with pytest.raises(httpx.ReadTimeout):
        client.generate("mnist", n=1, seed=5)
    assert len(calls) == 1


def test_when_retries_run_out_the_last_failure_is_raised():
    client, calls = scripted_client([httpx.Response(504, text="gateway timeout")], retries=2)
    with pytest.raises(SynthError) as info:
        client.generate("mnist", n=1, seed=5)
    assert info.value.status == 504 and len(calls) == 3
    client, calls = scripted_client([httpx.ConnectError("refused")], retries=0)
    with pytest.raises(httpx.ConnectError):
        client.generate("mnist", n=1, seed=5)
    assert len(calls) == 1


def test_retry_delays_double_and_retry_after_is_capped():
    assert [retry_delay(None, attempt, 0.5) for attempt in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert retry_delay(httpx.Response(429, headers={"Retry-After": "7"}), 0, 0.5) == 7.0
    assert retry_delay(httpx.Response(503, headers={"Retry-After": "3600"}), 0, 0.5) == MAX_RETRY_AFTER_S
    assert retry_delay(httpx.Response(500, text="internal"), 0, 0.5) is None
    assert retry_delay(SERVICE_503, 0, 0.5) is None


def test_a_token_read_from_a_secret_file_is_sent_without_its_newline():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"datasets": {}})

    client = SynthClient("http://synthgen.test", token="s3cret\n", transport=httpx.MockTransport(handler))
    client.http.get("/models")
    assert seen == ["Bearer s3cret"]
