"""Promises of the one trainer: each objective learns, a run leaves its artifacts, resume is exact, DDP runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_idx_dataset, train_tiny
from training.cli import UsageError
from training.config import TrainConfig
from training.data import load_dataset
from training.models import MODEL_FAMILIES, build_model
from training.models.gan import ClassBatchNorm2d, DCGANGenerator
from training.objectives import build_objective

pytestmark = pytest.mark.filterwarnings("ignore:.*official file")
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model_id, key", [("cvae", "loss"), ("mlp_vae", "loss"), ("cmlp_vae", "loss"), ("cdcgan", "loss_d"),
                                           ("mlp_gan", "loss_d"), ("cmlp_gan", "loss_d"), ("cwgan_gp", "loss_c")])
def test_a_few_steps_of_each_objective_lower_its_loss(model_id, key, data_dir):
    torch.manual_seed(0)
    data = load_dataset("mnist", "train", data_dir)
    cfg = TrainConfig(dataset="mnist", model=model_id, width=8).resolve()
    generator, discriminator = build_model(model_id, data.info.image_shape, 10, cfg.latent_dim, cfg.width)
    objective = build_objective(cfg, torch.device("cpu"), generator, discriminator, MODEL_FAMILIES[model_id].conditional)
    x, y = data.images[:32].float() / 255, data.labels[:32]
    losses = [objective.step(x, y)[key] for _ in range(30)]
    assert sum(losses[-5:]) / 5 < losses[0], losses  # adversarial losses move both ways; below the start they must be


def test_a_step_leaves_its_losses_on_the_device_unread_and_wgan_gp_has_loss_g_only_on_generator_steps(data_dir):
    """Reading a loss (.item()) makes the CPU wait for a GPU: a step returns detached tensors, the trainer reads
    their epoch sums once."""
    torch.manual_seed(0)
    data = load_dataset("mnist", "train", data_dir)
    x, y = data.images[:16].float() / 255, data.labels[:16]
    for model_id in ("cdcgan", "cvae", "cwgan_gp"):
        cfg = TrainConfig(dataset="mnist", model=model_id, width=8, aux_classifier=1.0 if model_id == "cdcgan" else 0.0,
                          n_critic=2 if model_id == "cwgan_gp" else TrainConfig.n_critic).resolve()
        generator, discriminator = build_model(model_id, (1, 28, 28), 10, cfg.latent_dim, cfg.width,
                                               class_head=model_id == "cdcgan")
        objective = build_objective(cfg, torch.device("cpu"), generator, discriminator, True)
        steps = [objective.step(x, y) for _ in range(4)]
        for losses in steps:
            assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in losses.values())
        if model_id == "cwgan_gp":
            assert ["loss_g" in losses for losses in steps] == [False, True, False, True]


def test_the_generator_ema_averages_every_weight_and_copies_the_buffers():
    from training.ema import GeneratorEMA

    torch.manual_seed(0)
    generator = DCGANGenerator(latent_dim=4, image_shape=(1, 28, 28), ngf=4)
    ema = GeneratorEMA(generator, decay=0.5)  # first update: min(0.5, 2 / 11) = 0.18 of the old, 0.82 of the new
    before = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(1.0)
        for b in generator.buffers():
            b.add_(2)
    ema.update(generator)
    decay = 2 / 11
    for old, new, live in zip(before, ema.model.parameters(), generator.parameters()):
        torch.testing.assert_close(new, decay * old + (1 - decay) * live, rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(ema.model.buffers(), generator.buffers()))


def test_a_run_leaves_config_checkpoint_logs_curve_and_samples(data_dir, tmp_path):
    out = train_tiny(data_dir, tmp_path / "run", "pneumoniamnist", "cdcgan", steps=4)
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "cdcgan" and config["lr"] == 2e-4 and config["beta1"] == 0.5
    for name in ("checkpoint.pt", "metrics.csv", "metrics.jsonl", "loss_curve.png", "samples/epoch_001.png"):
        assert (out / name).stat().st_size > 0, name
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["config"] == config and state["step"] == 3 and state["version"]
    assert set(state["models"]) == {"generator", "discriminator"} and set(state["optimizers"]) == {"generator", "discriminator"}


def test_a_run_given_its_data_by_the_environment_records_that_folder(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHGEN_DATA_DIR", str(data_dir))
    out = train_tiny(None, tmp_path / "run", "mnist", "mlp_gan", steps=1)
    assert json.loads((out / "config.json").read_text())["data_dir"] == str(data_dir)


@pytest.mark.parametrize("model", ["wgan_gp", "cdcgan"])
def test_compiled_training_runs_for_a_gan_and_for_wgan_gp_whose_penalty_is_a_double_backward(
        model, data_dir, tmp_path, monkeypatch):
    compile_ = torch.compile  # aot_eager: torch.compile's autograd (what refuses a double backward) without codegen
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compile_(module, backend="aot_eager", **kw))
    out = train_tiny(data_dir, tmp_path / "run", "mnist", model, steps=2, compile=True)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 2


def test_checkpoint_alone_rebuilds_the_model(data_dir, tmp_path):
    from training.train import load_checkpoint

    out = train_tiny(data_dir, tmp_path / "run", "retinamnist", "cvae", steps=2)
    model, state = load_checkpoint(out)
    assert model.image_shape == (3, 28, 28) and model.num_classes == 5 and state["dataset_info"]["id"] == "retinamnist"


def _weights(run: Path) -> dict:
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    return {**state["models"], "generator_ema": state["generator_ema"]["model"]}


def test_a_gan_run_exports_its_generator_ema_and_a_vae_run_its_weights(data_dir, tmp_path):
    from training.train import load_checkpoint

    gan_run = train_tiny(data_dir, tmp_path / "gan", "mnist", "cdcgan", steps=3)
    model, state = load_checkpoint(gan_run)
    ema, live = state["generator_ema"]["model"], state["models"]["generator"]
    assert state["config"]["ema_decay"] == 0.999 and state["generator_ema"]["updates"] == 3
    assert all(torch.equal(model.state_dict()[k].cpu(), ema[k]) for k in ema)
    assert any(not torch.equal(ema[k], live[k]) for k in ema if ema[k].is_floating_point())

    vae_run = train_tiny(data_dir, tmp_path / "vae", "mnist", "cvae", steps=2)
    model, state = load_checkpoint(vae_run)
    assert "generator_ema" not in state and state["config"]["ema_decay"] == 0.0


@pytest.mark.parametrize("aux_classifier, twin, diff_augment", [(0.0, False, ""), (1.0, False, ""), (1.0, True, ""),
                                                                 (1.0, False, "color,translation,cutout")])
def test_resume_gives_the_same_weights_as_one_uninterrupted_run(aux_classifier, twin, diff_augment, data_dir, tmp_path):
    from training.train import main

    def cfg(out, epochs):
        return TrainConfig(dataset="mnist", model="cdcgan", epochs=epochs, batch_size=16, width=8,
                           aux_classifier=aux_classifier, twin_classifier=twin, diff_augment=diff_augment,
                           data_dir=str(data_dir), out_dir=str(out)).resolve()

    main(cfg(tmp_path / "straight", 2))
    main(cfg(tmp_path / "resumed", 1))
    main(cfg(tmp_path / "resumed", 2), resume=True)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for net in a:
        for name in a[net]:
            assert torch.equal(a[net][name], b[net][name]), f"{net}.{name}"


def tiny_cdcgan(**overrides):
    """(generator, discriminator, objective) of a width-8 MNIST cDCGAN, built with what its config asks for: the
    class head (aux_classifier), its twin (twin_classifier), the latent encoder (reconstruction)."""
    cfg = TrainConfig(dataset="mnist", model="cdcgan", width=8, **overrides).resolve()
    generator, discriminator = build_model("cdcgan", (1, 28, 28), 10, cfg.latent_dim, cfg.width,
                                           class_head=cfg.aux_classifier > 0, twin_head=cfg.twin_classifier,
                                           encoder=cfg.reconstruction > 0)
    return generator, discriminator, build_objective(cfg, torch.device("cpu"), generator, discriminator, True)


def tiny_cdcgan_with_both_heads(**overrides):
    """`tiny_cdcgan` with the class head and its twin."""
    return tiny_cdcgan(aux_classifier=1.0, twin_classifier=True, **overrides)


def test_the_aux_classifier_head_learns_the_real_labels_and_steers_the_generator(data_dir):
    torch.manual_seed(0)
    data = load_dataset("mnist", "train", data_dir)
    generator, discriminator, objective = tiny_cdcgan(aux_classifier=1.0, lr=1e-3)
    assert set(objective.optimizers) == {"generator", "discriminator", "class_head"}
    x, y = data.images[:32].float() / 255, data.labels[:32]
    losses = [objective.step(x, y) for _ in range(40)]
    assert losses[-1]["class_loss_real"] < 0.85 * losses[0]["class_loss_real"], losses
    assert losses[-1]["class_loss_fake"] < losses[0]["class_loss_fake"], losses


def test_the_twin_head_learns_the_generated_labels_and_the_generator_plays_against_it(data_dir):
    torch.manual_seed(0)
    data = load_dataset("mnist", "train", data_dir)
    generator, discriminator, objective = tiny_cdcgan_with_both_heads(lr=1e-3)
    assert set(objective.optimizers) == {"generator", "discriminator", "class_head", "twin_head"}
    x, y = data.images[:32].float() / 255, data.labels[:32]
    twin_before = discriminator.twin_classifier.weight.detach().clone()
    losses = [objective.step(x, y) for _ in range(40)]
    assert not torch.equal(twin_before, discriminator.twin_classifier.weight)
    assert losses[-1]["twin_loss_fake"] < losses[0]["twin_loss_fake"], losses  # it reads G's labels

    # G's loss is the AC-GAN one minus the twin head's loss on the same images: the twin pushes G the other way.
    d_gen, classes, twin = torch.randn(8), torch.randn(8, 10), torch.randn(8, 10)
    labels, ce = y[:8], torch.nn.functional.cross_entropy
    expected = torch.nn.functional.binary_cross_entropy_with_logits(d_gen, torch.ones(8)) + ce(classes, labels) - ce(twin, labels)
    assert torch.allclose(objective.generator_loss(d_gen, classes, twin, labels, None, {}), expected)


def test_twin_classifier_needs_the_class_head():
    with pytest.raises(ValueError, match="twin_classifier is the class head's twin: it needs aux_classifier > 0"):
        TrainConfig(model="cdcgan", twin_classifier=True).resolve()
    with pytest.raises(ValueError, match="twin_head needs class_head"):
        build_model("cdcgan", (1, 28, 28), 10, 100, 8, twin_head=True)


def test_a_run_saved_without_a_class_head_resumes_with_one_and_can_drop_it_again(data_dir, tmp_path, capsys):
    from training.train import main

    def cfg(epochs, aux):
        return TrainConfig(dataset="mnist", model="cdcgan", epochs=epochs, batch_size=16, width=8, aux_classifier=aux,
                           data_dir=str(data_dir), out_dir=str(tmp_path / "run")).resolve()

    main(cfg(1, 0.0))
    before = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert not any(k.startswith("classifier.") for k in before["models"]["discriminator"])
    main(cfg(2, 1.0), resume=True)
    after = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert after["epoch"] == 2 and "class_head" in after["optimizers"] and after["config"]["aux_classifier"] == 1.0
    assert before["resumes"] == [] and after["resumes"] == [{"from_epoch": 2, "changed": {"aux_classifier": [0.0, 1.0]}}]
    assert after["models"]["discriminator"]["classifier.weight"].shape == (10, 17, 7, 7)  # ndf 8 * 2 + minibatch std
    capsys.readouterr()
    main(cfg(3, 0.0), resume=True)  # dropping it again: said, and recorded
    assert "does not train the checkpoint's class head (--aux-classifier)" in capsys.readouterr().out
    dropped = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert not any(k.startswith("classifier.") for k in dropped["models"]["discriminator"])
    assert dropped["resumes"][-1] == {"from_epoch": 3, "changed": {"aux_classifier": [1.0, 0.0]}}


def _epochs_logged(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_started_again_keeps_nothing_of_the_run_it_replaces(data_dir, tmp_path):
    from training.train import main

    def cfg(epochs):
        return TrainConfig(dataset="mnist", model="mlp_gan", epochs=epochs, batch_size=16, width=8,
                           data_dir=str(data_dir), out_dir=str(tmp_path / "run")).resolve()

    run = main(cfg(2))
    assert _epochs_logged(run) == [1, 2] and (run / "samples" / "epoch_002.png").exists()
    main(cfg(1))  # what --overwrite runs: not a resume
    assert _epochs_logged(run) == [1]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["epoch_001.png"]
    assert [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()] == ["epoch", "1"]


def test_a_resume_drops_what_a_run_logged_after_its_last_checkpoint(data_dir, tmp_path):
    """A run that stopped after epoch 5 with its checkpoint at 2 resumes from 2: epochs 3-5 of the stopped
    run must not stay beside the resumed run's own (a loss curve that doubles back)."""
    from training.train import main

    def cfg(epochs):
        return TrainConfig(dataset="mnist", model="mlp_gan", epochs=epochs, batch_size=16, width=8,
                           data_dir=str(data_dir), out_dir=str(tmp_path / "run")).resolve()

    run = main(cfg(2))
    with open(run / "metrics.jsonl", "a") as f:  # what the stopped run logged past its checkpoint
        f.writelines(json.dumps({"epoch": e, "step": 99}) + "\n" for e in (3, 4, 5))
    (run / "samples" / "epoch_005.png").write_bytes(b"a grid of the stopped run")
    main(cfg(3), resume=True)
    assert _epochs_logged(run) == [1, 2, 3] and not (run / "samples" / "epoch_005.png").exists()
    with pytest.raises(UsageError, match="at epoch 3, past --epochs 2"):
        main(cfg(2), resume=True)


