"""A small Python client for the synthgen service (httpx + numpy + pillow; no torch, no BentoML).

    from service.client import SynthClient

    client = SynthClient("http://127.0.0.1:3000", token=None)
    images, labels, class_names = client.generate("mnist", n=256, labels="balanced", seed=0)
    images.shape, images.dtype   # (256, 28, 28, 1) uint8, N x H x W x C; labels int64 (-1: unconditional)
    client.last_seed             # the seed the server used (drawn by it when seed=None)
    images, labels, _ = client.generate("mnist", n=60_000, seed=0)  # above the server's max_n: several requests
    images, labels, _ = client.generate("mnist", n=256, seed=0, temperature=0.8)  # nearer each class's centre
    images, labels, _ = client.generate("pneumoniamnist", labels={"normal": 300, "pneumonia": 100}, seed=0)  # n=400
    for start, batch in client.iter_batches("mnist", n=600_000, seed=0): ...  # a Batch per request
    client.models()["datasets"]  # the catalog
    frames = client.interpolate("mnist", seed_start=0, seed_end=1, steps=8, label=3)  # uint8 steps x H x W x C

Errors come back as `SynthError` with the HTTP status and the service's JSON error body.

Transient failures are retried (`retries`, 3 by default), which is safe because a request with a seed
always gives the same bytes: a dropped or refused connection, and answers 429, 502, 503 and 504, after
`Retry-After` seconds when the answer has it, else after `backoff` x 1, 2, 4 ... seconds. Not retried: a
4xx about the request, a read timeout (the server may still be working on it), and the service's own 503
for a model that failed to load, which has no `Retry-After` and lasts until the server restarts.
"""

from __future__ import annotations

import math
import operator
import time

import httpx
import numpy as np

from .encoders import Batch, decode_npz

MAX_SEED = 2**63 - 1
DEFAULT_N = 64  # the service's default n
RETRY_STATUSES = (429, 502, 503, 504)
MAX_RETRY_AFTER_S = 30.0
# Failures before the server answered: nothing was computed for the request, or its answer was cut off.
RETRY_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


def count_of(labels: dict) -> int | None:
    """The images a labels object {class name: count} asks for, or None where a count is not an integer >= 0
    (the service then says which)."""
    counts = list(labels.values())
    if all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        return sum(counts)
    return None


def integer(name: str, value) -> int:
    """value as a Python int (numpy integers too); a bool or a non-integer raises, as the service would refuse it."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} is an integer; got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} is an integer; got {value!r}") from None


def plain_fields(n, labels, seed, temperature) -> tuple:
    """n, labels, seed and temperature as JSON takes them: numpy integers and floats as Python ones, a numpy
    array of labels as a list. A value that is not one of the kinds the service takes raises here, naming it."""
    n = None if n is None else integer("n", n)
    seed = None if seed is None else integer("seed", seed)
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer, np.floating)):
            raise TypeError(f"temperature is a number in 0..2; got {temperature!r}")
        temperature = float(temperature)
        if not math.isfinite(temperature):
            raise ValueError(f"temperature is a number in 0..2; got {temperature}")
    if isinstance(labels, np.ndarray):
        labels = labels.tolist()
    elif isinstance(labels, np.integer):
        labels = int(labels)
    elif isinstance(labels, dict):
        labels = {k: int(v) if isinstance(v, np.integer) else v for k, v in labels.items()}
    elif isinstance(labels, (list, tuple)):
        labels = [int(v) if isinstance(v, np.integer) else v for v in labels]
    return n, labels, seed, temperature


def images_asked(n: int | None, labels) -> int:
    """n as the service reads it: as given, else the sum of a labels object's counts, else 64."""
    if n is not None:
        return n
    total = count_of(labels) if isinstance(labels, dict) else None
    return DEFAULT_N if total is None else total


def chunk_seed(seed: int, index: int) -> int:
    """The seed of request `index` of a batch fetched in several requests: `seed` itself for the first, so
    the batch starts with the images one request with that seed gives; for the others a 63-bit value drawn
    from numpy's SeedSequence([seed, index]), unrelated to seed + 1 and to every other seed a user picks."""
    if index == 0:
        return seed
    high, low = np.random.SeedSequence([seed, index]).generate_state(2, np.uint32).tolist()
    return ((high << 32) | low) & MAX_SEED


def join_batches(parts, n: int) -> Batch:
    """One Batch of n rows from the (start, Batch) parts that `SynthClient.iter_batches` yields; its meta is the
    first part's, whose seed is the seed of the whole. A single part is returned as it is, without a copy."""
    joined = None
    for start, batch in parts:
        if start == 0 and len(batch.images) == n:
            return batch
        if joined is None:
            joined = Batch(images=np.empty((n, *batch.images.shape[1:]), dtype=batch.images.dtype),
                           labels=np.empty(n, dtype=np.int64), class_names=batch.class_names, meta=batch.meta)
        stop = start + len(batch.images)
        joined.images[start:stop], joined.labels[start:stop] = batch.images, batch.labels
    return joined


