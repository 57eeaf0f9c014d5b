"""A probe, not a service feature: does resampling a conditional generator's images towards the real
distribution make them better for training a classifier?

A density-ratio classifier (the evaluation's CNN recipe, its own seed, 2K outputs: "real class y" and
"generated class y") learns real training images against the generator's images. The logit difference of the
requested class, l_real(y) - l_generated(y), estimates log p_real(x | y) / p_generated(x | y). From M times the
evaluation's synthetic pool (balanced labels, fresh z for each of the M copies), each class keeps N / K images
drawn without replacement with weights exp(alpha * log ratio) (Gumbel top-k; alpha = 0 draws uniformly, 1 is
importance resampling, in between a partial correction). Every pool, the plain one first, is measured as the
evaluation measures a model: FID, precision / recall and label fidelity of 10,000 of its images in the
reference classifier's features, and CAS (a fresh classifier trained on the pool, tested on the real test
split). One JSON line per pool on stdout.

    python -m training.importance_resampling exported/mnist/cdcgan --data-dir ../shared/data --temperature 1.2 \
        --candidates 3 --alphas 0.5,1 --seeds 2 --threads 2

What it measured is in docs/zoo-experiments.md ("Importance resampling towards the real images"). The ratio
classifier sees only the training split, as the generator did; FID and precision / recall are in the
reference classifier's features, a network of the same architecture, so they may flatter the resampled pools;
CAS trains its own classifier and is the figure that decides.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from .cli import UsageError, user_errors_exit
from .evaluate import (GENERATION_SEED, DatasetContext, OnnxGenerator, Settings, frechet_distance,
                       precision_recall, predict, synthetic_only_runs, train_classifier)
from .manifest import CARD
from .sampling import balanced_labels

RATIO_SEED = 5  # the ratio classifier's seed (the reference classifier's is 0)
FIT_SEED = GENERATION_SEED + 11  # z of the generated images the ratio classifier learns from
GUMBEL_SEED = 9
N_MEASURED = 10_000


def log_density_ratio(ratio_logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """log p_real(x | y) / p_generated(x | y), up to a constant, from a 2K-way classifier's logits."""
    rows = torch.arange(len(labels))
    return ratio_logits[rows, labels] - ratio_logits[rows, labels + num_classes]


def resample_per_class(log_ratio: torch.Tensor, labels: torch.Tensor, per_class: int, alpha: float,
                       seed: int = GUMBEL_SEED) -> torch.Tensor:
    """Indices of `per_class` candidates of each class, drawn without replacement with weights
    exp(alpha * log_ratio) (Gumbel top-k), in class order."""
    g = torch.Generator().manual_seed(seed)
    gumbel = -torch.log(-torch.log(torch.rand(len(log_ratio), generator=g).clamp_min(1e-12)))
    keys = alpha * log_ratio + gumbel
    chosen = []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().squeeze(1)
        if len(members) < per_class:
            raise ValueError(f"class {c}: {len(members)} candidates for {per_class} draws")
        chosen.append(members[keys[members].topk(per_class).indices])
    return torch.cat(chosen)


def measure_pool(ctx: DatasetContext, images: torch.Tensor, labels: torch.Tensor, settings: Settings) -> dict:
    """The evaluation's sample-quality figures on up to 10,000 of the pool's images, and its CAS runs."""
    subset = torch.randperm(len(images), generator=torch.Generator().manual_seed(3))[:N_MEASURED]
    logits, feats = predict(ctx.reference, images[subset])
    n_pr = min(len(subset), len(ctx.test_feats))
    precision, recall = precision_recall(ctx.test_feats[:n_pr], feats[:n_pr])
    cas = [run["accuracy"] for run in synthetic_only_runs(ctx, images, labels, settings)]
    return {"fid": round(frechet_distance(feats, ctx.test_feats), 3), "precision": round(precision, 3),
            "recall": round(recall, 3), "label_fidelity": round(float((logits.argmax(1) == labels[subset]).float().mean()), 4),
            "cas": [round(c, 4) for c in cas], "cas_mean": round(sum(cas) / len(cas), 4)}


