"""Fetch a synthetic training set from a running synthgen service to disk, in one command, at any size.

    python -m service.fetch mnist -n 60000 --seed 0 --out mnist-synth.npz        # one .npz
    python -m service.fetch pneumoniamnist -n 5000 --seed 0 --out pneumonia/    # an ImageFolder tree
    python -m service.fetch pneumoniamnist --labels normal=3000,pneumonia=1000 --out mix.npz  # 4,000, by class
    python -m service.fetch fashion_mnist -n 60000 --best-for-training --out train.npz  # the highest-CAS model
    synthgen-fetch ...                                                           # the same, once pip-installed

`--out` ending in `.npz` writes one uncompressed .npz with the members of the service's npz format (images
uint8 N x H x W x C, labels int64, class_names, dataset, model, seed). Any other `--out` is a folder in
torchvision's ImageFolder layout, written request by request, so a set need not fit in memory:

    pneumonia/0_normal/000000.png, pneumonia/1_pneumonia/000001.png, ...   one folder per class
    pneumonia/labels.csv    filename,label,class_name (as the service's zip format)
    pneumonia/info.json     dataset, model, seed, temperature (when not 1), n, labels, image_shape, class_names

A class folder is `<label id>_<class name>` (the id zero-padded, the name with anything but letters, digits,
`.` and `-` made `_`), so the folders sort in label order and ImageFolder's class index is the label id when
every class is present (as with the default "balanced" labels; otherwise use labels.csv). Images of an
unconditional model go in `unlabelled/`. A file is named by the image's row in the set.

The images are exactly those of `SynthClient.generate` with the same arguments: more than one request may
ask for come in several, with seeds derived from `--seed` (`service.client.chunk_seed`). Without `--seed`
the server draws one, and it is printed and recorded. An existing non-empty folder or an existing file is
refused rather than overwritten. A failed fetch leaves no .npz behind (it is written under a temporary
name, then renamed); in a folder it leaves the images written so far and no labels.csv or info.json.

`--url` defaults to $SYNTHGEN_URL or http://127.0.0.1:3000, `--token` to $SYNTHGEN_API_TOKEN.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

import httpx

from .client import SynthClient, SynthError, images_asked, join_batches
from .encoders import encode_npz, image_name_width, labels_csv, png_bytes

DEFAULT_URL = "http://127.0.0.1:3000"
UNLABELLED = "unlabelled"


def class_folder(label: int, name: str, num_classes: int) -> str:
    """`<id>_<name>`: the id zero-padded to the widest id so the folders sort in label order."""
    if label < 0:
        return UNLABELLED
    width = len(str(max(num_classes - 1, 0)))
    return f"{label:0{width}d}_{re.sub(r'[^A-Za-z0-9.-]+', '_', name).strip('_') or 'class'}"


COUNT = re.compile(r"(.+?)=(\d+)(?:,|$)")  # name=count; names may hold commas (BloodMNIST's do), not "="


def parse_labels(text: str):
    """The --labels value as the service takes it: "balanced", one class id (an int) or class name, or class
    counts as "name=count,name=count" (or a JSON object), which the service takes as a labels object."""
    if text.lstrip().startswith("{"):
        try:
            counts = json.loads(text)
        except json.JSONDecodeError as error:
            raise argparse.ArgumentTypeError(f"not a JSON object of class name -> count: {error}") from None
        if not isinstance(counts, dict):
            raise argparse.ArgumentTypeError("not a JSON object of class name -> count")
        return counts
    if "=" in text:
        pairs = COUNT.findall(text)
        if "".join(f"{name}={count}," for name, count in pairs) != text + ",":
            raise argparse.ArgumentTypeError(f"{text!r}: class counts are written name=count,name=count "
                                             "(counts are integers)")
        counts = {name.strip(): int(count) for name, count in pairs}  # "a=3, b=2" names b, not " b"
        if len(counts) < len(pairs):
            raise argparse.ArgumentTypeError(f"{text!r}: a class is given twice")
        return counts
    return int(text) if text.lstrip("-").isdigit() else text


def finite_temperature(text: str) -> float:
    """--temperature: a finite number (the service checks its range, 0..2, and names it)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (0..2)") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number (0..2)")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1")
    return value


