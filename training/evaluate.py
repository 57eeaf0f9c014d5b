"""Evaluate exported generators with one fixed protocol, run on the shipped ONNX file (what the service serves).

    python -m training.evaluate exported/mnist/cdcgan --data-dir ../shared/data
    python -m training.evaluate exported/pneumoniamnist/cdcgan exported/retinamnist/cdcgan --seeds 3
    python -m training.evaluate --all                      # every model in exported/manifest.json
    python -m training.evaluate exported/mnist/cdcgan --quick --no-card   # smoke run, card untouched

Writes the metrics into each model's card.json under "metrics", refreshes exported/manifest.json (card
sha256s change), writes a full report to runs/eval/<dataset>__<model>.json and prints a table.

Protocol (protocol version 1; accuracies are fractions in [0, 1], gains are differences of them)
---------------------------------------------------------------------------------------------------
Images. Generated images come from `generator.onnx` through ONNX Runtime (CPU), z ~ N(0, I) from a fixed
seed, and are quantised to uint8 (round(255 x)) like the PNGs the service returns; real images are the
uint8 dataset files. Every classifier sees x / 255.

Reference classifier. One small CNN per dataset (`Classifier`: conv5x5(16)-pool-conv5x5(32)-pool-fc128-fc K,
first conv strided for 64x64 inputs), trained on the full real training split (seed 0) and cached in
runs/classifiers/<dataset>.pt. Its real test accuracy is the ceiling. Its 128-d penultimate activations
(after ReLU) are the feature space of FID and precision/recall.

Classifier recipe (every classifier below, real, synthetic or mixed, is trained the same way): Adam with
a one-cycle learning-rate schedule (peak 3e-3), batch 256 drawn with replacement, a fixed number of steps
per dataset: max(300, ceil(E * N_train / 256)) with E = 4 epochs of the full real training split
(--classifier-epochs E sets it to ceil(E * N_train / 256)). MNIST: 938 steps; PneumoniaMNIST: 300.

FID (Heusel et al. 2017): Frechet distance between Gaussians fitted to the reference-classifier features
of 10,000 generated images (--n-generated) and of the real test split. Conditional models are asked for
labels in the real training split's class proportions (the distribution they were trained to match).
The floor is the same metric for a random subset of the real training split of the same size
(at most the whole split) against the real test split.

Precision / recall (Kynkaenniemi et al. 2019, k = 3): k-NN manifolds in the same features; n =
min(n_generated, N_test) generated images against the real test split; floor: n real training images.

Memorisation (every model; --memorisation-only adds just this block to cards, in seconds and without the
classifier): the first 2,000 images of the FID set and a seeded subset of as many real test images (at most the
split) against the whole training split, by L2 distance on the [0, 1] pixel scale. A copy is an image whose
nearest training image is closer than a third of its second nearest (Yoon et al. 2023). Reported: the share of
copies and the median and smallest nearest distance, each for the generated and for the real test images, so a
generator is read against real data drawn apart from its training set. A real test image can count as a copy
where the dataset's splits share near-duplicates (BreastMNIST's do); a copy of a training image that itself has
a near-duplicate in the training split escapes the rule, so read the smallest distance too.

Label fidelity (conditional models): the reference classifier's accuracy on generated images against
the requested labels, balanced labels (class i mod K), 10,000 images; per class too. label_fidelity_real:
the same measure on real held-out images of the training distribution (the reference's mean per-class
accuracy on the val split where the dataset has one, else on test), i.e. what a perfect generator would
score with this judge: on hard sets (RetinaMNIST) it is far below 1; read label fidelity against it.

CAS (classification accuracy score, Ravuri & Vinyals 2019; conditional models): a fresh classifier
trained only on a synthetic pool, tested on the real test split, one run per seed (--seeds, default 3).
The pool: max(n_generated, N_train) images, label mix --label-mix (default balanced, the service's
default mix). cas_real: the same recipe on the real training split, same seeds. Per-class accuracy too.

Augmentation (conditional models, --augmentation default on): classifiers trained on a stratified
fraction of the real training split (1%, 10%, 100%; 10%, 25%, 100% for sets under 20,000 images), alone
and with the synthetic pool added (each batch half real, half synthetic: --synthetic-share 0.5), each
for every seed (the seed draws the subset, the initialisation and the batches; real and real+synthetic
runs of a seed share all three), reporting real test accuracy mean and std and the paired gain. The
shipped generators saw the full training split, so the low-data figures measure how much of that
knowledge the synthetic images carry to a classifier, not a gain available to someone who only has the
small subset.

Inception FID (optional, --inception-weights FILE, pytorch-fid's TF-Inception port; nothing downloads it):
the same FID set and floor subset in the 2048-d pool features of that network (`training/inception_fid.py`),
against the real test split, for comparison with published figures; reported as inception_fid(_floor).

Unconditional models: FID, precision and recall only (no pseudo-labels); the reference classifier's
predicted class histogram of their images is reported to show mode coverage.

Real-only runs do not depend on the generator, so they are cached with the reference classifier
(runs/classifiers/<dataset>.baselines.json, keyed by the recipe and a fingerprint of the data; a recipe other
than the default, say --classifier-epochs 2, keeps its own <dataset>.<key>.pt and .baselines.json).

Run time (2 CPU cores shared with two training jobs, --threads 1, classifiers cached): MNIST conditional
model, full protocol (12 classifier trainings) ~7.5 min; `--seeds 1 --no-augmentation` ~45 s; small
MedMNIST conditional model, full protocol ~3 min. First use of a dataset adds the reference classifier
(MNIST ~1 min) and the 8 other real-only runs (MNIST ~8 min), once. `--classifier-epochs 2` halves it all.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import hashlib
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cli import flag, user_errors_exit
from .data import DATA_DIR_ENV, DataNotFoundError, DatasetInfo, ImageData, load_dataset
from .hardware import hardware_name
from .manifest import CARD, MANIFEST, write_manifest
from .sampling import balanced_labels

PROTOCOL_VERSION = 1
CLASSIFIER_ARCH = "lenet5-16-32-128/v1"
BATCH_SIZE = 256
PEAK_LR = 3e-3
MIN_STEPS = 300
DEFAULT_EPOCHS = 4.0
LARGE_SET = 20_000  # training splits at least this big use the 1/10/100% fractions
FRACTIONS_LARGE = (0.01, 0.1, 1.0)
FRACTIONS_SMALL = (0.1, 0.25, 1.0)
PR_K = 3
GENERATION_SEED = 0  # z of the FID/label-fidelity set; the synthetic pool uses GENERATION_SEED + 1
MEMORISATION_N = 2_000  # generated images (and real test images, at most) compared with the whole training split
MEMORISATION_VERSION = 1
COPY_RATIO = 1 / 3
FLOOR_SEED = 0


# --------------------------------------------------------------------------------------------------------------
# The classifier


class Classifier(nn.Module):
    """LeNet-5-style CNN: conv5x5(16)-ReLU-maxpool-conv5x5(32)-ReLU-maxpool-fc(128)-ReLU-fc(K).

    `features` is the 128-d penultimate layer (after ReLU), the feature space of FID and precision/recall.
    For inputs of 56 px and more the first conv has stride 2 (64x64 costs ~3x a 28x28 image, not ~5x).
    Input: images in [0, 1], (N, C, H, W).
    """

    def __init__(self, channels: int, size: int, num_classes: int, feature_dim: int = 128):
        super().__init__()
        stride = 2 if size >= 56 else 1
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 16, 5, stride=stride, padding=2 if stride == 2 else 0), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, channels, size, size)).shape[1]
        self.fc = nn.Sequential(nn.Linear(flat, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x * 2 - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float().div_(255)


def classifier_steps(n_train_full: int, epochs: float | None) -> int:
    """Optimiser steps of every classifier of a dataset: E epochs of the full real training split (default
    max(300, 4 epochs)); fixed whatever the training set, so real, synthetic and mixed runs get equal compute."""
    if epochs is None:
        return max(MIN_STEPS, math.ceil(DEFAULT_EPOCHS * n_train_full / BATCH_SIZE))
    return max(1, math.ceil(epochs * n_train_full / BATCH_SIZE))


def train_classifier(parts: list[tuple[torch.Tensor, torch.Tensor, float]], info: DatasetInfo, steps: int, seed: int,
                     batch_size: int = BATCH_SIZE, lr: float = PEAK_LR) -> Classifier:
    """Train a fresh `Classifier` for `steps` Adam steps (one-cycle schedule, peak `lr`).

    parts: (uint8 images (N, C, H, W), labels (N,), share of each batch); a batch draws round(share * batch_size)
    indices with replacement from each part. Seeded: same seed and data give the same weights.
    """
    torch.manual_seed(seed)
    model = Classifier(info.channels, info.size, info.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(10_000 + seed)
    counts = [round(share * batch_size) for _, _, share in parts]
    counts[-1] = batch_size - sum(counts[:-1])
    model.train()
    for _ in range(steps):
        xs, ys = [], []
        for (images, labels, _), count in zip(parts, counts):
            if count > 0:
                idx = torch.randint(0, len(images), (count,), generator=g)
                xs.append(images[idx])
                ys.append(labels[idx])
        loss = F.cross_entropy(model(to_float(torch.cat(xs))), torch.cat(ys))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.inference_mode()
def predict(model: Classifier, images_u8: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, K), features (N, 128)) of uint8 images, in eval mode, batched."""
    model.eval()
    logits, feats = [], []
    for i in range(0, len(images_u8), batch_size):
        f = model.features(to_float(images_u8[i:i + batch_size]))
        feats.append(f)
        logits.append(model.head(f))
    return torch.cat(logits), torch.cat(feats)


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    """Recall of each class (accuracy on the images of that class); None for a class with no images."""
    out = []
    for c in range(num_classes):
        mask = labels == c
        out.append(float((pred[mask] == c).float().mean()) if mask.any() else None)
    return out