def run_probe(model_dir: str | Path, data_dir, settings: Settings, candidates: int, alphas: list[float],
              classifier_dir: str | Path = "runs/classifiers", emit=print) -> list[dict]:
    """Measure the plain pool and one resampled pool per alpha; returns (and emits) one dict per pool."""
    t0 = time.time()
    card = json.loads((Path(model_dir) / CARD).read_text())
    if not card["conditional"]:
        raise UsageError(f"{model_dir}: {card['dataset']}/{card['model']} is unconditional; the probe resamples each "
                         "requested class, so it takes a conditional model")
    ctx = DatasetContext(card["dataset"], data_dir, Path(classifier_dir), settings)
    k = ctx.info.num_classes
    n = settings.pool_size(len(ctx.train))
    n -= n % k  # the same count of every class
    gen = OnnxGenerator(model_dir, temperature=settings.temperature)
    labels = balanced_labels(n, k)

    ratio_info = dataclasses.replace(ctx.info, classes=tuple(f"{side} {c}" for side in ("real", "generated")
                                                             for c in ctx.info.classes))
    fit_images = gen(n, labels, seed=FIT_SEED)
    ratio_net = train_classifier([(ctx.train.images, ctx.train.labels, 0.5), (fit_images, labels + k, 0.5)],
                                 ratio_info, ctx.steps, RATIO_SEED)
    pool = torch.cat([gen(n, labels, seed=GENERATION_SEED + 1 + 100 * i) for i in range(candidates)])
    pool_labels = labels.repeat(candidates)
    log_ratio = log_density_ratio(predict(ratio_net, pool)[0], pool_labels, k)
    test_log_ratio = log_density_ratio(predict(ratio_net, ctx.test.images)[0], ctx.test.labels, k)
    base = {"model": f"{card['dataset']}/{card['model']}", "temperature": settings.temperature, "candidates": candidates}
    emit(json.dumps({**base, "ratio_classifier": {
        "real_test_called_real": round(float((test_log_ratio > 0).float().mean()), 4),
        "generated_called_generated": round(float((log_ratio < 0).float().mean()), 4)}}), flush=True)

    rows = []
    pools = [("as generated", None)] + [(f"resampled, alpha {a:g}", a) for a in alphas]
    for name, alpha in pools:
        # The first n candidates are the evaluation's own pool (seed GENERATION_SEED + 1, balanced labels).
        chosen = torch.arange(n) if alpha is None else resample_per_class(log_ratio, pool_labels, n // k, alpha)
        row = {**base, "pool": name, **measure_pool(ctx, pool[chosen], pool_labels[chosen], settings),
               "seconds": round(time.time() - t0)}
        emit(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _alphas(text: str) -> list[float]:
    try:
        values = [float(a) for a in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 0.5,1") from None
    if any(a < 0 for a in values):
        raise argparse.ArgumentTypeError("alphas must be >= 0")
    return values


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="an exported conditional model folder")
    parser.add_argument("--data-dir", default=None, help="real data folder (default: $SYNTHGEN_DATA_DIR, then ./data)")
    parser.add_argument("--classifier-dir", default="runs/classifiers", help="reference classifier cache")
    parser.add_argument("--temperature", type=float, default=1.0, help="the generator's noise scale (default: 1)")
    parser.add_argument("--candidates", type=int, default=3, help="candidates per kept image, M (default: 3)")
    parser.add_argument("--alphas", type=_alphas, default=[0.5, 1.0], help="resampling strengths (default: 0.5,1)")
    parser.add_argument("--seeds", type=int, default=2, help="CAS classifier seeds (default: 2)")
    parser.add_argument("--quick", action="store_true", help="tiny settings for tests (numbers meaningless)")
    parser.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads (default: 1)")
    args = parser.parse_args(argv)
    if args.candidates < 1:
        parser.error("--candidates must be at least 1")
    if not (Path(args.model_dir) / CARD).is_file():
        parser.error(f"{args.model_dir}: no {CARD}; the probe takes an exported model folder")
    torch.set_num_threads(args.threads)
    common = dict(temperature=args.temperature, augmentation=False)
    settings = Settings.quick_mode(**common) if args.quick else Settings(seeds=args.seeds, **common)
    return run_probe(args.model_dir, args.data_dir, settings, args.candidates, args.alphas, args.classifier_dir)


if __name__ == "__main__":
    with user_errors_exit():
        main()