def test_a_run_saved_with_a_class_head_resumes_with_its_twin(data_dir, tmp_path):
    from training.train import main

    def cfg(epochs, twin):
        return TrainConfig(dataset="mnist", model="cdcgan", epochs=epochs, batch_size=16, width=8, aux_classifier=1.0,
                           twin_classifier=twin, data_dir=str(data_dir), out_dir=str(tmp_path / "run")).resolve()

    main(cfg(1, False))
    main(cfg(2, True), resume=True)
    after = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert {"class_head", "twin_head"} <= set(after["optimizers"]) and after["config"]["twin_classifier"] is True
    assert after["resumes"] == [{"from_epoch": 2, "changed": {"twin_classifier": [False, True]}}]
    assert after["models"]["discriminator"]["twin_classifier.weight"].shape == (10, 17, 7, 7)


def test_reconstruction_trains_a_latent_encoder_with_the_generator_until_g_redraws_real_images(data_dir):
    torch.manual_seed(0)
    data = load_dataset("mnist", "train", data_dir)
    generator, discriminator, objective = tiny_cdcgan(reconstruction=10.0, lr=1e-3)
    assert set(objective.optimizers) == {"generator", "discriminator", "encoder"}
    encoder = {id(p) for p in discriminator.encoder.parameters()}
    body = {id(p) for group in objective.optimizers["discriminator"].param_groups for p in group["params"]}
    assert encoder and not encoder & body  # D's loss never moves the encoder
    x, y = data.images[:32].float() / 255, data.labels[:32]
    before = discriminator.encoder.to_latent.weight.detach().clone()
    losses = [objective.step(x, y) for _ in range(40)]
    assert not torch.equal(before, discriminator.encoder.to_latent.weight)  # it learns in G's step, kept out of `frozen`
    assert losses[-1]["reconstruction_l1"] < 0.7 * losses[0]["reconstruction_l1"], losses
    assert all(torch.isfinite(v) for v in losses[-1].values())
    for model in ("cvae", "mlp_gan", "cwgan_gp"):
        with pytest.raises(ValueError, match="reconstruction .* applies to dcgan and cdcgan"):
            TrainConfig(model=model, reconstruction=1.0).resolve()


