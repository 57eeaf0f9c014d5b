"""Shared fixtures: tiny dataset files in the real formats (gzipped IDX, MedMNIST .npz) and tiny exported models.

Nothing here reads ../shared/data or the network: every file is written into a temp dir.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

# (flag, channels, classes) of the MedMNIST files the fixtures write, in the official layout.
TINY_MEDMNIST = {"pneumoniamnist": (1, 2), "retinamnist": (3, 5), "bloodmnist": (3, 8), "pathmnist": (3, 9), "breastmnist": (1, 2)}
TINY_SIZES = {"train": 48, "val": 12, "test": 24}


def class_patterns(labels: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """uint8 images whose brightness pattern depends on the class, plus noise: learnable, not constant."""
    n = len(labels)
    h, w = shape[0], shape[1]
    yy, xx = np.mgrid[0:h, 0:w]
    images = np.empty((n, *shape), dtype=np.uint8)
    for i, label in enumerate(labels):
        stripe = ((xx + yy * (label + 1)) % (label + 3) == 0).astype(np.float32) * 200
        noise = rng.integers(0, 40, size=(h, w))
        img = np.clip(stripe + noise, 0, 255).astype(np.uint8)
        images[i] = img[..., None].repeat(shape[2], axis=2) if len(shape) == 3 else img
    return images


def write_idx(path: Path, array: np.ndarray) -> None:
    """Gzipped IDX (the MNIST format): magic 0x0803 for images (N, H, W), 0x0801 for labels (N,)."""
    magic = 0x0803 if array.ndim == 3 else 0x0801
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_idx_dataset(root: Path, folder: str, n_train: int = 64, n_test: int = 32, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte.gz", class_patterns(labels, (28, 28), rng))
        write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))


def make_medmnist_npz(folder: Path, flag: str, size: int = 28, seed: int = 0) -> Path:
    """A small .npz with the official keys, dtypes and shapes: images uint8 (N, H, W[, 3]), labels uint8 (N, 1)."""
    channels, classes = TINY_MEDMNIST[flag]
    rng = np.random.default_rng(seed)
    shape = (size, size) if channels == 1 else (size, size, 3)
    arrays = {}
    for split, n in TINY_SIZES.items():
        labels = np.arange(n) % classes
        arrays[f"{split}_images"] = class_patterns(labels, shape, rng)
        arrays[f"{split}_labels"] = labels.astype(np.uint8).reshape(-1, 1)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data folder in the layout of ../shared/data with tiny files of every format."""
    root = tmp_path_factory.mktemp("data")
    make_idx_dataset(root, "MNIST")
    make_idx_dataset(root, "FashionMNIST", seed=1)
    for flag in TINY_MEDMNIST:
        make_medmnist_npz(root / "medmnist", flag, 28)
    for flag in ("bloodmnist", "pathmnist", "breastmnist"):
        make_medmnist_npz(root / "medmnist", flag, 64)
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Decompressed IDX copies go to a temp cache, never to ~/.cache."""
    monkeypatch.setenv("SYNTHGEN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True, scope="session")
def _fewer_prior_codes():
    """A VAE's mixture prior is fitted to 4,000 latent codes in tests, not 60,000: the same EM in a second."""
    import training.latent_prior

    training.latent_prior.PRIOR_POINTS = 4_000


def train_tiny(data_dir: Path | None, out: Path, dataset: str, model: str, steps: int = 3, **overrides) -> Path:
    """A few optimiser steps of a small model into `out` (a run directory)."""
    from training.config import TrainConfig
    from training.train import main

    cfg = TrainConfig(dataset=dataset, model=model, epochs=1, batch_size=16, width=8, max_steps=steps,
                      data_dir=data_dir and str(data_dir), out_dir=str(out),
                      **overrides).resolve()
    return main(cfg)


SERVER_FIXTURES = {"server", "url"}  # module fixtures that start a real `bentoml serve`


def pytest_collection_modifyitems(items):
    """A test that talks to a real server is an end-to-end test: marked slow (CI runs it; -m "not slow" skips it)."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

# The tiny zoo the service tests serve: two conditional 28x28 models (a GAN and a VAE), one unconditional 28x28 VAE,
# one 64x64 RGB GAN.
TINY_ZOO = (("mnist", "cdcgan"), ("mnist", "mlp_vae"), ("bloodmnist_64", "dcgan"), ("pneumoniamnist", "cvae"))
FLOAT16_WEIGHTS = {("mnist", "cdcgan")}  # exported with float16 weights, so the serving tests cover both storages
PRIORS = {("mnist", "mlp_vae"): 3}  # a VAE sampling through a fitted mixture prior: latent_dim 21, not 20


@pytest.fixture(scope="session")
def exported_dir(tmp_path_factory, data_dir) -> Path:
    """An exported/ folder (manifest, cards, ONNX, TorchScript) of tiny models trained a few steps here."""
    from training.export import export_run

    runs = tmp_path_factory.mktemp("runs")
    out = tmp_path_factory.mktemp("exported")
    for dataset, model in TINY_ZOO:
        run = train_tiny(data_dir, runs / dataset / model, dataset, model, steps=2,
                         prior_components=PRIORS.get((dataset, model), 0))
        export_run(run, out, "float16" if (dataset, model) in FLOAT16_WEIGHTS else "float32")
    return out