class SynthError(RuntimeError):
    """A non-2xx answer: `status` and `body` (the service's {"error": ..., "detail": [...]} when JSON)."""

    def __init__(self, status: int, body):
        message = body.get("error") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.body = status, body


def request_error(field: str, message: str, allowed: list) -> SynthError:
    """The service's 400 for a request, raised by the client before sending it (the body of `service.errors`)."""
    return SynthError(400, {"error": message, "detail": [{"loc": [field], "msg": message, "type": "value_error",
                                                          "allowed": allowed}]})


def retry_delay(response: httpx.Response | None, attempt: int, backoff: float) -> float | None:
    """Seconds to wait before retry `attempt` (0, 1, ...), or None when the failure is not worth a retry.

    `response` is None for a connection failure (one of RETRY_ERRORS). A 503 without Retry-After that carries
    the service's JSON error is its "model failed to load" answer, permanent until a restart; a proxy's 503
    (HTML, or a restarting server behind a load balancer) is retried."""
    if response is not None:
        if response.status_code not in RETRY_STATUSES:
            return None
        retry_after = response.headers.get("retry-after", "")
        if retry_after.strip().isdigit():
            return min(float(retry_after), MAX_RETRY_AFTER_S)
        if response.status_code == 503 and is_service_error(error_body(response)):
            return None
    return backoff * 2**attempt


def error_body(response: httpx.Response):
    """The parsed JSON of an error answer, or its text when it is not JSON (a proxy's HTML page)."""
    try:
        return response.json()
    except ValueError:
        return response.text


def is_service_error(body) -> bool:
    """Whether an error body is the service's own {"error": ..., ...}."""
    return isinstance(body, dict) and isinstance(body.get("error"), str)