@pytest.mark.parametrize("flag, setting", [("reconstruction", 5.0), ("r1", 1.0)])
def test_single_process_options_are_refused_under_torchrun_before_joining_the_process_group(flag, setting,
                                                                                           monkeypatch):
    from training.cli import UsageError
    from training.train import setup_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match=f"--{flag} trains in one process only"):
        setup_distributed(TrainConfig(model="cdcgan", device="cpu", **{flag: setting}).resolve())


def test_r1_steps_d_every_16_steps_on_its_gradient_at_real_images_and_lowers_it(data_dir):
    from training.objectives import R1_EVERY

    torch.manual_seed(0)
    data = load_dataset("mnist", "train", data_dir)
    x, y = data.images[:32].float() / 255, data.labels[:32]
    generator, discriminator, objective = tiny_cdcgan_with_both_heads(r1=10.0)
    logged = [i for i in range(1, 2 * R1_EVERY + 1) if "r1_grad_sq" in objective.step(x, y)]
    assert logged == [R1_EVERY, 2 * R1_EVERY]

    def grad_sq() -> float:
        real = (x * 2 - 1).requires_grad_(True)
        (grad,) = torch.autograd.grad(discriminator(real, y).sum(), real)
        return grad.pow(2).flatten(1).sum(1).mean().item()

    heads = [p.detach().clone() for p in discriminator.classifier.parameters()]
    before = grad_sq()
    objective.r1_step(x * 2 - 1, y, {})
    assert grad_sq() < before  # what the penalty asks of D's body
    assert all(torch.equal(a, b) for a, b in zip(heads, discriminator.classifier.parameters()))  # heads untouched
    for model in ("cvae", "cwgan_gp"):
        with pytest.raises(ValueError, match="r1 penalises a BCE discriminator"):
            TrainConfig(model=model, r1=1.0).resolve()
    _, _, plain = tiny_cdcgan_with_both_heads()
    assert not any("r1_grad_sq" in plain.step(x, y) for _ in range(R1_EVERY))


