"""Promises of `--self-diagnosing-from` (training/diagnosis.py): real images the discriminator keeps calling real,
the ones the generator under-represents, are drawn more often; the record survives a resume; misuse is refused."""

import pytest
import torch

from training.config import TrainConfig
from training.diagnosis import MAX_RATIO, MIN_SCORE, RealImageDiagnosis

pytestmark = pytest.mark.filterwarnings("ignore:.*official file")


def test_an_image_the_discriminator_keeps_calling_real_is_drawn_more_often_than_one_it_calls_generated():
    diagnosis = RealImageDiagnosis(3, "cpu")
    for _ in range(5):
        diagnosis.record(torch.tensor([0, 1, 2]), torch.tensor([0.3, 0.1, -2.0]))
    order = diagnosis.epoch_order(torch.Generator().manual_seed(0))
    counts = torch.bincount(order, minlength=3)
    assert len(order) == 3 and counts.sum() == 3
    orders = [diagnosis.epoch_order(torch.Generator().manual_seed(s)) for s in range(300)]
    draws = torch.bincount(torch.cat(orders), minlength=3)
    # scores 0.3, 0.1 and 0.01 (clipped; steady logits have no spread): about 0.3, 0.1 and 0.01 in 0.41 of the draws
    assert draws[0] > 2.5 * draws[1] > 0 and draws[2] < 0.05 * draws.sum()


def test_the_weights_are_the_mean_plus_the_spread_of_each_images_logits_clipped_as_in_the_paper():
    diagnosis = RealImageDiagnosis(4, "cpu")
    diagnosis.record(torch.arange(4), torch.tensor([0.2, 0.1, -5.0, 100.0]))
    diagnosis.record(torch.arange(4), torch.tensor([0.2, 0.3, -5.0, 100.0]))
    weights = diagnosis.weights()
    # image 1: mean 0.1 + 0.2 * 0.2 = 0.14, variance 0.8 * (0 + 0.2 * 0.2**2) = 0.0064, so 0.14 + 0.08 = 0.22;
    # image 3 is capped at 50 times the smallest weight, image 2's clipped 0.01
    assert weights[0] == pytest.approx(0.2) and weights[1] == pytest.approx(0.22)
    assert weights[2] == pytest.approx(MIN_SCORE) and weights[3] == pytest.approx(MIN_SCORE * MAX_RATIO)
    assert diagnosis.effective_fraction() < 1


def weights_after_two_epochs(weighting: str, logits: list[float]) -> torch.Tensor:
    diagnosis = RealImageDiagnosis(len(logits), "cpu", weighting=weighting)
    for _ in range(2):
        diagnosis.record(torch.arange(len(logits)), torch.tensor(logits))
    return diagnosis.weights()


def test_ratio_weights_are_the_density_ratio_the_mean_logit_estimates_capped_at_fifty_to_one():
    weights = weights_after_two_epochs("ratio", [1.0, 0.0, -10.0, 800.0])  # 800: exp would overflow float32
    assert torch.isfinite(weights).all() and weights[3] == 1
    assert weights[2] == pytest.approx(1 / MAX_RATIO) and weights[1] == pytest.approx(1 / MAX_RATIO)
    weights = weights_after_two_epochs("ratio", [1.0, 0.0])
    assert weights[0] / weights[1] == pytest.approx(torch.e)


def test_inverse_weights_draw_most_often_the_images_the_discriminator_finds_generated_looking():
    weights = weights_after_two_epochs("inverse", [1.0, 0.0, -800.0, 10.0])
    assert torch.isfinite(weights).all() and weights[2] == 1
    assert weights[3] == pytest.approx(1 / MAX_RATIO) and weights[0] == pytest.approx(1 / MAX_RATIO)
    weights = weights_after_two_epochs("inverse", [1.0, 0.0])
    assert weights[1] / weights[0] == pytest.approx(torch.e)


def test_reweighting_waits_until_every_image_has_been_judged_twice():
    diagnosis = RealImageDiagnosis(3, "cpu")
    diagnosis.record(torch.tensor([0, 1, 2]), torch.zeros(3))
    diagnosis.record(torch.tensor([0, 1]), torch.zeros(2))
    assert not diagnosis.ready()
    diagnosis.record(torch.tensor([2]), torch.zeros(1))
    assert diagnosis.ready()


@pytest.mark.parametrize("weighting", ["paper", "ratio", "inverse"])
def test_a_run_reweights_from_the_epoch_asked_and_a_resume_continues_the_same_record(weighting, data_dir, tmp_path):
    from training.train import main

    def cfg(out, epochs):
        return TrainConfig(dataset="mnist", model="cdcgan", epochs=epochs, batch_size=16, width=8,
                           self_diagnosing_from=3, self_diagnosing_weights=weighting, data_dir=str(data_dir),
                           out_dir=str(out)).resolve()

    main(cfg(tmp_path / "straight", 4))
    main(cfg(tmp_path / "resumed", 2))
    main(cfg(tmp_path / "resumed", 4), resume=True)
    rows = [line for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert ["real_draws_effective_fraction" in row for row in rows] == [False, False, True, True]
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    record = straight["real_image_diagnosis"]
    # 64 tiny images: each judged in both epochs in random order, then 64 draws an epoch with replacement (an image
    # drawn twice into one batch counts once)
    assert (record["seen"] >= 2).all() and 2 * 64 < record["seen"].sum() <= 4 * 64
    for key in record:
        assert torch.equal(record[key], resumed["real_image_diagnosis"][key]), key
    for name, weight in straight["models"]["generator"].items():
        assert torch.equal(weight, resumed["models"]["generator"][name]), name


def test_self_diagnosing_is_refused_without_a_bce_discriminator_and_under_torchrun(monkeypatch):
    from training.cli import UsageError
    from training.train import setup_distributed

    for model in ("cvae", "cwgan_gp"):
        with pytest.raises(ValueError, match="self_diagnosing_from reads a BCE discriminator's logits"):
            TrainConfig(model=model, self_diagnosing_from=5).resolve()
    with pytest.raises(ValueError, match="self_diagnosing_from"):
        TrainConfig(model="cdcgan", self_diagnosing_from=-1).resolve()
    with pytest.raises(ValueError, match="self_diagnosing_weights must be one of paper, ratio, inverse, not 'exp'"):
        TrainConfig(model="cdcgan", self_diagnosing_from=5, self_diagnosing_weights="exp").resolve()
    with pytest.raises(ValueError, match="self_diagnosing_weights picks the weights of self_diagnosing_from, which is off"):
        TrainConfig(model="cdcgan", self_diagnosing_weights="ratio").resolve()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="--self-diagnosing-from trains in one process only"):
        setup_distributed(TrainConfig(model="cdcgan", self_diagnosing_from=5, device="cpu").resolve())
