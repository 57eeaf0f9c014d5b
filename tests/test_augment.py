"""DiffAugment: the transforms move or hide content as documented, keep gradients, and an empty policy is a no-op."""

import pytest
import torch

from training.augment import DiffAugment, cutout, translation


def test_an_empty_policy_returns_the_images_untouched():
    x = torch.rand(3, 1, 28, 28)
    augment = DiffAugment("")
    assert not augment and augment(x) is x


def test_translation_shifts_each_image_whole_and_pads_with_black():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 16, 16) * 2 - 1
    y = translation(x)  # shifts of up to 2 pixels
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(y[i, :, 2:-2, 2:-2], x[i, :, 2 + dy:14 + dy, 2 + dx:14 + dx])]
        assert matches, f"image {i} is not a shifted copy"
        dy, dx = matches[0]
        if dy > 0:
            assert torch.all(y[i, :, -dy:] == -1)
        if dx < 0:
            assert torch.all(y[i, :, :, :-dx] == -1)
    assert not torch.equal(x, y)


def test_cutout_zeroes_one_square_of_half_the_side_at_most():
    torch.manual_seed(0)
    y = cutout(torch.ones(200, 1, 28, 28))
    zeroed = (y == 0).squeeze(1)
    assert torch.all(zeroed.sum((1, 2)) <= 14 * 14) and zeroed.any()
    rows, cols = zeroed.any(2), zeroed.any(1)
    assert torch.all(rows.sum(1) <= 14) and torch.all(cols.sum(1) <= 14)
    assert torch.all(zeroed.sum((1, 2)) == rows.sum(1) * cols.sum(1))  # a rectangle: the square, clipped at the edge


@pytest.mark.parametrize("channels", [1, 3])
def test_every_policy_keeps_the_shape_and_passes_gradients_to_the_images(channels):
    x = (torch.rand(8, channels, 28, 28) * 2 - 1).requires_grad_(True)
    y = DiffAugment("color,translation,cutout")(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_the_same_seed_gives_the_same_augmentation():
    x = torch.rand(8, 3, 28, 28)
    augment = DiffAugment("color,translation,cutout")
    torch.manual_seed(5)
    a = augment(x)
    torch.manual_seed(5)
    assert torch.equal(a, augment(x))