def test_a_run_saved_without_a_latent_encoder_resumes_with_one(data_dir, tmp_path):
    from training.train import main

    def cfg(epochs, reconstruction):
        return TrainConfig(dataset="mnist", model="cdcgan", epochs=epochs, batch_size=16, width=8,
                           reconstruction=reconstruction, data_dir=str(data_dir), out_dir=str(tmp_path / "run")).resolve()

    main(cfg(1, 0.0))
    main(cfg(2, 5.0), resume=True)
    after = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert "encoder" in after["optimizers"] and after["resumes"] == [{"from_epoch": 2, "changed": {"reconstruction": [0.0, 5.0]}}]
    assert after["models"]["discriminator"]["encoder.to_latent.weight"].shape == (2 * 100, 16 * 7 * 7 + 10)


SAME_DATA = {"sha256": "0" * 64, "images": 64, "processes": 1}  # what the checkpoints below were trained on too


def test_a_resume_records_changed_settings_only_and_not_fields_newer_than_the_checkpoint():
    from training.train import _record_resume

    cfg = TrainConfig(model="cdcgan", epochs=80).resolve()
    old = {k: v for k, v in cfg.to_dict().items() if k != "aux_classifier"}  # saved before the field existed
    assert _record_resume({"config": {**old, "epochs": 60}}, cfg, 61, "fp32", SAME_DATA) == []
    cfg.lr = 1e-4
    resumed_before = {"config": old, "resumes": [{"from_epoch": 5, "changed": {}}]}
    assert _record_resume(resumed_before, cfg, 61, "fp32", SAME_DATA) == [
        {"from_epoch": 5, "changed": {}}, {"from_epoch": 61, "changed": {"lr": [2e-4, 1e-4]}}]


def test_a_resume_on_other_data_is_recorded(data_dir, tmp_path):
    """Resuming with another file of the dataset once left the checkpoint describing the second file alone,
    so the card said the whole model was trained on it."""
    from training.train import main

    other = tmp_path / "other-data"
    make_idx_dataset(other, "MNIST", n_train=48, seed=5)
    run = dict(dataset="mnist", model="cdcgan", batch_size=16, width=8, out_dir=str(tmp_path / "run"))
    main(TrainConfig(epochs=1, data_dir=str(data_dir), **run).resolve())
    first = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["train_data"]
    main(TrainConfig(epochs=2, data_dir=str(other), **run).resolve(), resume=True)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    changed = state["resumes"][0]["changed"]
    assert state["resumes"][0]["from_epoch"] == 2 and first["processes"] == 1
    assert changed["train_data.images"] == [64, 48] and changed["train_data.sha256"][0] == first["sha256"]


def test_a_run_stopped_inside_an_epoch_by_max_steps_is_not_resumed_past_the_rest_of_it(data_dir, tmp_path):
    """A resume starts at the next epoch: it once skipped the rest of the stopped one (5 steps against 6)."""
    from training.cli import UsageError
    from training.train import main

    run = tmp_path / "run"
    train_tiny(data_dir, run, "mnist", "cdcgan", steps=2)  # 64 images in batches of 16: 2 of the epoch's 4 steps
    with pytest.raises(UsageError, match="stopped inside epoch 1 .*--max-steps"):
        main(TrainConfig(dataset="mnist", model="cdcgan", epochs=2, batch_size=16, width=8, data_dir=str(data_dir),
                         out_dir=str(run)).resolve(), resume=True)


def test_an_out_dir_that_is_a_file_and_a_prior_larger_than_its_codes_are_usage_errors(data_dir, tmp_path):
    from training.cli import UsageError
    from training.train import main

    (tmp_path / "taken").write_text("")
    with pytest.raises(UsageError, match="a file is there"):
        train_tiny(data_dir, tmp_path / "taken", "mnist", "cdcgan")
    with pytest.raises(UsageError, match=r"--prior-components 100000: a mixture can have at most \d+ components"):
        main(TrainConfig(dataset="mnist", model="cvae", epochs=1, width=8, prior_components=100_000,
                         data_dir=str(data_dir), out_dir=str(tmp_path / "run")).resolve())  # before training


def test_the_learning_rate_is_constant_then_decays_linearly_over_the_last_epochs(data_dir, tmp_path):
    from training.train import learning_rate, main

    cfg = TrainConfig(model="cdcgan", epochs=5, lr_decay_epochs=2).resolve()
    assert [learning_rate(cfg, e) / cfg.lr for e in range(1, 6)] == pytest.approx([1, 1, 1, 2 / 3, 1 / 3])
    assert {learning_rate(TrainConfig(model="cdcgan", epochs=5).resolve(), e) for e in range(1, 6)} == {2e-4}
    run = TrainConfig(dataset="mnist", model="cdcgan", epochs=3, lr_decay_epochs=2, batch_size=16, width=8,
                      aux_classifier=1.0, data_dir=str(data_dir), out_dir=str(tmp_path / "run")).resolve()
    main(run)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] / run.lr for r in rows] == pytest.approx([1, 2 / 3, 1 / 3])
    optimizers = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["optimizers"]
    assert [g["lr"] for opt in optimizers.values() for g in opt["param_groups"]] == pytest.approx([run.lr / 3] * 3)