def fetch(client: SynthClient, dataset: str, n: int | None, out: Path, model: str | None = None, labels=None,
          seed: int | None = None, temperature: float | None = None, progress=None) -> dict:
    """Write n images of `dataset` to `out` (a .npz file, or an ImageFolder tree); return what info.json holds.

    n None: the sum of a labels object's counts. `progress(done, n)` is called as each request's answer arrives."""
    n = images_asked(n, labels)
    out = Path(out)
    to_npz = out.suffix == ".npz"
    if to_npz and out.exists():
        raise FileExistsError(f"{out} exists; give a new --out")
    if not to_npz and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; give a new --out")
    parts = client.iter_batches(dataset, n, model=model, labels=labels, seed=seed, temperature=temperature)
    if progress:
        parts = reporting(parts, n, progress)
    if to_npz:
        first = join_batches(parts, n)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        partial.write_bytes(encode_npz(first))
        partial.replace(out)
    else:
        first, filenames, label_list, folders, width = None, [], [], set(), image_name_width(n)
        for start, batch in parts:
            first = first or batch
            for row, (image, label) in enumerate(zip(batch.images, batch.labels.tolist()), start):
                folder = class_folder(label, batch.class_names[label] if label >= 0 else "", len(batch.class_names))
                if folder not in folders:
                    (out / folder).mkdir(parents=True, exist_ok=True)
                    folders.add(folder)
                filename = f"{folder}/{row:0{width}d}.png"
                (out / filename).write_bytes(png_bytes(image))
                filenames.append(filename)
                label_list.append(label)
    info = {**first.meta, "n": n, "labels": "balanced" if labels is None else labels,
            "image_shape": list(first.images.shape[1:]), "class_names": first.class_names}
    if not to_npz:
        (out / "labels.csv").write_text(labels_csv(filenames, label_list, first.class_names), encoding="utf-8",
                                        newline="")
        (out / "info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def reporting(parts, n: int, progress):
    """The parts of `SynthClient.iter_batches`, calling progress(done, n) as each request's answer arrives."""
    for start, batch in parts:
        progress(start + len(batch.images), n)
        yield start, batch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.fetch", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="a dataset id from the service's /models, e.g. mnist")
    parser.add_argument("-n", type=int, help="how many images (any number; large sets come in several "
                                             "requests); required unless --labels gives class counts")
    parser.add_argument("--out", type=Path, required=True, help="a .npz file, or a folder for an ImageFolder tree")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", help="a model of the dataset (default: the dataset's default model)")
    which.add_argument("--best-for-training", action="store_true",
                       help="the dataset's best_for_training model in /models: the conditional model whose images "
                            "trained the best classifier (highest CAS on its card)")
    parser.add_argument("--labels", type=parse_labels, default=None,
                        help='"balanced" (default), one class id or name for every image, or how many of each '
                             'class: "normal=3000,pneumonia=1000" (images class by class, in that order)')
    parser.add_argument("--seed", type=int, help="0..2**63-1; omitted, the server draws one (printed)")
    parser.add_argument("--temperature", type=finite_temperature, help="0..2, the scale of the latent noise (default 1; below 1 "
                                                          "fewer odd images and less variety)")
    parser.add_argument("--url", default=os.environ.get("SYNTHGEN_URL", DEFAULT_URL),
                        help=f"the service (default: $SYNTHGEN_URL or {DEFAULT_URL})")
    parser.add_argument("--token", default=os.environ.get("SYNTHGEN_API_TOKEN"),
                        help="bearer token, where the service has one (default: $SYNTHGEN_API_TOKEN)")
    parser.add_argument("--max-request-n", type=positive_int, help="images per request, below the server's max_n")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


class NoModelToFetch(ValueError):
    """The dataset or its best_for_training model is not in the service's catalog."""


def best_for_training(client: SynthClient, dataset: str) -> str:
    """The catalog's best_for_training model of a dataset; NoModelToFetch naming what to do where there is none."""
    datasets = client.models()["datasets"]
    if dataset not in datasets:
        raise NoModelToFetch(f"unknown dataset {dataset!r}; the service has: {', '.join(sorted(datasets))}")
    best = datasets[dataset].get("best_for_training")
    if best is None:
        raise NoModelToFetch(f"{dataset} has no conditional model with a measured CAS, so no best_for_training; "
                         f"name one with --model ({', '.join(datasets[dataset]['models'])})")
    return best


def service_error_text(error: SynthError) -> str:
    """The service's error and each detail's field, message and allowed values, one per line."""
    lines = [str(error)]
    for item in (error.body.get("detail") or []) if isinstance(error.body, dict) else []:
        field = ".".join(str(part) for part in item.get("loc", []))
        allowed = f" (allowed: {json.dumps(item['allowed'])})" if "allowed" in item else ""
        lines.append(f"  {field}: {item.get('msg', '')}{allowed}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.n is None and not isinstance(args.labels, dict):
        parser.error("-n is required unless --labels gives class counts (name=count,...)")
    if args.out.suffix not in ("", ".npz") and not args.out.is_dir():
        parser.error(f"--out {args.out}: a .npz file, or a folder for an ImageFolder tree; a {args.out.suffix} name "
                     "would become a folder (create the folder first to use such a name)")

    def progress(done: int, n: int) -> None:
        if not args.quiet:
            print(f"\r{done:,}/{n:,} images", end="" if done < n else "\n", file=sys.stderr, flush=True)

    try:
        with SynthClient(args.url, token=args.token, max_request_n=args.max_request_n) as client:
            model = best_for_training(client, args.dataset) if args.best_for_training else args.model
            info = fetch(client, args.dataset, args.n, args.out, model=model, labels=args.labels,
                         seed=args.seed, temperature=args.temperature, progress=progress)
    except SynthError as error:
        print(f"error: {service_error_text(error)}", file=sys.stderr)
        return 1
    except httpx.HTTPError as error:
        print(f"error: cannot reach {args.url}: {error}", file=sys.stderr)
        return 1
    except (FileExistsError, NoModelToFetch) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    images = f"{info['n']:,} image{'s' if info['n'] != 1 else ''}"
    print(f"wrote {images} of {info['dataset']}/{info['model']} (seed {info['seed']}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
