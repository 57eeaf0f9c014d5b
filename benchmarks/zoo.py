"""The benchmark zoo: the served models, each trained 1 step on random data and exported with `export_run`.

Serving speed depends on the architecture and sizes, not on how well a model is trained, so the benchmark
builds its own zoo in a temp dir instead of depending on what is shipped in exported/. Sizes are the
shipped ones: each model's width, latent and label-embedding sizes from its zoo entry (`training.zoo.zoo_sizes`).
(`quick` shrinks the width to 8 for the smoke test.)
"""

from __future__ import annotations

import gzip
import os
import struct
import time
from pathlib import Path

import numpy as np

from training.zoo import zoo_sizes

# (dataset, model, sizes): the three served models the issue asks about, at their zoo sizes.
SERVING_MODELS = tuple((d, m, zoo_sizes(d, m))
                       for d, m in (("mnist", "cdcgan"), ("mnist", "mlp_gan"), ("bloodmnist_64", "dcgan")))


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Gzipped IDX (the MNIST format): magic 0x0803 for images (N, H, W), 0x0801 for labels (N,)."""
    magic = 0x0803 if array.ndim == 3 else 0x0801
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_random_data(root: Path, n: int = 64, seed: int = 0) -> Path:
    """Random uint8 data in the real layouts: MNIST/raw/*.gz (1x28x28, 10 classes) and medmnist/bloodmnist_64.npz
    (3x64x64, 8 classes). Only shapes matter for speed; BloodMNIST itself is not on this machine."""
    rng = np.random.default_rng(seed)
    for prefix in ("train", "t10k"):
        _write_idx(root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 8).astype(np.uint8).reshape(-1, 1)
    (root / "medmnist").mkdir(parents=True, exist_ok=True)
    np.savez(root / "medmnist" / "bloodmnist_64.npz", **arrays)
    return root


def build_zoo(workdir: Path, quick: bool = False, models=SERVING_MODELS, log=print) -> Path:
    """Train each model 1 step on random data and export it into workdir/exported; returns that folder."""
    import warnings

    from training.config import TrainConfig
    from training.export import export_run
    from training.train import main as train

    os.environ.setdefault("SYNTHGEN_CACHE_DIR", str(workdir / "cache"))  # decompressed IDX copies stay in the temp dir
    data = write_random_data(workdir / "data")
    exported = workdir / "exported"
    for dataset, model, sizes in models:
        t0 = time.perf_counter()
        sizes = {**sizes, "width": 8} if quick else sizes
        cfg = TrainConfig(dataset=dataset, model=model, epochs=1, batch_size=16, **sizes, max_steps=1,
                          data_dir=str(data), out_dir=str(workdir / "runs" / dataset / model)).resolve()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = train(cfg)
            export_run(run, exported)
        log(f"zoo: {dataset}/{model} trained 1 step and exported in {time.perf_counter() - t0:.1f} s")
    return exported
