"""synthgen: labelled synthetic MNIST / MedMNIST images over HTTP (BentoML 1.4).

Run it (from the repository root; models come from exported/manifest.json):

    bentoml serve service.service:SyntheticImages --host 127.0.0.1 --port 3000
    curl -s -X POST localhost:3000/generate -H 'Content-Type: application/json' \\
         -d '{"dataset": "mnist", "n": 64, "seed": 0}' -o batch.npz

Endpoints: POST /generate, POST (or GET) /models, POST /interpolate, plus BentoML's /livez /readyz
/healthz /metrics and the OpenAPI document /docs.json (amended by service/openapi.py). Configuration is by
environment variable (see service/config.py). Start-up reads the manifest, verifies every file's sha256 and
loads every model once; a model that fails is not served (the catalog says why), and start-up fails when no
model is usable.

Memory: a request holds its uint8 images, the encoded body and the encoder's working copies; the largest
(n=10,000 at 64x64x3, 123 MB of pixels) peaks at about +390 MB as npz and +440 MB as png_grid, all
returned afterwards. SYNTHGEN_MEMORY_BUDGET_MB (1 GiB) caps a worker's requests in flight by 4x their pixels,
each answer's body counted until it has been sent (service/budget.py); the rest wait. Model calls run one at a
time per worker, at most SYNTHGEN_BATCH_ROWS rows and about SYNTHGEN_CALL_MS milliseconds each
(service/batching.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import bentoml
import numpy as np
from bentoml.validators import ContentType
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .config import REQUEST_TIMEOUT_S, ConfigError

try:
    from . import schemas  # reads the settings: a malformed SYNTHGEN_* variable stops start-up here
except ConfigError as exc:
    raise SystemExit(f"error: {exc}") from None  # one line on stderr naming the variable, no traceback
from . import patches
from .backends import BackendLoadError, load_runner, missing_cuda_device
from .batching import MicroBatcher, wait_through_cancels
from .budget import BudgetedResponse, MemoryBudget
from .catalog import CatalogEntry, ManifestError, load_catalog
from .encoders import EXTENSIONS, MEDIA_TYPES, Batch, encode
from .errors import ApiError, short_name
from .memory import pin_mmap_threshold
from .middleware import ErrorBodies, GuardMiddleware
from .openapi import OpenApiDocs
from .sampling import class_id, interpolation_latents, latents, resolve_labels

logger = logging.getLogger("bentoml.synthgen")
SETTINGS = schemas.SETTINGS
patches.install()
# The body of /generate and /interpolate: the bytes of the requested format (npz, PNG, zip or JSON).
Binary = Annotated[bytes, ContentType("application/octet-stream")]
# A 503 that may pass (a failed model call) carries Retry-After; one that lasts until a restart (a model that
# failed to load) does not, which is how `service.client` tells them apart.
RETRY_AFTER_S = 1
INLINE_LATENT_VALUES = 1 << 16  # latents of up to this many values (about 0.6 ms) are drawn on the event loop
INLINE_ENCODE_BYTES = 1 << 20  # npz of up to this many pixel bytes is written on the event loop (no thread hop)
MODEL_CALLS = bentoml.metrics.Counter(name="synthgen_model_calls", labelnames=["dataset", "model"],
                                      documentation="Model calls; concurrent requests share calls (micro-batching)")
IMAGES = bentoml.metrics.Counter(name="synthgen_images", labelnames=["dataset", "model"],
                                 documentation="Images generated")
CANCELLED = bentoml.metrics.Counter(name="synthgen_requests_cancelled", labelnames=["route"],
                                    documentation="Requests whose client went away before the answer was complete "
                                                  "(their work not yet done is skipped; no access-log line)")


class ModelCallFailed(Exception):
    """A model call failed (the batcher logged why): the request gets a 503 that may be retried."""


def count_cancelled(path: str) -> None:
    """One more request whose client went away, by route (any other path as "other": labels stay few)."""
    CANCELLED.labels(route=path if path in ("/generate", "/interpolate", "/models") else "other").inc()


async def thread_work(executor, fn, *args):
    """fn(*args) on an executor thread, awaited. A request cancelled meanwhile (its client went away, or the
    timeout) drops the work if it has not started, and otherwise waits for the thread to finish before it ends,
    also through a second cancel, so that the memory it reserved is not handed on while the thread still uses it;
    the work's error, if any, is then logged rather than raised."""
    work = executor.submit(fn, *args)
    result = asyncio.wrap_future(work)
    try:
        return await asyncio.shield(result)
    except asyncio.CancelledError:
        if not work.cancel():  # already running
            await wait_through_cancels(result)
            if not result.cancelled() and result.exception() is not None:
                logger.warning("%s failed for a cancelled request: %r", getattr(fn, "__name__", fn), result.exception())
        raise