def test_lr_decay_epochs_must_leave_an_epoch_at_the_full_rate():
    with pytest.raises(ValueError, match=r"lr_decay_epochs must be in \[0, epochs\)"):
        TrainConfig(epochs=10, lr_decay_epochs=10).resolve()


def test_a_resume_that_moves_the_end_of_a_decaying_schedule_is_recorded():
    from training.train import _record_resume

    decaying = TrainConfig(model="cdcgan", epochs=60, lr_decay_epochs=10).resolve()
    constant = {**decaying.to_dict(), "epochs": 80, "lr_decay_epochs": 0}
    assert _record_resume({"config": constant}, decaying, 51, "fp32", SAME_DATA) == [
        {"from_epoch": 51, "changed": {"epochs": [80, 60], "lr_decay_epochs": [0, 10]}}]
    assert _record_resume({"config": {**decaying.to_dict(), "epochs": 70}}, decaying, 51, "fp32", SAME_DATA) == [
        {"from_epoch": 51, "changed": {"epochs": [70, 60]}}]


def test_a_resume_in_another_precision_is_recorded():
    from training.train import _record_resume

    cfg = TrainConfig(model="cdcgan").resolve()
    saved = {"config": cfg.to_dict(), "precision": "fp32"}
    assert _record_resume(saved, cfg, 11, "bf16", SAME_DATA) == [
        {"from_epoch": 11, "changed": {"precision": ["fp32", "bf16"]}}]
    assert _record_resume(saved, cfg, 11, "fp32", SAME_DATA) == []
    assert _record_resume({"config": cfg.to_dict()}, cfg, 11, "bf16", SAME_DATA) == []  # older checkpoint: precision unknown


def test_bf16_autocast_is_used_only_where_asked_and_native(data_dir, tmp_path):
    from training.objectives import cpu_has_bf16, training_precision

    cpu = torch.device("cpu")
    assert training_precision(TrainConfig(amp=False).resolve(), cpu) == "fp32"
    assert training_precision(TrainConfig(amp=True).resolve(), cpu) == ("bf16" if cpu_has_bf16() else "fp32")
    assert training_precision(TrainConfig(amp=True).resolve(), torch.device("cuda")) == "bf16"
    out = train_tiny(data_dir, tmp_path / "run", "mnist", "cdcgan", steps=2)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["precision"] == training_precision(TrainConfig.from_dict(state["config"]), cpu)


def test_diff_augment_is_validated_and_refused_where_no_discriminator_uses_it():
    assert TrainConfig(model="cdcgan", diff_augment="cutout, translation").resolve().diff_augment == "translation,cutout"
    with pytest.raises(ValueError, match="unknown diff_augment policy rotate; known: color, translation, cutout"):
        TrainConfig(model="cdcgan", diff_augment="rotate").resolve()
    for model_id in ("cvae", "wgan_gp"):
        with pytest.raises(ValueError, match="diff_augment applies to the GANs trained with BCE"):
            TrainConfig(model=model_id, diff_augment="cutout").resolve()


def test_disc_width_widens_the_discriminator_alone_so_the_exported_generator_keeps_its_size():
    narrow_g, narrow_d = build_model("cdcgan", (1, 28, 28), 10, 100, 8)
    wide_g, wide_d = build_model("cdcgan", (1, 28, 28), 10, 100, 8, disc_width=16)
    assert [p.shape for p in wide_g.parameters()] == [p.shape for p in narrow_g.parameters()]
    assert wide_d.features[0].out_channels == 16 and narrow_d.features[0].out_channels == 8
    assert TrainConfig(model="cdcgan", width=8).resolve().disc_width == 8  # default: the generator's width
    assert TrainConfig(model="wgan_gp", width=8, disc_width=24).resolve().disc_width == 24
    assert TrainConfig(model="mlp_gan").resolve().disc_width is None
    for model_id in ("mlp_gan", "cvae"):
        with pytest.raises(ValueError, match="disc_width applies to the DCGAN families"):
            TrainConfig(model=model_id, disc_width=64).resolve()


def test_embed_dim_sizes_the_conditional_generators_label_embedding_and_its_checkpoint_rebuilds_it(data_dir,
                                                                                                     tmp_path):
    from training.train import load_checkpoint, main

    g, _ = build_model("cdcgan", (1, 28, 28), 10, 64, 8, embed_dim=10)
    assert g.label_embedding.embed.weight.shape == (10, 10) and g.net[0].weight.shape[0] == 64 + 10
    for model_id in ("dcgan", "cvae", "mlp_gan"):
        with pytest.raises(ValueError, match="embed_dim applies to the conditional DCGAN generators"):
            TrainConfig(model=model_id, embed_dim=10).resolve()
    out = train_tiny(data_dir, tmp_path / "run", "mnist", "cdcgan", steps=2, latent_dim=16, embed_dim=10)
    generator, _ = load_checkpoint(out)
    assert generator.label_embedding.embed.weight.shape == (10, 10) and generator.net[0].weight.shape[0] == 26
    cfg = TrainConfig(dataset="mnist", model="cdcgan", epochs=2, batch_size=16, width=8, latent_dim=16,
                      data_dir=str(data_dir), out_dir=str(out)).resolve()
    with pytest.raises(ValueError, match="--embed-dim 10"):
        main(cfg, resume=True)


