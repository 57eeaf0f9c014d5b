"""The OpenAPI document at /docs.json, saying what the API routes really answer.

BentoML builds /docs.json from the request and response models, but documents an image route's success as
`application/octet-stream` and every route's errors as its own 400/404/500 bodies. This service answers
npz, PNG, zip or JSON with `X-Seed`, `X-Dataset`, `X-Model`, `X-Count` and `Content-Disposition` headers,
gives every error the body of `service.errors` (`schemas.Error`), and answers 401, 413, 415, 503 and 504
where BentoML's document knows none of them; with SYNTHGEN_API_TOKEN set the API routes declare bearer
authentication. `amend` rewrites the API routes' responses in BentoML's document (its request schemas are
kept); `OpenApiDocs` serves the result, built once per worker on first use.
"""

from __future__ import annotations

import json
from typing import Callable

from . import VERSION
from .config import REQUEST_TIMEOUT_S
from .encoders import MEDIA_TYPES
from .schemas import Catalog, Error, JsonBatch

REF = "#/components/schemas/{model}"
IMAGE_ROUTES = ("/generate", "/interpolate")

_HEADERS = {
    "X-Seed": "generate: the seed used, given or drawn; the same request with it gives the same bytes",
    "X-Dataset": "the dataset of the model that answered",
    "X-Model": "the model that answered (the dataset's default when none was named)",
    "X-Count": "the number of images",
    "Content-Disposition": "a filename naming dataset, model, seed and n (or steps), e.g. "
                           "synthgen-mnist-cdcgan-seed0-n64.npz",
}
_ERRORS = {
    "400": "a field is invalid: `detail` names each bad field and what it allows",
    "401": "missing or wrong bearer token (only when the server sets SYNTHGEN_API_TOKEN)",
    "404": "unknown dataset or model: `datasets` lists what is served",
    "413": "the request body is over SYNTHGEN_MAX_BODY_BYTES",
    "415": "the request body is not JSON, is sent compressed (Content-Encoding), or names a charset other than UTF-8",
    "503": "the model failed its start-up check (until a restart: no Retry-After) or this call (Retry-After: "
           "worth retrying); the message says which",
    "504": f"no response within the request timeout ({REQUEST_TIMEOUT_S} s)",
}
_MODELS_ERRORS = ("400", "401", "413", "415")


def _error_responses(codes) -> dict:
    content = {"application/json": {"schema": {"$ref": REF.format(model="Error")}}}
    responses = {code: {"description": _ERRORS[code], "content": content} for code in codes}
    if "503" in responses:
        responses["503"]["headers"] = {"Retry-After": {"description": "seconds to wait before retrying; only on a "
                                                       "failed model call", "schema": {"type": "integer"}}}
    return responses


def _image_success(route: str) -> dict:
    def binary(description: str) -> dict:
        return {"schema": {"type": "string", "format": "binary", "description": description}}

    content = {MEDIA_TYPES["npz"]: binary("format npz: images uint8 N x H x W x C, labels int64, class_names, seed; "
                                          "np.load(allow_pickle=False)"),
               MEDIA_TYPES["png_grid"]: binary("format png_grid: one PNG of every image"),
               MEDIA_TYPES["zip"]: binary("format zip: a PNG per image, labels.csv, info.json"),
               MEDIA_TYPES["json"]: {"schema": {"$ref": REF.format(model="JsonBatch")}}}
    headers = {name: {"description": text, "schema": {"type": "string"}} for name, text in _HEADERS.items()
               if name != "X-Seed" or route == "/generate"}
    return {"description": "the images, in the requested format", "headers": headers, "content": content}


def _schemas(*models) -> dict:
    """JSON schemas of pydantic models and the models they use, as OpenAPI components."""
    components = {}
    for model in models:
        schema = model.model_json_schema(ref_template=REF)
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
    return components


def _as_openapi_3_0(schema: dict) -> None:
    """One JSON schema, in place, in OpenAPI 3.0's dialect, which BentoML's document claims and misses: a null
    default or a null branch of anyOf (pydantic's Optional) is `nullable`, and BentoML's own keyword
    `root_input` gets the `x-` prefix that extensions need."""
    if "root_input" in schema:
        schema["x-bentoml-root-input"] = schema.pop("root_input")
    if "anyOf" in schema and {"type": "null"} in schema["anyOf"]:
        schema["anyOf"] = [branch for branch in schema["anyOf"] if branch != {"type": "null"}]
        schema["nullable"] = True
    if "default" in schema and schema["default"] is None:
        schema["nullable"] = True
    for value in schema.values():
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, dict):
                _as_openapi_3_0(child)


def amend(spec: dict, bearer: bool = False) -> dict:
    """BentoML's OpenAPI document (`Service.openapi_spec.asdict()`) with the API routes' true responses, and
    valid OpenAPI 3.0 (tests/test_service.py checks it with openapi-spec-validator). `bearer`: the server
    asks for a token (SYNTHGEN_API_TOKEN), so the API routes declare bearer authentication."""
    spec = json.loads(json.dumps(spec))  # a plain copy, status codes as strings
    info = spec.setdefault("info", {})
    if str(info.get("version")) in ("None", ""):  # served from source, not from a built Bento with its own version
        info["version"] = VERSION
    if bearer:
        spec["components"].setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    for bentoml_error in ("InvalidArgument", "NotFound", "InternalServerError"):  # bodies this service never sends
        components.pop(bentoml_error, None)
    components.update(_schemas(Error, JsonBatch, Catalog))
    for route in IMAGE_ROUTES:
        operation = spec["paths"][route]["post"]
        operation["responses"] = {"200": _image_success(route), **_error_responses(_ERRORS)}
        request = operation["requestBody"]["content"]["application/json"]["schema"]
        for name, field in request.get("properties", {}).items():
            if name not in request.get("required", []):
                field["nullable"] = True  # null means the field's default (schemas._Strict)
    models = spec["paths"]["/models"]
    catalog = {"description": "every dataset and model served, with classes, image shape and metrics, and the "
                              "models that failed to load",
               "content": {"application/json": {"schema": {"$ref": REF.format(model="Catalog")}}}}
    models["post"]["responses"] = {"200": catalog, **_error_responses(_MODELS_ERRORS)}
    models["get"] = {**{k: v for k, v in models["post"].items() if k not in ("requestBody", "operationId")},
                     "responses": {"200": catalog, **_error_responses(("401",))}}
    if bearer:
        for operation in (*(spec["paths"][route]["post"] for route in IMAGE_ROUTES), models["get"], models["post"]):
            operation["security"] = [{"bearer": []}]
    _as_openapi_3_0(spec)
    return spec


class OpenApiDocs:
    """ASGI middleware: GET /docs.json answers `amend(spec(), bearer)`, built on the first request and kept."""

    def __init__(self, app, spec: Callable[[], dict], bearer: bool = False):
        self.app, self.spec, self.bearer, self.body = app, spec, bearer, None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/docs.json" or scope["method"] not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        if self.body is None:
            self.body = json.dumps(amend(self.spec(), self.bearer)).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(self.body)).encode())]})
        await send({"type": "http.response.body", "body": self.body if scope["method"] == "GET" else b""})