def load_runners(catalog, settings, until_one_loads: bool = False) -> None:
    """Load the runner of each verified model of the catalog; a model that fails is marked not served (its
    error logged). until_one_loads: stop at the first that loads (start-up's check that something can be
    served: a file that passes its checksum but no runtime can load, a missing CUDA device)."""
    for entry in catalog.usable():
        try:
            entry.runner = load_runner(entry, settings.backend, settings.ort_threads, settings.device,
                                       settings.ort_spinning, settings.ort_arena, settings.ort_part_rows)
        except BackendLoadError as exc:
            entry.error = str(exc)
            logger.error("model %s/%s is not served: %s", entry.dataset, entry.model, exc)
            continue
        if until_one_loads:
            return


def nothing_servable(catalog) -> str:
    """Why nothing can be served, each reason once with the models it stopped ("a/x, b/y: no CUDA device")."""
    models_by_reason: dict[str, list[str]] = {}
    for e in catalog.failed():
        models_by_reason.setdefault(e.error, []).append(f"{e.dataset}/{e.model}")
    reasons = "; ".join(f"{', '.join(models)}: {reason}" for reason, models in models_by_reason.items())
    return f"no model in {catalog.root} can be served ({reasons or 'the manifest lists none'})"


def request_bytes(n: int, card) -> int:
    """A bound on one request's memory: 4 x its uint8 pixels (the images, the encoded body and the encoder's
    working copies; measured at most 3.7 x, png_grid) plus the latents. One model call's own working memory
    comes on top, once per worker (a single inference thread), bounded by SYNTHGEN_BATCH_ROWS."""
    return 4 * n * card.image_bytes + n * card.latent_dim * 4


def temperature_meta(temperature: float) -> dict:
    """The temperature among a batch's metadata (npz member, info.json, JSON field) when it is not 1, so that a
    request at 1 gives the bytes of a request without the field."""
    return {} if temperature == 1.0 else {"temperature": temperature}


def temperature_stem(temperature: float) -> str:
    """'-t0.7' in a file name: the shortest text that reads back as the request's float (never rounded)."""
    return "" if temperature == 1.0 else f"-t{repr(float(temperature)).removesuffix('.0')}"


async def _get_models(_: Request) -> Response:
    """GET /models: the same catalog as POST /models."""
    return JSONResponse(bentoml.get_current_service().catalog_info.model_dump())


catalog_app = Starlette(routes=[Route("/models", _get_models, methods=["GET"])])


