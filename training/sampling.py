"""The one sampler of torch models: the training previews and an export's or a mixture's samples.png draw images
through `sample` (`save_sample_grid`). (The evaluation draws from the exported ONNX file, as the service does:
`training.evaluate.OnnxGenerator`.)"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind DistributedDataParallel or torch.compile wrappers."""
    return uncompiled(getattr(model, "module", model))


def uncompiled(model: nn.Module) -> nn.Module:
    """The module behind a torch.compile wrapper (still inside DistributedDataParallel when it is): for a double
    backward, which torch.compile's autograd does not support."""
    return getattr(model, "_orig_mod", model)


def noise_dim(model: nn.Module) -> int:
    """Width of the standard normal noise `model.generate` takes: its latent_dim, or the noise_dim of a VAE
    whose fitted mixture prior (`models/prior.py`) adds a component coordinate."""
    return model.noise_dim if hasattr(model, "noise_dim") else model.latent_dim


def balanced_labels(n: int, num_classes: int, device=None) -> torch.Tensor:
    """0, 1, ..., k-1, 0, 1, ...: the 'balanced' label mix (same rule as the service)."""
    return torch.arange(n, device=device) % num_classes


def class_rows(num_classes: int, per_class: int, device=None) -> torch.Tensor:
    """Labels for a grid with one row per class: 0 0 0 ... 1 1 1 ..."""
    return torch.arange(num_classes, device=device).repeat_interleave(per_class)


@torch.inference_mode()
def sample(model: nn.Module, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
           device=None) -> torch.Tensor:
    """n images (n, C, H, W) in [0, 1] from a generator or VAE, in eval mode; labels only for conditional models."""
    model = unwrap(model)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        z = torch.randn(n, noise_dim(model), generator=generator, device="cpu").to(device)
        y = None
        if model.num_classes > 0:
            y = (labels if labels is not None else balanced_labels(n, model.num_classes)).to(device)
        return model.generate(z, y).float().clamp_(0, 1)
    finally:
        model.train(was_training)


GRID_PER_CLASS = 10  # images in a conditional model's row of a sample grid; an unconditional model's grid is 8x8


def save_sample_grid(model: nn.Module, path: str | Path, seed: int) -> None:
    """A model's fixed-seed sample grid as one PNG: a row of GRID_PER_CLASS images per class, or 8x8 for an
    unconditional model."""
    classes = unwrap(model).num_classes
    labels = class_rows(classes, GRID_PER_CLASS) if classes else None
    grid = sample(model, len(labels) if classes else 64, labels, torch.Generator().manual_seed(seed))
    save_grid(grid, path, nrow=GRID_PER_CLASS if classes else 8)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int) -> None:
    """Images (N, C, H, W) in [0, 1] as one PNG grid, nrow images per row."""
    from torchvision.utils import save_image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(images.cpu(), str(path), nrow=nrow, padding=2, pad_value=1.0)
