"""Real datasets as in-memory tensors: MNIST and Fashion-MNIST (torchvision), MedMNIST 2D (medmnist).

One function, `load_dataset`, returns any of them as uint8 images (N, C, H, W), int64 labels and a
`DatasetInfo` (class names, channels, image size). These sets fit in memory, so the trainer keeps them
as one tensor on its device and never runs per-sample Python code.

Dataset ids are the ones used everywhere (CLI, `exported/`, the API): `mnist`, `fashion_mnist`, the
medmnist flags (`bloodmnist`, `pathmnist`, ...) with `_64` for the 64x64 files (as medmnist names them),
and `_gray` when an RGB set is converted to grayscale (`pathmnist_gray`).

Where the files are looked for (first match wins): `--data-dir`, then `$SYNTHGEN_DATA_DIR`, then `./data`.
Layout: torchvision's (`<dir>/MNIST/raw/*.gz`, `<dir>/FashionMNIST/raw/*.gz`) and medmnist's
(`<dir>/medmnist/<flag>[_64].npz`, or `<dir>/<flag>[_64].npz`). Gzipped IDX files are read in place and
decompressed into a cache (`$SYNTHGEN_CACHE_DIR`, default `~/.cache/synthgen`) because torchvision
reads the uncompressed files; nothing is ever written into the data directory.

    python -m training.data mnist --data-dir ../shared/data     # prints what was found
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATA_DIR_ENV = "SYNTHGEN_DATA_DIR"
CACHE_DIR_ENV = "SYNTHGEN_CACHE_DIR"
SPLITS = ("train", "val", "test")
MEDMNIST_SIZES = (28, 64)

# MedMNIST 2D sets with one label per image (ChestMNIST is multi-label and so cannot be class-conditioned).
MEDMNIST_FLAGS = (
    "pathmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist", "breastmnist",
    "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist",
)
# The raw files torchvision's MNIST classes need, all four for either split (torchvision checks them all),
# under its own layout <root>/<Class>/raw/.
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TORCHVISION_SETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


class DataNotFoundError(FileNotFoundError):
    """A dataset file is missing: the message names the file, the folder searched and how to get it."""


class DataFormatError(ValueError):
    """A dataset file is not in its official layout: the message names the file, what it holds and what the
    official file holds (arrays, shape, label range)."""


@dataclass(frozen=True)
class DatasetInfo:
    id: str  # e.g. "bloodmnist_64"
    source: str  # "torchvision" or "medmnist"
    base: str  # "mnist", "fashion_mnist" or the medmnist flag
    classes: tuple[str, ...]
    channels: int
    size: int  # H == W

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)


@dataclass
class ImageData:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    info: DatasetInfo
    split: str

    def __len__(self) -> int:
        return self.images.shape[0]

    def loader(self, batch_size: int = 64, shuffle: bool = True, **kwargs) -> torch.utils.data.DataLoader:
        """A DataLoader of (float images in [0, 1], labels), for code that wants one."""
        dataset = torch.utils.data.TensorDataset(self.images.float().div_(255), self.labels)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, **kwargs)


def parse_dataset_id(dataset: str) -> tuple[str, int, bool]:
    """'pathmnist_64_gray' -> ('pathmnist', 64, True). Raises ValueError listing the known ids."""
    name, grayscale = dataset, False
    if name.endswith("_gray"):
        name, grayscale = name[: -len("_gray")], True
    size = MEDMNIST_SIZES[0]
    for other in MEDMNIST_SIZES[1:]:
        if name.endswith(f"_{other}"):
            name, size = name[: -len(f"_{other}")], other
    if name in TORCHVISION_SETS and size == MEDMNIST_SIZES[0] and not grayscale:
        return name, size, grayscale
    if name in MEDMNIST_FLAGS:
        if grayscale and name not in rgb_medmnist_flags():
            raise ValueError(f"{dataset!r}: {name} is grayscale already; use {dataset.removesuffix('_gray')!r}")
        return name, size, grayscale
    if name == "chestmnist":
        raise ValueError(f"{dataset!r}: ChestMNIST is multi-label (several findings per image), so no class-conditional "
                         f"generator can be trained on it; known: {', '.join(known_dataset_ids())}")
    raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(known_dataset_ids())}; the RGB sets also as "
                     f"<id>_gray ({', '.join(rgb_medmnist_flags())})")


def rgb_medmnist_flags() -> list[str]:
    """The MedMNIST sets stored in RGB: the ones that also load as grayscale (`<id>_gray`)."""
    import medmnist

    return [flag for flag in MEDMNIST_FLAGS if medmnist.INFO[flag]["n_channels"] == 3]


def known_dataset_ids() -> list[str]:
    ids = list(TORCHVISION_SETS)
    for flag in MEDMNIST_FLAGS:
        ids += [flag, f"{flag}_64"]
    return ids


def dataset_info(dataset: str) -> DatasetInfo:
    """Class names, channels and size, without reading any data file."""
    base, size, grayscale = parse_dataset_id(dataset)
    if base in TORCHVISION_SETS:
        import torchvision

        classes = getattr(torchvision.datasets, TORCHVISION_SETS[base]).classes
        if base == "mnist":  # torchvision names them "0 - zero", ...; the digit is the name users want
            classes = [c.split(" - ")[0] for c in classes]
        return DatasetInfo(dataset, "torchvision", base, tuple(classes), 1, 28)
    import medmnist

    info = medmnist.INFO[base]
    labels = info["label"]
    classes = tuple(labels[str(i)] for i in range(len(labels)))
    channels = 1 if grayscale else info["n_channels"]
    return DatasetInfo(dataset, "medmnist", base, classes, channels, size)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or "data").expanduser()


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "synthgen").expanduser()


def load_dataset(
    dataset: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> ImageData:
    """Any supported dataset split as uint8 tensors (N, C, H, W) with int64 labels and its `DatasetInfo`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    info = dataset_info(dataset)
    root = resolve_data_dir(data_dir)
    if info.source == "torchvision":
        images, labels = _load_torchvision(info, split, root, download)
    else:
        images, labels = _load_medmnist(info, split, root, download)
    if info.channels == 1 and images.shape[1] == 3:
        images = to_grayscale(images)
    return ImageData(images.contiguous(), labels, info, split)


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """RGB uint8 (N, 3, H, W) -> (N, 1, H, W) with ITU-R 601 luma weights, as PIL's convert('L')."""
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() * weights).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)


