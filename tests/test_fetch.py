"""python -m service.fetch: a synthetic training set on disk, as an .npz or a torchvision ImageFolder tree."""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from service.client import SynthClient
from service.fetch import class_folder, fetch, main, parse_labels
from service_harness import REPO, main_server


@pytest.fixture(scope="module")
def url(exported_dir, tmp_path_factory):
    return main_server(exported_dir, tmp_path_factory).url


def test_an_npz_holds_the_images_generate_gives_for_the_same_seed(url, tmp_path):
    with SynthClient(url, max_request_n=25) as client:
        info = fetch(client, "mnist", 47, tmp_path / "set.npz", seed=5)
        expected, labels, names = client.generate("mnist", n=47, seed=5)
    with np.load(tmp_path / "set.npz", allow_pickle=False) as npz:
        assert np.array_equal(npz["images"], expected) and np.array_equal(npz["labels"], labels)
        assert npz["class_names"].tolist() == names and int(npz["seed"]) == 5 and str(npz["model"]) == "cdcgan"
    assert info["n"] == 47 and info["seed"] == 5 and not list(tmp_path.glob("*.partial"))


def test_a_temperature_is_fetched_and_recorded(url, tmp_path):
    assert main(["mnist", "-n", "12", "--seed", "2", "--temperature", "0.6", "--out", str(tmp_path / "cool"),
                 "--url", url, "--quiet"]) == 0
    info = json.loads((tmp_path / "cool" / "info.json").read_text())
    assert info["temperature"] == 0.6
    with SynthClient(url) as client:
        expected, _, _ = client.generate("mnist", n=12, seed=2, temperature=0.6)
    first = np.asarray(Image.open(tmp_path / "cool" / "0_0" / "000000.png"))
    assert np.array_equal(first, expected[0, :, :, 0])


def test_a_folder_is_an_image_folder_whose_class_index_is_the_label(url, tmp_path):
    out = tmp_path / "pneumonia"
    with SynthClient(url, max_request_n=4) as client:
        fetch(client, "pneumoniamnist", 9, out, seed=1)
        expected, labels, _ = client.generate("pneumoniamnist", n=9, seed=1)
    folder = ImageFolder(str(out), loader=lambda path: np.asarray(Image.open(path)))
    assert folder.class_to_idx == {"0_normal": 0, "1_pneumonia": 1}
    rows = list(csv.DictReader(open(out / "labels.csv", newline="", encoding="utf-8")))
    assert [r["filename"] for r in rows] == [f"{class_folder(int(y), n, 2)}/{i:06d}.png"
                                             for i, (y, n) in enumerate(zip(labels, ["normal", "pneumonia"] * 5))]
    for (path, target), row in zip(folder.samples, sorted(rows, key=lambda r: r["filename"])):
        index = int(row["filename"][-10:-4])
        assert path.endswith(row["filename"]) and target == int(row["label"]) == labels[index]
        assert np.array_equal(np.asarray(Image.open(path)), expected[index, :, :, 0])
    info = json.loads((out / "info.json").read_text())
    assert info["seed"] == 1 and info["class_names"] == ["normal", "pneumonia"] and info["image_shape"] == [28, 28, 1]


def test_class_folders_sort_in_label_order_and_have_safe_names():
    assert class_folder(0, "T-shirt/top", 10) == "0_T-shirt_top"
    assert class_folder(3, "immature granulocytes(myelocytes, metamyelocytes)", 11) == \
        "03_immature_granulocytes_myelocytes_metamyelocytes"
    assert class_folder(-1, "", 0) == "unlabelled" and class_folder(2, "///", 3) == "2_class"
    assert sorted(class_folder(i, "x", 12) for i in range(12)) == [class_folder(i, "x", 12) for i in range(12)]


def test_unconditional_images_go_in_one_unlabelled_folder(url, tmp_path):
    assert main(["mnist", "--model", "mlp_vae", "-n", "3", "--seed", "2", "--out", str(tmp_path / "vae"),
                 "--url", url, "--quiet"]) == 0
    assert sorted(p.relative_to(tmp_path / "vae").as_posix() for p in (tmp_path / "vae").rglob("*.png")) == \
        ["unlabelled/000000.png", "unlabelled/000001.png", "unlabelled/000002.png"]


def test_class_counts_fetch_that_many_of_each_class_without_n(url, tmp_path):
    out = tmp_path / "mix.npz"
    assert main(["pneumoniamnist", "--labels", "normal=3,pneumonia=2", "--seed", "1", "--out", str(out),
                 "--url", url, "--quiet"]) == 0
    with np.load(out, allow_pickle=False) as npz, SynthClient(url) as client:
        assert npz["labels"].tolist() == [0, 0, 0, 1, 1]
        expected, _, _ = client.generate("pneumoniamnist", n=5, labels=["normal"] * 3 + ["pneumonia"] * 2, seed=1)
        assert np.array_equal(npz["images"], expected)


