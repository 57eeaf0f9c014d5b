"""Fit a VAE's mixture prior (`models/prior.py`) to the latent codes of its training set.

The trainer calls `fit_prior` after the last epoch when the run asks for one (`--prior-components K`), and
stores the result in the checkpoint as `latent_prior`; `load_checkpoint` attaches it to the decoder, so the
previews of later runs, the export and the evaluation all sample through it. To refit a finished run with
another K, resume it at the same epoch count: no epoch runs, the prior is refitted and saved:

    python -m training.train --dataset mnist --model mlp_vae --epochs 200 --prior-components 30 --resume

The codes are posterior samples z ~ q(z|x) of every training image (several draws per image for the small
sets, PRIOR_POINTS in all), the mixture a full-covariance Gaussian mixture fitted by EM from a k-means start.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .models.prior import MixturePrior

PRIOR_POINTS = 60_000  # codes the mixture is fitted to: every image once, or several posterior draws each
EM_ITERATIONS = 300
EM_TOLERANCE = 1e-5  # stop when the mean log-likelihood per code gains less than this
KMEANS_ITERATIONS = 20
REG_COVAR = 1e-6  # added to each covariance's diagonal (scikit-learn's default): no component collapses


@torch.no_grad()
def posterior_codes(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, draws: int,
                    generator: torch.Generator, batch_size: int = 1000) -> torch.Tensor:
    """(len(images) * draws, latent_dim) float64 samples of q(z|x) for uint8 images (N, C, H, W), image-major."""
    was_training = model.training
    model.eval()
    codes = []
    try:
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].float().div_(255)
            y = labels[i:i + batch_size] if labels is not None else None
            _, mu, logvar = model(x, y)
            mu, std = mu.double(), logvar.double().mul(0.5).exp()
            noise = torch.randn((draws, *mu.shape), generator=generator, dtype=torch.float64)
            codes.append((mu + std * noise).transpose(0, 1).reshape(-1, mu.shape[1]))
    finally:
        model.train(was_training)
    return torch.cat(codes)


def _log_gaussians(x: torch.Tensor, means: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """(N, K) log N(x_n | mean_k, L_k L_k^T) for x (N, D), means (K, D), Cholesky factors chol (K, D, D)."""
    d = x.shape[1]
    columns = []
    for mean, tril in zip(means, chol):
        y = torch.linalg.solve_triangular(tril, (x - mean).T, upper=False)  # (D, N)
        columns.append(-0.5 * y.square().sum(0) - tril.diagonal().log().sum() - 0.5 * d * math.log(2 * math.pi))
    return torch.stack(columns, 1)


def _kmeans(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Cluster ids (N,) from k-means++ seeding and KMEANS_ITERATIONS Lloyd steps."""
    centres = x[torch.randint(len(x), (1,), generator=generator)]
    for _ in range(1, k):
        d2 = torch.cdist(x, centres).square().min(1).values
        centres = torch.cat([centres, x[torch.multinomial(d2 / d2.sum(), 1, generator=generator)]])
    for _ in range(KMEANS_ITERATIONS):
        assign = torch.cdist(x, centres).argmin(1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                centres[j] = members.mean(0)
    return torch.cdist(x, centres).argmin(1)


def _m_step(x: torch.Tensor, resp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights (K,), means (K, D), Cholesky factors (K, D, D)) from responsibilities resp (N, K)."""
    nk = resp.sum(0) + 10 * torch.finfo(x.dtype).eps
    means = resp.T @ x / nk[:, None]
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    covs = torch.stack([((resp[:, j, None] * (x - means[j])).T @ (x - means[j])) / nk[j] + REG_COVAR * eye
                        for j in range(len(nk))])
    return nk / len(x), means, torch.linalg.cholesky(covs)


def fit_gaussian_mixture(x: torch.Tensor, k: int, generator: torch.Generator) -> dict:
    """A k-component full-covariance Gaussian mixture fitted to x (N, D) by EM from a k-means start.
    Returns weights (K,), means (K, D), chol (K, D, D), the mean log-likelihood per point and the iterations."""
    if not 1 <= k <= len(x):
        raise ValueError(f"components must be in 1..{len(x)} (the codes fitted), not {k}")
    x = x.double()
    weights, means, chol = _m_step(x, nn.functional.one_hot(_kmeans(x, k, generator), k).double())
    previous, iterations = -math.inf, 0
    for iterations in range(1, EM_ITERATIONS + 1):
        log_joint = _log_gaussians(x, means, chol) + weights.log()
        log_likelihood = torch.logsumexp(log_joint, 1)
        mean_ll = float(log_likelihood.mean())
        weights, means, chol = _m_step(x, (log_joint - log_likelihood[:, None]).exp())
        if mean_ll - previous < EM_TOLERANCE:
            break
        previous = mean_ll
    mean_ll = float(torch.logsumexp(_log_gaussians(x, means, chol) + weights.log(), 1).mean())
    return {"weights": weights, "means": means, "chol": chol, "log_likelihood": mean_ll, "iterations": iterations}


def middle_out_order(weights: torch.Tensor) -> torch.Tensor:
    """Component order with the heaviest in the middle and lighter ones alternating outwards."""
    by_weight = weights.argsort(descending=True).tolist()
    left, right = by_weight[1::2], by_weight[2::2]
    return torch.tensor(left[::-1] + by_weight[:1] + right)


def picker_thresholds(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, K-1 thresholds) for picking one of K items with these weights by a standard normal coordinate:
    the items in `middle_out_order`, the thresholds at the standard normal quantiles of their cumulative weights.
    The fitted prior picks its component this way, a mixture of exported models (training/mixture.py) its member."""
    order = middle_out_order(weights)
    cumulative = weights[order].cumsum(0)[:-1].clamp(1e-12, 1 - 1e-12)
    return order, torch.special.ndtri(cumulative)


def mixture_prior(fits: list[dict]) -> MixturePrior:
    """The served module for one fitted mixture per class (a single one for an unconditional VAE)."""
    thresholds, means, chols = [], [], []
    for fit in fits:
        order, fit_thresholds = picker_thresholds(fit["weights"])
        thresholds.append(fit_thresholds)
        means.append(fit["means"][order])
        chols.append(fit["chol"][order])
    return MixturePrior(torch.stack(thresholds), torch.stack(means), torch.stack(chols))


def posterior_draws(n_images: int) -> int:
    """Codes drawn per training image: enough for PRIOR_POINTS codes in all."""
    return max(1, math.ceil(PRIOR_POINTS / n_images))


def most_components(labels: torch.Tensor, num_classes: int) -> int:
    """The most mixture components `fit_prior` can fit: the codes of its smallest group (a class's for a
    conditional VAE, num_classes > 0; all of them otherwise)."""
    smallest = int(torch.bincount(labels.cpu(), minlength=num_classes).min()) if num_classes else len(labels)
    return posterior_draws(len(labels)) * smallest


def fit_prior(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, components: int, seed: int) -> tuple[MixturePrior, dict]:
    """Fit the mixture prior of a trained VAE on its uint8 training images; returns (module, a report for the
    checkpoint and card). A conditional VAE gets one mixture per class, fitted to that class's codes."""
    generator = torch.Generator().manual_seed(seed)
    draws = posterior_draws(len(images))
    conditional = model.num_classes > 0
    codes = posterior_codes(model, images, labels if conditional else None, draws, generator)
    code_labels = labels.repeat_interleave(draws)
    groups = [codes[code_labels == c] for c in range(model.num_classes)] if conditional else [codes]
    fits = [fit_gaussian_mixture(group, components, generator) for group in groups]
    standard = torch.distributions.Normal(0.0, 1.0).log_prob(codes).sum(1).mean()
    report = {
        "type": "gaussian_mixture", "components": components, "per_class": conditional,
        "codes": len(codes), "posterior_draws_per_image": draws, "seed": seed,
        "log_likelihood_per_code": sum(f["log_likelihood"] * len(g) for f, g in zip(fits, groups)) / len(codes),
        "log_likelihood_per_code_standard_normal": float(standard),
        "em_iterations": [f["iterations"] for f in fits],
    }
    return mixture_prior(fits), report
