"""Promises of export: every family exports to TorchScript and single-file ONNX that match eager within 1e-5."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import train_tiny
from training.export import PARITY_ATOL, export_run, inference_module, store_weights_in_float16
from training.manifest import FAMILY_PREFERENCE, sha256_of
from training.models import MODEL_FAMILIES, build_model
from training.sampling import noise_dim
from training.train import load_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*official file", "ignore::FutureWarning")
DATASET_FOR = {"cdcgan": "bloodmnist_64", "conv_vae": "breastmnist_64", "cwgan_gp": "retinamnist"}


# Every family with its defaults, and the conditional DCGAN generators with class-conditional batch norm.
# and the VAEs sampling through a fitted mixture prior (one per class for the conditional VAE).
EXPORT_CASES = [(model_id, {}) for model_id in MODEL_FAMILIES] + [
    ("cdcgan", {"class_norm": True}), ("cwgan_gp", {"class_norm": True}),
    ("mlp_vae", {"prior_components": 3}), ("cvae", {"prior_components": 2})]
CASE_IDS = [m + "".join(f"-{k}" for k in o) for m, o in EXPORT_CASES]


def eager_module_and_inputs(run, n: int):
    """The run's exported graph in eager PyTorch, and n fresh inputs for it (labels cycle through the classes)."""
    model, _ = load_checkpoint(run)
    z = torch.randn(n, noise_dim(model))
    return inference_module(model), ((z, torch.arange(n) % model.num_classes) if model.num_classes else (z,))


def run_onnx(path, inputs) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (images,) = session.run(None, {name: t.numpy() for name, t in zip(["z", "labels"], inputs)})
    return images


@pytest.mark.parametrize("model_id,overrides", EXPORT_CASES, ids=CASE_IDS)
def test_exported_onnx_and_torchscript_match_eager_within_1e_5(model_id, overrides, data_dir, tmp_path):
    dataset = DATASET_FOR.get(model_id, "mnist")
    run = train_tiny(data_dir, tmp_path / "run", dataset, model_id, steps=2, **overrides)
    out = export_run(run, tmp_path / "exported")
    card = json.loads((out / "card.json").read_text())
    assert card["dataset"] == dataset and card["model"] == model_id
    assert card["conditional"] == MODEL_FAMILIES[model_id].conditional
    assert max(card["parity_max_abs_error"].values()) <= PARITY_ATOL

    # A fresh batch size (the batch axis is dynamic), against eager, independently of export's own check.
    module, inputs = eager_module_and_inputs(run, n=5)
    with torch.inference_mode():
        eager = module(*inputs).numpy()
    images = run_onnx(out / "generator.onnx", inputs)
    assert images.dtype == np.float32 and images.shape == (5, *card["image_shape"])
    np.testing.assert_allclose(images, eager, atol=PARITY_ATOL, rtol=0)
    assert 0 <= images.min() and images.max() <= 1
    scripted = torch.jit.load(str(out / "generator.pt"))
    np.testing.assert_allclose(scripted(*inputs).detach().numpy(), eager, atol=PARITY_ATOL, rtol=0)


def test_the_card_says_what_data_trained_the_model(data_dir, tmp_path):
    from training.config import TrainConfig
    from training.data import load_dataset
    from training.train import main

    run = main(TrainConfig(dataset="pneumoniamnist", model="cdcgan", epochs=1, batch_size=1000, width=8,
                           data_dir=str(data_dir), out_dir=str(tmp_path / "run")).resolve())
    data = json.loads((export_run(run, tmp_path / "exported") / "card.json").read_text())["training"]["data"]
    real = load_dataset("pneumoniamnist", "train", data_dir)
    assert data["split"] == "train" and data["images"] == len(real) and len(data["sha256"]) == 64
    assert data["class_counts"] == real.labels.bincount(minlength=2).tolist()
    assert data["batch_size"] == len(real)  # fewer images than --batch-size 1000: the batch it really used
    again = train_tiny(data_dir, tmp_path / "again", "pneumoniamnist", "cdcgan", steps=1)
    assert torch.load(again / "checkpoint.pt", weights_only=False)["train_data"]["sha256"] == data["sha256"]


@pytest.mark.parametrize("model_id", ["cdcgan", "conv_vae"])
def test_float16_weights_halve_the_files_and_the_files_match_the_rounded_model(model_id, data_dir, tmp_path):
    dataset = DATASET_FOR.get(model_id, "mnist")
    run = train_tiny(data_dir, tmp_path / "run", dataset, model_id, steps=2)
    full = export_run(run, tmp_path / "float32")
    half = export_run(run, tmp_path / "float16", weights="float16")
    card = json.loads((half / "card.json").read_text())
    assert card["weights"]["storage"] == "float16" and card["weights"]["compute"] == "float32"
    assert json.loads((full / "card.json").read_text())["weights"] == {"storage": "float32", "compute": "float32"}
    scripted = torch.jit.load(str(half / "generator.pt"))
    assert {p.dtype for p in scripted.parameters()} == {torch.float16}
    assert (half / "generator.pt").stat().st_size < (full / "generator.pt").stat().st_size  # (its code is the same few KB)
    # ONNX: the exporter's optimizer folds the casts of small weights back into float32 constants; the large
    # ones, nearly all the bytes of a real model, stay float16.
    large = [t for t in onnx.load(str(half / "generator.onnx")).graph.initializer if np.prod(t.dims) >= 16384]
    assert large and all(t.data_type == onnx.TensorProto.FLOAT16 for t in large)
    assert (half / "generator.onnx").stat().st_size < 0.7 * (full / "generator.onnx").stat().st_size

    module, inputs = eager_module_and_inputs(run, n=5)
    with torch.inference_mode():
        float32 = module(*inputs).numpy()
        store_weights_in_float16(module)
        rounded = module(*inputs).numpy()
    images = run_onnx(half / "generator.onnx", inputs)
    assert images.dtype == np.float32
    np.testing.assert_allclose(images, rounded, atol=PARITY_ATOL, rtol=0)
    np.testing.assert_allclose(scripted(*inputs).detach().numpy(), rounded, atol=PARITY_ATOL, rtol=0)
    # float16 keeps 11 significant bits: the images move by far less than one uint8 level (1/255)
    assert 0 < np.abs(rounded - float32).max() <= card["weights"]["max_abs_output_change"] * 4 + 1e-6
    assert card["weights"]["max_abs_output_change"] < 1 / 255


