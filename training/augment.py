"""Differentiable augmentation for GAN discriminators on small datasets (DiffAugment, Zhao et al. 2020).

A discriminator trained on a few hundred or thousand images memorises them, and the generator then learns
to please a discriminator that no longer generalises. DiffAugment applies the same random, differentiable
transforms to every image the discriminator sees, real and generated alike (in the D step and in the G step),
so D cannot memorise exact pixels and G's gradient still flows through the transform. The generator is never
asked to produce augmented images: the augmentation lives only between the images and D.

    python -m training.train --dataset retinamnist --model cdcgan --diff-augment translation,cutout ...

Policies (comma-separated, applied in this order): `color` (random brightness, saturation, contrast),
`translation` (shift by up to 1/8 of the side, padded with black, -1), `cutout` (one square of half the
side set to 0, the range's middle).
Images are in the generator's range [-1, 1]. Randomness comes from torch's global generator, which the
trainer seeds per epoch, so resuming stays exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

def parse_policy(policy: str) -> tuple[str, ...]:
    """'translation,cutout' -> ('translation', 'cutout'); '' -> (); an unknown name is a ValueError listing them."""
    names = tuple(p.strip() for p in policy.split(",") if p.strip())
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown diff_augment policy {', '.join(unknown)}; known: {', '.join(POLICIES)}")
    return tuple(p for p in POLICIES if p in names)


def color(x: torch.Tensor) -> torch.Tensor:
    """Per-image brightness (+-0.5), saturation (x0..2, RGB only) and contrast (x0.5..1.5), on [-1, 1] images."""
    n = x.shape[0]
    x = x + (torch.rand(n, 1, 1, 1, device=x.device) - 0.5)
    if x.shape[1] > 1:
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (torch.rand(n, 1, 1, 1, device=x.device) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(n, 1, 1, 1, device=x.device) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ratio * side pixels in x and y; uncovered pixels become -1 (black)."""
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(-sw, sw + 1, (n, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    ys = (rows + dy).clamp(-1, h)  # -1 and h index the padding
    xs = (cols + dx).clamp(-1, w)
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)  # (N, C, H+2, W+2)
    index = ((ys + 1) * (w + 2) + (xs + 1)).view(n, 1, h * w).expand(-1, x.shape[1], -1)
    return padded.flatten(2).gather(2, index).view_as(x)


def cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Zero (to the range's middle, 0) one square of ratio * side at a random place per image."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    top, left = cy - ch // 2, cx - cw // 2
    inside = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)  # (N, H, W)
    return x * (~inside).unsqueeze(1).to(x.dtype)


TRANSFORMS = {"color": color, "translation": translation, "cutout": cutout}  # in the order they are applied
POLICIES = tuple(TRANSFORMS)


class DiffAugment:
    """Callable applying a policy's transforms in order; the identity when the policy is empty."""

    def __init__(self, policy: str = ""):
        self.names = parse_policy(policy)

    def __bool__(self) -> bool:
        return bool(self.names)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            x = TRANSFORMS[name](x)
        return x