def test_a_resume_that_would_change_the_weight_shapes_is_refused_naming_the_flag(data_dir, tmp_path):
    from training.train import main

    out = train_tiny(data_dir, tmp_path / "run", "mnist", "cdcgan", steps=2, disc_width=16)
    assert json.loads((out / "config.json").read_text())["disc_width"] == 16
    cfg = TrainConfig(dataset="mnist", model="cdcgan", epochs=2, batch_size=16, width=8, data_dir=str(data_dir),
                      out_dir=str(out)).resolve()
    with pytest.raises(ValueError, match="trained with --disc-width 16, not 8; resume with --disc-width 16"):
        main(cfg, resume=True)
    cfg.disc_width, cfg.width = 16, 16
    with pytest.raises(ValueError, match="trained with --width 8, not 16"):
        main(cfg, resume=True)


def test_class_norm_gives_each_class_its_own_batch_norm_scale_and_shift():
    plain, _ = build_model("cdcgan", (1, 28, 28), 10, 100, 8)
    generator, _ = build_model("cdcgan", (1, 28, 28), 10, 100, 8, class_norm=True)
    norms = [m for m in generator.modules() if isinstance(m, ClassBatchNorm2d)]
    assert len(norms) == len([m for m in plain.modules() if isinstance(m, nn.BatchNorm2d)]) == 3
    z, labels = torch.randn(2, 100), torch.tensor([3, 4])
    generator.eval()
    with torch.no_grad():
        before = generator(z, labels)
        norms[-1].shift.weight[3] += 1.0  # class 3's shift at the last norm: only class 3's images move
        after = generator(z, labels)
    assert not torch.allclose(before[0], after[0]) and torch.equal(before[1], after[1])
    for model_id in ("dcgan", "cvae", "mlp_gan"):
        with pytest.raises(ValueError, match="class_norm applies to the conditional DCGAN generators"):
            TrainConfig(model=model_id, class_norm=True).resolve()
    with pytest.raises(ValueError, match="class_norm needs a conditional generator"):
        DCGANGenerator(num_classes=0, class_norm=True)


def test_a_resume_that_would_add_or_drop_class_norm_is_refused_naming_the_flag(data_dir, tmp_path):
    from training.train import main

    out = train_tiny(data_dir, tmp_path / "run", "mnist", "cdcgan", steps=2, class_norm=True)
    cfg = TrainConfig(dataset="mnist", model="cdcgan", epochs=2, batch_size=16, width=8, data_dir=str(data_dir),
                      out_dir=str(out)).resolve()
    with pytest.raises(ValueError, match="trained with --class-norm, not --no-class-norm; resume with --class-norm"):
        main(cfg, resume=True)


