"""One config dataclass per training run. Every default is here; `None` means "the model family's default",
resolved once by `resolve()` and saved resolved, so config.json always says what actually ran.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .augment import parse_policy
from .cli import flag
from .data import parse_dataset_id
from .diagnosis import WEIGHTINGS
from .models import MODEL_FAMILIES

# Per-objective optimiser defaults: the reference projects' Adam settings (WGAN-GP: the paper's).
OPTIMIZER_DEFAULTS = {
    "gan": dict(lr=2e-4, beta1=0.5, beta2=0.999),
    "vae": dict(lr=1e-3, beta1=0.9, beta2=0.999),
    "wgan_gp": dict(lr=1e-4, beta1=0.0, beta2=0.9),
}


DCGAN_MODELS = ("dcgan", "cdcgan", "wgan_gp", "cwgan_gp")  # the families with a DCGAN discriminator or critic
CONDITIONAL_DCGAN_MODELS = tuple(m for m in DCGAN_MODELS if MODEL_FAMILIES[m].conditional)  # their class-conditional generators
# For messages: the GANs trained with BCE, and the VAEs.
BCE_GAN_MODELS = ", ".join(m for m, f in MODEL_FAMILIES.items() if f.objective == "gan")
VAE_MODELS = ", ".join(m for m, f in MODEL_FAMILIES.items() if f.objective == "vae")


def _flag(name: str) -> str:
    """A field as its errors name it: the field and its command-line flag, "batch_size (--batch-size)"."""
    return f"{name} ({flag(name)})"


@dataclass
class TrainConfig:
    dataset: str = "mnist"  # dataset id, e.g. mnist, pneumoniamnist, bloodmnist_64, pathmnist_gray
    model: str = "cdcgan"  # model id: a key of training.models.MODEL_FAMILIES (mlp_gan, cdcgan, ...)
    epochs: int = 10
    batch_size: int = 128  # per process; the reference loops use 64, 128 trains as well and faster
    lr: float | None = None  # Adam learning rate (GAN 2e-4, VAE 1e-3, WGAN-GP 1e-4)
    beta1: float | None = None  # Adam betas (GAN 0.5/0.999, VAE 0.9/0.999, WGAN-GP 0.0/0.9)
    beta2: float | None = None
    lr_decay_epochs: int = 0  # the last n epochs decay the learning rate linearly towards 0 (pix2pix's n_epochs_decay; 0 = constant)
    latent_dim: int | None = None  # GANs 100, VAEs 20
    width: int = 32  # ngf/ndf of the DCGANs, first conv width of the conv VAEs
    disc_width: int | None = None  # ndf of the DCGAN discriminator / critic alone (None = width): not exported, so it costs no bytes
    beta: float = 1.0  # VAE KL weight: beta-VAE when != 1
    prior_components: int = 0  # VAEs: sample from a K-component Gaussian mixture fitted to the training codes after the last epoch (0 = N(0, I))
    n_critic: int = 5  # WGAN-GP critic steps per generator step
    gp_weight: float = 10.0  # WGAN-GP gradient-penalty weight
    label_smoothing: float = 0.0  # GAN: real targets become 1 - label_smoothing
    mode_seeking: float | None = None  # GAN mode-seeking weight (MSGAN); cdcgan 0.25, others 0 (WGAN-GP: no such term)
    mode_seeking_in_batch: bool = False  # the mode-seeking pairs from the batch halves, no second G pass (MNIST cdcgan: 29% less arithmetic, worse FID on 2 of 4 datasets)
    ema_decay: float | None = None  # generator weight EMA, the exported copy (GANs 0.999; VAEs 0 = off)
    aux_classifier: float = 0.0  # cdcgan: weight of the AC-GAN class loss (a class head on D; 0 = off)
    class_grouped_std: bool = False  # cdcgan: D's minibatch-std groups each hold one class (see class_grouped_order)
    reconstruction: float = 0.0  # dcgan, cdcgan: weight of the cVAE-GAN term, L1 of G redrawing real images from an encoder's z (0 = off)
    reconstruction_kl: float = 0.01  # with reconstruction: weight of the encoder's KL to N(0, I)
    twin_classifier: bool = False  # cdcgan with aux_classifier: TAC-GAN's twin head, trained on generated images, G plays against it
    class_norm: bool = False  # cdcgan, cwgan_gp: class-conditional batch norm in the generator (a per-class scale and shift)
    embed_dim: int = 50  # cdcgan, cwgan_gp: the generator's label embedding; the class count or more loses nothing, each dim costs 16 x 4 ngf weights
    self_diagnosing_from: int = 0  # GANs trained with BCE (mlp_gan, cmlp_gan, dcgan, cdcgan): from this epoch on, D sees each real image in proportion to how much G under-represents it (Self-Diagnosing GAN, training/diagnosis.py; 0 = off)
    self_diagnosing_weights: str = "paper"  # with self_diagnosing_from: "paper" (mean + std of the logit, clipped), "ratio" (exp of the mean logit) or "inverse" (exp of minus it)
    r1: float = 0.0  # GANs trained with BCE (mlp_gan, cmlp_gan, dcgan, cdcgan): R1 penalty gamma / 2 * E|grad_x D(x)|^2 on real images (Mescheder et al. 2018), lazily every 16 steps (0 = off)
    diff_augment: str = ""  # GANs trained with BCE (mlp_gan, cmlp_gan, dcgan, cdcgan): DiffAugment policy for every image D sees, e.g. "translation,cutout" ("" = off)
    seed: int = 0
    data_dir: str | None = None  # default: $SYNTHGEN_DATA_DIR, then ./data
    download: bool = False
    out_dir: str | None = None  # default: runs/<dataset>/<model>
    sample_every: int = 1  # epochs between sample grids
    checkpoint_every: int = 1  # epochs between checkpoints
    max_steps: int | None = None  # stop after this many optimiser steps (smoke tests)
    tensorboard: bool = False
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    amp: bool = True  # bf16 autocast where the device computes bf16 natively (CUDA; CPUs with AVX512-BF16 / AMX)
    compile: bool = False  # torch.compile the networks (CUDA or CPU: ~40 s of compiling first, then 1.2-1.4x on an fp32 CPU, up to 2.9x in bf16)

    def resolve(self) -> "TrainConfig":
        parse_dataset_id(self.dataset)  # raises with the list of known ids
        for name in ("epochs", "batch_size", "width", "checkpoint_every", "sample_every", "n_critic"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} must be at least 1, not {getattr(self, name)}")
        if self.model not in MODEL_FAMILIES:
            raise ValueError(f"unknown model {self.model!r}; known: {', '.join(MODEL_FAMILIES)}")
        family = MODEL_FAMILIES[self.model]
        for key, value in OPTIMIZER_DEFAULTS[family.objective].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.mode_seeking is None:
            self.mode_seeking = 0.25 if family.conditional and family.objective == "gan" else 0.0  # WGAN-GP has no such term
        if self.mode_seeking_in_batch and not (family.objective == "gan" and self.mode_seeking > 0):
            raise ValueError("mode_seeking_in_batch pairs the images of the mode-seeking term: it needs a GAN trained with BCE "
                             f"({BCE_GAN_MODELS}) and mode_seeking > 0; got {self.model!r}, mode_seeking={self.mode_seeking}")
        if self.ema_decay is None:
            self.ema_decay = 0.0 if family.objective == "vae" else 0.999
        if not 0 <= self.lr_decay_epochs < self.epochs:
            raise ValueError(f"lr_decay_epochs must be in [0, epochs); got {self.lr_decay_epochs} with epochs={self.epochs}")
        if family.objective != "gan":
            for name in ("label_smoothing", "mode_seeking"):
                if getattr(self, name):
                    raise ValueError(f"{_flag(name)} applies to the GANs trained with BCE ({BCE_GAN_MODELS}), not "
                                     f"{self.model!r}")
        for name in ("n_critic", "gp_weight"):
            if family.objective != "wgan_gp" and getattr(self, name) != getattr(TrainConfig, name):
                raise ValueError(f"{_flag(name)} applies to WGAN-GP (wgan_gp, cwgan_gp), not {self.model!r}")
        if family.objective != "vae" and self.beta != TrainConfig.beta:
            raise ValueError(f"{_flag('beta')} is the VAEs' KL weight ({VAE_MODELS}), not {self.model!r}'s")
        if not (math.isfinite(self.aux_classifier) and self.aux_classifier >= 0):
            raise ValueError(f"{_flag('aux_classifier')} must be a number >= 0, not {self.aux_classifier}")
        if self.aux_classifier and self.model != "cdcgan":
            raise ValueError(f"aux_classifier applies to the conditional DCGAN (cdcgan), not {self.model!r}")
        if self.class_grouped_std and self.model != "cdcgan":
            raise ValueError("class_grouped_std groups the minibatch-std of a conditional DCGAN's discriminator by label: "
                             f"it applies to cdcgan, not {self.model!r}")
        if self.reconstruction < 0 or self.reconstruction_kl < 0:
            raise ValueError(f"reconstruction and reconstruction_kl must be >= 0, not {self.reconstruction}, {self.reconstruction_kl}")
        if self.reconstruction and self.model not in ("dcgan", "cdcgan"):
            raise ValueError(f"reconstruction (a cVAE-GAN's encoder) applies to dcgan and cdcgan, not {self.model!r}")
        if self.twin_classifier and not self.aux_classifier:
            raise ValueError("twin_classifier is the class head's twin: it needs aux_classifier > 0")
        if self.diff_augment and family.objective != "gan":
            raise ValueError(f"diff_augment applies to the GANs trained with BCE ({BCE_GAN_MODELS}), not {self.model!r}")
        if self.r1 < 0 or (self.r1 and family.objective != "gan"):
            raise ValueError(f"r1 penalises a BCE discriminator's gradient on real images ({BCE_GAN_MODELS}; 0 = off): "
                             f"got {self.r1} for {self.model!r}")
        if self.self_diagnosing_from < 0 or (self.self_diagnosing_from and family.objective != "gan"):
            raise ValueError(f"self_diagnosing_from reads a BCE discriminator's logits ({BCE_GAN_MODELS}; "
                             f"0 = off): got {self.self_diagnosing_from} for {self.model!r}")
        if self.self_diagnosing_weights not in WEIGHTINGS:
            raise ValueError(f"self_diagnosing_weights must be one of {', '.join(WEIGHTINGS)}, "
                             f"not {self.self_diagnosing_weights!r}")
        if self.self_diagnosing_weights != TrainConfig.self_diagnosing_weights and not self.self_diagnosing_from:
            raise ValueError("self_diagnosing_weights picks the weights of self_diagnosing_from, which is off (0): "
                             "set both")
        self.diff_augment = ",".join(parse_policy(self.diff_augment))  # validated, in the order applied
        if self.disc_width is not None and self.model not in DCGAN_MODELS:
            raise ValueError(f"disc_width applies to the DCGAN families ({', '.join(DCGAN_MODELS)}), not {self.model!r}")
        if self.disc_width is None and self.model in DCGAN_MODELS:
            self.disc_width = self.width
        if self.class_norm and self.model not in CONDITIONAL_DCGAN_MODELS:
            raise ValueError(f"class_norm applies to the conditional DCGAN generators ({', '.join(CONDITIONAL_DCGAN_MODELS)}), "
                             f"not {self.model!r}")
        if self.embed_dim != TrainConfig.embed_dim and self.model not in CONDITIONAL_DCGAN_MODELS:
            raise ValueError(f"embed_dim applies to the conditional DCGAN generators ({', '.join(CONDITIONAL_DCGAN_MODELS)}), "
                             f"not {self.model!r}")
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be at least 1, not {self.embed_dim}")
        if self.prior_components < 0 or (self.prior_components and family.objective != "vae"):
            raise ValueError(f"prior_components is the VAEs' fitted latent prior ({VAE_MODELS}; 0 = N(0, I)): "
                             f"got {self.prior_components} for {self.model!r}")
        if self.latent_dim is None:
            self.latent_dim = family.latent_dim
        self._check_ranges()
        if self.out_dir is None:
            self.out_dir = str(Path("runs") / self.dataset / self.model)
        return self

    def _check_ranges(self) -> None:
        """Numbers that would train nothing useful, or crash later with a message that names no flag: the fields
        that may be None until resolved or left out (checked once resolved), the rates and weights."""
        for name in ("latent_dim", "disc_width", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} must be at least 1, not {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"{_flag('lr')} must be a positive number, not {self.lr}")
        for name in ("beta1", "beta2", "ema_decay", "label_smoothing"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} must be in [0, 1), not {getattr(self, name)}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"{_flag('beta')} (the VAE's KL weight) must be a positive number, not {self.beta}")
        for name in ("gp_weight", "mode_seeking"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{_flag(name)} must be a number >= 0, not {getattr(self, name)}")
        if self.device != "auto":
            import torch

            try:
                device_type = torch.device(self.device).type
            except RuntimeError:
                device_type = None
            if device_type not in ("cpu", "cuda"):
                raise ValueError(f"{_flag('device')} must be auto, cpu, cuda or cuda:N, not {self.device!r}")

    @property
    def objective(self) -> str:
        return MODEL_FAMILIES[self.model].objective

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
