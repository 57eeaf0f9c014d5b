"""The model families by id: which networks each builds and which objective trains them.

Ids are used everywhere (CLI, `exported/<dataset>/<model>/`, the API):
    mlp_gan, mlp_vae, conv_vae (beta-VAE with --beta), dcgan, cvae, cdcgan, wgan_gp, cwgan_gp,
    cmlp_gan, cmlp_vae
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .gan import DCGANDiscriminator, DCGANGenerator, MLPDiscriminator, MLPGenerator, init_dcgan_weights
from .vae import ConvVAE, MLPVAE


@dataclass(frozen=True)
class ModelFamily:
    id: str
    objective: str  # "vae", "gan" or "wgan_gp": the loop in training/objectives.py that trains it
    conditional: bool
    latent_dim: int  # default
    description: str


MODEL_FAMILIES = {
    f.id: f
    for f in [
        ModelFamily("mlp_gan", "gan", False, 100, "MLP GAN: 100-128-256-512-1024-784 generator, 784-512-256-1 discriminator"),
        ModelFamily("mlp_vae", "vae", False, 20, "MLP VAE: 784-400-(20, 20) encoder, 20-400-784 sigmoid decoder"),
        ModelFamily("conv_vae", "vae", False, 20, "Convolutional VAE (beta-VAE when beta != 1)"),
        ModelFamily("cvae", "vae", True, 20, "Class-conditional convolutional VAE"),
        ModelFamily("dcgan", "gan", False, 100, "DCGAN: transposed-conv generator, strided-conv discriminator"),
        ModelFamily("cdcgan", "gan", True, 100, "Class-conditional DCGAN"),
        ModelFamily("wgan_gp", "wgan_gp", False, 100, "DCGAN generator trained against a critic with WGAN-GP"),
        ModelFamily("cwgan_gp", "wgan_gp", True, 100, "Class-conditional WGAN-GP (DCGAN architecture)"),
        ModelFamily("cmlp_gan", "gan", True, 100, "Class-conditional MLP GAN (Mirza & Osindero 2014): the label's "
                    "embedding concatenated to z and to the discriminator's input"),
        ModelFamily("cmlp_vae", "vae", True, 20, "Class-conditional MLP VAE: the label's embedding concatenated to "
                    "the encoder's input and to z"),
    ]
}


def build_model(model: str, image_shape, num_classes: int, latent_dim: int, width: int,
                class_head: bool = False, twin_head: bool = False,
                disc_width: int | None = None, class_norm: bool = False,
                embed_dim: int = 50, encoder: bool = False) -> tuple[nn.Module, nn.Module | None]:
    """(generator or VAE, discriminator or critic or None) for a family, a data shape and its class count.

    `num_classes` is used only by conditional families. `width` is ngf/ndf for GANs and the first
    conv width for the conv VAEs (ignored by the MLP families, whose widths are the reference ones).
    `class_head` gives the (conditional DCGAN) discriminator an auxiliary classifier (`--aux-classifier`),
    `twin_head` its TAC-GAN twin (`--twin-classifier`). `disc_width` is the DCGAN discriminator's ndf when it
    differs from the generator's (`--disc-width`; None = width): only the generator is exported, so a wider
    discriminator costs training time, not bytes in `exported/`. `class_norm` makes the (conditional DCGAN)
    generator's batch norms class-conditional (`--class-norm`). `embed_dim` is the size of the conditional DCGAN
    generator's label embedding (`--embed-dim`): its first layer has (latent_dim + embed_dim) x 16 x 4 ngf weights
    for 28x28, most of the generator, so a smaller embedding leaves bytes for width. `encoder` gives the (BCE)
    DCGAN discriminator a `LatentEncoder` of the generator's z (`--reconstruction`).
    """
    if model not in MODEL_FAMILIES:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODEL_FAMILIES)}")
    family = MODEL_FAMILIES[model]
    k = num_classes if family.conditional else 0
    if model in ("mlp_gan", "cmlp_gan"):
        return MLPGenerator(latent_dim, image_shape, num_classes=k), MLPDiscriminator(image_shape, num_classes=k)
    if model in ("mlp_vae", "cmlp_vae"):
        return MLPVAE(latent_dim, image_shape, num_classes=k), None
    if model in ("conv_vae", "cvae"):
        return ConvVAE(latent_dim, image_shape, width, num_classes=k), None
    norm = "none" if family.objective == "wgan_gp" else "batch"
    generator = DCGANGenerator(latent_dim, image_shape, width, num_classes=k, embed_dim=embed_dim, class_norm=class_norm)
    discriminator = DCGANDiscriminator(image_shape, disc_width or width, num_classes=k, norm=norm, minibatch_std=norm == "batch",
                                       class_head=class_head, twin_head=twin_head,
                                       encoder_latent_dim=latent_dim if encoder else 0)
    generator.apply(init_dcgan_weights)
    discriminator.apply(init_dcgan_weights)
    return generator, discriminator
