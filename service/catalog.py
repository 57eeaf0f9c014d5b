"""The manifest, read and verified: which (dataset, model) pairs exist, where their files are, and which are usable.

`exported/manifest.json` (format "synthgen-manifest/1", written by `training/manifest.py`) lists every model
with its files and their sha256. `load_catalog` checks, for the files the chosen backend needs (the card and
the ONNX or TorchScript file), that each path stays inside the exported folder, exists, and has the sha256
the manifest promises, and that the card carries what serving needs. A model that fails any check is kept
out of service with the reason (logged, and shown by the catalog endpoint); the other models keep working.
A manifest that cannot be read at all raises `ManifestError` with one clear message.

Names from requests are only ever looked up in `Catalog.entries` (a dict), never joined into paths.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("bentoml.synthgen.catalog")

MANIFEST_FORMAT = "synthgen-manifest/1"
MANIFEST_FILE = "manifest.json"
BACKEND_FILE_KIND = {"onnxruntime": "onnx", "torchscript": "torchscript"}
# Preference among loaded models when the manifest's default for a dataset could not be loaded.
FAMILY_PREFERENCE = ("cdcgan", "cwgan_gp", "cvae", "cmlp_gan", "cmlp_vae", "dcgan", "wgan_gp", "conv_vae", "mlp_gan",
                     "mlp_vae")


class ManifestError(RuntimeError):
    """The manifest is missing or malformed: nothing can be served."""


class ModelFileError(RuntimeError):
    """One model's files fail verification: that model is not served."""


@dataclass(frozen=True)
class ModelCard:
    """What serving needs from card.json, checked; `raw` keeps the whole card for the catalog."""

    dataset: str
    model: str
    description: str
    classes: tuple[str, ...]
    conditional: bool
    image_shape: tuple[int, int, int]  # C, H, W
    latent_dim: int
    metrics: dict
    raw: dict

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def weight_storage(self) -> str:
        """"float16" when the files store the weights as float16 (cast to float32 in the graph), "mixed" for a
        mixture whose members store them differently, else "float32" (cards written before the field: float32)."""
        weights = self.raw.get("weights")
        storage = weights.get("storage") if isinstance(weights, dict) else None
        return storage if storage in ("float16", "mixed") else "float32"

    @property
    def image_bytes(self) -> int:
        c, h, w = self.image_shape
        return c * h * w


@dataclass
class CatalogEntry:
    dataset: str
    model: str
    model_path: Path | None = None
    card: ModelCard | None = None
    error: str | None = None  # why this model is not served; None when it is usable
    runner: object = None  # set by the service once the backend session is loaded

    @property
    def ok(self) -> bool:
        return self.error is None and self.card is not None


@dataclass
class Catalog:
    root: Path
    backend: str
    entries: dict[tuple[str, str], CatalogEntry] = field(default_factory=dict)
    manifest_defaults: dict[str, str] = field(default_factory=dict)

    def usable(self) -> list[CatalogEntry]:
        return [e for e in self.entries.values() if e.ok]

    def failed(self) -> list[CatalogEntry]:
        return [e for e in self.entries.values() if not e.ok]

    def datasets(self) -> dict[str, list[str]]:
        """Servable datasets and their servable models, sorted: what a 404 lists."""
        out: dict[str, list[str]] = {}
        for e in sorted(self.usable(), key=lambda e: (e.dataset, e.model)):
            out.setdefault(e.dataset, []).append(e.model)
        return out

    def default_model(self, dataset: str) -> str | None:
        """The manifest's default when it is usable, else the best usable model of the dataset by the rule that
        picked the default (training/manifest.py): conditional first, then the lowest FID, then the family."""
        models = self.datasets().get(dataset, [])
        if not models:
            return None
        preferred = self.manifest_defaults.get(dataset)
        if preferred in models:
            return preferred

        def rank(name: str) -> tuple:
            card = self.entries[(dataset, name)].card
            fid = card.metrics.get("fid")
            fid = fid if isinstance(fid, (int, float)) and not isinstance(fid, bool) else float("inf")
            family = FAMILY_PREFERENCE.index(name) if name in FAMILY_PREFERENCE else len(FAMILY_PREFERENCE)
            return (not card.conditional, fid, family, name)

        return min(models, key=rank)

    def best_for_training(self, dataset: str) -> str | None:
        """The usable conditional model whose card has the highest CAS (a classifier trained only on its
        images, tested on real ones): the one to ask for when the images are a training set. None when no
        conditional model of the dataset has a measured CAS. Ties go to the name first in order."""
        scored = []
        for name in self.datasets().get(dataset, []):
            card = self.entries[(dataset, name)].card
            cas = card.metrics.get("cas")
            if card.conditional and isinstance(cas, (int, float)) and not isinstance(cas, bool):
                scored.append((-cas, name))
        return min(scored)[1] if scored else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ModelFileError(message)


