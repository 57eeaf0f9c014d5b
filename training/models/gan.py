"""GAN networks: the MLP GAN and the DCGAN, unconditional or class-conditional.

Generators map z (N, latent_dim) [and labels (N,)] to images in [-1, 1] (tanh); `generate` maps them to
[0, 1], the exported contract. Discriminators return one logit per image (N,); the objectives that train
them live in `training/objectives.py`. The same DCGAN discriminator with `norm="none"` is the WGAN-GP critic
(the gradient penalty is per sample, which batch norm would break).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LabelEmbedding(nn.Module):
    """Class ids (N,) -> learned vectors (N, dim); empty when the model is unconditional."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(num_classes, dim) if num_classes > 0 else None

    def forward(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        if self.embed is None:
            return None
        assert labels is not None, "a conditional model needs labels"
        return self.embed(labels)


class MLPGenerator(nn.Module):
    """z (N, 100) -> 128 -> 256 -> 512 -> 1024 -> C*H*W, BatchNorm + LeakyReLU, tanh (the reference MLP GAN)."""

    def __init__(self, latent_dim: int = 100, image_shape=(1, 28, 28), hidden=(128, 256, 512, 1024), num_classes: int = 0):
        super().__init__()
        self.latent_dim, self.image_shape, self.num_classes = latent_dim, tuple(image_shape), num_classes
        self.label_embedding = LabelEmbedding(num_classes, num_classes)
        layers, width = [], latent_dim + num_classes
        for i, out in enumerate(hidden):
            layers.append(nn.Linear(width, out))
            if i > 0:  # no normalisation on the first layer, as in the reference
                layers.append(nn.BatchNorm1d(out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            width = out
        layers += [nn.Linear(width, math.prod(image_shape)), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        y = self.label_embedding(labels)
        h = z if y is None else torch.cat([z, y], 1)
        return self.net(h).view(-1, *self.image_shape)  # (N, C, H, W) in [-1, 1]

    def generate(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return (self(z, labels) + 1) / 2  # (N, C, H, W) in [0, 1]


class MLPDiscriminator(nn.Module):
    """C*H*W -> 512 -> 256 -> 1 logit, LeakyReLU (the reference MLP GAN, without the final sigmoid)."""

    def __init__(self, image_shape=(1, 28, 28), hidden=(512, 256), num_classes: int = 0):
        super().__init__()
        self.label_embedding = LabelEmbedding(num_classes, num_classes)
        layers, width = [], math.prod(image_shape) + num_classes
        for out in hidden:
            layers += [nn.Linear(width, out), nn.LeakyReLU(0.2, inplace=True)]
            width = out
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = x.flatten(1)
        y = self.label_embedding(labels)
        if y is not None:
            h = torch.cat([h, y], 1)
        return self.net(h).squeeze(1)  # (N,)


def _upsampling_plan(size: int) -> tuple[int, int]:
    """Start size and number of stride-2 upsamplings: 28 = 4 -> 7 -> 14 -> 28, 64 = 4 -> 8 -> 16 -> 32 -> 64."""
    if size == 28:
        return 4, 3
    if size == 64:
        return 4, 4
    raise ValueError(f"DCGAN supports image sizes 28 and 64, not {size}")


def _downsampling_layers(channels: int, size: int, ndf: int, norm: str) -> tuple[list[nn.Module], int, int]:
    """The DCGAN discriminator's strided 4x4 convolutions (28 -> 14 -> 7; 64 -> 32 -> 16 -> 8 -> 4), widths
    doubling from ndf, LeakyReLU(0.2), the layers after the first normalised by `norm` ("batch" or "none").
    Returns (layers, last width, last side)."""
    steps = 2 if size == 28 else 4
    width, layers = ndf, [nn.Conv2d(channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    for _ in range(steps - 1):
        layers.append(nn.Conv2d(width, width * 2, 4, 2, 1, bias=norm == "none"))
        if norm == "batch":
            layers.append(nn.BatchNorm2d(width * 2))
        layers.append(nn.LeakyReLU(0.2, True))
        width *= 2
    return layers, width, size // 2**steps


class ClassBatchNorm2d(nn.Module):
    """Batch norm whose scale and shift are looked up per class (conditional batch norm: de Vries et al. 2017,
    the generator of Miyato & Koyama 2018's projection cGAN and of BigGAN).

    The label then shapes every layer of the generator instead of only its input, so each class can use the
    channels its own way. Scales start at N(1, 0.02) and shifts at 0, the DCGAN init of a plain batch norm.
    """

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.scale = nn.Embedding(num_classes, channels)
        self.shift = nn.Embedding(num_classes, channels)
        nn.init.normal_(self.scale.weight, 1.0, 0.02)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.scale(labels)[:, :, None, None] + self.shift(labels)[:, :, None, None]


class DCGANGenerator(nn.Module):
    """z [+ label embedding] -> 4x4 -> ... -> HxW with ConvTranspose2d + BatchNorm + ReLU, tanh output.

    Widths halve at each upsampling, from ngf * 2**(steps-1) down to ngf. For 28x28 the first upsampling
    uses a 3x3 kernel (4 -> 7); the others are the DCGAN paper's 4x4, stride 2, padding 1.
    class_norm (conditional only): every batch norm is a `ClassBatchNorm2d`, its scale and shift chosen by the label.
    """

    def __init__(self, latent_dim: int = 100, image_shape=(1, 28, 28), ngf: int = 32, num_classes: int = 0, embed_dim: int = 50,
                 class_norm: bool = False):
        super().__init__()
        if class_norm and num_classes < 2:
            raise ValueError("class_norm needs a conditional generator (num_classes >= 2)")
        self.latent_dim, self.image_shape, self.num_classes = latent_dim, tuple(image_shape), num_classes
        channels, size, _ = image_shape
        start, steps = _upsampling_plan(size)
        self.label_embedding = LabelEmbedding(num_classes, embed_dim)
        in_dim = latent_dim + (embed_dim if num_classes > 0 else 0)

        def norm(c: int) -> nn.Module:
            return ClassBatchNorm2d(c, num_classes) if class_norm else nn.BatchNorm2d(c)

        width = ngf * 2 ** (steps - 1)
        layers = [nn.ConvTranspose2d(in_dim, width, start, 1, 0, bias=False), norm(width), nn.ReLU(True)]
        for step in range(steps - 1):
            kernel = 3 if (size == 28 and step == 0) else 4
            layers += [nn.ConvTranspose2d(width, width // 2, kernel, 2, 1, bias=False), norm(width // 2), nn.ReLU(True)]
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        y = self.label_embedding(labels)
        h = (z if y is None else torch.cat([z, y], 1))[:, :, None, None]
        for layer in self.net:
            h = layer(h, labels) if isinstance(layer, ClassBatchNorm2d) else layer(h)
        return h  # (N, C, H, W) in [-1, 1]

    def generate(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return (self(z, labels) + 1) / 2  # (N, C, H, W) in [0, 1]


def group_size(n: int, group: int) -> int:
    """The rows of one minibatch-std group for a batch of n: the largest divisor of n up to `group`, or, when
    n has none above 1 (a prime batch of 5 or more, 25, ...), the whole batch as one group (ProGAN's original
    rule). Never 1 for n > 1: a group of one row has no spread, and the feature would be a constant."""
    if n <= group:
        return n
    return next((g for g in range(group, 1, -1) if n % g == 0), n)


class MinibatchStd(nn.Module):
    """Appends the batch's mean feature std as one channel (Karras et al. 2018, ProGAN).

    It lets the discriminator see a batch's lack of variety, the signal that stops the generator from
    collapsing to one image per class (without it our conditional DCGAN ignored z within a few hundred steps).
    """

    def __init__(self, group: int = 4):
        super().__init__()
        self.group = group  # the trainer reads it to group rows by class (cfg.class_grouped_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = group_size(n, self.group)
        y = x.view(g, -1, c, h, w)  # (G, N/G, C, H, W)
        std = (y.var(0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (N/G,)
        std = std.view(-1, 1, 1, 1).repeat(g, 1, h, w)  # (N, 1, H, W)
        return torch.cat([x, std], 1)


def class_grouped_order(labels: torch.Tensor, group: int) -> torch.Tensor | None:
    """A permutation of the batch after which `MinibatchStd(group)`'s groups hold images of one label each
    (all but the groups that straddle two labels), or None when the batch does not split into such groups.

    Why: the std channel is how the discriminator sees a batch's lack of variety. Its groups are rows i, i + N/G,
    i + 2N/G, ... of a batch in random order, so in a conditional GAN they mix classes, and the std mostly measures
    how different the classes are, which a generator that draws few digits per class gets right. Grouped by label,
    it measures the variety within a class, real against generated: the variety that a classifier trained on the
    generated images needs. Apply the same order to images and labels, and its inverse to D's outputs."""
    n = labels.shape[0]
    if n % group or n == group:
        return None
    by_label = torch.sort(labels, stable=True).indices  # rows of one label next to each other
    return by_label.view(n // group, group).t().reshape(-1)  # row j * N/G + i holds by_label[i * G + j]


class LatentEncoder(nn.Module):
    """Image [+ label] -> (mu, logvar) of the z the generator would draw it from: the encoder of a cVAE-GAN
    (Larsen et al. 2016; BicycleGAN's cVAE-GAN branch, Zhu et al. 2017), for `--reconstruction`.

    Why: the adversarial loss lets a generator leave out the real images it draws badly (low recall), and a
    classifier trained only on its images then fails on those real ones. Asked to redraw every real training
    image from the z this encoder infers for it, the generator must keep a z for each. The DCGAN
    discriminator's strided convolutions (`_downsampling_layers`), then a linear map of the features and the label
    to 2 x latent_dim.
    """

    def __init__(self, image_shape, latent_dim: int, ndf: int, num_classes: int = 0):
        super().__init__()
        channels, size, _ = image_shape
        layers, width, final = _downsampling_layers(channels, size, ndf, "batch")
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.label_embedding = LabelEmbedding(num_classes, num_classes)
        self.to_latent = nn.Linear(width * final * final + num_classes, 2 * latent_dim)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        y = self.label_embedding(labels)
        mu, logvar = self.to_latent(h if y is None else torch.cat([h, y], 1)).chunk(2, dim=1)
        return mu, logvar  # (N, latent_dim) each


class DCGANDiscriminator(nn.Module):
    """HxW -> ... -> 4x4 (or 7x7) -> 1 logit with strided Conv2d + norm + LeakyReLU(0.2).

    Conditional: a projection discriminator (Miyato & Koyama 2018): logit = f(h) + <embed(y), mean_hw h>,
    where h are the last features. (Stacking the label as an input plane let our conditional DCGAN
    collapse to one image per class; the projection keeps the label in every gradient.)
    norm: "batch" for GANs, "none" for the WGAN-GP critic. minibatch_std: a `MinibatchStd` channel before
    the last layer (off for the WGAN-GP critic, whose gradient penalty is per sample).
    class_head: also a linear classifier on the last features, shaped like `head` (AC-GAN, Odena et al. 2017),
    returned by `forward(..., with_classes=True)`; it never sees the label, so it can teach the generator what a
    class looks like. (On pooled features it could not: a linear probe of our trained MNIST discriminator reads
    the digit from the 7x7 features at 94 %, from their spatial mean at 70 %.)
    twin_head: a second classifier of the same shape (TAC-GAN, Gong et al. 2019), returned after the first;
    the objective trains it on generated images, so it reads the labels of the generator's distribution.
    encoder_latent_dim > 0: also a `LatentEncoder` (`self.encoder`, `--reconstruction`), a network of its own
    that shares nothing with D; it lives here because, like the heads, it is trained and saved with the
    discriminator and never exported. `forward` does not run it.
    """

    def __init__(self, image_shape=(1, 28, 28), ndf: int = 32, num_classes: int = 0, norm: str = "batch",
                 minibatch_std: bool = True, class_head: bool = False, twin_head: bool = False,
                 encoder_latent_dim: int = 0):
        super().__init__()
        if norm not in ("batch", "none"):
            raise ValueError(f"norm must be 'batch' or 'none', not {norm!r}")
        channels, size, _ = image_shape
        layers, width, final = _downsampling_layers(channels, size, ndf, norm)  # final: 7 for 28x28, 4 for 64x64
        if minibatch_std:
            layers.append(MinibatchStd())
            width += 1
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(width, 1, final, 1, 0)
        self.projection = LabelEmbedding(num_classes, width)
        if class_head and num_classes < 2:
            raise ValueError("class_head needs a conditional discriminator (num_classes >= 2)")
        self.classifier = nn.Conv2d(width, num_classes, final, 1, 0) if class_head else None
        if twin_head and not class_head:
            raise ValueError("twin_head needs class_head (it is the class head's twin)")
        self.twin_classifier = nn.Conv2d(width, num_classes, final, 1, 0) if twin_head else None
        self.encoder = LatentEncoder(image_shape, encoder_latent_dim, ndf, num_classes) if encoder_latent_dim else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, with_classes: bool = False):
        """(N,) real/fake logits; with_classes: (logits, classes, twin_classes), the (N, num_classes) class
        logits of the class head and of the twin head (None without one)."""
        h = self.features(x)  # (N, W, 7, 7) or (N, W, 4, 4)
        logit = self.head(h).view(-1)  # (N,)
        y = self.projection(labels)
        if y is not None:
            logit = logit + (y * h.mean((2, 3))).sum(1)
        if with_classes:
            if self.classifier is None:
                raise ValueError("this discriminator was built without class_head")
            twin = self.twin_classifier(h).flatten(1) if self.twin_classifier is not None else None
            return logit, self.classifier(h).flatten(1), twin
        return logit


def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN paper init: conv weights N(0, 0.02), batch-norm scale N(1, 0.02) and shift 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d) and module.affine:  # a ClassBatchNorm2d's inner norm has no affine
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