def _load_torchvision(info: DatasetInfo, split: str, root: Path, download: bool):
    import torchvision

    cls_name = TORCHVISION_SETS[info.base]
    if split == "val":
        raise ValueError(f"{info.id} has no 'val' split; use 'train' or 'test'")
    raw = root / cls_name / "raw"
    tv_root = root
    missing = [name for name in IDX_FILES if not (raw / name).exists() and not (raw / f"{name}.gz").exists()]
    if missing:
        if not download:
            raise DataNotFoundError(
                f"{info.id}: expected file '{missing[0]}.gz' (or uncompressed '{missing[0]}') in '{raw}'. "
                f"Point --data-dir or ${DATA_DIR_ENV} at the folder holding {cls_name}/raw/, "
                f"or pass --download to fetch it with torchvision.datasets.{cls_name}."
            )
    elif not all((raw / name).exists() for name in IDX_FILES):
        tv_root = _decompressed_copy(raw, cls_name)
    image_file, label_file = IDX_FILES[:2] if split == "train" else IDX_FILES[2:]
    files = f"{raw / image_file}[.gz] and {raw / label_file}[.gz]"
    try:
        dataset = getattr(torchvision.datasets, cls_name)(root=str(tv_root), train=split == "train", download=download)
    except (RuntimeError, ValueError, AssertionError, OSError) as err:  # a failed download, or a wrong or cut file
        if missing:
            raise download_failed(info, "the IDX files", raw, err) from None
        raise DataFormatError(f"{info.id}: {files} are not the official IDX files ({err}); replace them with the "
                              "published ones") from None
    images, labels = dataset.data, dataset.targets
    check_idx_arrays(files, split, images, labels, info)
    return images.unsqueeze(1).to(torch.uint8), labels.to(torch.int64)  # (N, 1, 28, 28), (N,)


def download_failed(info: DatasetInfo, what: str, folder: Path, err: Exception) -> DataNotFoundError:
    """The error of a --download that fetched nothing usable (no network, a server error), on one line."""
    reason = " ".join(str(err).split())  # medmnist's message spans lines
    return DataNotFoundError(f"{info.id}: --download could not fetch {what} into '{folder}' ({reason}); check the "
                             "network, or put the files there yourself")