def resolve_inside(root: Path, relative: object) -> Path:
    """root/relative, refusing absolute paths and anything that escapes root (e.g. '../../etc/passwd')."""
    _require(isinstance(relative, str) and relative != "", f"file path {relative!r} is not a non-empty string")
    candidate = (root / relative).resolve()
    _require(candidate.is_relative_to(root) and not Path(relative).is_absolute(),
             f"file path {relative!r} leaves the exported folder")
    return candidate


def verified_file(root: Path, spec: object, kind: str) -> Path:
    """The file of one manifest "files" entry, after checking it exists and matches its sha256."""
    _require(isinstance(spec, dict), f"manifest has no usable '{kind}' file entry")
    path = resolve_inside(root, spec.get("path"))
    expected = spec.get("sha256")
    _require(isinstance(expected, str) and len(expected) == 64, f"{kind} file {spec.get('path')} has no sha256 in the manifest")
    _require(path.is_file(), f"{kind} file {spec['path']} is missing")
    actual = sha256_of(path)
    _require(actual == expected.lower(),
             f"{kind} file {spec['path']} fails its sha256 check (manifest {expected[:12]}..., file {actual[:12]}...): "
             "truncated, corrupted or replaced")
    return path


def parse_card(raw: object, dataset: str, model: str) -> ModelCard:
    """Check the fields serving relies on; anything odd is a ModelFileError naming the field."""
    _require(isinstance(raw, dict), "card.json is not a JSON object")
    _require(raw.get("dataset") == dataset and raw.get("model") == model,
             f"card.json names {raw.get('dataset')}/{raw.get('model')}, the manifest {dataset}/{model}")
    classes = raw.get("classes")
    _require(isinstance(classes, list) and len(classes) > 0 and all(isinstance(c, str) for c in classes),
             "card.json 'classes' is not a non-empty list of names")
    _require(len(set(classes)) == len(classes), "card.json 'classes' has duplicate names")
    shape = raw.get("image_shape")
    _require(isinstance(shape, list) and len(shape) == 3 and all(isinstance(d, int) and d > 0 for d in shape)
             and shape[0] in (1, 3), "card.json 'image_shape' is not [C, H, W] with C in (1, 3)")
    latent = raw.get("latent_dim")
    _require(isinstance(latent, int) and latent > 0, "card.json 'latent_dim' is not a positive integer")
    conditional = raw.get("conditional")
    _require(isinstance(conditional, bool), "card.json 'conditional' is not true/false")
    metrics = raw.get("metrics") or {}
    _require(isinstance(metrics, dict), "card.json 'metrics' is not an object")
    clean_metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and not math.isfinite(v))}
    return ModelCard(dataset=dataset, model=model, description=str(raw.get("description", "")),
                     classes=tuple(classes), conditional=conditional, image_shape=tuple(shape),
                     latent_dim=latent, metrics=clean_metrics, raw=raw)


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"no manifest at {path}: set SYNTHGEN_EXPORTED_DIR to a folder written by training.export")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"manifest {path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ManifestError(f"manifest {path} has format {found!r}, expected {MANIFEST_FORMAT!r}")
    models, defaults = manifest.get("models"), manifest.get("defaults", {})
    if not isinstance(models, list) or not isinstance(defaults, dict):
        raise ManifestError(f"manifest {path}: 'models' must be a list and 'defaults' an object")
    return manifest


def load_catalog(root: Path, backend: str = "onnxruntime") -> Catalog:
    """Read and verify the manifest under `root`; every entry ends up usable or with an error saying why."""
    root = Path(root).resolve()
    manifest = read_manifest(root)
    kind = BACKEND_FILE_KIND[backend]
    catalog = Catalog(root=root, backend=backend,
                      manifest_defaults={str(k): str(v) for k, v in manifest["defaults"].items()})
    for i, item in enumerate(manifest["models"]):
        if not (isinstance(item, dict) and isinstance(item.get("dataset"), str) and isinstance(item.get("model"), str)):
            logger.error("manifest entry %d has no dataset/model names; skipped", i)
            continue
        entry = CatalogEntry(dataset=item["dataset"], model=item["model"])
        if (entry.dataset, entry.model) in catalog.entries:
            logger.error("manifest lists %s/%s twice; the first entry is used", entry.dataset, entry.model)
            continue
        catalog.entries[(entry.dataset, entry.model)] = entry
        try:
            files = item.get("files")
            _require(isinstance(files, dict), "manifest entry has no 'files' object")
            card_path = verified_file(root, files.get("card"), "card")
            try:
                raw = json.loads(card_path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ModelFileError(f"card {files['card']['path']} is not valid JSON: {exc}") from None
            entry.card = parse_card(raw, entry.dataset, entry.model)
            entry.model_path = verified_file(root, files.get(kind), kind)
        except ModelFileError as exc:
            entry.error = str(exc)
            logger.error("model %s/%s is not served: %s", entry.dataset, entry.model, exc)
    return catalog
