"""training.evaluate: metric functions on features with known answers, and the CLI on the tiny exported zoo."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from training import evaluate as ev
from training.manifest import MANIFEST, sha256_of


@pytest.fixture(autouse=True)
def _one_thread():
    """The evaluator's default (main() sets 1 thread); restored afterwards for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gaussian(n: int, dim: int = 16, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) + shift


# -- FID ------------------------------------------------------------------------------------------------------------

def test_fid_of_identical_sets_is_zero():
    x = gaussian(500)
    assert ev.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_fid_matches_closed_form_for_a_mean_shift():
    # Same covariance, means apart by `shift` in each of d dims: FID = d * shift^2 (+ sampling noise).
    a, b = gaussian(4000, 8, seed=0), gaussian(4000, 8, seed=1)
    base = ev.frechet_distance(a, b)
    assert base < 0.1  # two samples of one distribution
    values = [ev.frechet_distance(a, b + s) for s in (0.5, 1.0, 2.0)]
    assert values == sorted(values)
    assert values[-1] == pytest.approx(8 * 2.0**2, rel=0.05)


def test_fid_of_diagonal_gaussians_matches_formula():
    # Population values: N(0, I) vs N(0, 4I) in d dims: Tr(I + 4I - 2*2I) = d.
    a = gaussian(20000, 4, seed=2)
    b = gaussian(20000, 4, seed=3) * 2
    assert ev.frechet_distance(a, b) == pytest.approx(4.0, rel=0.05)


# -- precision / recall ---------------------------------------------------------------------------------------------

def test_precision_recall_identical_sets_is_one():
    x = gaussian(300)
    assert ev.precision_recall(x, x, k=3) == (1.0, 1.0)


def test_precision_recall_disjoint_sets_is_zero():
    real, fake = gaussian(300, seed=0), gaussian(300, seed=1, shift=50.0)
    assert ev.precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_mode_collapse_keeps_precision_loses_recall():
    real = gaussian(400, 4, seed=0)
    fake = real[real[:, 0] > 0.5][:, :] + 0.01 * gaussian(int((real[:, 0] > 0.5).sum()), 4, seed=5)  # one region only
    precision, recall = ev.precision_recall(real, fake)
    assert precision > 0.9
    assert recall < 0.6


def test_knn_radii_excludes_self():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    assert ev.knn_radii(x, k=1).tolist() == [1.0, 1.0, 2.0, 3.0]
    assert ev.knn_radii(x, k=2).tolist() == [3.0, 2.0, 3.0, 5.0]


# -- labels and subsets ---------------------------------------------------------------------------------------------

def test_prior_labels_follow_class_counts():
    labels = ev.prior_labels(1000, torch.tensor([26, 74]), seed=0)
    assert torch.bincount(labels).tolist() == [260, 740]
    assert ev.prior_labels(7, torch.tensor([1, 1, 1]), seed=0).bincount().sum() == 7


def test_stratified_subset_keeps_every_class():
    labels = torch.tensor([0] * 90 + [1] * 10)
    idx = ev.stratified_subset(labels, 0.1, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [9, 1]
    assert ev.stratified_subset(labels, 0.01, seed=0).numel() == 2  # at least one per class
    assert torch.equal(ev.stratified_subset(labels, 0.1, seed=0), ev.stratified_subset(labels, 0.1, seed=0))
    assert ev.stratified_subset(labels, 1.0, seed=3).tolist() == list(range(100))


def test_classifier_steps():
    assert ev.classifier_steps(60000, None) == 938
    assert ev.classifier_steps(1080, None) == ev.MIN_STEPS
    assert ev.classifier_steps(60000, 1) == 235


def test_classifier_learns_and_is_reproducible(data_dir):
    from training.data import load_dataset

    train, test = load_dataset("mnist", "train", data_dir), load_dataset("mnist", "test", data_dir)
    a = ev.train_classifier([(train.images, train.labels, 1.0)], train.info, steps=30, seed=0, batch_size=32)
    b = ev.train_classifier([(train.images, train.labels, 1.0)], train.info, steps=30, seed=0, batch_size=32)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    logits, feats = ev.predict(a, test.images)
    assert feats.shape == (len(test), 128) and logits.shape == (len(test), 10)
    assert ev.accuracy_report(a, test)["accuracy"] > 0.5  # the fixture's class patterns are learnable


def test_classifier_64px_rgb():
    model = ev.Classifier(3, 64, 8)
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 8)


