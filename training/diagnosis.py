"""Which real training images the generator under-represents, and batches that show them to D more often
(Self-Diagnosing GAN, Lee et al. 2021), for `--self-diagnosing-from`.

Why: a GAN's discriminator logit on a real image x estimates the log density ratio log p_data(x) / p_G(x)
(LDR). An image the generator draws too rarely keeps a high LDR, and one it fails on now and then keeps a
varied one. The paper scores each real image by the mean plus the standard deviation of its LDR over
training, clips the scores to [0.01, 50 x their minimum] and then samples the training set in proportion
to them, so that D sees the under-represented images more often and G is pushed to draw them. Our CAS
misses are real digits the generator leaves out (docs/zoo-experiments.md), which is what the method is for.

How, online: the trainer hands over the logit of every real image D judged (`record`), and each image keeps
an exponential moving mean and variance of its own LDRs (decay 0.8, about its last five epochs). From the
epoch `self_diagnosing_from` on, `epoch_order` draws the epoch's N images with replacement in proportion to
their weights, once every image has been seen twice; before that, and when off, it is a permutation.

Three weightings (`self_diagnosing_weights`):
- "paper": the paper's score, mean + std of the LDR, clipped to [0.01, 50 x the smallest]. On our MNIST
  cDCGAN the per-image std over epochs (median 1.2) dwarfs the spread of the means (0.6), so almost every
  score is above the cap and the weights are nearly flat (effective fraction 0.985).
- "ratio": exp(mean LDR), the density ratio p_data(x) / p_G(x) that the logit estimates, capped at 50 x the
  smallest: D then sees each real image about as much more often as the generator draws it too rarely.
- "inverse": exp(-mean LDR), capped the same way: the opposite bet. On our MNIST cDCGAN the images "ratio"
  drew less were the thin, slanted and odd digits that D finds generated-looking and that the synthetic-trained
  classifier misses; "inverse" shows D more of them, so that G is pushed towards them. Neither raised that
  classifier's accuracy (docs/zoo-experiments.md, "The reverse bet").
"""

from __future__ import annotations

import torch

EMA_WEIGHT = 0.2  # weight of each new LDR in the per-image moving mean and variance: about the last 5 epochs
CONFIDENCE = 1.0  # score = mean + CONFIDENCE * std of the image's LDR (the paper's LDRM + k * sqrt(LDRV), k = 1)
MIN_SCORE = 0.01  # the paper's clip_min
MAX_RATIO = 50.0  # the paper's clip_max_ratio: no image drawn more than 50 times as often as the least drawn
WEIGHTINGS = ("paper", "ratio", "inverse")


class RealImageDiagnosis:
    """Per-image moving mean and variance of D's logit on the N real training images, and the epoch orders
    that follow from them. State lives on `device`; `state_dict` goes into the checkpoint."""

    def __init__(self, num_images: int, device, weighting: str = "paper"):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, not {weighting!r}")
        self.weighting = weighting
        self.mean = torch.zeros(num_images, device=device)
        self.var = torch.zeros(num_images, device=device)
        self.seen = torch.zeros(num_images, dtype=torch.int32, device=device)

    def record(self, indices: torch.Tensor, logits: torch.Tensor) -> None:
        """One observation of D's logit (B,) for the images at `indices` (B,); an image drawn twice in one batch
        keeps one of its two observations."""
        logits = logits.detach().float()
        first = self.seen[indices] == 0
        delta = logits - self.mean[indices]
        mean = torch.where(first, logits, self.mean[indices] + EMA_WEIGHT * delta)
        var = (1 - EMA_WEIGHT) * (self.var[indices] + EMA_WEIGHT * delta**2)
        var = torch.where(first, torch.zeros_like(logits), var)
        self.mean[indices], self.var[indices] = mean, var
        self.seen[indices] += 1

    def ready(self) -> bool:
        """Whether every image has been judged at least twice (a variance needs two observations)."""
        return bool((self.seen >= 2).all())

    def weights(self) -> torch.Tensor:
        """(N,) sampling weights. "paper": mean + CONFIDENCE * std, clipped to [MIN_SCORE, MAX_RATIO x their
        minimum]; "ratio": exp(mean) and "inverse": exp(-mean), each capped at MAX_RATIO x their minimum."""
        if self.weighting in ("ratio", "inverse"):
            log_weight = self.mean if self.weighting == "ratio" else -self.mean
            weight = (log_weight - log_weight.max()).exp()  # shifted so that the largest is 1: no overflow
            return weight.clamp(min=weight.max() / MAX_RATIO)
        score = (self.mean + CONFIDENCE * self.var.sqrt()).clamp(min=MIN_SCORE)
        return score.clamp(max=score.min() * MAX_RATIO)

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor:
        """N image indices (on the CPU) drawn with replacement in proportion to `weights()`."""
        weights = self.weights().cpu().double()
        return torch.multinomial(weights, len(weights), replacement=True, generator=generator)

    def effective_fraction(self) -> float:
        """(sum w)^2 / (N sum w^2): 1 for uniform weights, smaller the more a few images dominate."""
        w = self.weights().double()
        return float(w.sum() ** 2 / (len(w) * (w**2).sum()))

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        if state["mean"].shape != self.mean.shape:
            raise ValueError(f"the checkpoint's diagnosis covers {state['mean'].shape[0]} images, "
                             f"this data {self.mean.shape[0]}")
        self.mean.copy_(state["mean"])
        self.var.copy_(state["var"])
        self.seen.copy_(state["seen"])
