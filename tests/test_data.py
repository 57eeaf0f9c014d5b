"""Promises of training/data.py: every dataset loads from files of its real format, and a missing file says how to fix it."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_idx
from training.data import DataFormatError, DataNotFoundError, dataset_info, load_dataset

CASES = {  # dataset id -> (channels, size, classes)
    "mnist": (1, 28, 10),
    "fashion_mnist": (1, 28, 10),
    "pneumoniamnist": (1, 28, 2),
    "retinamnist": (3, 28, 5),
    "breastmnist": (1, 28, 2),
    "bloodmnist": (3, 28, 8),
    "pathmnist": (3, 28, 9),
    "bloodmnist_64": (3, 64, 8),
    "pathmnist_64": (3, 64, 9),
    "breastmnist_64": (1, 64, 2),
    "pathmnist_gray": (1, 28, 9),
}


@pytest.mark.filterwarnings("ignore:.*official file")
@pytest.mark.parametrize("dataset", CASES)
def test_every_dataset_loads_as_uint8_tensors_with_class_names(dataset, data_dir):
    channels, size, classes = CASES[dataset]
    for split in ("train", "test"):
        data = load_dataset(dataset, split, data_dir)
        assert data.images.dtype == torch.uint8 and data.labels.dtype == torch.int64
        assert data.images.shape[1:] == (channels, size, size)
        assert len(data.labels) == len(data.images) > 0
        assert int(data.labels.min()) >= 0 and int(data.labels.max()) < classes
        assert data.info.num_classes == classes == len(data.info.classes)
        x, y = next(iter(data.loader(batch_size=4)))
        assert x.shape == (4, channels, size, size) and 0 <= float(x.min()) and float(x.max()) <= 1


def test_mnist_class_names_are_the_digits():
    assert dataset_info("mnist").classes == tuple("0123456789")
    assert dataset_info("pneumoniamnist").classes == ("normal", "pneumonia")


def test_grayscale_is_an_option_of_the_same_loader(data_dir):
    rgb = load_dataset("pathmnist", "train", data_dir)
    gray = load_dataset("pathmnist_gray", "train", data_dir)
    expected = (rgb.images.float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert torch.equal(gray.images, expected.round().clamp(0, 255).to(torch.uint8))
    assert torch.equal(gray.labels, rgb.labels)


def test_tiny_medmnist_file_is_read_but_flagged_as_not_official(data_dir):
    with pytest.warns(UserWarning, match="the official file has 11959"):
        load_dataset("bloodmnist", "train", data_dir)


def test_missing_idx_file_names_file_folder_and_download(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("mnist", "train", tmp_path)
    message = str(err.value)
    assert "train-images-idx3-ubyte.gz" in message and str(tmp_path / "MNIST" / "raw") in message and "--download" in message


def test_missing_medmnist_file_names_file_folder_and_download(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("bloodmnist_64", "train", tmp_path)
    message = str(err.value)
    assert "bloodmnist_64.npz" in message and str(tmp_path) in message and "--download" in message


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: mnist, fashion_mnist, pathmnist.*also as <id>_gray \\(pathmnist, "):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="ChestMNIST is multi-label"):
        load_dataset("chestmnist")
    with pytest.raises(ValueError, match="pneumoniamnist is grayscale already; use 'pneumoniamnist_64'"):
        load_dataset("pneumoniamnist_64_gray")


def test_data_dir_comes_from_the_environment(data_dir, monkeypatch):
    monkeypatch.setenv("SYNTHGEN_DATA_DIR", str(data_dir))
    assert len(load_dataset("mnist", "test")) == 32


def test_gzipped_files_are_read_without_writing_into_the_data_dir(data_dir):
    before = sorted(p.name for p in (data_dir / "FashionMNIST" / "raw").iterdir())
    load_dataset("fashion_mnist", "train", data_dir)
    assert sorted(p.name for p in (data_dir / "FashionMNIST" / "raw").iterdir()) == before
    assert any(os.scandir(os.environ["SYNTHGEN_CACHE_DIR"]))


def _official_bloodmnist(n: int = 8) -> dict:
    labels = (np.arange(n) % 8).astype(np.uint8).reshape(-1, 1)
    images = np.zeros((n, 28, 28, 3), np.uint8)
    return {f"{split}_{kind}": array for split in ("train", "val", "test")
            for kind, array in (("images", images), ("labels", labels))}


@pytest.mark.parametrize("change, said", [
    ({"train_images": np.zeros((8, 28, 28), np.uint8)}, "needs uint8 N x 28 x 28 x 3"),  # grayscale, RGB set
    ({"train_images": np.zeros((8, 3, 28, 28), np.uint8)}, "is uint8 8x3x28x28"),  # channels first
    ({"train_images": np.zeros((8, 28, 28, 3), np.float32)}, "needs uint8"),
    ({"train_labels": np.arange(8).reshape(-1, 1) + 1}, r"run from 1 to 8; bloodmnist has 8 classes \(0\.\.7\)"),
    ({"train_labels": np.zeros((5, 1), np.uint8)}, "one integer label per image"),
])
def test_a_medmnist_file_off_the_official_layout_is_refused_naming_file_and_layout(tmp_path, change, said):
    path = tmp_path / "bloodmnist.npz"
    np.savez(path, **{**_official_bloodmnist(), **change})
    with pytest.raises(DataFormatError, match=said) as err:
        load_dataset("bloodmnist", "train", tmp_path)
    assert str(path) in str(err.value)


def test_a_28px_file_under_the_64px_name_is_refused(tmp_path):
    np.savez(tmp_path / "bloodmnist_64.npz", **_official_bloodmnist())
    with pytest.raises(DataFormatError, match="needs uint8 N x 64 x 64 x 3"):
        load_dataset("bloodmnist_64", "train", tmp_path)


def test_a_medmnist_file_without_the_split_arrays_lists_what_it_holds(tmp_path):
    np.savez(tmp_path / "bloodmnist.npz", images=np.zeros((8, 28, 28, 3), np.uint8))
    with pytest.raises(DataFormatError, match=r"no 'train_images' and 'train_labels' arrays; it holds \['images'\]"):
        load_dataset("bloodmnist", "train", tmp_path)
    (tmp_path / "bloodmnist.npz").write_bytes(b"hello")  # numpy would call it a pickle and suggest loading it unsafely
    with pytest.raises(DataFormatError, match=r"not a readable .npz file \(not a zip archive\)$"):
        load_dataset("bloodmnist", "train", tmp_path)


def test_a_truncated_medmnist_file_is_refused_naming_it(tmp_path):
    whole = tmp_path / "whole.npz"
    np.savez(whole, **_official_bloodmnist(64))
    (tmp_path / "bloodmnist.npz").write_bytes(whole.read_bytes()[:5000])
    with pytest.raises(DataFormatError, match=r"bloodmnist.npz: not a readable .npz file \("):
        load_dataset("bloodmnist", "train", tmp_path)


def test_a_damaged_compressed_medmnist_file_is_refused_naming_it(tmp_path):
    arrays = _official_bloodmnist(64)
    arrays["train_images"] = np.random.default_rng(0).integers(0, 256, (64, 28, 28, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "whole.npz", **arrays)
    data = bytearray((tmp_path / "whole.npz").read_bytes())
    start = data.index(b"train_images.npy") + 40  # into its deflate stream: zlib fails before any CRC check
    data[start:start + 8] = bytes(b ^ 0xFF for b in data[start:start + 8])
    (tmp_path / "bloodmnist.npz").write_bytes(bytes(data))
    with pytest.raises(DataFormatError, match=r"bloodmnist.npz: not a readable .npz file"):
        load_dataset("bloodmnist", "train", tmp_path)


def test_a_truncated_gzipped_idx_file_is_refused_naming_it_and_leaves_nothing_in_the_cache(data_dir, tmp_path):
    shutil.copytree(data_dir / "MNIST", tmp_path / "MNIST")
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:len(images.read_bytes()) // 2])
    with pytest.raises(DataFormatError, match="train-images-idx3-ubyte.gz: not a readable gzip file"):
        load_dataset("mnist", "train", tmp_path)
    assert not list(Path(os.environ["SYNTHGEN_CACHE_DIR"]).rglob("*.tmp"))


def _idx_split(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """A train split of MNIST in real gzipped IDX files (the test split as it was)."""
    write_idx(root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz", images)
    write_idx(root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz", labels)


@pytest.mark.parametrize("images, labels, said", [
    (np.zeros((64, 28, 28)), np.arange(60) % 10, "hold 64 images and 60 labels"),  # short label file: failed mid-epoch
    (np.zeros((64, 28, 28)), np.arange(80) % 10, "hold 64 images and 80 labels"),  # long one: trained, misaligned
    (np.zeros((64, 28, 28)), np.full(64, 200), "labels from 200 to 200; mnist has 10 classes"),
    (np.zeros((64, 14, 14)), np.arange(64) % 10, "images of torch.uint8 64x14x14; the official files hold uint8 N x 28 x 28"),
], ids=["short-labels", "long-labels", "label-range", "image-size"])
def test_idx_files_off_the_official_layout_are_refused_naming_them(data_dir, tmp_path, images, labels, said):
    shutil.copytree(data_dir / "MNIST", tmp_path / "MNIST")
    _idx_split(tmp_path, images, labels)
    with pytest.raises(DataFormatError, match=r"train-images-idx3-ubyte\[\.gz\] and .*train-labels-idx1-ubyte") as err:
        load_dataset("mnist", "train", tmp_path)
    assert said in str(err.value)


def test_swapped_idx_files_are_refused_naming_them(data_dir, tmp_path):
    shutil.copytree(data_dir / "MNIST", tmp_path / "MNIST")
    raw = tmp_path / "MNIST" / "raw"
    images, labels = raw / "train-images-idx3-ubyte.gz", raw / "train-labels-idx1-ubyte.gz"
    images_bytes = images.read_bytes()
    images.write_bytes(labels.read_bytes())
    labels.write_bytes(images_bytes)
    with pytest.raises(DataFormatError, match="are not the official IDX files"):
        load_dataset("mnist", "train", tmp_path)


@pytest.mark.parametrize("dataset", ["mnist", "pneumoniamnist"])
def test_a_download_without_network_is_a_missing_file_error_naming_the_folder(dataset, tmp_path, monkeypatch):
    import torchvision.datasets.mnist
    import torchvision.datasets.utils
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("no network here")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)  # torchvision's MNIST
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", offline)  # medmnist imports it when it downloads
    with pytest.raises(DataNotFoundError, match=f"--download could not fetch .*'{tmp_path}.*check the network"):
        load_dataset(dataset, "train", tmp_path, download=True)


def test_an_empty_split_is_refused_naming_the_file(tmp_path):
    empty = {"train_images": np.zeros((0, 28, 28, 3), np.uint8), "train_labels": np.zeros((0, 1), np.uint8)}
    np.savez(tmp_path / "bloodmnist.npz", **{**_official_bloodmnist(), **empty})
    with pytest.raises(DataFormatError, match="train_images holds no images"):
        load_dataset("bloodmnist", "train", tmp_path)


def test_a_users_own_file_beside_the_medmnist_folder_is_found(tmp_path):
    """The shared files in <dir>/medmnist/ and a user's own BloodMNIST file in <dir>/: each is found."""
    np.savez(tmp_path / "bloodmnist.npz", **_official_bloodmnist(n=6))
    (tmp_path / "medmnist").mkdir()
    np.savez(tmp_path / "medmnist" / "pathmnist.npz", **{k: v for k, v in _official_bloodmnist(n=9).items()})
    assert len(load_dataset("bloodmnist", "train", tmp_path)) == 6
    assert len(load_dataset("pathmnist", "train", tmp_path)) == 9
    with pytest.raises(DataNotFoundError, match="in '.*/medmnist' or '"):
        load_dataset("retinamnist", "train", tmp_path)
