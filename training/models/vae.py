"""VAE networks: the MLP VAE and the convolutional VAE / beta-VAE, unconditional or class-conditional.

`forward(x, labels)` returns (reconstruction in [0, 1], mu, logvar): what the ELBO in
`training/objectives.py` needs. `generate(noise, labels)` is the decoder alone, the exported contract: the
noise is z itself, or, once a mixture prior has been fitted after training (`prior`, see `prior.py`), the
standard normal noise that the prior turns into z (`noise_dim` wide).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .gan import LabelEmbedding, _upsampling_plan
from .prior import MixturePrior


class DecoderNoise:
    """What the two VAEs share about their decoder's input: N(0, I) codes, or a fitted prior's noise.
    `prior` (set in each __init__, None until `training/latent_prior.py` fits one) is a registered submodule."""

    @property
    def noise_dim(self) -> int:
        return self.prior.noise_dim if self.prior is not None else self.latent_dim

    def generate(self, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images (N, C, H, W) in [0, 1] from standard normal noise (N, noise_dim): the sampler and the export."""
        return self.decode(self.prior(noise, labels) if self.prior is not None else noise, labels)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


class MLPVAE(DecoderNoise, nn.Module):
    """784 -> 400 -> (mu, logvar) of 20; decoder 20 -> 400 -> 784, sigmoid (the PyTorch examples VAE)."""

    encoder_modules = ("encoder", "to_mu", "to_logvar")  # dropped from the exported decoder

    def __init__(self, latent_dim: int = 20, image_shape=(1, 28, 28), hidden: int = 400, num_classes: int = 0):
        super().__init__()
        self.latent_dim, self.image_shape, self.num_classes = latent_dim, tuple(image_shape), num_classes
        self.prior: MixturePrior | None = None
        pixels = math.prod(image_shape)
        self.label_embedding = LabelEmbedding(num_classes, num_classes)
        self.encoder = nn.Sequential(nn.Linear(pixels + num_classes, hidden), nn.ReLU(True))
        self.to_mu, self.to_logvar = nn.Linear(hidden, latent_dim), nn.Linear(hidden, latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim + num_classes, hidden), nn.ReLU(True), nn.Linear(hidden, pixels), nn.Sigmoid()
        )

    def _with_label(self, h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        y = self.label_embedding(labels)
        return h if y is None else torch.cat([h, y], 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        h = self.encoder(self._with_label(x.flatten(1), labels))
        mu, logvar = self.to_mu(h), self.to_logvar(h)  # (N, latent_dim) each
        return self.decode(reparameterize(mu, logvar), labels), mu, logvar

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(self._with_label(z, labels)).view(-1, *self.image_shape)  # (N, C, H, W) in [0, 1]


class ConvVAE(DecoderNoise, nn.Module):
    """Conv encoder (stride-2 Conv2d + ReLU) and transposed-conv decoder; beta lives in the objective.

    28x28: 28 -> 14 -> 7 and back through 7 -> 14 -> 28; 64x64: 64 -> 32 -> 16 -> 8 -> 4 and back.
    Conditional (the CVAE): the label embedding is stacked as an input plane for the encoder and
    concatenated to z for the decoder.
    """

    encoder_modules = ("encoder", "to_mu", "to_logvar", "enc_label")  # dropped from the exported decoder

    def __init__(self, latent_dim: int = 20, image_shape=(1, 28, 28), width: int = 32, num_classes: int = 0):
        super().__init__()
        self.latent_dim, self.image_shape, self.num_classes = latent_dim, tuple(image_shape), num_classes
        self.prior: MixturePrior | None = None
        channels, size, _ = image_shape
        self.size = size
        steps = 2 if size == 28 else 4
        _upsampling_plan(size)  # validates the size
        self.bottom = size // 2**steps  # 7 or 4
        self.top_width = width * 2 ** (steps - 1)
        self.enc_label = LabelEmbedding(num_classes, size * size)
        self.dec_label = LabelEmbedding(num_classes, num_classes)

        enc, w_in, w = [], channels + (1 if num_classes > 0 else 0), width
        for _ in range(steps):
            enc += [nn.Conv2d(w_in, w, 4, 2, 1), nn.ReLU(True)]
            w_in, w = w, w * 2
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        flat = self.top_width * self.bottom * self.bottom
        self.to_mu, self.to_logvar = nn.Linear(flat, latent_dim), nn.Linear(flat, latent_dim)

        self.from_z = nn.Linear(latent_dim + num_classes, flat)
        dec, w = [nn.ReLU(True)], self.top_width
        for _ in range(steps - 1):
            dec += [nn.ConvTranspose2d(w, w // 2, 4, 2, 1), nn.ReLU(True)]
            w //= 2
        dec += [nn.ConvTranspose2d(w, channels, 4, 2, 1), nn.Sigmoid()]
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        y = self.enc_label(labels)
        if y is not None:
            x = torch.cat([x, y.view(-1, 1, self.size, self.size)], 1)
        h = self.encoder(x)
        mu, logvar = self.to_mu(h), self.to_logvar(h)  # (N, latent_dim) each
        return self.decode(reparameterize(mu, logvar), labels), mu, logvar

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        y = self.dec_label(labels)
        h = self.from_z(z if y is None else torch.cat([z, y], 1))
        h = h.view(-1, self.top_width, self.bottom, self.bottom)
        return self.decoder(h)  # (N, C, H, W) in [0, 1]