@bentoml.asgi_app(catalog_app, path="/", name="catalog")
@bentoml.service(
    name="synthgen",
    workers=SETTINGS.workers,
    traffic={"timeout": REQUEST_TIMEOUT_S},
    resources={"cpu": "2", "memory": "2Gi"},  # what one worker is sized for (deploy/ sets the same limits)
)
class SyntheticImages:
    """Labelled synthetic MNIST and MedMNIST images from trained generators: see POST /models for what exists."""

    @bentoml.on_deployment
    def preflight() -> None:
        """Once, in the `bentoml serve` process before any worker starts: a missing or malformed manifest, or
        a zoo where no model passes its file checks and loads (the first that does ends the check), stops the
        server here with one clear error (instead of workers failing and being restarted in a loop)."""
        try:
            catalog = load_catalog(SETTINGS.exported_dir, SETTINGS.backend)
        except ManifestError as exc:
            raise SystemExit(f"error: {exc}") from None  # one line on stderr, exit status 1, no traceback
        settings = SETTINGS
        if settings.backend == "torchscript":  # files checked on the CPU: this process keeps no CUDA context
            if problem := missing_cuda_device(settings.device):
                raise SystemExit(f"error: {problem}")
            settings = dataclasses.replace(settings, device="cpu")
        load_runners(catalog, settings, until_one_loads=True)
        if not catalog.usable():
            raise SystemExit(f"error: {nothing_servable(catalog)}")

    def __init__(self) -> None:
        self.settings = SETTINGS
        self._ready = False
        pin_mmap_threshold()
        self.catalog = load_catalog(self.settings.exported_dir, self.settings.backend)
        load_runners(self.catalog, self.settings)
        usable = self.catalog.usable()
        if not usable:
            raise ManifestError(nothing_servable(self.catalog))
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="synthgen-infer")
        # Encoding (PNG, zip) is CPU-bound: more threads than CPUs only adds memory arenas and contention.
        self.encoders = ThreadPoolExecutor(max_workers=max(1, self.settings.ort_threads),
                                           thread_name_prefix="synthgen-encode")
        self.batchers = {(e.dataset, e.model): MicroBatcher(e.runner, self.executor, self.settings.batch_rows,
                                                            e.card.image_shape, merge=e.runner.row_independent,
                                                            on_call=self._counter(e),
                                                            call_s=self.settings.call_ms / 1000)
                         for e in usable}
        for e in usable:
            if not e.runner.row_independent:
                logger.warning("%s/%s: outputs depend on the batch size on this host; its requests are not "
                               "merged (reproducible, less throughput under load)", e.dataset, e.model)
        self.budget = MemoryBudget(self.settings.memory_budget_bytes)
        self.catalog_info = self._catalog_info()
        self._ready = True
        logger.info("serving %d model(s) with %s from %s (%d not served); %s", len(usable), self.settings.backend,
                    self.catalog.root, len(self.catalog.failed()),
                    "API routes need the bearer token" if self.settings.api_token else
                    "no SYNTHGEN_API_TOKEN: the API routes are open to anyone who can reach the port")

    @staticmethod
    def _counter(entry: CatalogEntry):
        calls = MODEL_CALLS.labels(dataset=entry.dataset, model=entry.model)
        images = IMAGES.labels(dataset=entry.dataset, model=entry.model)

        def count(rows: int) -> None:
            calls.inc()
            images.inc(rows)

        return count

    def __is_ready__(self) -> bool:
        return self._ready

    @bentoml.on_shutdown
    def _stop_threads(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.encoders.shutdown(wait=False, cancel_futures=True)

    def _catalog_info(self) -> schemas.Catalog:
        datasets, models = {}, []
        for dataset, names in self.catalog.datasets().items():
            default = self.catalog.default_model(dataset)
            card = self.catalog.entries[(dataset, default)].card
            datasets[dataset] = schemas.DatasetInfo(default_model=default,
                                                    best_for_training=self.catalog.best_for_training(dataset),
                                                    models=names, classes=list(card.classes),
                                                    image_shape=list(card.image_shape))
            for name in names:
                entry = self.catalog.entries[(dataset, name)]
                card = entry.card
                training = card.raw.get("training") or {}
                models.append(schemas.ModelInfo(
                    dataset=dataset, model=name, description=card.description, default=name == default,
                    conditional=card.conditional, classes=list(card.classes), num_classes=card.num_classes,
                    image_shape=list(card.image_shape), latent_dim=card.latent_dim, metrics=card.metrics,
                    parameters=card.raw.get("parameters") if isinstance(card.raw.get("parameters"), int) else None,
                    weight_storage=card.weight_storage,
                    merges_requests=entry.runner.row_independent,
                    training={k: training[k] for k in ("epochs", "steps", "wall_time_s", "hardware", "precision")
                              if k in training},
                ))
        failed = [schemas.FailedModel(dataset=e.dataset, model=e.model, reason=e.error) for e in self.catalog.failed()]
        return schemas.Catalog(backend=self.settings.backend, max_n=self.settings.max_n, datasets=datasets,
                               models=models, failed=failed)

    def _entry(self, dataset: str, model: str | None) -> CatalogEntry:
        """The usable catalog entry for a request's names: 404 listing what exists, or 503 saying why not."""
        available = self.catalog.datasets()
        if dataset not in available:
            failed = [e for e in self.catalog.failed() if e.dataset == dataset]
            if failed:
                raise ApiError(503, f"dataset {dataset!r} is not served: every model of it failed to load at "
                               "start-up (" + "; ".join(f"{e.model}: {e.error}" for e in failed) + ")",
                               field="dataset", allowed=list(available), kind="unavailable",
                               extra={"datasets": available})
            raise ApiError(404, f"unknown dataset {short_name(dataset)!r}; available: {', '.join(available)}",
                           field="dataset", allowed=list(available), kind="not_found",
                           extra={"datasets": available})
        name = model if model is not None else self.catalog.default_model(dataset)
        entry = self.catalog.entries.get((dataset, name))
        if entry is not None and not entry.ok:
            raise ApiError(503, f"model {dataset}/{name} is not served: it failed to load at start-up ({entry.error})",
                           field="model", allowed=available[dataset], kind="unavailable",
                           extra={"datasets": available})
        if entry is None:
            raise ApiError(404, f"unknown model {short_name(name)!r} for dataset {dataset!r}; available: "
                           f"{', '.join(available[dataset])}", field="model", allowed=available[dataset],
                           kind="not_found", extra={"datasets": available})
        return entry

    async def _encoded(self, entry: CatalogEntry, z: np.ndarray, labels: np.ndarray, fmt: str, meta: dict,
                       columns: int | None) -> bytes:
        """The images of z and labels, encoded as fmt; ModelCallFailed when the model call fails."""
        try:
            images = await self.batchers[(entry.dataset, entry.model)].generate(z, labels)
        except Exception as exc:  # logged by the batcher
            raise ModelCallFailed(type(exc).__name__) from exc
        batch = Batch(images=images, labels=labels, class_names=list(entry.card.classes), meta=meta)
        if fmt == "npz" and images.nbytes <= INLINE_ENCODE_BYTES:
            return encode(batch, fmt)
        return await thread_work(self.encoders, encode, batch, fmt, columns)

    async def _render(self, entry: CatalogEntry, z: np.ndarray, labels: np.ndarray, fmt: str, meta: dict,
                      stem: str, columns: int | None = None) -> Response:
        share = await self.budget.acquire(request_bytes(len(z), entry.card))  # the body's part kept until sent
        try:
            body = await self._encoded(entry, z, labels, fmt, meta, columns)
        except ModelCallFailed as exc:  # not the request's fault
            share.release()
            return ApiError(503, f"model {entry.dataset}/{entry.model} failed to compute this batch ({exc}); retry, "
                                 "or see the server log", headers={"Retry-After": str(RETRY_AFTER_S)}).response()
        except BaseException:  # cancelled (the client went away, or the timeout), or a bug
            share.release()
            raise
        headers = {"X-Dataset": entry.dataset, "X-Model": entry.model, "X-Count": str(len(z)),
                   "Content-Disposition": f'{"inline" if fmt == "png_grid" else "attachment"}; '
                                          f'filename="{stem}.{EXTENSIONS[fmt]}"'}
        # one that cannot be built (a header outside latin-1) gives the share back through its finalizer
        return BudgetedResponse(body, share, self.settings.send_timeout_s, media_type=MEDIA_TYPES[fmt],
                                headers=headers)

    @bentoml.api(route="/generate")
    async def generate(self, request: schemas.GenerateRequest, /) -> Binary:
        """n labelled images from one model, as npz (default), png_grid, zip or json.

        The seed (given, or drawn when absent) comes back in the X-Seed header and inside npz/zip/json;
        the same request with the same seed gives byte-identical output. Unconditional models label every
        image -1. Errors: 404 unknown dataset/model (lists what exists), 400 invalid field (names it).
        """
        try:
            entry = self._entry(request.dataset, request.model)
            counted = isinstance(request.labels, dict) and "n" not in request.model_fields_set
            labels = resolve_labels(request.labels, None if counted else request.n, entry.card, self.settings.max_n)
        except ApiError as exc:
            return exc.response()
        n = len(labels)
        seed = request.seed if request.seed is not None else secrets.randbits(32)
        if n * entry.card.latent_dim <= INLINE_LATENT_VALUES:
            z = latents(seed, n, entry.card.latent_dim, request.temperature)
        else:  # off the event loop: 10,000 latents of 100 values take about 9 ms
            z = await asyncio.get_running_loop().run_in_executor(self.encoders, latents, seed, n,
                                                                 entry.card.latent_dim, request.temperature)
        meta = {"dataset": entry.dataset, "model": entry.model, "seed": seed, **temperature_meta(request.temperature)}
        stem = f"synthgen-{entry.dataset}-{entry.model}-seed{seed}-n{n}{temperature_stem(request.temperature)}"
        response = await self._render(entry, z, labels, request.format, meta, stem)
        response.headers["X-Seed"] = str(seed)
        return response

    @bentoml.api(route="/interpolate")
    async def interpolate(self, request: schemas.InterpolateRequest, /) -> Binary:
        """`steps` images along the latent path between the seed_start and seed_end images (ends included).

        Step 0 is exactly the image /generate returns for n=1, seed=seed_start (and the same label); the
        last step the one for seed_end. Conditional models keep one class along the path (`label`, default 0).
        png_grid (default) shows the path as one row.
        """
        try:
            entry = self._entry(request.dataset, request.model)
            card = entry.card
            if card.conditional:
                label = class_id(request.label if request.label is not None else 0, card, "label")
            elif request.label is not None:
                raise ApiError(400, f"label: {card.dataset}/{card.model} is an unconditional model; omit 'label'",
                               field="label", allowed=[None])
            else:
                label = -1
        except ApiError as exc:
            return exc.response()
        z = interpolation_latents(request.seed_start, request.seed_end, request.steps, card.latent_dim, request.method,
                                  request.temperature)
        labels = np.full(request.steps, label, dtype=np.int64)
        meta = {"dataset": entry.dataset, "model": entry.model, "seed_start": request.seed_start,
                "seed_end": request.seed_end, "method": request.method, **temperature_meta(request.temperature)}
        stem = (f"synthgen-{entry.dataset}-{entry.model}-seed{request.seed_start}-to-{request.seed_end}"
                f"-steps{request.steps}{'-lerp' if request.method == 'lerp' else ''}"
                f"{temperature_stem(request.temperature)}")
        return await self._render(entry, z, labels, request.format, meta, stem, columns=request.steps)

    @bentoml.api(route="/models")
    async def models(self) -> schemas.Catalog:
        """Every servable dataset and model: classes, image shape, conditional or not, the default model,
        the quality metrics from its card; and the models of the manifest that are not served, with why."""
        return self.catalog_info


SyntheticImages.add_asgi_middleware(OpenApiDocs, spec=lambda: SyntheticImages.openapi_spec.asdict(),
                                    bearer=SETTINGS.api_token is not None)
SyntheticImages.add_asgi_middleware(GuardMiddleware, token=SETTINGS.api_token, max_body_bytes=SETTINGS.max_body_bytes,
                                    on_cancel=count_cancelled)
SyntheticImages.add_asgi_middleware(ErrorBodies, request_schemas={
    "/generate": schemas.GenerateRequest.model_json_schema(), "/interpolate": schemas.InterpolateRequest.model_json_schema()})