class SynthClient:
    """`max_request_n` caps the images of one request below the server's own limit (`max_n` in /models);
    `retries` and `backoff` set the retries of transient failures (module docstring); `transport` is passed to
    httpx (a custom transport, or `httpx.MockTransport` in tests)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 300.0, max_request_n: int | None = None,
                 retries: int = 3, backoff: float = 0.5, transport: httpx.BaseTransport | None = None):
        if max_request_n is not None and (isinstance(max_request_n, bool) or not isinstance(max_request_n, int)
                                          or max_request_n < 1):
            raise ValueError(f"max_request_n is an integer of at least 1 (or None: the server's max_n); "
                             f"got {max_request_n!r}")
        token = token.strip() if token else None  # as the service strips its own (a secret file's newline)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)
        self.max_request_n = max_request_n
        self.retries, self.backoff = retries, backoff
        self.last_seed: int | None = None
        self._catalog: dict | None = None

    def __enter__(self) -> SynthClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _post(self, route: str, body: dict) -> httpx.Response:
        body = {k: v for k, v in body.items() if v is not None}
        for attempt in range(self.retries + 1):  # the last attempt either raises or breaks
            try:
                response = self.http.post(route, json=body)
            except RETRY_ERRORS:
                if attempt == self.retries:
                    raise
                delay = retry_delay(None, attempt, self.backoff)
            else:
                delay = retry_delay(response, attempt, self.backoff)
                if delay is None or attempt == self.retries:
                    break
            time.sleep(delay)
        if response.status_code >= 400:
            raise SynthError(response.status_code, error_body(response))
        return response

    def generate(self, dataset: str, n: int | None = None, model: str | None = None, labels=None,
                 seed: int | None = None, temperature: float | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(images uint8 N x H x W x C, labels int64 N, class_names); the seed used is in `last_seed`.

        `labels` as the service takes them; n defaults to 64, or to the sum of a labels object's counts.
        n above what one request may ask (`chunk_rows`) comes in several requests: request i gives rows
        i*m.. of the batch with seed `chunk_seed(seed, i)` and its slice of a labels list (a labels object is
        sent as the list it stands for; for "balanced" labels m is a multiple of the class count, so the batch
        is balanced as one request's would be). The first request uses `seed` itself, so the batch starts with
        the images one request with that seed gives. The same call with the same seed gives the same images on
        a server with the same max_n. `temperature` (0..2, default 1) scales the latent noise of every request
        (see the service's /generate).
        """
        n, labels, seed, temperature = plain_fields(n, labels, seed, temperature)
        n = images_asked(n, labels)
        batch = join_batches(self.iter_batches(dataset, n, model, labels, seed, temperature), n)
        return batch.images, batch.labels, batch.class_names

    def iter_batches(self, dataset: str, n: int | None = None, model: str | None = None, labels=None,
                     seed: int | None = None, temperature: float | None = None):
        """Yield (start, Batch) for rows start.. of the images `generate` returns, one request at a time, so a
        set of any size can be written out without holding all of it (`python -m service.fetch`). `last_seed`
        is set once the first request has answered. n below 1 is sent as is, for the server's 400. When n
        needs several requests, labels that cannot fit it (a list of another length, counts of another sum)
        raise, before any request, the SynthError 400 the service gives one request of all n images (each
        request's own n would mislead)."""
        n, labels, seed, temperature = plain_fields(n, labels, seed, temperature)
        n = images_asked(n, labels)
        rows = self.chunk_rows(dataset, model, labels) if n > 1 else 1
        if n > rows:
            if isinstance(labels, (list, tuple)) and len(labels) != n:
                raise request_error("labels", f"labels: a list of labels must have exactly n={n} items, it has "
                                    f"{len(labels)}", [f"a list of {n} class ids or names", "balanced",
                                                       "one class id or name"])
            counted = count_of(labels) if isinstance(labels, dict) else None
            if counted is not None and counted != n:
                raise request_error("n", f"n is {n} but the labels' counts add up to {counted}; leave n out or "
                                         "make them equal", [counted])
            if counted == n:
                labels = [name for name, count in labels.items() for _ in range(count)]  # the same images, sliceable
            classes = self._balanced_classes(dataset, model, labels)
            if classes and rows % classes:  # fewer rows a request than classes: send the balanced list itself
                labels = [i % classes for i in range(n)]
        for index, start in enumerate(range(0, max(n, 1), rows)):
            stop = min(start + rows, n)
            part = labels[start:stop] if isinstance(labels, (list, tuple)) else labels
            batch = self._generate(dataset, model, stop - start, part, seed if index == 0 else chunk_seed(seed, index),
                                   temperature)
            if index == 0:
                seed = self.last_seed = int(batch.meta["seed"])  # drawn by the server when the caller gave none
            yield start, batch

    def chunk_rows(self, dataset: str, model: str | None = None, labels=None) -> int:
        """The most images one request of `generate` asks for: the server's max_n (or `max_request_n`, if
        lower), rounded down to a multiple of the model's class count for "balanced" labels (where that leaves
        none, `iter_batches` sends the balanced labels as a list)."""
        max_n = self._cached_models()["max_n"]
        limit = min(max_n, self.max_request_n or max_n)
        classes = self._balanced_classes(dataset, model, labels)
        if classes is None or limit < classes:
            return limit
        return limit // classes * classes

    def _cached_models(self) -> dict:
        if self._catalog is None:
            self._catalog = self.models()
        return self._catalog

    def _balanced_classes(self, dataset: str, model: str | None, labels) -> int | None:
        """The class count of a conditional model asked for "balanced" labels, else None (an unknown name gets
        the server's 404 from the first request)."""
        catalog = self._cached_models()
        name = model or (catalog["datasets"].get(dataset) or {}).get("default_model")
        entry = next((m for m in catalog["models"] if m["dataset"] == dataset and m["model"] == name), None)
        if entry is None or not entry["conditional"] or not (labels is None or labels == "balanced"):
            return None
        return entry["num_classes"]

    def _generate(self, dataset: str, model: str | None, n: int, labels, seed: int | None,
                  temperature: float | None = None):
        response = self._post("/generate", {"dataset": dataset, "model": model, "n": n, "labels": labels,
                                            "seed": seed, "temperature": temperature, "format": "npz"})
        return decode_npz(response.content)

    def generate_bytes(self, dataset: str, format: str, **fields) -> bytes:
        """The raw body of /generate in any format (npz, png_grid, zip, json), e.g. to save a PNG grid."""
        return self._post("/generate", {"dataset": dataset, "format": format, **fields}).content

    def models(self) -> dict:
        return self._post("/models", {}).json()

    def interpolate(self, dataset: str, seed_start: int = 0, seed_end: int = 1, steps: int | None = None,
                    model: str | None = None, label=None, method: str = "slerp",
                    temperature: float | None = None) -> np.ndarray:
        """uint8 steps x H x W x C images from the seed_start image to the seed_end image (steps: the service's
        default, 8 unless its SYNTHGEN_MAX_STEPS is lower)."""
        _, label, _, temperature = plain_fields(None, label, None, temperature)
        seed_start, seed_end = integer("seed_start", seed_start), integer("seed_end", seed_end)
        steps = None if steps is None else integer("steps", steps)
        response = self._post("/interpolate", {"dataset": dataset, "model": model, "seed_start": seed_start,
                                               "seed_end": seed_end, "steps": steps, "label": label,
                                               "method": method, "temperature": temperature, "format": "npz"})
        return decode_npz(response.content).images
