"""The three training objectives, one class each: VAE ELBO, GAN with BCE, WGAN-GP.

An objective owns its optimisers and does one optimisation step on a batch of real images in [0, 1]
(N, C, H, W) with labels (N,); it returns the step's losses as detached 0-dim tensors, which the trainer
reads once an epoch: reading a float every step (`.item()`) would make the CPU wait for a GPU at every step.
The trainer (`training/train.py`) does everything else. Models may be wrapped in DistributedDataParallel: the
objective does not care.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .augment import DiffAugment
from .config import TrainConfig
from .models.gan import MinibatchStd, class_grouped_order
from .models.vae import reparameterize
from .sampling import uncompiled, unwrap

R1_EVERY = 16  # steps between lazy R1 steps (StyleGAN2's lazy regularisation interval for D)


def vae_loss(recon, x, mu, logvar, beta: float = 1.0):
    """Negative ELBO per image: Bernoulli reconstruction (BCE summed over pixels) + beta * KL(q(z|x) || N(0, I))."""
    reconstruction = F.binary_cross_entropy(recon, x, reduction="sum") / x.shape[0]
    kl = kl_to_standard_normal(mu, logvar)
    return reconstruction + beta * kl, reconstruction, kl


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) of (N, D) posteriors, summed over D, mean over the batch: the VAEs' KL
    term and the cVAE-GAN encoder's (`GANObjective.reconstruction_loss`)."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / mu.shape[0]


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, labels) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): (||grad_x D(x_hat)||_2 - 1)^2 on random interpolates x_hat."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    scores = critic(mixed, labels)
    (grad,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def mode_seeking_term(fake: torch.Tensor, fake2: torch.Tensor, z: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """MSGAN (Mao et al. 2019): 1 / (|G(z1, y) - G(z2, y)| / |z1 - z2|), to be minimised by the generator.

    Class-conditional GANs tend to ignore z and draw one image per class (ours did within one epoch);
    rewarding distance between images of the same label drawn from different z keeps z in use. `fake[i]` and
    `fake2[i]` share a label; `GANObjective` draws `fake2` either in a second generator pass or as the other
    half of the batch (`mode_seeking_in_batch`).
    """
    ratio = (fake - fake2).abs().mean() / (z - z2).abs().mean()
    return 1 / (ratio + 1e-5)


def paired_labels(labels: torch.Tensor) -> torch.Tensor:
    """The generator's labels for in-batch mode seeking: the batch's last n // 2 rows repeat its first n // 2
    labels, so row i and row n - n // 2 + i share a label and differ only in z. The label mix stays the data's
    in expectation (the first half is a random draw of the batch)."""
    pairs = labels.shape[0] // 2
    return torch.cat([labels[:labels.shape[0] - pairs], labels[:pairs]])


def in_batch_pairs(fake: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fake, fake2, z, z2) of the pairs `paired_labels` made: first n // 2 rows against the last n // 2."""
    pairs = fake.shape[0] // 2
    first = fake.shape[0] - pairs
    return fake[:pairs], fake[first:], z[:pairs], z[first:]


@contextlib.contextmanager
def frozen(module: nn.Module, keep: nn.Module | None = None):
    """The block runs with `module`'s parameters out of autograd: the generator's step backpropagates through D
    only to reach G, and D's weight gradients there would be computed to be thrown away (the next D step
    starts from zeroed gradients). Under DistributedDataParallel the block also skips D's gradient sync, which
    would otherwise wait for gradients that never come. The losses and G's gradients are unchanged.
    `keep`: a submodule trained in the block (the latent encoder that D holds) stays in autograd."""
    kept = {id(p) for p in keep.parameters()} if keep is not None else set()
    params = [p for p in module.parameters() if p.requires_grad and id(p) not in kept]
    wrapped = getattr(module, "_orig_mod", module)  # torch.compile(DDP(D)) -> DDP(D)
    sync = wrapped.no_sync() if isinstance(wrapped, DistributedDataParallel) else contextlib.nullcontext()
    for p in params:
        p.requires_grad_(False)
    try:
        with sync:
            yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _logged_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, losses: dict, key: str) -> torch.Tensor:
    """Cross-entropy of class logits (computed in fp32) against labels, its value also logged as losses[key]."""
    loss = F.cross_entropy(logits.float(), labels)
    losses[key] = loss.detach()
    return loss