def test_a_weight_beyond_float16_range_is_refused():
    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight[0, 0] = 1e5
    with pytest.raises(ValueError, match="float16"):
        store_weights_in_float16(layer)


def test_onnx_is_one_file_with_the_documented_contract(exported_dir):
    path = exported_dir / "mnist" / "cdcgan" / "generator.onnx"
    assert not list(path.parent.glob("*.data"))
    graph = onnx.load(str(path)).graph
    inputs = {i.name: i.type.tensor_type for i in graph.input}
    assert list(inputs) == ["z", "labels"]
    assert inputs["z"].elem_type == onnx.TensorProto.FLOAT and inputs["labels"].elem_type == onnx.TensorProto.INT64
    assert inputs["z"].shape.dim[0].dim_param  # dynamic batch axis
    assert [o.name for o in graph.output] == ["images"]


def test_manifest_lists_every_card_with_sha256_and_a_conditional_default(exported_dir):
    manifest = json.loads((exported_dir / "manifest.json").read_text())
    assert manifest["format"] == "synthgen-manifest/1"
    assert {(e["dataset"], e["model"]) for e in manifest["models"]} >= {("mnist", "cdcgan"), ("mnist", "mlp_vae")}
    assert manifest["defaults"]["mnist"] == "cdcgan"  # conditional first
    for entry in manifest["models"]:
        for kind, f in entry["files"].items():
            assert sha256_of(exported_dir / f["path"]) == f["sha256"], kind


def test_the_service_falls_back_on_the_same_family_order_as_the_manifest_and_it_ranks_every_family():
    from service.catalog import FAMILY_PREFERENCE as SERVICE_PREFERENCE  # the service cannot import training/
    assert SERVICE_PREFERENCE == FAMILY_PREFERENCE and sorted(FAMILY_PREFERENCE) == sorted(MODEL_FAMILIES)


@pytest.mark.parametrize("model_dir", ["pneumoniamnist/cvae", "mnist/mlp_vae"])
def test_vae_export_ships_the_decoder_only(exported_dir, model_dir):
    """The shipped parameters are exactly those that decoding uses (found by backpropagating through decode)."""
    card = json.loads((exported_dir / model_dir / "card.json").read_text())
    cfg = card["training"]["config"]
    vae, _ = build_model(cfg["model"], tuple(card["image_shape"]), len(card["classes"]), cfg["latent_dim"], cfg["width"])
    labels = torch.zeros(2, dtype=torch.long) if card["conditional"] else None
    vae.decode(torch.randn(2, cfg["latent_dim"]), labels).sum().backward()
    decoder = {name for name, p in vae.named_parameters() if p.grad is not None}
    scripted = torch.jit.load(str(exported_dir / model_dir / "generator.pt"))
    assert {name.removeprefix("model.") for name, _ in scripted.named_parameters()} == decoder
    assert card["parameters"] == sum(p.numel() for name, p in vae.named_parameters() if name in decoder)


def test_a_re_export_keeps_the_metrics_of_the_same_model_only(data_dir, tmp_path):
    run_a = train_tiny(data_dir, tmp_path / "a", "mnist", "cdcgan", steps=2)
    run_b = train_tiny(data_dir, tmp_path / "b", "mnist", "cdcgan", steps=2, seed=1)  # same steps, other weights
    out = export_run(run_a, tmp_path / "exported")
    card_path = out / "card.json"
    card = json.loads(card_path.read_text())
    card["metrics"] = {"fid": 1.0}  # as training.evaluate writes them
    card_path.write_text(json.dumps(card))
    export_run(run_a, tmp_path / "exported")  # same run again: same ONNX bytes, the metrics still hold
    assert json.loads(card_path.read_text())["metrics"] == {"fid": 1.0}
    export_run(run_b, tmp_path / "exported")  # another model in the same place: they do not
    assert json.loads(card_path.read_text())["metrics"] == {}


def test_an_export_that_fails_its_parity_check_leaves_the_model_already_there_as_it_was(data_dir, tmp_path,
                                                                                          monkeypatch):
    import training.export

    run_a = train_tiny(data_dir, tmp_path / "a", "mnist", "mlp_gan", steps=1)
    run_b = train_tiny(data_dir, tmp_path / "b", "mnist", "mlp_gan", steps=1, seed=1)
    out = export_run(run_a, tmp_path / "exported")
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    def failing_parity(*args):
        raise AssertionError("ONNX Runtime differs from eager by 1e-3")

    monkeypatch.setattr(training.export, "check_parity", failing_parity)
    with pytest.raises(AssertionError, match="differs from eager"):
        export_run(run_b, tmp_path / "exported")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["mlp_gan"]  # no staging folder left
    with pytest.raises(AssertionError, match="differs from eager"):
        export_run(run_b, tmp_path / "first")  # a first export of the dataset: no empty folder left either
    assert not (tmp_path / "first" / "mnist").exists()
