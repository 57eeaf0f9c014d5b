"""Promises of a mixture of exported models (training/mixture.py): each image is its picked member's image,
members are picked at their shares, the files match eager within 1e-5, rows stay independent for the
service, and a mixture that cannot work is refused naming the flag. Also the rebuild of an exported model
from its own files (`training.export --from-exported`), which stores a shipped model another way."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from scipy.stats import norm

from conftest import train_tiny
from training.cli import UsageError
from training.export import PARITY_ATOL, export_model, export_run, rebuild_from_exported
from training.mixture import export_mixture, picker_thresholds

pytestmark = pytest.mark.filterwarnings("ignore:.*official file", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def members_root(tmp_path_factory, data_dir):
    """exported/pneumoniamnist/{cdcgan, cvae}: a GAN (latent 100) and a VAE with a fitted prior (latent 20 + 1)."""
    runs, root = tmp_path_factory.mktemp("mix-runs"), tmp_path_factory.mktemp("mix-exported")
    export_run(train_tiny(data_dir, runs / "cdcgan", "pneumoniamnist", "cdcgan", steps=2), root)
    export_run(train_tiny(data_dir, runs / "cvae", "pneumoniamnist", "cvae", steps=2, prior_components=2), root, "float16")
    return root


@pytest.fixture(scope="module")
def mixture(members_root):
    dirs = [members_root / "pneumoniamnist" / m for m in ("cdcgan", "cvae")]
    out = export_mixture(dirs, [0.3, 0.7], [1.0, 1.3], "mixture", members_root)
    return out, json.loads((out / "card.json").read_text())


def run_onnx(path, z, labels) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"z": z, "labels": labels})[0]


def test_every_image_is_its_picked_members_image_for_the_same_noise(members_root, mixture):
    out, card = mixture
    rng = np.random.default_rng(0)
    z = rng.standard_normal((300, card["latent_dim"])).astype(np.float32)
    labels = rng.integers(0, 2, 300)
    images = run_onnx(out / "generator.onnx", z, labels)
    members = card["mixture"]["members"]
    assert card["latent_dim"] == 1 + max(m["latent_dim"] for m in members) == 101
    # The documented rule: thresholds at the standard normal quantiles of the cumulative shares, in card order.
    thresholds = norm.ppf(np.cumsum([m["share"] for m in members])[:-1]).astype(np.float32)
    picked = (z[:, :1] > thresholds).sum(1)
    for k, member in enumerate(members):
        rows = picked == k
        own = run_onnx(members_root / "pneumoniamnist" / member["model"] / "generator.onnx",
                       z[rows, 1:1 + member["latent_dim"]] * np.float32(member["noise_scale"]), labels[rows])
        np.testing.assert_allclose(images[rows], own, atol=1e-6, rtol=0)
    assert 0.6 < np.mean([members[k]["model"] == "cvae" for k in picked]) < 0.8  # cvae's share, 0.7
    assert 0 < (picked == 0).sum() < 300


def test_members_are_picked_at_their_shares_with_the_largest_in_the_middle():
    order, thresholds = picker_thresholds([0.2, 0.5, 0.3])
    assert order == [2, 1, 0] or order == [0, 1, 2]
    shares = np.diff(norm.cdf([-np.inf, *thresholds, np.inf]))
    np.testing.assert_allclose(shares, [[0.2, 0.5, 0.3][i] for i in order], atol=1e-9)
    assert thresholds[0] < 0 < thresholds[1]  # zero noise (temperature 0) picks the largest share


def test_the_mixture_files_match_eager_and_each_other_within_1e_5(mixture):
    out, card = mixture
    assert max(card["parity_max_abs_error"].values()) <= PARITY_ATOL
    z, labels = torch.randn(7, card["latent_dim"]), torch.arange(7) % 2
    scripted = torch.jit.load(str(out / "generator.pt"))
    with torch.no_grad():
        ts = scripted(z, labels).numpy()
    np.testing.assert_allclose(run_onnx(out / "generator.onnx", z.numpy(), labels.numpy()), ts, atol=PARITY_ATOL, rtol=0)
    for n in (1, 2):  # a batch where some member gets no rows
        assert run_onnx(out / "generator.onnx", z[:n].numpy(), labels[:n].numpy()).shape == (n, 1, 28, 28)


def test_the_card_records_each_member_and_the_file_it_was_built_from(members_root, mixture):
    _, card = mixture
    for member in card["mixture"]["members"]:
        member_card = json.loads((members_root / "pneumoniamnist" / member["model"] / "card.json").read_text())
        assert member["onnx_sha256"] == member_card["sha256"]["onnx"]
        assert member["torchscript_sha256"] == member_card["sha256"]["torchscript"]
    assert {m["model"]: (m["share"], m["noise_scale"]) for m in card["mixture"]["members"]} == {
        "cdcgan": (0.3, 1.0), "cvae": (0.7, 1.3)}
    assert card["weights"]["storage"] == "mixed"
    assert dict(zip(card["training"]["mixture_of"], card["weights"]["members"])) == {"cdcgan": "float32", "cvae": "float16"}
    assert card["training"]["mixture_of"] == [m["model"] for m in card["mixture"]["members"]]
    assert len(card["training"]["epochs"]) == 2
    assert card["conditional"] and card["classes"] == ["normal", "pneumonia"] and card["metrics"] == {}
    manifest = json.loads((members_root / "manifest.json").read_text())
    assert ("pneumoniamnist", "mixture") in {(m["dataset"], m["model"]) for m in manifest["models"]}


def test_the_service_serves_a_mixture_and_its_row_parts_give_the_bytes_of_one_call(members_root, mixture):
    from service.backends import load_runner
    from service.catalog import load_catalog
    from service.sampling import latents

    entry = load_catalog(members_root).entries[("pneumoniamnist", "mixture")]
    assert entry.ok, entry.error
    assert entry.card.weight_storage == "mixed" and entry.card.latent_dim == 101
    z, labels = latents(3, 150, entry.card.latent_dim), np.arange(150, dtype=np.int64) % 2
    one_call = load_runner(entry, "onnxruntime", threads=2, part_rows=0)
    in_parts = load_runner(entry, "onnxruntime", threads=2, part_rows=32)
    assert one_call.row_independent
    assert one_call.run(z, labels).tobytes() == in_parts.run(z, labels).tobytes()
    ts_entry = load_catalog(members_root, "torchscript").entries[("pneumoniamnist", "mixture")]
    scripted = load_runner(ts_entry, "torchscript", threads=1, device="cpu")
    np.testing.assert_allclose(scripted.run(z, labels), one_call.run(z, labels), atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(shares=[0.5, 0.6]), "--shares"),
    (dict(shares=[0.5]), "one value per member"),
    (dict(scales=[1.0, 0.0]), "--noise-scales"),
    (dict(name="cvae"), "overwrite a member"),
    (dict(name="../x"), "--name"),
    (dict(other_dataset=True), "disagree on dataset"),
    (dict(members=["cdcgan"]), "at least two"),
    (dict(members=["cdcgan", "mixture"]), "itself a mixture"),
])
def test_a_mixture_that_cannot_work_is_refused_naming_the_flag(members_root, mixture, exported_dir, change, message):
    members = change.get("members", ["cdcgan", "cvae"])
    dirs = [members_root / "pneumoniamnist" / m for m in members]
    if change.get("other_dataset"):
        dirs[0] = exported_dir / "mnist" / "cdcgan"
    shares = change.get("shares", [0.5] * len(dirs))
    with pytest.raises(UsageError, match=message):
        export_mixture(dirs, shares, change.get("scales", [1.0] * len(shares)), change.get("name", "mixture"), members_root)


def test_the_cli_never_replaces_an_exported_mixture_without_overwrite(members_root, mixture, capsys):
    from training.mixture import main

    out, _ = mixture
    card_before = (out / "card.json").read_bytes()
    dirs = [str(members_root / "pneumoniamnist" / m) for m in ("cdcgan", "cvae")]
    with pytest.raises(SystemExit) as stop:
        main([*dirs, "--shares", "0.5", "0.5", "--out", str(members_root)])
    assert stop.value.code == 2 and "--overwrite replaces it" in capsys.readouterr().err
    assert (out / "card.json").read_bytes() == card_before


def test_a_model_rebuilt_from_its_exported_files_exports_the_same_model(data_dir, tmp_path):
    run = train_tiny(data_dir, tmp_path / "run", "mnist", "mlp_vae", steps=2, prior_components=2)
    original = export_run(run, tmp_path / "a")
    model, state = rebuild_from_exported(original)
    again = export_model(model, state, tmp_path / "b")
    z = np.random.default_rng(0).standard_normal((9, 21)).astype(np.float32)
    outputs = [ort.InferenceSession(str(d / "generator.onnx")).run(None, {"z": z})[0] for d in (original, again)]
    assert np.array_equal(*outputs)
    cards = [json.loads((d / "card.json").read_text()) for d in (original, again)]
    assert cards[0]["training"] == cards[1]["training"] and cards[0]["latent_prior"] == cards[1]["latent_prior"]

    half = export_model(*rebuild_from_exported(original), tmp_path / "c", "float16")
    assert (half / "generator.onnx").stat().st_size < 0.7 * (original / "generator.onnx").stat().st_size
    with pytest.raises(UsageError, match="only float32 files"):
        rebuild_from_exported(half)
    shutil.copy(half / "generator.pt", original / "generator.pt")
    with pytest.raises(UsageError, match="sha256"):
        rebuild_from_exported(original)


def test_zoo_export_composes_each_mixture_from_its_exported_members(members_root, tmp_path, monkeypatch, capsys):
    from training import zoo

    root = tmp_path / "exported"
    shutil.copytree(members_root, root)
    shutil.rmtree(root / "pneumoniamnist" / "mixture", ignore_errors=True)  # composed by another test, if any
    monkeypatch.setattr(zoo, "MIXTURES", [zoo.ZooMixture("pneumoniamnist", (("cdcgan", 0.4, 1.0), ("cvae", 0.6, 1.2)))])
    monkeypatch.setattr("sys.argv", ["zoo", "export", "--runs", str(tmp_path / "runs"), "--out", str(root),
                                     "--only", "pneumoniamnist/mixture"])
    zoo.main()
    assert "pneumoniamnist/mixture: composed" in capsys.readouterr().out
    card = json.loads((root / "pneumoniamnist" / "mixture" / "card.json").read_text())
    assert {m["model"]: (m["share"], m["noise_scale"]) for m in card["mixture"]["members"]} == {
        "cdcgan": (0.4, 1.0), "cvae": (0.6, 1.2)}

    shutil.rmtree(root / "pneumoniamnist" / "cvae")
    zoo.main()  # a member that is not exported: said, and nothing composed
    assert "members not exported" in capsys.readouterr().out