def test_in_batch_mode_seeking_pairs_the_batch_halves_by_label_and_runs_the_generator_once_per_step(data_dir):
    from training.objectives import in_batch_pairs, paired_labels

    for n in (7, 8):  # the odd row out of an odd batch is in no pair
        labels = torch.arange(n)
        paired = paired_labels(labels)
        first = n - n // 2
        assert torch.equal(paired[:first], labels[:first]) and torch.equal(paired[first:], labels[:n // 2])
        fake, fake2, z, z2 = in_batch_pairs(paired.float()[:, None], paired.float()[:, None])
        assert torch.equal(fake, fake2) and len(fake) == n // 2  # each pair: one label, two rows

    data = load_dataset("mnist", "train", data_dir)
    x, y = data.images[:16].float() / 255, data.labels[:16]
    for in_batch, generator_calls in ((False, 2), (True, 1)):
        torch.manual_seed(0)
        generator, _, objective = tiny_cdcgan_with_both_heads(mode_seeking_in_batch=in_batch)
        asked = []
        generator.register_forward_hook(lambda module, args, out: asked.append(args[1].clone()))
        losses = objective.step(x, y)
        assert len(asked) == generator_calls and all(torch.isfinite(v) for v in losses.values())
        assert torch.equal(asked[0], paired_labels(y) if in_batch else y)


def test_class_grouped_std_gives_each_minibatch_std_group_one_label_and_d_outputs_in_the_batchs_order(data_dir):
    from training.models.gan import class_grouped_order

    labels = torch.tensor([3, 1, 0, 1, 3, 0, 1, 3, 0, 1, 3, 0])
    order = class_grouped_order(labels, 4)
    assert sorted(order.tolist()) == list(range(12))
    groups = labels[order].view(4, -1).t()  # MinibatchStd's groups: rows i, i + N/4, i + N/2, i + 3N/4
    assert [set(g.tolist()) for g in groups] == [{0}, {1}, {3}]
    assert class_grouped_order(labels[:10], 4) is None  # 10 rows do not split into groups of 4

    data = load_dataset("mnist", "train", data_dir)
    x, y = data.images[:16].float() * 2 / 255 - 1, data.labels[:16]
    _, discriminator, objective = tiny_cdcgan_with_both_heads(class_grouped_std=True, mode_seeking_in_batch=True)
    seen = []
    discriminator.register_forward_hook(lambda module, args, out: seen.append(args[1].clone()))
    outputs = objective._discriminate(x, y)
    grouped = class_grouped_order(y, 4)
    assert torch.equal(seen[0], y[grouped])  # D judged the rows grouped by label
    restore = torch.argsort(grouped)
    for output, expected in zip(outputs, discriminator(x[grouped], y[grouped], with_classes=True)):
        torch.testing.assert_close(output, expected[restore])  # each row's outputs back in the batch's order
    losses = objective.step(x, y)
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="class_grouped_std .* applies to cdcgan"):
        TrainConfig(model="dcgan", class_grouped_std=True).resolve()


def test_in_batch_mode_seeking_is_refused_where_there_is_no_mode_seeking_term():
    for overrides in (dict(model="cvae"), dict(model="cwgan_gp"), dict(model="cdcgan", mode_seeking=0.0),
                      dict(model="dcgan")):
        with pytest.raises(ValueError, match="mode_seeking_in_batch pairs the images of the mode-seeking term"):
            TrainConfig(mode_seeking_in_batch=True, **overrides).resolve()
    assert TrainConfig(model="cwgan_gp").resolve().mode_seeking == 0.0  # its objective has no such term
    assert TrainConfig(model="cdcgan").resolve().mode_seeking == 0.25


def test_the_mode_seeking_term_takes_a_second_generator_pass_unless_in_batch_pairs_are_asked_for():
    """The second pass trained every shipped cDCGAN; in-batch pairs measured worse FID on two of the four datasets compared."""
    from training.train import parse_args

    assert TrainConfig(model="cdcgan").resolve().mode_seeking_in_batch is False
    assert parse_args(["--model", "cdcgan"])[0].mode_seeking_in_batch is False
    assert parse_args(["--model", "cdcgan", "--mode-seeking-in-batch"])[0].mode_seeking_in_batch is True


@pytest.mark.parametrize("model_id", ["cdcgan", "cwgan_gp"])
def test_the_generator_step_skips_the_discriminators_weight_gradients_and_trains_the_same_weights(model_id, data_dir,
                                                                                                  monkeypatch):
    import contextlib

    import training.objectives as objectives

    data = load_dataset("mnist", "train", data_dir)
    x, y = data.images[:16].float() / 255, data.labels[:16]
    frozen = objectives.frozen
    trained = {}
    for name, freeze in (("frozen", frozen), ("textbook", lambda module, keep=None: contextlib.nullcontext())):
        monkeypatch.setattr(objectives, "frozen", freeze)
        torch.manual_seed(0)
        cfg = TrainConfig(dataset="mnist", model=model_id, width=8, amp=False,
                          **(dict(aux_classifier=1.0, twin_classifier=True) if model_id == "cdcgan" else dict(n_critic=1))
                          ).resolve()
        generator, discriminator = build_model(model_id, (1, 28, 28), 10, cfg.latent_dim, cfg.width,
                                               class_head=cfg.aux_classifier > 0, twin_head=cfg.twin_classifier)
        objective = build_objective(cfg, torch.device("cpu"), generator, discriminator, True)
        calls = []
        discriminator.register_forward_hook(lambda module, args, out: calls.append(
            all(p.requires_grad for p in module.parameters())))
        for _ in range(2):
            objective.step(x, y)
        trained[name] = {**generator.state_dict(), **{f"D.{k}": v for k, v in discriminator.state_dict().items()}}
        assert all(p.requires_grad for p in discriminator.parameters())  # given back after each generator step
        if name == "frozen":
            assert False in calls and True in calls  # out of autograd in the generator's step only
    assert all(torch.equal(trained["frozen"][k], trained["textbook"][k]) for k in trained["frozen"])


def test_aux_classifier_is_refused_for_models_without_a_class_head():
    with pytest.raises(ValueError, match="aux_classifier applies to the conditional DCGAN"):
        TrainConfig(model="cvae", aux_classifier=1.0).resolve()


def test_resume_without_checkpoint_says_where_it_looked_and_what_to_do(data_dir, tmp_path):
    from training.cli import UsageError
    from training.train import main

    cfg = TrainConfig(dataset="mnist", model="mlp_vae", data_dir=str(data_dir), out_dir=str(tmp_path)).resolve()
    with pytest.raises(UsageError, match=r"no checkpoint at .*checkpoint.pt; train without --resume"):
        main(cfg, resume=True)


@pytest.mark.slow
@pytest.mark.parametrize("model_id", ["dcgan", "cwgan_gp"])
def test_torchrun_with_two_cpu_processes_trains_in_sync(model_id, data_dir, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "training.train",
           "--dataset", "mnist", "--model", model_id, "--epochs", "2", "--batch-size", "8", "--width", "8",
           "--data-dir", str(data_dir), "--out-dir", str(out)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["step"] == 2 * (64 // 2 // 8)  # each process takes half of each epoch
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 2


def test_cli_rejects_unknown_ids_with_the_known_ones(capsys):
    from training.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--dataset", "cifar10"])
    assert "unknown dataset 'cifar10'; known: mnist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--model", "gpt"])
    assert "--model: invalid choice: 'gpt' (choose from 'mlp_gan', 'mlp_vae'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--epoch", "3"])  # an abbreviation is not taken for --epochs
    assert "unrecognized arguments: --epoch 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--batch-size", "0"])
    assert "batch_size (--batch-size) must be at least 1, not 0" in capsys.readouterr().err


