"""Promises of the VAEs' fitted latent prior: the mixture draws its components at their weights, EM finds a known
mixture, a run fits (or refits, or drops) it after training, and the export and card carry it."""

import json

import pytest
import torch

from conftest import train_tiny
from training.config import TrainConfig
from training.export import export_run
from training.latent_prior import fit_gaussian_mixture, middle_out_order, mixture_prior
from training.models.prior import MixturePrior
from training.sampling import noise_dim
from training.train import load_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*official file")


def two_blobs(n: int, generator: torch.Generator) -> torch.Tensor:
    """n points of 0.3 N((-4, 0), 0.25 I) + 0.7 N((3, 1), diag(1, 0.04)), in that order."""
    a = torch.randn(int(0.3 * n), 2, generator=generator, dtype=torch.float64) * 0.5 + torch.tensor([-4.0, 0.0])
    b = torch.randn(n - len(a), 2, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 0.2]) + torch.tensor([3.0, 1.0])
    return torch.cat([a, b])


def test_em_recovers_the_weights_means_and_covariances_of_a_known_mixture():
    g = torch.Generator().manual_seed(0)
    fit = fit_gaussian_mixture(two_blobs(20_000, g), 2, g)
    order = fit["means"][:, 0].argsort()
    weights, means = fit["weights"][order], fit["means"][order]
    covs = fit["chol"][order] @ fit["chol"][order].transpose(1, 2)
    torch.testing.assert_close(weights, torch.tensor([0.3, 0.7], dtype=torch.float64), atol=0.01, rtol=0)
    torch.testing.assert_close(means, torch.tensor([[-4.0, 0.0], [3.0, 1.0]], dtype=torch.float64), atol=0.05, rtol=0)
    torch.testing.assert_close(covs.diagonal(dim1=1, dim2=2), torch.tensor([[0.25, 0.25], [1.0, 0.04]], dtype=torch.float64),
                               atol=0.05, rtol=0)


def test_the_prior_draws_each_component_at_its_weight_and_from_its_gaussian():
    g = torch.Generator().manual_seed(1)
    prior = mixture_prior([fit_gaussian_mixture(two_blobs(20_000, g), 2, g)])
    assert prior.noise_dim == 3 and prior.latent_dim == 2
    z = prior(torch.randn(50_000, 3, generator=g))
    left = z[:, 0] < -0.5
    assert abs(float(left.double().mean()) - 0.3) < 0.01
    torch.testing.assert_close(z[left].mean(0), torch.tensor([-4.0, 0.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(z[~left].std(0), torch.tensor([1.0, 0.2]), atol=0.05, rtol=0)


def test_zero_noise_gives_the_mean_of_the_heaviest_component():
    """Temperature 0 in the service: every image the same, the centre of the commonest component."""
    weights = torch.tensor([0.1, 0.5, 0.15, 0.25])
    assert middle_out_order(weights).tolist() == [0, 3, 1, 2]  # 0.1, 0.25, 0.5, 0.15: heaviest in the middle
    means = torch.arange(4.0)[:, None].repeat(1, 2)
    fit = {"weights": weights, "means": means, "chol": torch.eye(2).repeat(4, 1, 1)}
    prior = mixture_prior([fit])
    assert prior(torch.zeros(1, 3)).tolist() == [[1.0, 1.0]]


def test_a_per_class_prior_draws_from_the_mixture_of_the_requested_class():
    means = torch.tensor([[[0.0]], [[10.0]], [[-10.0]]])  # 3 classes, 1 component, 1 dimension
    prior = MixturePrior(torch.zeros(3, 0), means, torch.full((3, 1, 1, 1), 0.01))
    z = prior(torch.randn(6, 1), torch.tensor([0, 1, 2, 2, 1, 0]))
    torch.testing.assert_close(z.squeeze(1), torch.tensor([0.0, 10.0, -10.0, -10.0, 10.0, 0.0]), atol=0.1, rtol=0)


def test_mismatched_prior_shapes_are_refused():
    with pytest.raises(ValueError, match="shapes disagree"):
        MixturePrior(torch.zeros(1, 2), torch.zeros(1, 2, 4), torch.zeros(1, 2, 4, 4))


def test_prior_components_is_for_vaes_only():
    with pytest.raises(ValueError, match="prior_components"):
        TrainConfig(dataset="mnist", model="dcgan", prior_components=10).resolve()
    with pytest.raises(ValueError, match="prior_components"):
        TrainConfig(dataset="mnist", model="mlp_vae", prior_components=-1).resolve()


def test_a_vae_run_fits_its_prior_and_the_export_samples_through_it(data_dir, tmp_path):
    run = train_tiny(data_dir, tmp_path / "run", "mnist", "mlp_vae", steps=2, prior_components=3)
    model, state = load_checkpoint(run)
    report = state["latent_prior"]["report"]
    assert report["components"] == 3 and report["epoch"] == state["epoch"] and report["codes"] >= 4_000
    assert model.prior is not None and noise_dim(model) == model.latent_dim + 1 == 21
    assert report["log_likelihood_per_code"] > report["log_likelihood_per_code_standard_normal"]
    assert (run / "samples" / f"epoch_{state['epoch']:03d}_prior.png").stat().st_size > 0

    card = json.loads((export_run(run, tmp_path / "exported") / "card.json").read_text())
    assert card["latent_dim"] == 21 and card["latent_prior"] == report


def test_a_resume_at_the_same_epoch_refits_or_drops_the_prior_and_leaves_the_weights(data_dir, tmp_path):
    from training.train import main

    run = train_tiny(data_dir, tmp_path / "run", "retinamnist", "cvae", steps=2)
    weights = torch.load(run / "checkpoint.pt", weights_only=False)["models"]["generator"]
    assert "latent_prior" not in torch.load(run / "checkpoint.pt", weights_only=False)

    def resume(components: int) -> dict:
        cfg = TrainConfig(**{**json.loads((run / "config.json").read_text()), "prior_components": components})
        main(cfg.resolve(), resume=True)
        return torch.load(run / "checkpoint.pt", weights_only=False)

    state = resume(2)
    assert state["latent_prior"]["report"]["per_class"] and state["latent_prior"]["state"]["means"].shape == (5, 2, 20)
    assert all(torch.equal(state["models"]["generator"][k], weights[k]) for k in weights)
    assert state["config"]["prior_components"] == 2
    assert "latent_prior" not in resume(0)