def check_idx_arrays(files: str, split: str, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo) -> None:
    """Refuse, naming the files, IDX arrays that are not the official layout: N x 28 x 28 uint8 images and one
    label per image in 0..9. Without this a short label file fails mid-epoch, and a long one trains silently
    on misaligned labels."""
    if images.dtype != torch.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != (28, 28) or len(images) == 0:
        raise DataFormatError(f"{info.id} {split}: {files} hold images of {images.dtype} "
                              f"{'x'.join(map(str, images.shape))}; the official files hold uint8 N x 28 x 28")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataFormatError(f"{info.id} {split}: {files} hold {len(images)} images and "
                              f"{'x'.join(map(str, labels.shape))} labels; the official files hold one label per image")
    if not 0 <= int(labels.min()) <= int(labels.max()) < info.num_classes:
        raise DataFormatError(f"{info.id} {split}: {files} hold labels from {int(labels.min())} to "
                              f"{int(labels.max())}; {info.base} has {info.num_classes} classes (0..{info.num_classes - 1})")


def _decompressed_copy(raw: Path, cls_name: str) -> Path:
    """Gunzip the IDX files into a cache keyed by the source files; return the root torchvision reads."""
    sources = [raw / name if (raw / name).exists() else raw / f"{name}.gz" for name in IDX_FILES]
    key = hashlib.sha1("|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sources).encode())
    root = cache_dir() / "idx" / key.hexdigest()[:16]
    target = root / cls_name / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for source in sources:
        out = target / source.name.removesuffix(".gz")
        if out.exists():
            continue
        tmp = out.with_suffix(f".{os.getpid()}.tmp")  # per process: two runs may fill the cache at once
        try:
            with (gzip.open(source, "rb") if source.suffix == ".gz" else open(source, "rb")) as fin, open(tmp, "wb") as fout:
                while True:
                    try:
                        chunk = fin.read(1 << 20)
                    except (EOFError, OSError, zlib.error) as err:  # truncated, or not gzip (BadGzipFile: an OSError)
                        kind = "gzip file" if source.suffix == ".gz" else "file"
                        raise DataFormatError(f"{source}: not a readable {kind} ({err}); replace it with the "
                                              "published file") from None
                    if not chunk:
                        break
                    fout.write(chunk)  # an error here is the cache's (disk full, read-only), not the file's
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(out)
    return root


def medmnist_root(root: Path, filename: str) -> Path:
    """The folder medmnist reads <flag>[_64].npz from: <dir>/medmnist/ where the file is there (or, for a
    download, where that folder exists), else <dir> itself, file by file (a user's own file may sit beside the
    medmnist/ folder of the official ones)."""
    nested = root / "medmnist"
    if (nested / filename).exists() or (nested.is_dir() and not (root / filename).exists()):
        return nested
    return root


def _load_medmnist(info: DatasetInfo, split: str, root: Path, download: bool):
    import medmnist

    suffix = "" if info.size == 28 else f"_{info.size}"
    mm_root = medmnist_root(root, f"{info.base}{suffix}.npz")
    path = mm_root / f"{info.base}{suffix}.npz"
    if not path.exists() and not download:
        raise DataNotFoundError(
            f"{info.id}: expected file '{path.name}' in '{root / 'medmnist'}' or '{root}'. "
            f"Point --data-dir or ${DATA_DIR_ENV} at the folder holding it, or pass --download to fetch it "
            f"with medmnist (python -c \"import medmnist; medmnist.{medmnist.INFO[info.base]['python_class']}"
            f"(split='train', size={info.size}, download=True, root='DIR')\")."
        )
    if download:
        mm_root.mkdir(parents=True, exist_ok=True)
    cls = getattr(medmnist, medmnist.INFO[info.base]["python_class"])
    fetched = download and not path.exists()
    try:
        dataset = cls(split=split, root=str(mm_root), size=info.size, download=download)
    except KeyError:  # medmnist reads <split>_images / <split>_labels from the npz
        with np.load(path) as npz:
            found = sorted(npz.files)
        raise DataFormatError(f"{path}: no '{split}_images' and '{split}_labels' arrays; it holds {found}, an "
                              f"official MedMNIST file holds {[f'{s}_{a}' for s in SPLITS for a in ('images', 'labels')]}"
                              ) from None
    except (RuntimeError, ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        if fetched:  # medmnist's download failed (no network, a server error)
            raise download_failed(info, f"'{path.name}'", mm_root, err) from None
        if isinstance(err, RuntimeError):
            raise
        with open(path, "rb") as f:  # truncated, damaged, another format
            is_zip = f.read(4) == b"PK\x03\x04"  # numpy reads anything else as a pickle, and says so
        raise DataFormatError(f"{path}: not a readable .npz file " + (f"({err})" if is_zip else "(not a zip archive)")
                              ) from None
    # medmnist's __len__ asserts the official sample count, so small files of the same layout (our tests)
    # would fail it: read the arrays it loaded instead, and say so when the count is not the official one.
    imgs, labels = np.asarray(dataset.imgs), np.asarray(dataset.labels)
    check_medmnist_arrays(path, split, imgs, labels, info, medmnist.INFO[info.base]["n_channels"])
    official = medmnist.INFO[info.base]["n_samples"][split]
    if imgs.shape[0] != official:
        warnings.warn(f"{path}: {split} has {imgs.shape[0]} images, the official file has {official}", stacklevel=3)
    images = torch.from_numpy(imgs)
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # (N, C, H, W)
    return images.to(torch.uint8), torch.from_numpy(labels.reshape(-1).astype(np.int64))


def check_medmnist_arrays(path: Path, split: str, imgs: np.ndarray, labels: np.ndarray, info: DatasetInfo,
                          file_channels: int) -> None:
    """Refuse, naming the file, arrays that are not the official layout: uint8 images N x H x W (grayscale
    sets) or N x H x W x 3 (RGB sets) at the id's size, and one label per image in 0..classes-1. Without
    this a wrong file fails deep inside a convolution or an embedding lookup, naming neither."""
    h = w = info.size
    expected = (h, w) if file_channels == 1 else (h, w, file_channels)
    layout = "N x " + " x ".join(map(str, expected))
    if imgs.dtype != np.uint8 or imgs.shape[1:] != expected:
        raise DataFormatError(f"{path}: {split}_images is {imgs.dtype} {'x'.join(map(str, imgs.shape))}; {info.id} "
                              f"needs uint8 {layout} (the official {info.base}"
                              f"{'' if info.size == 28 else f'_{info.size}'}.npz layout)")
    if imgs.shape[0] == 0:
        raise DataFormatError(f"{path}: {split}_images holds no images")
    if labels.size != imgs.shape[0] or labels.reshape(-1).dtype.kind not in "iu":
        raise DataFormatError(f"{path}: {split}_labels is {labels.dtype} {'x'.join(map(str, labels.shape))}; "
                              f"needs one integer label per image ({imgs.shape[0]} x 1)")
    if labels.size and not 0 <= labels.min() <= labels.max() < info.num_classes:
        raise DataFormatError(f"{path}: {split}_labels run from {labels.min()} to {labels.max()}; {info.base} has "
                              f"{info.num_classes} classes (0..{info.num_classes - 1})")


def main() -> None:
    parser = argparse.ArgumentParser(description="Load a dataset and print what was found.")
    parser.add_argument("dataset", help=f"one of: {', '.join(known_dataset_ids())} (RGB sets also take _gray)")
    parser.add_argument("--data-dir", default=None, help=f"data folder (default: ${DATA_DIR_ENV} or ./data)")
    parser.add_argument("--download", action="store_true", help="download missing files (needs internet)")
    args = parser.parse_args()
    try:
        source = dataset_info(args.dataset).source
    except ValueError as err:  # an unknown id: the message lists the known ones
        parser.exit(2, f"error: {err}\n")
    for split in ("train", "test") if source == "torchvision" else SPLITS:  # MedMNIST files hold a val split too
        try:
            data = load_dataset(args.dataset, split, args.data_dir, args.download)
        except (DataNotFoundError, DataFormatError, ValueError) as err:  # each names the file or the known ids
            parser.exit(2, f"error: {err}\n")
        counts = torch.bincount(data.labels, minlength=data.info.num_classes).tolist()
        print(f"{args.dataset} {split}: images {tuple(data.images.shape)} classes {counts}")
    print(f"classes: {list(data.info.classes)}")


if __name__ == "__main__":
    main()