# -- memorisation ---------------------------------------------------------------------------------------------------

def _random_images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_nearest_training_distances_match_brute_force():
    train, query = _random_images(300, 0), _random_images(40, 1)
    got = ev.nearest_training_distances(query, train, chunk=7)  # chunks of the training split, merged
    want = torch.cdist(ev.to_float(query).flatten(1).double(), ev.to_float(train).flatten(1).double())
    assert torch.allclose(got.double(), want.topk(2, largest=False).values, atol=1e-3)


def test_a_generator_that_returns_training_images_is_all_copies_and_fresh_images_are_none():
    train = _random_images(300, 0)
    real_test = ev.nearest_summary(_random_images(50, 2), train)
    copier = ev.memorisation_report(ev.nearest_summary(train[:50], train), real_test)
    assert copier["copy_fraction"] == 1.0 and copier["nearest_min"] < 1e-2 and copier["copy_fraction_real"] == 0.0
    assert copier["nearest_median_ratio"] < 0.01
    fresh = ev.memorisation_report(ev.nearest_summary(_random_images(50, 3), train), real_test)
    assert fresh["copy_fraction"] == 0.0 and fresh["nearest_median_ratio"] == pytest.approx(1.0, abs=0.05)
    nearly = ev.memorisation_report(ev.nearest_summary(train[:50] // 2 * 2, train), real_test)  # 1/255 off at most
    assert nearly["copy_fraction"] == 1.0


def test_memorisation_only_adds_the_full_protocols_block_to_the_card_and_keeps_the_rest(zoo, data_dir, tmp_path):
    settings = ev.Settings.quick_mode(augmentation=False)
    kwargs = dict(data_dir=data_dir, report_dir=None)
    (_, full), = ev.run([zoo / "mnist/cdcgan"], settings, classifier_dir=tmp_path / "c1", **kwargs)
    card_before = json.loads((zoo / "mnist/cdcgan/card.json").read_text())
    (_, alone), = ev.run([zoo / "mnist/cdcgan"], settings, classifier_dir=tmp_path / "c2", memorisation_only=True, **kwargs)
    numbers = {k: v for k, v in full["memorisation"].items() if k != "protocol"}
    assert numbers == {k: v for k, v in alone.items() if k != "protocol"}  # the same images, the same figures
    assert numbers["n_generated"] == settings.n_generated and 0 <= numbers["copy_fraction"] <= 1
    card = json.loads((zoo / "mnist/cdcgan/card.json").read_text())
    assert card["metrics"]["memorisation"] == alone
    assert {k: v for k, v in card["metrics"].items() if k != "memorisation"} == \
        {k: v for k, v in card_before["metrics"].items() if k != "memorisation"}
    assert not (tmp_path / "c2").exists()  # no reference classifier trained for it
    _verify_manifest(zoo)


def test_memorisation_only_draws_its_images_at_the_temperature_asked(zoo, data_dir, tmp_path):
    settings = ev.Settings.quick_mode(augmentation=False)
    ctx = ev.DatasetContext("mnist", data_dir, tmp_path / "c", settings)
    at_one = ev.evaluate_memorisation(zoo / "mnist/cdcgan", ctx, settings)
    at_half = ev.evaluate_memorisation(zoo / "mnist/cdcgan", ctx, ev.Settings.quick_mode(augmentation=False, temperature=0.5))
    assert at_half["nearest_median"] != at_one["nearest_median"]


# -- the CLI on the tiny exported zoo -------------------------------------------------------------------------------

@pytest.fixture()
def zoo(exported_dir, tmp_path):
    """A private copy of the exported fixture (the session fixture is shared with other tests)."""
    out = tmp_path / "exported"
    shutil.copytree(exported_dir, out)
    return out


def _verify_manifest(root):
    manifest = json.loads((root / MANIFEST).read_text())
    for entry in manifest["models"]:
        for f in entry["files"].values():
            assert sha256_of(root / f["path"]) == f["sha256"], f["path"]
    return manifest


def test_quick_never_replaces_a_full_evaluation_on_a_card(zoo, data_dir, tmp_path, capsys):
    model = tmp_path / "mnist" / "cdcgan"
    shutil.copytree(zoo / "mnist/cdcgan", model)
    card = json.loads((model / "card.json").read_text())
    card["metrics"] = {"fid": 2.5, "protocol": {"quick": False}}
    (model / "card.json").write_text(json.dumps(card))
    before = (model / "card.json").read_text()
    with pytest.raises(SystemExit) as stop:
        ev.main([str(model), "--quick"])
    assert stop.value.code == 2 and "add --no-card" in capsys.readouterr().err
    assert (model / "card.json").read_text() == before
    ev.main([str(model), "--quick", "--temperature", "0.5", "--no-augmentation", "--data-dir", str(data_dir),
             "--classifier-dir", str(tmp_path / "c"), "--report-dir", str(tmp_path / "r")])  # writes no card: goes ahead
    assert (model / "card.json").read_text() == before


def test_cli_quick_writes_cards_reports_and_manifest(zoo, data_dir, tmp_path, capsys):
    classifiers, reports = tmp_path / "classifiers", tmp_path / "eval"
    results = ev.main(["--all", "--exported-dir", str(zoo), "--quick", "--data-dir", str(data_dir),
                       "--classifier-dir", str(classifiers), "--report-dir", str(reports)])
    assert len(results) == 4
    table = capsys.readouterr().out
    assert "mnist/cdcgan" in table and "FID" in table

    cdcgan = json.loads((zoo / "mnist/cdcgan/card.json").read_text())["metrics"]
    for key in ("fid", "fid_floor", "precision", "recall", "label_fidelity", "cas", "cas_real", "classifier_ceiling"):
        assert isinstance(cdcgan[key], float), key
    assert cdcgan["memorisation"]["n_generated"] == 64 and "copy_fraction_real" in cdcgan["memorisation"]
    assert 0 <= cdcgan["label_fidelity"] <= 1 and cdcgan["fid"] >= 0 and 0 <= cdcgan["label_fidelity_real"] <= 1
    aug = cdcgan["augmentation"]
    assert [row["fraction"] for row in aug["fractions"]] == list(ev.FRACTIONS_SMALL)  # the tiny set is under 20,000
    assert aug["label_mix"] == "balanced" and aug["n_synthetic"] == 64
    assert set(cdcgan["per_class"]["cas"]) == {str(d) for d in range(10)}
    assert cdcgan["protocol"]["quick"] is True and "--quick" in cdcgan["protocol"]["command"]

    cvae = json.loads((zoo / "pneumoniamnist/cvae/card.json").read_text())["metrics"]
    assert "cas" in cvae and set(cvae["per_class"]["cas"]) == {"normal", "pneumonia"}

    vae = json.loads((zoo / "mnist/mlp_vae/card.json").read_text())["metrics"]  # unconditional: FID/P/R only
    assert "fid" in vae and "cas" not in vae and "label_fidelity" not in vae and "augmentation" not in vae
    assert sum(vae["details"]["predicted_class_mix"].values()) == pytest.approx(1.0, abs=1e-3)
    gan64 = json.loads((zoo / "bloodmnist_64/dcgan/card.json").read_text())["metrics"]
    assert gan64["protocol"]["n_train"] == 48

    _verify_manifest(zoo)
    report = json.loads((reports / "mnist__cdcgan.json").read_text())
    assert report["metrics"]["fid"] == cdcgan["fid"]
    # a smoke run's tiny classifier lives apart: it never replaces the real one and its baselines in the cache
    assert (classifiers / "quick" / "mnist.pt").exists() and (classifiers / "quick" / "mnist.baselines.json").exists()
    assert not (classifiers / "mnist.pt").exists()


def test_another_classifier_recipe_keeps_its_own_cache_beside_the_default_one(data_dir, tmp_path):
    """--classifier-epochs X once overwrote runs/classifiers/<dataset>.pt, and the next default run retrained it."""
    default = ev.DatasetContext("mnist", data_dir, tmp_path / "classifiers", ev.Settings())
    shorter = ev.DatasetContext("mnist", data_dir, tmp_path / "classifiers", ev.Settings(classifier_epochs=0.5))
    assert default.baselines_path.name == "mnist.baselines.json"
    assert shorter.baselines_path.name == f"mnist.{shorter.key}.baselines.json" and shorter.key != default.key


def test_evaluation_is_reproducible_and_uses_the_cache(zoo, data_dir, tmp_path, capsys):
    settings = ev.Settings.quick_mode(augmentation=False)
    kwargs = dict(data_dir=data_dir, classifier_dir=tmp_path / "classifiers", report_dir=None)
    (_, first), = ev.run([zoo / "mnist/cdcgan"], settings, **kwargs)
    assert first["protocol"]["classifier"]["cache"].endswith("quick/mnist.pt")
    assert "training the reference classifier" in capsys.readouterr().err
    card = json.loads((zoo / "mnist/cdcgan/card.json").read_text())
    (_, second), = ev.run([zoo / "mnist/cdcgan"], settings, write_card=False, **kwargs)
    assert "training the reference classifier" not in capsys.readouterr().err  # read from the cache
    for key in ("fid", "fid_floor", "precision", "recall", "label_fidelity", "cas", "cas_real"):
        assert first[key] == second[key], key
    assert json.loads((zoo / "mnist/cdcgan/card.json").read_text()) == card  # write_card=False leaves it alone
    assert "augmentation" not in first
    _verify_manifest(zoo)


def test_onnx_generator_contract(zoo):
    gen = ev.OnnxGenerator(zoo / "mnist/cdcgan")
    labels = ev.balanced_labels(10, 10)
    a = gen(10, labels, seed=0, batch_size=4)
    assert a.dtype == torch.uint8 and a.shape == (10, 1, 28, 28)
    assert torch.equal(a, gen(10, labels, seed=0, batch_size=4))
    with pytest.raises(ValueError):
        gen(10, None, seed=0)


def test_onnx_generator_at_a_temperature_scales_the_noise_as_the_service_does(zoo):
    labels = torch.tensor([3, 3, 3, 5])
    default = ev.OnnxGenerator(zoo / "mnist/cdcgan")(4, labels, seed=0)
    assert torch.equal(ev.OnnxGenerator(zoo / "mnist/cdcgan", temperature=1.0)(4, labels, seed=0), default)
    centre = ev.OnnxGenerator(zoo / "mnist/cdcgan", temperature=0.0)(4, labels, seed=0)
    assert torch.equal(centre[0], centre[1]) and torch.equal(centre[0], centre[2])  # z = 0: one image per class
    assert not torch.equal(centre, default)


def test_an_evaluation_at_another_temperature_writes_its_own_report_and_leaves_the_card(zoo, data_dir, tmp_path):
    card = (zoo / "mnist/cdcgan/card.json").read_text()
    (_, metrics), = ev.main([str(zoo / "mnist/cdcgan"), "--quick", "--no-augmentation", "--temperature", "0.5",
                             "--data-dir", str(data_dir), "--classifier-dir", str(tmp_path / "c"),
                             "--report-dir", str(tmp_path / "eval")])
    assert (zoo / "mnist/cdcgan/card.json").read_text() == card
    report = json.loads((tmp_path / "eval" / "mnist__cdcgan.t0.5.json").read_text())
    assert report["settings"]["temperature"] == 0.5 and report["metrics"]["fid"] == metrics["fid"]
    ev.run([zoo / "mnist/cdcgan"], ev.Settings.quick_mode(augmentation=False, temperature=0.5), data_dir=data_dir,
           classifier_dir=tmp_path / "c", report_dir=None, memorisation_only=True)  # write_card left at its default
    assert (zoo / "mnist/cdcgan/card.json").read_text() == card
    with pytest.raises(SystemExit):
        ev.main([str(zoo / "mnist/cdcgan"), "--quick", "--temperature", "2.5"])
    for sizes in (["--seeds", "3"], ["--n-generated", "500"], ["--n-synthetic", "100"]):
        with pytest.raises(SystemExit):  # --quick would silently use its own sizes
            ev.main([str(zoo / "mnist/cdcgan"), "--quick", *sizes])


@pytest.mark.parametrize("given, expected", [("1%,10%,100%", (0.01, 0.1, 1.0)), ("0.25, 1", (0.25, 1.0))])
def test_fractions_are_numbers_or_percentages(given, expected):
    assert ev.build_parser().parse_args(["x", "--fractions", given]).fractions == expected


@pytest.mark.parametrize("given, message", [("0,2", "fractions must be in (0, 1]"), ("half", "numbers or percentages")])
def test_bad_fractions_are_a_usage_error_naming_the_rule(given, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["x", "--fractions", given])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("flag, given, message", [
    ("--seeds", "0", "must be at least 1, not 0"),  # once: CAS written as NaN into the card
    ("--n-generated", "2", "must be at least 4, not 2"),  # once: a traceback from the k-nearest-neighbour radii
    ("--synthetic-share", "3", "must be at least 0 and at most 1, not 3"),  # once: all-synthetic batches of 768
    ("--threads", "0", "must be at least 1, not 0"),
    ("--classifier-epochs", "0", "must be above 0, not 0"),
    ("--classifier-epochs", "nan", "must be above 0, not nan"),
    ("--n-synthetic", "many", "an integer is needed, not 'many'"),
])
def test_out_of_range_sizes_are_a_usage_error_naming_the_flag(flag, given, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["x", flag, given])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument {flag}: {message}" in err and "Traceback" not in err


def test_all_skips_models_whose_data_is_missing(zoo, data_dir, tmp_path, capsys):
    only_mnist = tmp_path / "data"
    shutil.copytree(data_dir / "MNIST", only_mnist / "MNIST")
    with pytest.raises(SystemExit, match="2 model"):
        ev.main(["--all", "--exported-dir", str(zoo), "--quick", "--no-augmentation", "--data-dir", str(only_mnist),
                 "--classifier-dir", str(tmp_path / "classifiers"), "--report-dir", str(tmp_path / "eval")])
    out = capsys.readouterr().out
    assert "skipped" in out and "mnist/cdcgan" in out
    assert "fid" in json.loads((zoo / "mnist/cdcgan/card.json").read_text())["metrics"]
    _verify_manifest(zoo)


def test_a_medmnist_file_with_a_broken_val_split_is_an_error_not_a_quiet_switch_to_test(zoo, data_dir, tmp_path):
    from training.data import DataFormatError

    with np.load(data_dir / "medmnist" / "pneumoniamnist.npz") as official:
        arrays = {k: official[k] for k in official.files if k != "val_labels"}
    (tmp_path / "data" / "medmnist").mkdir(parents=True)
    np.savez(tmp_path / "data" / "medmnist" / "pneumoniamnist.npz", **arrays)
    with pytest.raises(DataFormatError, match="no 'val_images' and 'val_labels' arrays"):
        ev.run([zoo / "pneumoniamnist/cvae"], ev.Settings.quick_mode(augmentation=False), data_dir=tmp_path / "data",
               classifier_dir=tmp_path / "c", report_dir=None, write_card=False)


def test_prior_label_mix(zoo, data_dir, tmp_path):
    settings = ev.Settings.quick_mode(label_mix="prior", augmentation=False)
    (_, m), = ev.run([zoo / "pneumoniamnist/cvae"], settings, data_dir=data_dir, classifier_dir=tmp_path / "c",
                     report_dir=None, write_card=False)
    assert m["details"]["cas"]["label_mix"] == "prior" and 0 <= m["label_fidelity"] <= 1


# -- Inception FID (optional; the real weights file is the user's) ------------------------------------------------

@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A weights file of the FID Inception's exact structure, with random values (He init keeps the features' scale)."""
    from training.inception_fid import FIDInception

    torch.manual_seed(0)
    network = FIDInception().net
    for conv in network.modules():
        if isinstance(conv, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(conv.weight)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(network.state_dict(), path)
    return path


def test_our_fid_inception_gives_pytorch_fids_features_on_the_same_weights(inception_weights, monkeypatch):
    import pytorch_fid.inception as pytorch_fid
    from training.inception_fid import inception_features, load_fid_inception

    state = torch.load(inception_weights, weights_only=True)
    monkeypatch.setattr(pytorch_fid, "load_state_dict_from_url", lambda *args, **kwargs: state)  # no download
    theirs = pytorch_fid.InceptionV3([3]).eval()
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = inception_features(load_fid_inception(inception_weights), images)
    with torch.no_grad():
        expected = theirs(images.float().div(255).expand(-1, 3, -1, -1))[0].flatten(1).double()
    assert ours.shape == (3, 2048)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_a_missing_or_wrong_inception_weights_file_is_named_before_any_work(data_dir, tmp_path, capsys):
    from training.inception_fid import load_fid_inception

    with pytest.raises(FileNotFoundError, match="--inception-weights: no file at .*pt_inception"):
        load_fid_inception(tmp_path / "missing.pth")
    wrong = tmp_path / "classifier.pth"
    torch.save(ev.Classifier(1, 28, 10).state_dict(), wrong)
    with pytest.raises(ValueError, match="is not the FID Inception weights"):
        load_fid_inception(wrong)
    for weights in (tmp_path / "missing.pth", wrong):
        with pytest.raises(SystemExit) as stop:
            ev.main(["--all", "--quick", "--data-dir", str(data_dir), "--inception-weights", str(weights)])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and "--inception-weights" in err and "Traceback" not in err


@pytest.mark.slow
def test_inception_fid_is_reported_with_its_floor_and_the_real_features_are_cached(zoo, data_dir, tmp_path, inception_weights):
    settings = ev.Settings.quick_mode(augmentation=False, n_generated=16, inception_weights=str(inception_weights))
    kwargs = dict(data_dir=data_dir, classifier_dir=tmp_path / "classifiers", report_dir=None, write_card=False)
    (_, first), = ev.run([zoo / "mnist/cdcgan"], settings, **kwargs)
    assert first["inception_fid"] > 0 and first["inception_fid_floor"] > 0
    about = first["protocol"]["inception_fid"]
    assert about["weights"] == "pt_inception-random.pth" and about["n_test"] == 32 and about["n_generated"] == 16
    assert (tmp_path / "classifiers" / "quick" / "mnist.inception.pt").exists()
    (_, second), = ev.run([zoo / "mnist/cdcgan"], settings, **kwargs)
    assert (second["inception_fid"], second["inception_fid_floor"]) == (first["inception_fid"], first["inception_fid_floor"])
