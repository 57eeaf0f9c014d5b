"""A VAE's latent prior fitted after training: a Gaussian mixture over the training set's latent codes.

A VAE's decoder only ever saw codes from its encoder, and their aggregate (the "aggregate posterior") is not
the N(0, I) that sampling draws from: it has holes and lumps, most of all with a KL weight below 1, so decoded
prior samples look worse than reconstructions. Fitting a Gaussian mixture to the encoded training set and
sampling from it instead ("ex-post density estimation", Ghosh et al. 2020, "From Variational to Deterministic
Autoencoders") keeps the decoder and fixes what it is fed. `training/latent_prior.py` fits it; this module is
what the exported graph runs, so the served contract stays "standard normal noise in, images out":

    noise (N, 1 + latent_dim) ~ N(0, I)      [one extra coordinate when there are several components]
    component k = how many of the K-1 thresholds noise[:, 0] exceeds   (P(k) = the mixture weight w_k)
    z = mean_k + scale_tril_k @ noise[:, 1:]                            (z ~ N(mean_k, cov_k))

The thresholds are the standard normal quantiles of the cumulative weights, with the components ordered
heaviest in the middle, lightest at both ends: a temperature below 1 (the service scales all the noise)
then favours the commoner components as it favours the middle of each one, and above 1 the rarer ones. A
conditional VAE has one mixture per class, picked by the label.
"""

from __future__ import annotations

import torch
from torch import nn


class MixturePrior(nn.Module):
    """Noise -> latent codes of a fitted Gaussian mixture; buffers only (weights, means, Cholesky factors)."""

    def __init__(self, thresholds: torch.Tensor, means: torch.Tensor, scale_tril: torch.Tensor):
        """thresholds (C, K-1), means (C, K, D), scale_tril (C, K, D, D): C = 1 for an unconditional VAE, else one
        mixture per class."""
        super().__init__()
        classes, components, dim = means.shape
        if thresholds.shape != (classes, components - 1) or scale_tril.shape != (classes, components, dim, dim):
            raise ValueError(f"mixture prior shapes disagree: thresholds {tuple(thresholds.shape)}, means "
                             f"{tuple(means.shape)}, scale_tril {tuple(scale_tril.shape)}")
        self.register_buffer("thresholds", thresholds.float())
        self.register_buffer("means", means.float())
        self.register_buffer("scale_tril", scale_tril.float())
        self.components, self.latent_dim = components, dim
        self.noise_dim = dim + (1 if components > 1 else 0)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        per_class = self.means.shape[0] > 1
        classes = labels if per_class else torch.zeros(noise.shape[0], dtype=torch.long, device=noise.device)
        if self.components > 1:
            pick, eps = noise[:, :1], noise[:, 1:]
            component = (pick > self.thresholds[classes]).long().sum(1)  # (N,) in 0..K-1
        else:
            eps, component = noise, torch.zeros_like(classes)
        mean = self.means[classes, component]  # (N, D)
        tril = self.scale_tril[classes, component]  # (N, D, D)
        return mean + torch.matmul(tril, eps.unsqueeze(-1)).squeeze(-1)

    def state(self) -> dict:
        """The checkpoint's `latent_prior` entry (plain tensors); `from_state` rebuilds the module."""
        return {"thresholds": self.thresholds.cpu(), "means": self.means.cpu(), "scale_tril": self.scale_tril.cpu()}

    @classmethod
    def from_state(cls, state: dict) -> "MixturePrior":
        return cls(state["thresholds"], state["means"], state["scale_tril"])