@pytest.mark.parametrize("flags, says", [
    (["--lr", "-1"], "lr (--lr) must be a positive number"), (["--lr", "nan"], "lr (--lr) must be a positive number"),
    (["--latent-dim", "0"], "latent_dim (--latent-dim) must be at least 1"),
    (["--model", "wgan_gp", "--n-critic", "0"], "n_critic (--n-critic) must be at least 1"),
    (["--max-steps", "0"], "max_steps (--max-steps) must be at least 1"),
    (["--ema-decay", "2"], "ema_decay (--ema-decay) must be in [0, 1)"),
    (["--label-smoothing", "1.5"], "label_smoothing (--label-smoothing) must be in [0, 1)"),
    (["--model", "conv_vae", "--beta", "-1"], "beta (--beta) (the VAE's KL weight) must be a positive number"),
    (["--device", "tpu"], "device (--device) must be auto, cpu, cuda or cuda:N, not 'tpu'"),
    (["--disc-width", "0"], "disc_width (--disc-width) must be at least 1"),
    (["--device", "mps"], "device (--device) must be auto, cpu, cuda or cuda:N, not 'mps'"),
    (["--aux-classifier", "-1"], "aux_classifier (--aux-classifier) must be a number >= 0"),
    (["--model", "cvae", "--label-smoothing", "0.2"], "label_smoothing (--label-smoothing) applies to the GANs trained"),
    (["--model", "cvae", "--mode-seeking", "3"], "mode_seeking (--mode-seeking) applies to the GANs trained"),
    (["--model", "dcgan", "--n-critic", "2"], "n_critic (--n-critic) applies to WGAN-GP"),
    (["--model", "cvae", "--gp-weight", "5"], "gp_weight (--gp-weight) applies to WGAN-GP"),
    (["--model", "dcgan", "--beta", "4"], "beta (--beta) is the VAEs' KL weight"),
])
def test_cli_refuses_numbers_that_cannot_train_naming_the_flag(capsys, flags, says, tmp_path):
    from training.train import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args([*flags, "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and says in err and "Traceback" not in err


def test_cli_never_overwrites_a_run_without_resume_or_overwrite(capsys, tmp_path):
    from training.train import parse_args

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"a run's weights")
    with pytest.raises(SystemExit):
        parse_args(["--out-dir", str(run)])
    assert "checkpoint.pt exists: --resume continues that run, --overwrite starts it again" in capsys.readouterr().err
    assert parse_args(["--out-dir", str(run), "--resume"])[1] is True
    assert parse_args(["--out-dir", str(run), "--overwrite"])[1] is False
    with pytest.raises(SystemExit):
        parse_args(["--out-dir", str(run), "--resume", "--overwrite"])
    assert (run / "checkpoint.pt").read_bytes() == b"a run's weights"  # parsing never touches it


def test_cli_help_gives_each_flag_the_meaning_written_in_the_config(capsys):
    from training.train import field_comments, parse_args

    comments = field_comments()
    assert comments["lr"].startswith("Adam learning rate") and comments["out_dir"] == "default: runs/<dataset>/<model>"
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Adam learning rate (GAN 2e-4, VAE 1e-3, WGAN-GP 1e-4)" in text and "known: mnist, fashion_mnist" in text
    assert "ndf of the DCGAN discriminator / critic alone (None = width)" in text


def test_a_resume_on_another_dataset_is_refused(data_dir, tmp_path):
    from training.cli import UsageError
    from training.train import main

    out = train_tiny(data_dir, tmp_path / "run", "mnist", "cdcgan", steps=2)
    cfg = TrainConfig(dataset="fashion_mnist", model="cdcgan", epochs=2, batch_size=16, width=8, latent_dim=16,
                      data_dir=str(data_dir), out_dir=str(out)).resolve()
    with pytest.raises(UsageError, match="trained with --dataset mnist, not fashion_mnist; resume with --dataset mnist"):
        main(cfg, resume=True)


def test_a_training_split_of_one_image_is_a_clear_error(tmp_path):
    import numpy as np

    from training.train import main

    arrays = {f"{s}_{k}": np.zeros((1, 28, 28, 3), np.uint8) if k == "images" else np.zeros((1, 1), np.uint8)
              for s in ("train", "val", "test") for k in ("images", "labels")}
    np.savez(tmp_path / "bloodmnist.npz", **arrays)
    cfg = TrainConfig(dataset="bloodmnist", model="mlp_gan", epochs=1, batch_size=16, width=8, data_dir=str(tmp_path),
                      out_dir=str(tmp_path / "run")).resolve()
    with pytest.raises(UsageError, match="1 training image\\(s\\) per process; training needs batches of at least 2"):
        main(cfg)


def test_an_export_never_replaces_an_exported_model_without_overwrite(data_dir, tmp_path):
    run = train_tiny(data_dir, tmp_path / "run", "mnist", "mlp_gan", steps=1)

    def export(*flags):
        return subprocess.run([sys.executable, "-m", "training.export", str(run), "--out", str(tmp_path / "out"), *flags],
                              cwd=REPO, capture_output=True, text=True, timeout=300)

    assert export().returncode == 0
    card = tmp_path / "out" / "mnist" / "mlp_gan" / "card.json"
    before = card.read_text()
    again = export()
    assert again.returncode == 2 and "holds an exported model; --overwrite replaces it" in again.stderr
    assert card.read_text() == before and "Traceback" not in again.stderr
    assert export("--overwrite").returncode == 0
    (tmp_path / "afile").write_text("")
    not_a_folder = subprocess.run([sys.executable, "-m", "training.export", str(run), "--out", str(tmp_path / "afile")],
                                  cwd=REPO, capture_output=True, text=True, timeout=300)
    assert not_a_folder.returncode == 2 and "is a file, not a folder" in not_a_folder.stderr
    twin = train_tiny(data_dir, tmp_path / "twin", "mnist", "mlp_gan", steps=1)
    both = subprocess.run([sys.executable, "-m", "training.export", str(run), str(twin), "--out", str(tmp_path / "two"),
                           "--overwrite"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert both.returncode == 2 and "would both export to" in both.stderr and not (tmp_path / "two").exists()


def test_the_training_commands_end_a_users_mistake_in_one_line_without_a_traceback(tmp_path, capsys):
    from training import evaluate

    done = subprocess.run([sys.executable, "-m", "training.export", str(tmp_path / "nope")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"error: {tmp_path / 'nope'}: no checkpoint.pt; a training run folder " \
                                  "(runs/<dataset>/<model>, or --out-dir of python -m training.train) holds one"
    with pytest.raises(SystemExit):
        evaluate.main([str(tmp_path)])  # a run folder, or any folder without a card
    assert "no card.json; evaluate takes exported model folders" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--all", "--exported-dir", str(tmp_path / "none")])
    assert "--all: no manifest.json in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["x", "--fractions", "10pct"])
    assert "fractions are numbers or percentages separated by commas" in capsys.readouterr().err