def accuracy_report(model: Classifier, test: ImageData) -> dict:
    """{"accuracy", "per_class" (list by class id)} of a classifier on a real split."""
    logits, _ = predict(model, test.images)
    pred = logits.argmax(1)
    return {"accuracy": float((pred == test.labels).float().mean()),
            "per_class": per_class_accuracy(pred, test.labels, test.info.num_classes)}


# --------------------------------------------------------------------------------------------------------------
# Metrics on features


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows = samples): the FID of
    Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium":

        ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    Tr((S_a S_b)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric PSD
    matrix S_a^(1/2) S_b S_a^(1/2) (same eigenvalues as S_a S_b), in float64: no complex parts to discard.
    """
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_a @ cov_b @ sqrt_a
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    fid = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)
    return max(fid, 0.0)


def _inside_any_ball(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """For each query row: whether it lies within radii[j] of some ref row j (bool (N_query,))."""
    inside = []
    for i in range(0, len(query), chunk):
        d = torch.cdist(query[i:i + chunk], ref)
        inside.append((d <= radii[None, :]).any(1))
    return torch.cat(inside)


def knn_radii(feats: torch.Tensor, k: int = PR_K, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (the radius of its k-NN hypersphere)."""
    out = []
    for i in range(0, len(feats), chunk):
        d = torch.cdist(feats[i:i + chunk], feats)
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # index 0 is the row itself (distance 0)
    return torch.cat(out)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = PR_K) -> tuple[float, float]:
    """Improved precision and recall of Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for
    Assessing Generative Models": each set's manifold is the union of balls around its samples with radius
    the distance to the k-th nearest neighbour within the set.

        precision = fraction of generated samples inside the real manifold   (fidelity)
        recall    = fraction of real samples inside the generated manifold   (coverage)
    """
    real, fake = torch.as_tensor(real).double(), torch.as_tensor(fake).double()
    precision = _inside_any_ball(fake, real, knn_radii(real, k)).double().mean()
    recall = _inside_any_ball(real, fake, knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)


# --------------------------------------------------------------------------------------------------------------
# Memorisation: generated images against their nearest training images, in pixel space


