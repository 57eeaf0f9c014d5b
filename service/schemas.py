"""Request and response models of the public API, and example requests that the tests send (and check valid).

Requests are strict: unknown fields are rejected (a typo such as "label" for "labels" is a 400, not a silent
default), integers must be JSON integers, and `n` is bounded by SYNTHGEN_MAX_N at start-up. `null` for an
optional field means its default, as leaving it out does (clients that serialise unset fields as null work);
`null` for a required field is the same 400 as leaving it out. Checks that need the catalog (does the dataset
exist, is the class name valid for it) happen in the service. The error and JSON-batch models document those
bodies in /docs.json (service/openapi.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, WithJsonSchema, model_validator

from .config import current
from .encoders import FORMATS
from .sampling import INTERPOLATION_METHODS

SETTINGS = current()
MAX_SEED = 2**63 - 1
MAX_NAME = 64  # longest dataset/model name accepted; real ones are short identifiers
MAX_TEMPERATURE = 2.0
DEFAULT_N = min(64, SETTINGS.max_n)  # a default above a configured limit would break that limit
DEFAULT_STEPS = min(8, SETTINGS.max_steps)
TEMPERATURE_DOC = ("scale of the latent noise, z = temperature x N(0, I): below 1 fewer odd images and less "
                   "variety (the truncation trick), above 1 the reverse, 0 one central image per class; "
                   "default 1, the distribution the model was trained on")

Format = Literal[FORMATS]
# -0.0 is 0: the same images, so the same bytes and file name as a request for 0
Temperature = Annotated[float, AfterValidator(lambda t: t + 0.0)]
# BentoML flattens a JSON-schema "anyOf" to its first member when it builds /docs.json, which would document
# `labels` as the constant "balanced"; these explicit "oneOf" schemas keep every accepted shape visible.
_ONE_LABEL = [{"type": "integer", "minimum": 0, "description": "class id"},
              {"type": "string", "description": "class name"}]
Label = Annotated[Union[StrictInt, StrictStr, None], WithJsonSchema({"oneOf": _ONE_LABEL})]
MAX_CLASSES = 256  # keys of a labels object; real datasets have at most a few dozen classes
Count = Annotated[StrictInt, Field(ge=0, le=SETTINGS.max_n)]
Labels = Annotated[
    Union[Literal["balanced"], StrictInt, StrictStr,
          Annotated[list[Union[StrictInt, StrictStr]], Field(max_length=SETTINGS.max_n)],
          Annotated[dict[StrictStr, Count], Field(max_length=MAX_CLASSES)], None],
    WithJsonSchema({"oneOf": [*_ONE_LABEL,
                              {"type": "object", "maxProperties": MAX_CLASSES, "description": "class name -> count",
                               "additionalProperties": {"type": "integer", "minimum": 0, "maximum": SETTINGS.max_n}},
                              {"type": "array", "maxItems": SETTINGS.max_n, "items": {"oneOf": _ONE_LABEL}}]}),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """Drop `null` values, so that each such field takes its default (or is reported missing if required)."""
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class GenerateRequest(_Strict):
    """POST /generate: n labelled images from one model."""

    dataset: StrictStr = Field(max_length=MAX_NAME, description="dataset id, e.g. 'mnist' (see /models)")
    model: StrictStr | None = Field(default=None, max_length=MAX_NAME,
                                    description="model family; default: the dataset's default model")
    n: StrictInt = Field(default=DEFAULT_N, ge=1, le=SETTINGS.max_n,
                         description=f"number of images; default {DEFAULT_N}, or the sum of a labels object's counts")
    labels: Labels = Field(
        default=None,
        description="conditional models: 'balanced' (default: 0,1,..,k-1,0,1,..), one class id or name for "
                    "all images, a list of n ids/names, or an object of class name -> count (the images class "
                    "by class in its order; n, if given, must equal the sum). Unconditional models: omit "
                    "(labels are -1).")
    seed: StrictInt | None = Field(default=None, ge=0, le=MAX_SEED,
                                   description="random seed; omitted: one is drawn and returned (X-Seed header, "
                                               "and inside npz/zip/json)")
    temperature: Temperature = Field(default=1.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False,
                               description=TEMPERATURE_DOC)
    format: Format = Field(default="npz", description="npz (default) | png_grid | zip | json")


class InterpolateRequest(_Strict):
    """POST /interpolate: images along the latent path from the seed_start image to the seed_end image."""

    dataset: StrictStr = Field(max_length=MAX_NAME)
    model: StrictStr | None = Field(default=None, max_length=MAX_NAME)
    seed_start: StrictInt = Field(default=0, ge=0, le=MAX_SEED)
    seed_end: StrictInt = Field(default=1, ge=0, le=MAX_SEED)
    steps: StrictInt = Field(default=DEFAULT_STEPS, ge=2, le=SETTINGS.max_steps,
                             description=f"images on the path, ends included; default {DEFAULT_STEPS}")
    label: Label = Field(
        default=None, description="conditional models: the class of every step (id or name; default class 0)")
    method: Literal[INTERPOLATION_METHODS] = Field(default="slerp", description="spherical (default) or linear path")
    temperature: Temperature = Field(default=1.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False,
                               description=TEMPERATURE_DOC + "; the ends are /generate's images at the same one")
    format: Format = Field(default="png_grid", description="png_grid (default, one row) | npz | zip | json")


class ModelInfo(BaseModel):
    dataset: str
    model: str
    description: str
    default: bool
    conditional: bool
    classes: list[str]
    num_classes: int
    image_shape: list[int] = Field(description="[C, H, W], the model's order; images come as N x H x W x C")
    latent_dim: int
    metrics: dict[str, Any] = Field(description="quality metrics from the model card (fid, precision, ...)")
    parameters: int | None = None
    weight_storage: Literal["float32", "float16", "mixed"] = Field(
        default="float32", description="how the model files store the weights (mixed: a mixture whose members differ); "
                                       "compute is float32 either way")
    merges_requests: bool = Field(description="concurrent requests share model calls (its outputs were checked "
                                              "to be row-independent at start-up)")
    training: dict[str, Any] = Field(default_factory=dict,
                                     description="epochs, steps, wall time, hardware and arithmetic precision (fp32 or bf16)")


class DatasetInfo(BaseModel):
    default_model: str
    best_for_training: str | None = Field(
        default=None, description="the conditional model whose images trained the best classifier (highest CAS on "
                                  "its card): ask for it when the images are a training set; null when none has a CAS")
    models: list[str]
    classes: list[str]
    image_shape: list[int] = Field(description="[C, H, W]")


class FailedModel(BaseModel):
    dataset: str
    model: str
    reason: str


class Catalog(BaseModel):
    backend: str
    max_n: int
    datasets: dict[str, DatasetInfo]
    models: list[ModelInfo]
    failed: list[FailedModel] = Field(description="models in the manifest that are not served, and why")


class ErrorItem(BaseModel):
    loc: list[Union[str, int]] = Field(description="the field, and for a bad item of a list its index: [\"labels\", 3]")
    msg: str = Field(description="what is wrong, in one sentence")
    type: str = Field(description="the kind of error, e.g. missing, not_found, value_error, extra_forbidden")
    allowed: Union[list[Any], dict[str, Any], None] = Field(
        default=None, description="what the field accepts: its values (datasets, models, class names, formats, "
                                  "field names) or its JSON-schema range, e.g. {\"type\": \"integer\", "
                                  "\"minimum\": 1, \"maximum\": 10000}")


class Error(BaseModel):
    """Every error the service answers (4xx, 503, 504): one sentence, then one `detail` entry per bad field."""

    error: str = Field(description="what went wrong, in one sentence")
    detail: list[ErrorItem] = Field(default_factory=list, description="one entry per bad field (absent when the "
                                                                      "error is not about a field)")
    datasets: dict[str, list[str]] | None = Field(default=None, description="on 404 and 503: the datasets served "
                                                                            "and their models")


class JsonBatch(BaseModel):
    """`format: "json"`: the images as base64 PNGs, with their labels and the request's provenance."""

    dataset: str
    model: str
    seed: int | None = Field(default=None, description="generate: the seed used (given or drawn)")
    seed_start: int | None = Field(default=None, description="interpolate")
    seed_end: int | None = Field(default=None, description="interpolate")
    method: str | None = Field(default=None, description="interpolate: slerp or lerp")
    temperature: float | None = Field(default=None, description="the request's temperature, when it was not 1")
    n: int
    image_shape: list[int] = Field(description="[H, W, C] of every image")
    class_names: list[str]
    labels: list[int] = Field(description="one class id per image; -1 for unconditional models")
    images: list[str] = Field(description="one base64 PNG per image")


EXAMPLE_GENERATE = {"dataset": "mnist", "model": "cdcgan", "n": 64, "labels": "balanced", "seed": 0,
                    "format": "npz"}
EXAMPLE_GENERATE_BY_NAME = {"dataset": "pneumoniamnist", "n": 8, "labels": "pneumonia", "seed": 1,
                            "format": "json"}
EXAMPLE_INTERPOLATE = {"dataset": "mnist", "model": "cdcgan", "seed_start": 0, "seed_end": 1, "steps": 8,
                       "label": 3, "format": "png_grid"}