def test_labels_take_one_class_or_class_counts_and_n_is_needed_otherwise(tmp_path, capsys):
    assert parse_labels("3") == 3 and parse_labels("pneumonia") == "pneumonia"
    assert parse_labels('{"normal": 1}') == {"normal": 1}
    granulocytes = "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)"  # a BloodMNIST class
    assert parse_labels(f"{granulocytes}=5,basophil=3") == {granulocytes: 5, "basophil": 3}
    assert parse_labels("normal=3, pneumonia=2") == {"normal": 3, "pneumonia": 2}  # spaces after commas
    for bad in ("normal=many", "normal=1,pneumonia", "normal=1,normal=2", "{oops", "{\"normal\": 1} x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_labels(bad)
    with pytest.raises(SystemExit) as info:
        main(["mnist", "--out", str(tmp_path / "x.npz")])
    assert info.value.code == 2 and "-n is required" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, says", [("--temperature", "nan", "finite"), ("--temperature", "inf", "finite"),
                                               ("--max-request-n", "0", "below 1"), ("--max-request-n", "-3", "below 1")])
def test_a_bad_flag_value_is_one_usage_error_not_a_traceback(tmp_path, capsys, flag, value, says):
    with pytest.raises(SystemExit) as info:
        main(["mnist", "-n", "5", "--out", str(tmp_path / "x.npz"), flag, value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and flag in err and says in err and "Traceback" not in err


def test_an_out_name_with_another_suffix_is_refused_not_made_a_folder(tmp_path, capsys):
    """--out f5.png once wrote an ImageFolder tree into a new folder named f5.png."""
    with pytest.raises(SystemExit) as info:
        main(["mnist", "-n", "5", "--out", str(tmp_path / "f5.png")])
    assert info.value.code == 2 and "a .png name would become a folder" in capsys.readouterr().err
    assert not (tmp_path / "f5.png").exists()


def test_a_bad_request_prints_the_service_error_and_writes_nothing(url, tmp_path, capsys):
    assert main(["mnist", "-n", "4", "--labels", "cat", "--out", str(tmp_path / "x.npz"), "--url", url]) == 1
    err = capsys.readouterr().err
    assert "HTTP 400" in err and "labels" in err and '"9"' in err  # the field and its allowed values
    assert main(["cifar10", "-n", "4", "--out", str(tmp_path / "y"), "--url", url]) == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_best_for_training_fetches_the_model_the_catalog_names(url, tmp_path, monkeypatch):
    catalog = SynthClient(url).models()
    assert catalog["datasets"]["mnist"]["default_model"] == "cdcgan"
    catalog["datasets"]["mnist"]["best_for_training"] = "mlp_vae"  # as if its card had the highest CAS
    monkeypatch.setattr(SynthClient, "models", lambda self: catalog)
    assert main(["mnist", "-n", "3", "--best-for-training", "--seed", "1", "--out", str(tmp_path / "s.npz"),
                 "--url", url, "--quiet"]) == 0
    with np.load(tmp_path / "s.npz", allow_pickle=False) as npz:
        assert str(npz["model"]) == "mlp_vae"


def test_best_for_training_without_one_says_which_models_to_name_instead(url, tmp_path, capsys):
    assert main(["mnist", "-n", "3", "--best-for-training", "--out", str(tmp_path / "s.npz"), "--url", url]) == 2
    assert "no conditional model with a measured CAS" in capsys.readouterr().err  # the tiny cards have no CAS
    assert main(["cifar10", "-n", "3", "--best-for-training", "--out", str(tmp_path / "s.npz"), "--url", url]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'cifar10'" in err and "mnist" in err
    with pytest.raises(SystemExit):
        main(["mnist", "-n", "3", "--best-for-training", "--model", "cdcgan", "--out", str(tmp_path / "s.npz")])
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_or_non_empty_folder_is_not_overwritten(url, tmp_path, capsys):
    (tmp_path / "set.npz").write_bytes(b"mine")
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "notes.txt").write_text("mine")
    for out in ("set.npz", "tree"):
        assert main(["mnist", "-n", "2", "--out", str(tmp_path / out), "--url", url]) == 2
        assert "exists" in capsys.readouterr().err
    assert (tmp_path / "set.npz").read_bytes() == b"mine" and len(list((tmp_path / "tree").iterdir())) == 1


def test_an_unreachable_service_is_one_clear_line(tmp_path, capsys):
    assert main(["mnist", "-n", "2", "--out", str(tmp_path / "x.npz"), "--url", "http://127.0.0.1:9"]) == 1
    assert "cannot reach http://127.0.0.1:9" in capsys.readouterr().err


def test_the_command_runs_without_torch(url, tmp_path):
    argv = ["mnist", "-n", "2", "--out", str(tmp_path / "a.npz"), "--url", url]
    code = f"import sys, service.fetch; assert 'torch' not in sys.modules; sys.exit(service.fetch.main({argv!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "wrote 2 images of mnist/cdcgan" in done.stdout
