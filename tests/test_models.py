"""Every model family builds for 28x28 and 64x64, 1 and 3 channels, with the shapes the objectives and export rely on."""

import pytest
import torch

from training.models import MODEL_FAMILIES, build_model
from training.models.gan import MinibatchStd

SHAPES = [(1, 28, 28), (3, 28, 28), (1, 64, 64), (3, 64, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("model_id", MODEL_FAMILIES)
def test_generator_and_discriminator_shapes(model_id, shape):
    family = MODEL_FAMILIES[model_id]
    torch.manual_seed(0)
    generator, discriminator = build_model(model_id, shape, 5, family.latent_dim, 8)
    n = 4
    labels = torch.arange(n) % 5 if family.conditional else None
    z = torch.randn(n, family.latent_dim)
    with torch.no_grad():
        images = generator.generate(z, labels)
    assert images.shape == (n, *shape)
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    assert generator.latent_dim == family.latent_dim
    assert generator.num_classes == (5 if family.conditional else 0)
    if family.objective == "vae":
        recon, mu, logvar = generator(torch.rand(n, *shape), labels)
        assert recon.shape == (n, *shape) and mu.shape == logvar.shape == (n, family.latent_dim)
        assert discriminator is None
    else:
        assert discriminator(images * 2 - 1, labels).shape == (n,)


def test_mlp_gan_has_the_reference_widths():
    generator, discriminator = build_model("mlp_gan", (1, 28, 28), 10, 100, 32)
    widths = [m.out_features for m in generator.net if isinstance(m, torch.nn.Linear)]
    assert widths == [128, 256, 512, 1024, 784]
    assert [m.out_features for m in discriminator.net if isinstance(m, torch.nn.Linear)] == [512, 256, 1]


def test_mlp_vae_has_the_reference_widths():
    vae, _ = build_model("mlp_vae", (1, 28, 28), 10, 20, 32)
    assert (vae.encoder[0].in_features, vae.encoder[0].out_features, vae.to_mu.out_features) == (784, 400, 20)
    assert [m.out_features for m in vae.decoder if isinstance(m, torch.nn.Linear)] == [400, 784]


@pytest.mark.parametrize("model_id", [m for m, family in MODEL_FAMILIES.items() if family.conditional])
def test_conditional_models_follow_their_labels(model_id):
    torch.manual_seed(0)
    latent_dim = MODEL_FAMILIES[model_id].latent_dim
    generator, _ = build_model(model_id, (1, 28, 28), 10, latent_dim, 8)
    generator.eval()
    z = torch.randn(1, latent_dim).repeat(2, 1)
    a, b = generator.generate(z, torch.tensor([0, 1]))
    assert not torch.equal(a, b)
    with pytest.raises(AssertionError, match="needs labels"):
        generator.generate(z)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: mlp_gan, mlp_vae, conv_vae"):
        build_model("vqvae", (1, 28, 28), 10, 20, 8)


def test_dcgan_rejects_unsupported_sizes():
    with pytest.raises(ValueError, match="sizes 28 and 64"):
        build_model("dcgan", (1, 32, 32), 10, 100, 8)


@pytest.mark.parametrize("n", [50, 126, 127, 64])
def test_minibatch_std_measures_the_batch_whatever_its_size(n):
    """A batch that does not split into groups of 4 once got the constant 1e-4: no signal of a collapse."""
    torch.manual_seed(0)
    x = torch.randn(n, 8, 7, 7)
    feature = MinibatchStd(group=4)(x)[:, -1, 0, 0]  # (N,) each row's group spread
    assert float(feature.min()) > 0.5  # unit-variance features: a spread near 1, not 1e-4
    collapsed = x[:1].repeat(n, 1, 1, 1)
    assert float(MinibatchStd(group=4)(collapsed)[:, -1].max()) < 1e-3  # and it still sees a collapse