def nearest_training_distances(images_u8: torch.Tensor, train_u8: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """(n, 2): the L2 distance, on the [0, 1] pixel scale, from each image to its nearest and its second-nearest
    training image. The training split is read in chunks (as uint8), so a large 64x64 RGB split needs no float copy."""
    if len(train_u8) < 2:
        raise ValueError(f"memorisation needs at least 2 training images, the split has {len(train_u8)}")
    x = to_float(images_u8).flatten(1)
    x_sq = x.square().sum(1, keepdim=True)
    best = torch.full((len(x), 2), math.inf)
    for i in range(0, len(train_u8), chunk):
        t = to_float(train_u8[i:i + chunk]).flatten(1)
        squared = x_sq + t.square().sum(1)[None] - 2 * x @ t.T
        best = torch.cat([best, squared.clamp_min_(0)], dim=1).topk(2, dim=1, largest=False).values
    return best.sqrt_()


def nearest_summary(images_u8: torch.Tensor, train_u8: torch.Tensor) -> dict:
    """How close a set of images comes to the training split: the share of copies (an image whose nearest training
    image is under COPY_RATIO of the distance to its second nearest: Yoon et al. 2023's rule; a copy sits on one
    training image, a new image between several) and the median and smallest nearest distance."""
    distances = nearest_training_distances(images_u8, train_u8)
    nearest, second = distances[:, 0], distances[:, 1]
    return {"n": len(distances), "copy_fraction": float((nearest < COPY_RATIO * second).float().mean()),
            "nearest_median": float(nearest.median()), "nearest_min": float(nearest.min())}


def memorisation_report(generated: dict, real: dict) -> dict:
    """The generated images' `nearest_summary` against the real test images' one, the reference."""
    return {"copy_fraction": generated["copy_fraction"], "copy_fraction_real": real["copy_fraction"],
            "nearest_median": generated["nearest_median"], "nearest_median_real": real["nearest_median"],
            "nearest_median_ratio": generated["nearest_median"] / real["nearest_median"] if real["nearest_median"] > 0 else None,
            "nearest_min": generated["nearest_min"], "nearest_min_real": real["nearest_min"],
            "n_generated": generated["n"], "n_real": real["n"]}


# --------------------------------------------------------------------------------------------------------------
# Generated images: the exported ONNX model


class OnnxGenerator:
    """The exported `generator.onnx` of a model folder, run with ONNX Runtime on CPU; returns uint8 images."""

    def __init__(self, model_dir: str | Path, threads: int | None = None, temperature: float = 1.0):
        import onnxruntime as ort

        self.dir = Path(model_dir)
        self.card = json.loads((self.dir / CARD).read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        onnx_file = self.dir / self.card["files"]["onnx"]
        self.session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        self.conditional = bool(self.card["conditional"])
        self.latent_dim = int(self.card["latent_dim"])
        self.image_shape = tuple(self.card["image_shape"])
        self.temperature = temperature

    def __call__(self, n: int, labels: torch.Tensor | None, seed: int, batch_size: int = 500) -> torch.Tensor:
        """n images as uint8 (n, C, H, W): z ~ temperature x N(0, I) from torch.Generator(seed), quantised like
        served PNGs (the service's `temperature`: 1, the default, is the distribution the model was trained on)."""
        if self.conditional and (labels is None or len(labels) != n):
            raise ValueError("a conditional model needs one label per image")
        g = torch.Generator().manual_seed(seed)
        out = torch.empty((n, *self.image_shape), dtype=torch.uint8)
        for i in range(0, n, batch_size):
            b = min(batch_size, n - i)
            feeds = {"z": (torch.randn(b, self.latent_dim, generator=g) * self.temperature).numpy()}
            if self.conditional:
                feeds["labels"] = labels[i:i + b].to(torch.int64).numpy()
            (images,) = self.session.run(None, feeds)
            if not np.isfinite(images).all():
                raise ValueError(f"{self.dir}: the ONNX model returned non-finite values")
            out[i:i + b] = torch.from_numpy(np.clip(images, 0, 1) * 255).round_().to(torch.uint8)
        return out


def prior_labels(n: int, class_counts: torch.Tensor, seed: int) -> torch.Tensor:
    """n labels in the proportions of class_counts (largest-remainder rounding), shuffled with seed."""
    p = class_counts.double() / class_counts.sum()
    counts = torch.floor(p * n).long()
    remainder = (p * n - counts).argsort(descending=True)
    counts[remainder[: n - int(counts.sum())]] += 1
    labels = torch.arange(len(counts)).repeat_interleave(counts)
    return labels[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def seeded_subset(size: int, n: int) -> torch.Tensor:
    """min(n, size) indices of a split of `size` images, a random subset fixed by FLOOR_SEED."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(FLOOR_SEED))[: min(n, size)]


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a class-stratified random subset: max(1, round(fraction * n_c)) images of each class c."""
    if fraction >= 1:
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        take = max(1, round(fraction * len(idx)))
        picks.append(idx[torch.randperm(len(idx), generator=g)[:take]])
    return torch.cat(picks).sort().values


# --------------------------------------------------------------------------------------------------------------
# Settings, dataset context, caches


@dataclass
class Settings:
    seeds: int = 3
    n_generated: int = 10_000
    n_synthetic: int | None = None  # None: max(n_generated, N_train)
    fractions: tuple[float, ...] | None = None  # None: by training-split size
    classifier_epochs: float | None = None  # None: max(300 steps, 4 epochs)
    label_mix: str = "balanced"  # of the synthetic pool (CAS, augmentation): balanced | prior
    synthetic_share: float = 0.5
    augmentation: bool | None = None  # None: on for conditional models
    quick: bool = False
    classifier_steps: int | None = None  # set by --quick only
    batch_size: int = BATCH_SIZE  # --quick: 32
    inception_weights: str | None = None  # pytorch-fid's Inception file: adds Inception FID
    temperature: float = 1.0  # scale of the generator's latent noise, as the service's request field

    def steps(self, n_train: int) -> int:
        return self.classifier_steps or classifier_steps(n_train, self.classifier_epochs)

    def pool_size(self, n_train: int) -> int:
        """Images in the synthetic pool of CAS and augmentation: n_synthetic, else max(n_generated, N_train)."""
        return self.n_synthetic or max(self.n_generated, n_train)

    def fractions_for(self, n_train: int) -> tuple[float, ...]:
        if self.fractions:
            return tuple(self.fractions)
        return FRACTIONS_LARGE if n_train >= LARGE_SET else FRACTIONS_SMALL

    @classmethod
    def quick_mode(cls, **overrides) -> "Settings":
        """Tiny everything, for tests and smoke runs: numbers are meaningless."""
        base = dict(seeds=1, n_generated=64, n_synthetic=64, quick=True, classifier_steps=8, batch_size=32)
        base.update(overrides)
        return cls(**base)


def fingerprint(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha1()
    for t in tensors:
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _log(msg: str, t0: float | None = None) -> None:
    stamp = f"[{time.time() - t0:7.1f}s] " if t0 is not None else ""
    print(f"{stamp}{msg}", file=sys.stderr, flush=True)


def _write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


class DatasetContext:
    """Real splits of one dataset, its reference classifier and its cached real-only runs."""

    def __init__(self, dataset: str, data_dir, classifier_dir: Path, settings: Settings, download: bool = False):
        # --quick trains its own tiny reference classifier: in a folder of its own, so that a smoke run never
        # replaces the real one and its real-only baselines (minutes to retrain) in the same cache
        classifier_dir = Path(classifier_dir) / "quick" if settings.quick else Path(classifier_dir)
        self.dataset, self.settings, self.classifier_dir = dataset, settings, classifier_dir
        self.data_dir, self.download = data_dir, download
        self.train = load_dataset(dataset, "train", data_dir, download)
        self.test = load_dataset(dataset, "test", data_dir, download)
        self.info = self.train.info
        self.steps = settings.steps(len(self.train))
        self.recipe = {
            "protocol": PROTOCOL_VERSION, "arch": CLASSIFIER_ARCH, "batch_size": settings.batch_size, "peak_lr": PEAK_LR,
            "schedule": "adam+onecycle", "steps": self.steps,
            "data": fingerprint(self.train.images, self.train.labels, self.test.images, self.test.labels),
        }
        self.key = hashlib.sha1(json.dumps(self.recipe, sort_keys=True).encode()).hexdigest()[:12]
        # the default recipe's cache is <dataset>.*; another recipe (--classifier-epochs) keeps its own files,
        # rather than replacing the default's (minutes to retrain) in the same place
        default_recipe = self.steps == classifier_steps(len(self.train), None) and settings.batch_size == BATCH_SIZE
        self.cache_stem = dataset if default_recipe or settings.quick else f"{dataset}.{self.key}"  # quick: own folder
        self.baselines_path = self.classifier_dir / f"{self.cache_stem}.baselines.json"
        self._baselines = self._read_baselines()
        self._floors: dict[tuple[int, int], dict] = {}
        self._memorisation_real: dict[int, dict] = {}

    # The reference classifier is trained (or read from its cache) on first use: --memorisation-only needs none.
    @functools.cached_property
    def _reference(self) -> tuple[Classifier, dict]:
        return self._reference_classifier()

    @property
    def reference(self) -> Classifier:
        return self._reference[0]

    @property
    def reference_result(self) -> dict:
        return self._reference[1]

    @functools.cached_property
    def test_feats(self) -> torch.Tensor:
        return predict(self.reference, self.test.images)[1]

    @functools.cached_property
    def train_counts(self) -> torch.Tensor:
        return torch.bincount(self.train.labels, minlength=self.info.num_classes)

    def fid_labels(self, n_generated: int, conditional: bool) -> torch.Tensor | None:
        """The FID set's labels: the training split's class proportions, fixed seed (None for unconditional models)."""
        return prior_labels(n_generated, self.train_counts, GENERATION_SEED) if conditional else None

    def memorisation_real(self, n: int) -> dict:
        """`nearest_summary` of a seeded subset of n real test images (at most the split): the memorisation
        reference, the same for every model of the dataset, so computed once."""
        if n not in self._memorisation_real:
            real = self.test.images[seeded_subset(len(self.test), n)]
            self._memorisation_real[n] = nearest_summary(real, self.train.images)
        return self._memorisation_real[n]

    # -- reference classifier -----------------------------------------------------------------------------------
    def _reference_classifier(self) -> tuple[Classifier, dict]:
        path = self.classifier_dir / f"{self.cache_stem}.pt"
        model = Classifier(self.info.channels, self.info.size, self.info.num_classes)
        if path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("key") == self.key:
                model.load_state_dict(saved["state_dict"])
                return model.eval(), {"accuracy": saved["accuracy"], "per_class": saved["per_class"], "path": str(path),
                                      "trained_s": saved.get("wall_time_s"), "cached": True}
            _log(f"{path}: trained with another recipe or data ({saved.get('key')} != {self.key}); retraining")
        t0 = time.time()
        _log(f"{self.dataset}: training the reference classifier ({self.steps} steps on {len(self.train)} real images)")
        model = train_classifier([(self.train.images, self.train.labels, 1.0)], self.info, self.steps, seed=0,
                                 batch_size=self.settings.batch_size)
        result = accuracy_report(model, self.test)
        wall = round(time.time() - t0, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"key": self.key, "recipe": self.recipe, "dataset": self.dataset, "state_dict": model.state_dict(),
                    "accuracy": result["accuracy"], "per_class": result["per_class"], "wall_time_s": wall,
                    "classes": list(self.info.classes)}, tmp)
        tmp.replace(path)
        self._store_run(1.0, 0, {**result, "n_real": len(self.train)})
        _log(f"{self.dataset}: reference classifier test accuracy {result['accuracy']:.4f} ({wall}s) -> {path}")
        return model, {**result, "path": str(path), "trained_s": wall, "cached": False}

    # -- real-only runs (cached) ----------------------------------------------------------------------------------
    def _read_baselines(self) -> dict:
        if self.baselines_path.exists():
            data = json.loads(self.baselines_path.read_text())
            if data.get("key") == self.key:
                return data
        return {"format": "synthgen-classifier-baselines/1", "dataset": self.dataset, "key": self.key,
                "recipe": self.recipe, "runs": {}}

    def _store_run(self, fraction: float, seed: int, result: dict) -> None:
        self._baselines["runs"][f"f={fraction:g},seed={seed}"] = result
        _write_json_atomic(self.baselines_path, self._baselines)

    def real_run(self, fraction: float, seed: int) -> dict:
        """Real test accuracy of the recipe trained on a stratified `fraction` of the real training split (cached)."""
        name = f"f={fraction:g},seed={seed}"
        if name not in self._baselines["runs"]:
            idx = stratified_subset(self.train.labels, fraction, seed)
            model = train_classifier([(self.train.images[idx], self.train.labels[idx], 1.0)], self.info, self.steps, seed,
                                     batch_size=self.settings.batch_size)
            result = {**accuracy_report(model, self.test), "n_real": len(idx)}
            self._store_run(fraction, seed, result)
        return self._baselines["runs"][name]

    def heldout_per_class(self) -> tuple[str, list[float | None]]:
        """Reference per-class accuracy on real held-out images of the training distribution: the val split where
        the dataset has one (MedMNIST; its test split can differ, e.g. PneumoniaMNIST), else the test split."""
        if not hasattr(self, "_heldout"):
            if self.info.source == "torchvision":  # no val split (MNIST, Fashion-MNIST)
                self._heldout = ("test", self.reference_result["per_class"])
            else:  # a MedMNIST file whose val split is missing or malformed fails here, naming it
                val = load_dataset(self.dataset, "val", self.data_dir, self.download)
                self._heldout = ("val", accuracy_report(self.reference, val)["per_class"])
        return self._heldout

    # -- floors -------------------------------------------------------------------------------------------------
    def floor_indices(self, n_fid: int) -> torch.Tensor:
        """The seeded random subset of the real training split that FID floors compare with the test split."""
        return seeded_subset(len(self.train), n_fid)

    def floor(self, n_fid: int, n_pr: int) -> dict:
        """FID and precision/recall of a random real-train subset vs the real test split (seeded)."""
        if (n_fid, n_pr) not in self._floors:
            idx = self.floor_indices(n_fid)
            _, feats = predict(self.reference, self.train.images[idx])
            p, r = precision_recall(self.test_feats[: n_pr], feats[: n_pr])
            self._floors[(n_fid, n_pr)] = {"fid": frechet_distance(feats, self.test_feats), "n_fid": len(idx),
                                            "precision": p, "recall": r}
        return self._floors[(n_fid, n_pr)]

    # -- Inception FID (optional) ---------------------------------------------------------------------------------
    def inception(self, weights: str, n_fid: int) -> tuple:
        """(network, test-split features, floor FID, what was used) in the FID Inception's features; the real
        features are cached in the classifier folder, keyed by the weights file and the data."""
        from .inception_fid import inception_features, load_fid_inception

        if not hasattr(self, "_inception"):
            network = load_fid_inception(weights)
            digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:16]
            idx = self.floor_indices(n_fid)
            key = f"{digest}-{self.recipe['data']}-{len(idx)}"
            path = self.classifier_dir / f"{self.dataset}.inception.pt"
            cached = torch.load(path, weights_only=True) if path.exists() else {}
            if cached.get("key") != key:
                t0 = time.time()
                _log(f"{self.dataset}: Inception features of {len(self.test)} test and {len(idx)} train images")
                cached = {"key": key, "test": inception_features(network, self.test.images),
                          "floor": inception_features(network, self.train.images[idx])}
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(cached, path)
                _log(f"{self.dataset}: Inception features cached in {path}", t0)
            floor = frechet_distance(cached["floor"], cached["test"])
            self._inception = (network, cached["test"], floor, {"weights": Path(weights).name, "sha256_16": digest,
                                                                   "n_floor": len(idx), "n_test": len(self.test)})
        return self._inception


# --------------------------------------------------------------------------------------------------------------
# One model


def _mean_std(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "runs": [float(v) for v in arr]}


def _mean_per_class(results: list[dict], classes) -> dict:
    out = {}
    for c, name in enumerate(classes):
        vals = [r["per_class"][c] for r in results if r["per_class"][c] is not None]
        out[name] = float(np.mean(vals)) if vals else None
    return out


def _round(obj, digits: int = 4):
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: _round(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v, digits) for v in obj]
    return obj


def open_generator(model_dir: Path, ctx: DatasetContext, temperature: float = 1.0) -> OnnxGenerator:
    gen = OnnxGenerator(model_dir, temperature=temperature)
    if tuple(gen.card["image_shape"]) != ctx.info.image_shape:
        raise ValueError(f"{model_dir}: card image_shape {gen.card['image_shape']} != {ctx.dataset} {ctx.info.image_shape}")
    return gen


def synthetic_only_runs(ctx: DatasetContext, images: torch.Tensor, labels: torch.Tensor, settings: Settings) -> list[dict]:
    """CAS's runs: per classifier seed, a fresh classifier trained only on the synthetic images, its report on
    the real test split."""
    return [accuracy_report(train_classifier([(images, labels, 1.0)], ctx.info, ctx.steps, seed,
                                             batch_size=settings.batch_size), ctx.test)
            for seed in range(settings.seeds)]


def evaluate_model(model_dir: str | Path, ctx: DatasetContext, settings: Settings, command: str | None = None) -> dict:
    """Run the protocol on one exported model folder; returns the metrics dict (flat keys + nested details)."""
    t0 = time.time()
    model_dir = Path(model_dir)
    gen = open_generator(model_dir, ctx, settings.temperature)
    card, info = gen.card, ctx.info
    name = f"{card['dataset']}/{card['model']}"
    k, classes = info.num_classes, list(info.classes)
    conditional = gen.conditional
    seeds = list(range(settings.seeds))
    augmentation = conditional if settings.augmentation is None else (settings.augmentation and conditional)
    n_train, n_test = len(ctx.train), len(ctx.test)
    train_counts = ctx.train_counts

    # FID set: labels in the training split's proportions (conditional), fixed seed.
    n_gen = settings.n_generated
    fid_images = gen(n_gen, ctx.fid_labels(n_gen, conditional), seed=GENERATION_SEED)
    logits_fid, feats_fid = predict(ctx.reference, fid_images)
    n_pr = min(n_gen, n_test)
    floor = ctx.floor(n_gen, n_pr)
    fid = frechet_distance(feats_fid, ctx.test_feats)
    precision, recall = precision_recall(ctx.test_feats[:n_pr], feats_fid[:n_pr])
    _log(f"{name}: FID {fid:.3f} (floor {floor['fid']:.3f}), precision {precision:.3f}, recall {recall:.3f}", t0)
    memorisation = _memorisation_block(fid_images[:MEMORISATION_N], ctx, card, command)
    _log(f"{name}: copies of training images {memorisation['copy_fraction']:.2%} (real test {memorisation['copy_fraction_real']:.2%})", t0)

    metrics: dict = {
        "fid": fid, "fid_floor": floor["fid"], "fid_ratio": fid / floor["fid"] if floor["fid"] > 0 else None,
        "precision": precision, "recall": recall,
        "precision_floor": floor["precision"], "recall_floor": floor["recall"],
        "classifier_ceiling": ctx.reference_result["accuracy"], "memorisation": memorisation,
    }
    inception_protocol = None
    if settings.inception_weights:
        from .inception_fid import inception_features

        network, test_feats, inception_floor, used = ctx.inception(settings.inception_weights, n_gen)
        metrics["inception_fid"] = frechet_distance(inception_features(network, fid_images), test_feats)
        metrics["inception_fid_floor"] = inception_floor
        inception_protocol = {**used, "n_generated": n_gen}
        _log(f"{name}: Inception FID {metrics['inception_fid']:.3f} (floor {inception_floor:.3f})", t0)
    per_class: dict = {"classifier_ceiling": dict(zip(classes, ctx.reference_result["per_class"]))}
    hist = torch.bincount(logits_fid.argmax(1), minlength=k).double() / n_gen
    details: dict = {"predicted_class_mix": dict(zip(classes, hist.tolist())),
                     "requested_class_mix": dict(zip(classes, (train_counts.double() / n_train).tolist())) if conditional else None}

    pool_images = pool_labels = None
    if conditional:
        n_pool = settings.pool_size(n_train)
        if settings.label_mix == "balanced":
            pool_labels = balanced_labels(n_pool, k)
        elif settings.label_mix == "prior":
            pool_labels = prior_labels(n_pool, train_counts, GENERATION_SEED + 1)
        else:
            raise ValueError(f"unknown label mix {settings.label_mix!r}")
        pool_images = gen(n_pool, pool_labels, seed=GENERATION_SEED + 1)
        # Label fidelity on n_gen balanced requests (the first n_gen of a balanced pool; else a balanced set of its own).
        if settings.label_mix == "balanced" and n_pool >= n_gen:
            lf_images, lf_labels = pool_images[:n_gen], pool_labels[:n_gen]
        else:
            lf_labels = balanced_labels(n_gen, k)
            lf_images = gen(n_gen, lf_labels, seed=GENERATION_SEED + 2)
        lf_pred = predict(ctx.reference, lf_images)[0].argmax(1)
        metrics["label_fidelity"] = float((lf_pred == lf_labels).float().mean())
        # What real images of the training distribution score on the same measure (balanced labels = mean per-class
        # accuracy; val split where there is one, else test): the label fidelity of a perfect generator.
        heldout_split, heldout = ctx.heldout_per_class()
        metrics["label_fidelity_real"] = float(np.mean([a for a in heldout if a is not None]))
        per_class["label_fidelity_real"] = dict(zip(classes, heldout))
        per_class["label_fidelity"] = dict(zip(classes, per_class_accuracy(lf_pred, lf_labels, k)))
        _log(f"{name}: label fidelity {metrics['label_fidelity']:.4f}; synthetic pool {n_pool} ({settings.label_mix})", t0)

        # CAS: synthetic only vs real only, same recipe and seeds.
        cas_runs = synthetic_only_runs(ctx, pool_images, pool_labels, settings)
        real_runs = [ctx.real_run(1.0, seed) for seed in seeds]
        cas, cas_real = _mean_std([r["accuracy"] for r in cas_runs]), _mean_std([r["accuracy"] for r in real_runs])
        metrics.update({"cas": cas["mean"], "cas_std": cas["std"], "cas_real": cas_real["mean"], "cas_real_std": cas_real["std"],
                        "cas_ratio": cas["mean"] / cas_real["mean"] if cas_real["mean"] > 0 else None})
        details["cas"] = {"synthetic": cas, "real": cas_real, "n_synthetic": n_pool, "label_mix": settings.label_mix}
        per_class["cas"] = _mean_per_class(cas_runs, classes)
        per_class["cas_real"] = _mean_per_class(real_runs, classes)
        _log(f"{name}: CAS {cas['mean']:.4f} +- {cas['std']:.4f} (real {cas_real['mean']:.4f} +- {cas_real['std']:.4f})", t0)

    if augmentation:
        rows = []
        for fraction in settings.fractions_for(n_train):
            real_res, mixed_res = [], []
            for seed in seeds:
                real_res.append(ctx.real_run(fraction, seed))
                idx = stratified_subset(ctx.train.labels, fraction, seed)
                model = train_classifier([(ctx.train.images[idx], ctx.train.labels[idx], 1 - settings.synthetic_share),
                                          (pool_images, pool_labels, settings.synthetic_share)], info, ctx.steps, seed,
                                         batch_size=settings.batch_size)
                mixed_res.append(accuracy_report(model, ctx.test))
            real_acc = [r["accuracy"] for r in real_res]
            mixed_acc = [r["accuracy"] for r in mixed_res]
            row = {"fraction": fraction, "n_real": real_res[0]["n_real"],
                   "real": _mean_std(real_acc), "real+synthetic": _mean_std(mixed_acc),
                   "gain": _mean_std([m - r for m, r in zip(mixed_acc, real_acc)]),
                   "per_class": {"real": _mean_per_class(real_res, classes), "real+synthetic": _mean_per_class(mixed_res, classes)}}
            rows.append(row)
            metrics[f"aug_gain_{fraction * 100:g}pct"] = row["gain"]["mean"]
            _log(f"{name}: {fraction:.0%} real ({row['n_real']}): {row['real']['mean']:.4f} -> "
                 f"{row['real+synthetic']['mean']:.4f} (gain {row['gain']['mean']:+.4f} +- {row['gain']['std']:.4f})", t0)
        metrics["augmentation"] = {
            "label_mix": settings.label_mix, "n_synthetic": len(pool_images), "synthetic_share_of_batch": settings.synthetic_share,
            "seeds": seeds, "fractions": rows,
            "note": "the generator was trained on the full real training split, so low-data gains measure how much of "
                    "that split's knowledge the synthetic images carry, not a gain for someone holding only the subset",
        }

    wall = time.time() - t0
    metrics["per_class"] = per_class
    metrics["details"] = details
    metrics["protocol"] = {
        "version": PROTOCOL_VERSION, "module": "training.evaluate", "quick": settings.quick,
        "evaluated_file": card["files"]["onnx"], "onnx_sha256": card.get("sha256", {}).get("onnx"),
        "runtime": "onnxruntime CPU, outputs quantised to uint8",
        "classifier": {"arch": CLASSIFIER_ARCH, "steps": ctx.steps, "batch_size": settings.batch_size, "optimizer": "Adam, one-cycle",
                       "peak_lr": PEAK_LR, "epochs_of_full_train": round(ctx.steps * settings.batch_size / n_train, 2),
                       "ceiling_test_accuracy": ctx.reference_result["accuracy"], "cache": ctx.reference_result.get("path")},
        "feature_space": "reference classifier penultimate layer (128-d, after ReLU)",
        "n_generated": n_gen, "fid_real_reference": f"test split ({n_test})", "fid_floor": f"{floor['n_fid']} real train vs test",
        "pr_k": PR_K, "pr_n": n_pr, "label_fidelity_real_split": heldout_split if conditional else None,
        "fid_label_mix": "training-split class proportions" if conditional else "unconditional",
        "inception_fid": inception_protocol,
        "seeds": seeds, "n_train": n_train, "n_test": n_test,
        "unconditional": None if conditional else "FID/precision/recall only; no pseudo-labels",
        "wall_time_s": round(wall, 1), "threads": torch.get_num_threads(),
        "hardware": hardware_name(torch.device("cpu")), "torch": torch.__version__,
        "command": command, "evaluated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    _log(f"{name}: done in {wall:.1f}s", t0)
    return _round(metrics)


def _memorisation_block(images_u8: torch.Tensor, ctx: DatasetContext, card: dict, command: str | None) -> dict:
    protocol = {"version": MEMORISATION_VERSION, "space": "pixels on the [0, 1] scale, L2 distance",
                "generated": f"the first {MEMORISATION_N} images of the FID set", "real_reference": "a seeded subset of the test split",
                "against": f"the whole training split ({len(ctx.train)})",
                "copy_rule": f"nearest training image closer than {COPY_RATIO:.3g} x the second nearest (Yoon et al. 2023)",
                "evaluated_file": card["files"]["onnx"], "onnx_sha256": card.get("sha256", {}).get("onnx"), "command": command,
                "evaluated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    report = memorisation_report(nearest_summary(images_u8, ctx.train.images), ctx.memorisation_real(len(images_u8)))
    return {**report, "protocol": protocol}


def evaluate_memorisation(model_dir: str | Path, ctx: DatasetContext, settings: Settings, command: str | None = None) -> dict:
    """The memorisation block alone (--memorisation-only), on the very images the full protocol checks: the first
    MEMORISATION_N of its FID set (same labels, same z), so it can be added to a card without the rest."""
    gen = open_generator(Path(model_dir), ctx, settings.temperature)
    n = min(MEMORISATION_N, settings.n_generated)
    labels = ctx.fid_labels(settings.n_generated, gen.conditional)
    block = _memorisation_block(gen(n, None if labels is None else labels[:n], seed=GENERATION_SEED), ctx, gen.card, command)
    _log(f"{gen.card['dataset']}/{gen.card['model']}: copies of training images {block['copy_fraction']:.2%} "
         f"(real test {block['copy_fraction_real']:.2%}), nearest median {block['nearest_median']:.2f} "
         f"(real test {block['nearest_median_real']:.2f})")
    return _round(block)


# --------------------------------------------------------------------------------------------------------------
# Cards, reports, CLI


def write_card_metrics(model_dir: str | Path, metrics: dict, merge: bool = False) -> dict:
    """Put metrics into the model's card.json (replacing its metrics, or with merge adding to them) and rewrite
    the manifest of its exported/ folder (new sha256)."""
    model_dir = Path(model_dir)
    card_path = model_dir / CARD
    card = json.loads(card_path.read_text())
    card["metrics"] = {**card.get("metrics", {}), **metrics} if merge else metrics
    tmp = card_path.with_name(card_path.name + ".tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    tmp.replace(card_path)
    return write_manifest(model_dir.parent.parent)


def _fmt(value, pct: bool = False, signed: bool = False) -> str:
    if value is None:
        return "-"
    if pct:
        return f"{value * 100:+.1f}" if signed else f"{value * 100:.1f}"
    return f"{value:.2f}"


def _aligned(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def format_table(results: list[tuple[str, dict]]) -> str:
    """One row per model; accuracies and gains in percent (points)."""
    header = ["model", "FID", "floor", "P", "R", "copies% (real)", "label fid% (real)", "CAS%", "real%", "aug gains (pts)", "time s"]
    rows = [header]
    for name, m in results:
        if m is None:
            rows.append([name, "skipped: real data not found"] + [""] * (len(header) - 2))
            continue
        gains = " ".join(f"{row['fraction'] * 100:g}%:{row['gain']['mean'] * 100:+.1f}±{row['gain']['std'] * 100:.1f}"
                         for row in m.get("augmentation", {}).get("fractions", []))
        cas = f"{_fmt(m.get('cas'), True)}±{m['cas_std'] * 100:.1f}" if "cas" in m else "-"
        real = f"{_fmt(m.get('cas_real'), True)}±{m['cas_real_std'] * 100:.1f}" if "cas_real" in m else "-"
        lf = f"{_fmt(m['label_fidelity'], True)} ({_fmt(m['label_fidelity_real'], True)})" if "label_fidelity" in m else "-"
        memo = m["memorisation"]
        copies = f"{_fmt(memo['copy_fraction'], True)} ({_fmt(memo['copy_fraction_real'], True)})"
        rows.append([name, _fmt(m["fid"]), _fmt(m["fid_floor"]), _fmt(m["precision"]), _fmt(m["recall"]), copies, lf, cas, real,
                     gains or "-", f"{m['protocol']['wall_time_s']:.0f}"])
    return _aligned(rows)


def format_memorisation_table(results: list[tuple[str, dict]]) -> str:
    """--memorisation-only: one row per model, copies in percent, distances on the [0, 1] pixel scale."""
    header = ["model", "copies% (real test)", "nearest median (real test)", "nearest min (real test)"]
    rows = [header]
    for name, m in results:
        if m is None:
            rows.append([name, "skipped: real data not found", "", ""])
            continue
        rows.append([name, f"{_fmt(m['copy_fraction'], True)} ({_fmt(m['copy_fraction_real'], True)})",
                     f"{_fmt(m['nearest_median'])} ({_fmt(m['nearest_median_real'])})",
                     f"{_fmt(m['nearest_min'])} ({_fmt(m['nearest_min_real'])})"])
    return _aligned(rows)


def models_in_manifest(exported_dir: str | Path) -> list[Path]:
    root = Path(exported_dir)
    manifest = json.loads((root / MANIFEST).read_text())
    return [root / entry["dir"] for entry in manifest["models"]]


def run(model_dirs: list[str | Path], settings: Settings, data_dir=None, classifier_dir="runs/classifiers",
        report_dir: str | Path | None = "runs/eval", write_card: bool = True, command: str | None = None,
        download: bool = False, memorisation_only: bool = False) -> list[tuple[str, dict | None]]:
    """Evaluate several model folders (dataset contexts shared); write cards, manifests and reports.

    Returns (dataset/model, metrics) per folder; metrics is None for a model whose real data files are missing.
    memorisation_only: the memorisation block alone, added to the card's metrics (the rest kept), returned as is.
    At a temperature other than 1 only the reports are written: a card holds the figures of the served default."""
    write_card = write_card and settings.temperature == 1.0
    contexts: dict[str, DatasetContext] = {}
    results = []
    for model_dir in model_dirs:
        model_dir = Path(model_dir)
        card = json.loads((model_dir / CARD).read_text())
        dataset = card["dataset"]
        if dataset not in contexts:
            try:
                contexts[dataset] = DatasetContext(dataset, data_dir, Path(classifier_dir), settings, download)
            except DataNotFoundError as err:  # e.g. --all over a zoo with sets whose files are not here
                _log(f"{model_dir}: skipped, {err}")
                contexts[dataset] = None
        if contexts[dataset] is None:
            results.append((f"{dataset}/{card['model']}", None))
            continue
        if memorisation_only:
            metrics = evaluate_memorisation(model_dir, contexts[dataset], settings, command)
            if write_card:
                write_card_metrics(model_dir, {"memorisation": metrics}, merge=True)
        else:
            metrics = evaluate_model(model_dir, contexts[dataset], settings, command)
            if write_card:
                write_card_metrics(model_dir, metrics)
        if report_dir is not None:
            report = {"model_dir": str(model_dir), "dataset": dataset, "model": card["model"], "settings": asdict(settings),
                      "metrics": metrics}
            suffix = ".memorisation" if memorisation_only else ""
            if settings.temperature != 1.0:
                suffix += f".t{settings.temperature:g}"
            _write_json_atomic(Path(report_dir) / f"{dataset}__{card['model']}{suffix}.json", report)
        results.append((f"{dataset}/{card['model']}", metrics))
    return results


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(_parse_fraction(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"fractions are numbers or percentages separated by commas, e.g. "
                                         f"0.01,0.1,1 or 1%,10%,100%; not {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must be in (0, 1]: {text!r}")
    return values


def _number(kind: type, low: float, high: float | None = None, low_open: bool = False):
    """An argparse type: a finite `kind` number in [low, high] ((low, high] with low_open), else a usage error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{'an integer' if kind is int else 'a number'} is needed, not {text!r}") from None
        if not math.isfinite(value) or (value <= low if low_open else value < low) or (high is not None and value > high):
            bounds = f"{'above' if low_open else 'at least'} {low:g}" + (f" and at most {high:g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bounds}, not {text}")
        return value
    return parse


def _parse_fraction(text: str) -> float:
    text = text.strip()
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def _evaluated_in_full(model_dir: Path) -> bool:
    """Whether the card in model_dir holds metrics of a full (not --quick) evaluation."""
    try:
        metrics = json.loads((model_dir / CARD).read_text()).get("metrics") or {}
    except (OSError, ValueError):
        return False
    protocol = metrics.get("protocol") or {}
    return bool(protocol) and not protocol.get("quick", False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dirs", nargs="*", help="exported model folders (holding card.json and generator.onnx)")
    parser.add_argument("--all", action="store_true", help="evaluate every model in <exported-dir>/manifest.json")
    parser.add_argument("--exported-dir", default="exported", help="for --all (default: exported)")
    parser.add_argument("--data-dir", default=None, help=f"real data folder (default: ${DATA_DIR_ENV}, then ./data)")
    parser.add_argument("--download", action="store_true", help="download missing real data files (needs internet)")
    parser.add_argument("--classifier-dir", default="runs/classifiers", help="reference classifier cache (default: runs/classifiers)")
    parser.add_argument("--report-dir", default="runs/eval", help="per-model JSON reports (default: runs/eval)")
    parser.add_argument("--seeds", type=_number(int, 1), default=None, help="classifier seeds for CAS and augmentation (default: 3)")
    parser.add_argument("--n-generated", type=_number(int, PR_K + 1), default=None, help="generated images for FID, P/R, label fidelity (default: 10000)")
    parser.add_argument("--n-synthetic", type=_number(int, 1), default=None, help="synthetic pool for CAS/augmentation (default: max(n-generated, N_train))")
    parser.add_argument("--fractions", type=_floats, default=None,
                        help="real-data fractions for augmentation, e.g. 0.01,0.1,1 or 1%%,10%%,100%% "
                             f"(default: {','.join(f'{f:g}' for f in FRACTIONS_LARGE)} for training splits >= {LARGE_SET}, "
                             f"else {','.join(f'{f:g}' for f in FRACTIONS_SMALL)})")
    parser.add_argument("--classifier-epochs", type=_number(float, 0, low_open=True), default=None,
                        help=f"classifier training length in epochs of the full real training split "
                             f"(default: max({MIN_STEPS} steps, {DEFAULT_EPOCHS:g} epochs))")
    parser.add_argument("--label-mix", choices=("balanced", "prior"), default="balanced",
                        help="labels of the synthetic pool: balanced (class i mod K, the service default) or prior "
                             "(the training split's class proportions) (default: balanced)")
    parser.add_argument("--synthetic-share", type=_number(float, 0, 1), default=0.5, help="share of each augmented batch that is synthetic (default: 0.5)")
    parser.add_argument("--augmentation", action=argparse.BooleanOptionalAction, default=None,
                        help="run the augmentation study (default: on for conditional models)")
    parser.add_argument("--inception-weights", default=None,
                        help="pytorch-fid's FID Inception weights file (pt_inception-2015-12-05-6726825d.pth): also "
                             "report Inception FID (optional; slow on a CPU; nothing downloads the file)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="scale of the latent noise, as the service's request field (default: 1, the trained "
                             "distribution); another value measures that trade-off and writes the report only, not "
                             "the card")
    parser.add_argument("--quick", action="store_true", help="tiny settings for tests and smoke runs (numbers meaningless)")
    parser.add_argument("--no-card", action="store_true", help="do not write card.json / manifest.json (report only)")
    parser.add_argument("--memorisation-only", action="store_true",
                        help="only the memorisation check (seconds, no classifier), added to each card's metrics")
    parser.add_argument("--threads", type=_number(int, 1), default=1,
                        help="torch / ONNX Runtime threads (default: 1; on a CPU shared with training jobs more threads "
                             "oversubscribe it and run several times slower)")
    return parser


def main(argv=None) -> list[tuple[str, dict]]:
    parser = build_parser()
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    try:
        model_dirs = list(args.model_dirs) + (models_in_manifest(args.exported_dir) if args.all else [])
    except FileNotFoundError:
        parser.error(f"--all: no {MANIFEST} in {args.exported_dir!r} (--exported-dir names the folder that holds it)")
    if not model_dirs:
        parser.error("name model folders or pass --all")
    for model_dir in model_dirs:
        if not (Path(model_dir) / CARD).is_file():
            parser.error(f"{model_dir}: no {CARD}; evaluate takes exported model folders (python -m training.export "
                         "RUN_DIR --out DIR writes DIR/<dataset>/<model>/), not training run folders")
    if not 0.0 <= args.temperature <= 2.0:
        parser.error(f"--temperature: {args.temperature:g} is outside 0..2, the service's range")
    if args.inception_weights:
        from .inception_fid import load_fid_inception

        try:
            load_fid_inception(args.inception_weights)  # a wrong file stops here, not after the evaluation's work
        except (FileNotFoundError, ValueError) as err:
            parser.error(str(err))
    common = dict(label_mix=args.label_mix, synthetic_share=args.synthetic_share, augmentation=args.augmentation,
                  fractions=args.fractions, classifier_epochs=args.classifier_epochs,
                  inception_weights=args.inception_weights, temperature=args.temperature)
    sizes = {name: value for name, value in (("seeds", args.seeds), ("n_generated", args.n_generated),
                                             ("n_synthetic", args.n_synthetic)) if value is not None}  # given ones
    if args.quick:
        if sizes:
            parser.error(f"--quick sets its own tiny sizes (1 seed, 64 images); drop "
                         f"{', '.join(flag(name) for name in sizes)} or --quick")
        writes_cards = not args.no_card and args.temperature == 1.0  # run() writes no card at another temperature
        fully_evaluated = [str(d) for d in model_dirs if writes_cards and _evaluated_in_full(Path(d))]
        if fully_evaluated:
            parser.error(f"--quick would replace the full evaluation on the card of {', '.join(fully_evaluated)} "
                         "with meaningless numbers; add --no-card (report only)")
        settings = Settings.quick_mode(**common)
    else:
        settings = Settings(**sizes, **common)  # the rest keep Settings' defaults
    command = "python -m training.evaluate " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    results = run(model_dirs, settings, args.data_dir, args.classifier_dir, args.report_dir, not args.no_card, command,
                  args.download, args.memorisation_only)
    print(format_memorisation_table(results) if args.memorisation_only else format_table(results))
    if any(m is None for _, m in results):
        sys.exit(f"{sum(m is None for _, m in results)} model(s) skipped: real data not found (see above)")
    return results


if __name__ == "__main__":
    with user_errors_exit():
        main()