def _adam(params, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam over a module's parameters or a list of them, with the run's learning rate and betas."""
    params = params.parameters() if isinstance(params, nn.Module) else params
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX, through oneDNN); elsewhere it is emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def training_precision(cfg: TrainConfig, device: torch.device) -> str:
    """"bf16" (autocast) when cfg.amp and the device computes bf16 natively: CUDA, or a CPU with AVX512-BF16
    or AMX, where oneDNN's bf16 convolutions made our training step 1.3-1.7x faster than fp32 (benchmarks/README.md);
    "fp32" elsewhere, where bf16 would be emulated and slower."""
    native = device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())
    return "bf16" if cfg.amp and native else "fp32"


class Objective:
    """Shared plumbing: optimisers by name for checkpoints, bf16 autocast where `training_precision` says so."""

    optimizers: dict[str, torch.optim.Optimizer]

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg = cfg
        self.precision = training_precision(cfg, device)
        self.autocast = contextlib.nullcontext
        if self.precision == "bf16":
            self.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def set_lr(self, lr: float) -> None:
        """Every optimiser's learning rate (they share cfg.lr): the trainer's schedule calls this each epoch."""
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr

    def load_state_dict(self, state: dict) -> None:
        """Optimiser states by name; one the checkpoint lacks (a class head added on resume) starts fresh."""
        for name, opt in self.optimizers.items():
            if name in state:
                opt.load_state_dict(state[name])


class VAEObjective(Objective):
    def __init__(self, cfg, device, vae: nn.Module, conditional: bool):
        super().__init__(cfg, device)
        self.vae, self.conditional = vae, conditional
        self.optimizers = {"vae": _adam(vae, cfg)}

    def step(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        y = labels if self.conditional else None
        with self.autocast():
            recon, mu, logvar = self.vae(x, y)
        loss, reconstruction, kl = vae_loss(recon.float(), x, mu.float(), logvar.float(), self.cfg.beta)
        opt = self.optimizers["vae"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach(), "recon": reconstruction.detach(), "kl": kl.detach()}


class GANObjective(Objective):
    """Non-saturating GAN with BCE on logits: D maximises log D(x) + log(1 - D(G(z))), G maximises log D(G(z)).

    With cfg.aux_classifier = w > 0 (AC-GAN, Odena et al. 2017), D's class head learns the labels of real
    images and G is also trained to make that head read its images as the requested label, both with weight w.
    The head learns from real images only: trained on fakes too, it would reward G for any image it can
    label, real-looking or not. The head has its own optimiser, so a run saved without it can resume with it.
    AC-GAN alone also rewards G for making classes easier to tell apart than they are (it lowers H(y | x) of
    the generated images: prototypical digits, unmistakable shirts, low recall). With cfg.twin_classifier
    (TAC-GAN, Gong et al. 2019) a twin head learns the labels of generated images, q(y | x), and G is trained
    to make that head's loss large, with the same weight w. With the class head reading p(y | x) from real
    images, G's two class terms are E[-log p(y | x) + log q(y | x)] = E[KL(q(y | x) || p(y | x))] over its
    images (both heads at their optimum): the bias becomes a match of the real class posteriors. The twin has
    its own optimiser too.
    With cfg.diff_augment (training/augment.py), every image D sees, real or generated, in both steps, goes
    through the same random differentiable transforms; the mode-seeking term compares unaugmented images.
    With cfg.class_grouped_std, every batch D judges is reordered so that its minibatch-std groups each hold one
    label (`class_grouped_order`): the std then shows D the variety within a class rather than between classes.
    With cfg.mode_seeking_in_batch, G is asked for `paired_labels(labels)` (the batch's second half repeats its
    first half's labels), D and both heads judge the images against those labels, and the mode-seeking term
    compares the two halves: one generator pass per step instead of two.
    With cfg.reconstruction = r > 0 (a cVAE-GAN: Larsen et al. 2016, BicycleGAN's cVAE-GAN branch), D's
    `LatentEncoder` infers (mu, logvar) of z for each real image and its label, and G's step adds
    r * L1(G(z_enc, label), real) + cfg.reconstruction_kl * KL(q(z | x) || N(0, I)), z_enc drawn from q; the
    encoder has its own optimiser and learns in G's step. G must then be able to redraw every real training
    image, not only the ones D finds easiest to be fooled by.
    With cfg.r1 = gamma > 0 (R1, Mescheder et al. 2018), every R1_EVERY steps D's body takes one more step on
    R1_EVERY * gamma / 2 * E|grad_x D(x)|^2 over the batch's real images (lazy regularisation, StyleGAN2): D is
    kept from growing steep around the real images, so its gradient keeps pointing G towards all of them.
    After each step `real_logits` holds D's logits on the batch's real images, which the trainer's
    `RealImageDiagnosis` (training/diagnosis.py, cfg.self_diagnosing_from) records.
    """

    def __init__(self, cfg, device, generator: nn.Module, discriminator: nn.Module, conditional: bool):
        super().__init__(cfg, device)
        self.G, self.D, self.conditional = generator, discriminator, conditional
        self.aux = cfg.aux_classifier
        self.augment = DiffAugment(cfg.diff_augment)
        self.twin = cfg.twin_classifier
        d = unwrap(discriminator)
        self.std_group = None  # with cfg.class_grouped_std: the size of D's minibatch-std groups
        if cfg.class_grouped_std:
            groups = [m.group for m in d.modules() if isinstance(m, MinibatchStd)]
            if not (conditional and groups):
                raise ValueError("class_grouped_std needs a conditional discriminator with a minibatch-std layer")
            self.std_group = groups[0]
        self.encoder = getattr(d, "encoder", None) if cfg.reconstruction else None
        if cfg.reconstruction and self.encoder is None:
            raise ValueError("reconstruction needs a discriminator built with a latent encoder (build_model(..., encoder=True))")
        head = list(d.classifier.parameters()) if self.aux else []
        twin = list(d.twin_classifier.parameters()) if self.twin else []
        encoder = list(self.encoder.parameters()) if self.encoder is not None else []
        body = [p for p in discriminator.parameters() if all(p is not h for h in head + twin + encoder)]
        self.optimizers = {"generator": _adam(generator, cfg), "discriminator": _adam(body, cfg),
                           **({"class_head": _adam(head, cfg)} if head else {}),
                           **({"twin_head": _adam(twin, cfg)} if twin else {}),
                           **({"encoder": _adam(encoder, cfg)} if encoder else {})}
        self.steps = 0  # this process's steps, for the lazy R1 interval

    def _discriminate(self, images: torch.Tensor, y, classes: bool = True) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                                 torch.Tensor | None]:
        """(real/fake logits, class logits of the class head, of the twin head), of the augmented images; None
        for a head D lacks, and for both heads when not `classes`."""
        images = self.augment(images)
        order = class_grouped_order(y, self.std_group) if self.std_group else None
        if order is not None:  # D sees the rows grouped by label; its outputs go back to the batch's order
            images, y = images[order], y[order]
        if classes and self.aux:
            outputs = self.D(images, y, with_classes=True)
        else:
            outputs = self.D(images, y), None, None
        if order is None:
            return outputs
        restore = torch.argsort(order)
        return tuple(None if out is None else out[restore] for out in outputs)

    def generator_loss(self, d_gen, classes_gen, twin_gen, labels, diversity, losses: dict) -> torch.Tensor:
        """G's loss on its images' logits: non-saturating BCE [+ mode seeking] [+ w * class head CE
        - w * twin head CE]; the class terms are also logged into `losses`."""
        loss_g = F.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen))
        if diversity is not None:
            loss_g = loss_g + self.cfg.mode_seeking * diversity
        if self.aux:
            loss_g = loss_g + self.aux * _logged_cross_entropy(classes_gen, labels, losses, "class_loss_fake")
        if self.twin:
            loss_g = loss_g - self.aux * _logged_cross_entropy(twin_gen, labels, losses, "twin_loss_gen")
        return loss_g

    def reconstruction_loss(self, real: torch.Tensor, y, losses: dict) -> torch.Tensor:
        """r * L1(G(z_enc, y), real) + kl * KL(q(z | real, y) || N(0, I)) (cfg.reconstruction, .reconstruction_kl);
        the L1 (per pixel, on the [-1, 1] scale) and the KL (summed over z, mean over the batch) also logged."""
        with self.autocast():
            mu, logvar = self.encoder(real, y)
            mu, logvar = mu.float(), logvar.float()
            redrawn = self.G(reparameterize(mu, logvar), y).float()
        l1 = (redrawn - real).abs().mean()
        kl = kl_to_standard_normal(mu, logvar)
        losses["reconstruction_l1"], losses["encoder_kl"] = l1.detach(), kl.detach()
        return self.cfg.reconstruction * l1 + self.cfg.reconstruction_kl * kl

    def r1_step(self, real: torch.Tensor, y, losses: dict) -> None:
        """One step of D's body on R1_EVERY * cfg.r1 / 2 * E|grad_x D(x)|^2 over `real` as D sees it (augmented,
        in the batch's order), in fp32 on the plain module: the penalty's double backward does not pass through
        torch.compile. The mean squared gradient norm is logged as r1_grad_sq."""
        seen = self.augment(real).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(unwrap(self.D)(seen, y).sum(), seen, create_graph=True)
        grad_sq = grad.pow(2).flatten(1).sum(1).mean()
        opt = self.optimizers["discriminator"]
        opt.zero_grad(set_to_none=True)
        (R1_EVERY * self.cfg.r1 / 2 * grad_sq).backward()
        opt.step()
        losses["r1_grad_sq"] = grad_sq.detach()

    def step(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        in_batch = self.cfg.mode_seeking_in_batch and self.cfg.mode_seeking > 0
        fake_labels = paired_labels(labels) if in_batch else labels  # what G is asked for, what D's heads judge
        y, y_fake = (labels, fake_labels) if self.conditional else (None, None)
        real = x * 2 - 1  # the generator's tanh range
        z = torch.randn(x.shape[0], self.cfg.latent_dim, device=x.device)
        opt_g = self.optimizers["generator"]
        with self.autocast():
            fake = self.G(z, y_fake)
            d_real, classes_real, _ = self._discriminate(real, y)
            d_fake, _, twin_fake = self._discriminate(fake.detach(), y_fake, classes=self.twin)
            d_real, d_fake = d_real.float(), d_fake.float()
        self.real_logits = d_real.detach()  # (N,) in the batch's order, for the trainer's RealImageDiagnosis
        loss_d = F.binary_cross_entropy_with_logits(d_real, torch.full_like(d_real, 1 - self.cfg.label_smoothing)) + \
            F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
        losses = {}
        if self.aux:
            loss_d = loss_d + self.aux * _logged_cross_entropy(classes_real, labels, losses, "class_loss_real")
        if self.twin:
            loss_d = loss_d + self.aux * _logged_cross_entropy(twin_fake, fake_labels, losses, "twin_loss_fake")
        d_optimizers = [opt for name, opt in self.optimizers.items() if name != "generator"]  # body [+ class head, twin head]
        for opt in d_optimizers:
            opt.zero_grad(set_to_none=True)
        loss_d.backward()
        for opt in d_optimizers:
            opt.step()
        self.steps += 1
        if self.cfg.r1 and self.steps % R1_EVERY == 0:
            self.r1_step(real, y, losses)

        with frozen(self.D, keep=self.encoder):
            with self.autocast():
                d_gen, classes_gen, twin_gen = self._discriminate(fake, y_fake)
                d_gen = d_gen.float()
                diversity = None
                if in_batch:
                    diversity = mode_seeking_term(*in_batch_pairs(fake, z)).float()
                elif self.cfg.mode_seeking:
                    z2 = torch.randn_like(z)
                    diversity = mode_seeking_term(fake, self.G(z2, y_fake), z, z2).float()
            loss_g = self.generator_loss(d_gen, classes_gen, twin_gen, fake_labels, diversity, losses)
            g_optimizers = [opt_g]
            if self.encoder is not None:
                loss_g = loss_g + self.reconstruction_loss(real, y, losses)
                g_optimizers.append(self.optimizers["encoder"])
            for opt in g_optimizers:
                opt.zero_grad(set_to_none=True)
            loss_g.backward()
            for opt in g_optimizers:
                opt.step()
        return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), "d_real": torch.sigmoid(d_real.detach()).mean(),
                "d_fake": torch.sigmoid(d_fake.detach()).mean(), **losses}


class WGANGPObjective(Objective):
    """WGAN-GP: the critic minimises D(G(z)) - D(x) + lambda * GP every batch; G minimises -D(G(z)) every n_critic
    (so loss_g is among a step's losses only on those steps)."""

    def __init__(self, cfg, device, generator: nn.Module, critic: nn.Module, conditional: bool):
        super().__init__(cfg, device)
        self.G, self.D, self.conditional = generator, critic, conditional
        self.optimizers = {"generator": _adam(generator, cfg), "critic": _adam(critic, cfg)}
        self.steps = 0

    def step(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        y = labels if self.conditional else None
        real = x * 2 - 1
        opt_g, opt_c = self.optimizers["generator"], self.optimizers["critic"]
        z = torch.randn(x.shape[0], self.cfg.latent_dim, device=x.device)
        with torch.no_grad():
            fake = self.G(z, y)
        wasserstein = self.D(fake, y).mean() - self.D(real, y).mean()  # critic in fp32: the GP needs it
        gp = gradient_penalty(uncompiled(self.D), real, fake, y)  # a double backward: not through torch.compile
        loss_c = wasserstein + self.cfg.gp_weight * gp
        opt_c.zero_grad(set_to_none=True)
        loss_c.backward()
        opt_c.step()

        losses = {"loss_c": loss_c.detach(), "wasserstein": -wasserstein.detach(), "gp": gp.detach()}
        self.steps += 1
        if self.steps % self.cfg.n_critic == 0:
            z = torch.randn(x.shape[0], self.cfg.latent_dim, device=x.device)
            with self.autocast():
                fake = self.G(z, y)
            with frozen(self.D):
                loss_g = -self.D(fake.float(), y).mean()
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
            losses["loss_g"] = loss_g.detach()
        return losses


def build_objective(cfg: TrainConfig, device, generator, discriminator, conditional: bool) -> Objective:
    if cfg.objective == "vae":
        return VAEObjective(cfg, device, generator, conditional)
    if cfg.objective == "gan":
        return GANObjective(cfg, device, generator, discriminator, conditional)
    return WGANGPObjective(cfg, device, generator, discriminator, conditional)
