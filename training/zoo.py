"""The model zoo: every shipped model as a list of overrides of `TrainConfig`, and the commands that build it.

    python -m training.zoo list                                   # what is shipped / trainable
    python -m training.zoo train --runs runs [--only mnist/cdcgan]   # train (resumes unfinished runs)
    python -m training.zoo export --runs runs [--only ...]        # export finished runs to exported/, then the mixtures
    python -m training.zoo table                                  # the README's model table, from the cards

Every other dataset id (bloodmnist, bloodmnist_64, pathmnist, dermamnist, ...) trains the same way with
`python -m training.train --dataset ID --model MODEL`; TRAINABLE_NOT_SHIPPED lists the suggested runs for the
MedMNIST files we could not obtain. Epochs are sized for the shared 2-core CPU these were trained on; more epochs on a GPU only help.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cli import flag, user_errors_exit
from .config import TrainConfig


@dataclass(frozen=True)
class ZooRun:
    """One model of the zoo: the TrainConfig overrides of its run and, where it has them, later stages
    (`then`): each continues the same run with --resume and changes the settings it names, as a fine-tune at a
    lower learning rate does. The checkpoint and the model card record each stage's changes (`resumes`)."""
    dataset: str
    model: str
    overrides: dict = field(default_factory=dict)
    then: tuple[dict, ...] = ()
    weights: str = "float32"  # how `export` stores the parameters (training.export: "float32" or "float16")

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.model}"

    def stages(self) -> list[dict]:
        """Each stage's overrides: the first stage's, then each later stage's changes on top of the one before."""
        stages = [dict(self.overrides)]
        for changes in self.then:
            stages.append(stages[-1] | changes)
        return stages

    def configs(self, runs: Path, data_dir: str | None) -> list[TrainConfig]:
        return [TrainConfig(dataset=self.dataset, model=self.model, data_dir=data_dir,
                            out_dir=str(runs / self.dataset / self.model), **overrides).resolve()
                for overrides in self.stages()]

    def config(self, runs: Path, data_dir: str | None) -> TrainConfig:
        """The config the finished model was trained with last (its card's `training.config`)."""
        return self.configs(runs, data_dir)[-1]


SMALL = dict(batch_size=64)  # the small MedMNIST sets: more steps per epoch

# In training order: the models the service is most often asked for first.
# Each entry's command trained its shipped file but for the EMA below; tests/test_zoo.py checks each card's epochs
# and every training setting it records against the entry. Settings added to the trainer after a card was written
# are not on it; the one known to change what an old command trains is the generator EMA: the BreastMNIST cDCGAN
# was trained before it, and its command now keeps one from the first step (a rerun of that command measured CAS
# 72.2 ± 1.8% against the shipped file's 74.6 ± 1.3%; docs/zoo-experiments.md).
# Precision (cards: training.precision): the RetinaMNIST DCGAN, the MNIST and Fashion-MNIST cDCGANs and the
# BreastMNIST-64 cDCGAN and cVAE were trained in bf16; every other shipped model in fp32, most of them before the
# trainer used bf16 on CPUs that have it, so on such a CPU their commands now train in bf16 (add --no-amp for fp32).
# The RetinaMNIST cDCGAN's command says --no-amp: before its last-100-epochs decay, the same command in bf16 measured
# CAS 48.7% and FID 4.15 against the fp32 run's 49.5% and 3.34 (one run each).
SHIPPED = [
    # Batch 512 (twice the learning rate) with the R1 penalty on D (gamma 0.1), then fine-tunes at a tenth of the rate
    # without it: the mode-seeking term at 0.175, then 0.1 for eighteen epochs. CAS 98.6% and FID 1.87x the floor
    # against 98.3% and 1.84x for the same recipe without R1 and twelve epochs at 0.1.
    ZooRun("mnist", "cdcgan", dict(epochs=30, lr_decay_epochs=8, batch_size=512, lr=4e-4, width=72, latent_dim=32,
                                   embed_dim=10, disc_width=144, aux_classifier=1.0, twin_classifier=True,
                                   mode_seeking_in_batch=True, compile=True, sample_every=5, r1=0.1),
           then=(dict(epochs=36, lr=4e-5, lr_decay_epochs=0, mode_seeking=0.175, sample_every=6, r1=0.0),
                 dict(epochs=54, mode_seeking=0.1))),
    ZooRun("pneumoniamnist", "cdcgan", dict(epochs=120, aux_classifier=0.3, sample_every=10, **SMALL)),
    ZooRun("retinamnist", "cdcgan", dict(epochs=300, lr_decay_epochs=100, aux_classifier=1.0,
                                         diff_augment="translation,cutout", amp=False, sample_every=50, **SMALL)),
    ZooRun("breastmnist", "cdcgan", dict(epochs=200, sample_every=25, **SMALL)),
    # The VAEs at beta 0.1 sample through a fitted 60-component mixture prior (training/latent_prior.py): FID 9.7
    # against 107.6 for the beta-1 file of 200 epochs, and 227 for the same beta-0.1 weights with an N(0, I) prior.
    # Stored in float16 (FID 9.72 either way) to keep exported/ within its budget with the priors' buffers.
    ZooRun("mnist", "mlp_vae", dict(epochs=60, lr_decay_epochs=20, beta=0.1, prior_components=60, sample_every=20),
           then=(dict(epochs=200, lr_decay_epochs=40),), weights="float16"),
    # beta 0.1 with a 10-component prior per class: FID 3.30 and CAS 98.8% against 13.05 and 97.2% at beta 1.
    ZooRun("mnist", "cvae", dict(epochs=30, lr_decay_epochs=10, beta=0.1, prior_components=10, sample_every=10),
           then=(dict(epochs=80, lr_decay_epochs=15),)),
    # beta 0.1 with a 10-component prior per class: FID 0.59 and CAS 90.0% against 1.27 and 82.0% at beta 1.
    ZooRun("pneumoniamnist", "cvae", dict(epochs=240, lr_decay_epochs=80, beta=0.1, prior_components=10, sample_every=40,
                                          **SMALL)),
    # beta 0.1 with a 5-component prior per class: FID 4.54 against 11.0 at beta 1 with N(0, I), CAS the same.
    ZooRun("retinamnist", "cvae", dict(epochs=150, lr_decay_epochs=50, beta=0.1, prior_components=5, sample_every=25,
                                       **SMALL)),
    # beta 0.1 with a 10-component prior per class, width 64: FID 3.69 and CAS 81.3% against 4.36 and 80.2% at width
    # 32, and 13.73 and 77.1% at beta 1, width 32.
    ZooRun("fashion_mnist", "cvae", dict(epochs=30, lr_decay_epochs=10, beta=0.1, prior_components=10, width=64,
                                         sample_every=10),
           then=(dict(epochs=80, lr_decay_epochs=15),)),
    ZooRun("fashion_mnist", "cdcgan", dict(epochs=30, lr_decay_epochs=8, width=96, latent_dim=32, embed_dim=10,
                                          disc_width=192, aux_classifier=1.0, twin_classifier=True,
                                          mode_seeking_in_batch=True, compile=True, sample_every=10),
           weights="float16"),
    # FID 4.2 in 60 epochs against 67.1 for the beta-1 file of 220 epochs, and 174 with an N(0, I) prior.
    ZooRun("mnist", "conv_vae", dict(epochs=60, lr_decay_epochs=20, beta=0.1, prior_components=60, sample_every=20)),
    # beta 0.1 (a beta-VAE below 1): FID 13.9 against 34.7 at beta 0.25, 55.3 at 0.5 and 63.8 at 1, the same 800
    # epochs (the beta 0.1 run was stopped after epoch 247 and resumed).
    ZooRun("breastmnist_64", "conv_vae", dict(epochs=800, lr_decay_epochs=250, beta=0.1, sample_every=100, **SMALL),
           weights="float16"),
    # The two MLP GANs (1.5M parameters each) are stored in float16 since 2026-12-06, to make room for the Fashion-MNIST
    # mixture: FID 6.227 -> 6.224 (MNIST) and 0.290 -> 0.290 (PneumoniaMNIST), re-exported from their float32 files
    # (`python -m training.export exported/D/mlp_gan --from-exported --weights float16 --overwrite`; the checkpoints are gone).
    ZooRun("mnist", "mlp_gan", dict(epochs=50, lr_decay_epochs=15, sample_every=10), weights="float16"),
    ZooRun("pneumoniamnist", "mlp_gan", dict(epochs=100, lr_decay_epochs=30, sample_every=20, **SMALL), weights="float16"),
    # The width-32 generator (0.31M parameters) drew broken strokes (FID 24.3); width 64 (0.84M) in float16: 17.8
    # at 25 epochs, 13.2 at 40, 10.9 at 55, 9.8 at 70, 8.6 at 85.
    ZooRun("mnist", "dcgan", dict(epochs=25, lr_decay_epochs=8, width=64, disc_width=32, compile=True, sample_every=5),
           then=(dict(epochs=40), dict(epochs=55), dict(epochs=70), dict(epochs=85)), weights="float16"),
    # 5 critic steps per generator step: 5 epochs were blobs, 40 broken strokes; each later stage (a warm restart
    # of the rate, then its decay) cut the FID: 60.6 at 40 epochs, 31.5 at 80, 23.9 at 110, 22.0 at 130, 17.5 at 160,
    # 15.5 at 190, 14.8 at 215, 13.6 at 245, 13.2 at 275.
    ZooRun("mnist", "wgan_gp", dict(epochs=40, lr_decay_epochs=10, sample_every=5),
           then=(dict(epochs=80, lr_decay_epochs=20, sample_every=10), dict(epochs=110, lr_decay_epochs=15), dict(epochs=130),
                 dict(epochs=160), dict(epochs=190), dict(epochs=215), dict(epochs=245), dict(epochs=275))),
    ZooRun("retinamnist", "dcgan", dict(epochs=150, diff_augment="translation,cutout", sample_every=25, **SMALL)),
    # beta 0.1 with a 20-component prior: FID 2.62 against 7.68 at beta 1 with N(0, I) (4.69 at beta 1 with the prior).
    ZooRun("retinamnist", "conv_vae", dict(epochs=500, lr_decay_epochs=150, beta=0.1, prior_components=20,
                                           sample_every=100, **SMALL)),
    # This model and the BreastMNIST-64 conv VAE were re-stored in float16 from their float32 files on 2026-12-07 (the
    # same FID, one machine and hour) to make room for the two conditional models at 64x64 below.
    ZooRun("breastmnist_64", "dcgan", dict(epochs=200, lr_decay_epochs=60, sample_every=25, **SMALL), weights="float16"),
    # The DCGAN's command made conditional (mode-seeking term 0.25, the cDCGAN default). Without that term, with
    # DiffAugment, class-grouped std, 400 epochs or a class head of weight 0.3: FID 11.0 to 29.3 against 8.9; the
    # same command at --seed 1: 11.5 (docs/zoo-experiments.md).
    ZooRun("breastmnist_64", "cdcgan", dict(epochs=200, lr_decay_epochs=60, sample_every=25, **SMALL), weights="float16"),
    # The PneumoniaMNIST cVAE's command at 64x64 for twice the epochs: blurrier than the cDCGAN (FID 17.5) but a better
    # training set (CAS 81.4% against 72.9%), so the catalog's best_for_training for breastmnist_64. At 240 epochs
    # (the PneumoniaMNIST schedule): FID 31.5, CAS 79.1%. At beta 0.05 and 480 epochs: FID 11.2, CAS 79.3%.
    ZooRun("breastmnist_64", "cvae", dict(epochs=480, lr_decay_epochs=160, beta=0.1, prior_components=10,
                                          sample_every=80, **SMALL), weights="float16"),
]

# Supported and tested on files of the official layout, not shipped: we have no real files for them.
# A user with the files (or internet and --download) runs the same commands.
TRAINABLE_NOT_SHIPPED = [
    ZooRun("bloodmnist", "cdcgan", dict(epochs=30)),
    ZooRun("bloodmnist_64", "cdcgan", dict(epochs=30)),
    ZooRun("bloodmnist_64", "dcgan", dict(epochs=30)),
    ZooRun("bloodmnist_64", "conv_vae", dict(epochs=30)),
    ZooRun("pathmnist", "cdcgan", dict(epochs=10)),
    ZooRun("pathmnist_gray", "mlp_gan", dict(epochs=20)),
    ZooRun("dermamnist", "cdcgan", dict(epochs=50)),
    ZooRun("organamnist", "cdcgan", dict(epochs=20)),
]


@dataclass(frozen=True)
class ZooMixture:
    """A shipped mixture of exported models of one dataset (training/mixture.py): each image from one member,
    picked with the member's share, its noise scaled by the member's noise scale. Nothing is trained for it:
    `python -m training.zoo export` composes it from the exported members."""
    dataset: str
    members: tuple[tuple[str, float, float], ...]  # (model, share, noise scale)
    model: str = "mixture"

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.model}"

    def member_dirs(self, exported: Path) -> list[Path]:
        return [exported / self.dataset / model for model, _, _ in self.members]


# The Fashion-MNIST cDCGAN and cVAE fail differently (mode dropping against blur): a CAS pool drawn from both
# trains a better classifier than either's alone (docs/zoo-experiments.md, "A mixture of the two Fashion-MNIST
# generators"). The cVAE runs at noise scale 1.3, where its own CAS beats temperature 1 (82.8% against 81.3%;
# README, "Temperature").
MIXTURES = [
    ZooMixture("fashion_mnist", (("cdcgan", 0.5, 1.0), ("cvae", 0.5, 1.3))),
]


def mixture_command(mixture: ZooMixture, exported: str = "exported") -> str:
    dirs = " ".join(f"{exported}/{mixture.dataset}/{model}" for model, _, _ in mixture.members)
    shares = " ".join(f"{share:g}" for _, share, _ in mixture.members)
    scales = " ".join(f"{scale:g}" for _, _, scale in mixture.members)
    return f"python -m training.mixture {dirs} --shares {shares} --noise-scales {scales} --name {mixture.model}"


GENERATOR_SIZE_FIELDS = ("width", "latent_dim", "embed_dim")  # what sizes a generator's weights and its call


def zoo_sizes(dataset: str, model: str, fields: tuple[str, ...] = GENERATOR_SIZE_FIELDS) -> dict:
    """The sizes the zoo trains dataset/model at ({"width": ..., and the other `fields` where its entry sets
    them}; TrainConfig's defaults otherwise): what the benchmarks build, so they measure what we ship. The
    serving benchmark needs the generator's; the training one adds "disc_width"."""
    for run in SHIPPED + TRAINABLE_NOT_SHIPPED:
        if run.key == f"{dataset}/{model}":
            return {"width": TrainConfig.width} | {k: run.overrides[k] for k in fields if k in run.overrides}
    raise KeyError(f"{dataset}/{model} is not in the zoo")


def command(run: ZooRun) -> str:
    """The shell command that trains run: one `training.train` per stage, the later ones with --resume."""
    commands = []
    for stage, overrides in enumerate(run.stages()):
        flags = " ".join(flag(k, v) for k, v in overrides.items()) + (" --resume" if stage else "")
        commands.append(f"python -m training.train --dataset {run.dataset} --model {run.model} {flags}".strip())
    return " && ".join(commands)


def finished_epoch(out_dir: Path) -> int:
    path = out_dir / "checkpoint.pt"
    if not path.exists():
        return 0
    return torch.load(path, map_location="cpu", weights_only=False)["epoch"]


def train_run(run: ZooRun, runs: Path, data_dir: str | None) -> None:
    """Train what is left of run's stages: a fresh run starts, an interrupted one continues where it stopped."""
    from .train import main as train

    for cfg in run.configs(runs, data_dir):
        done = finished_epoch(Path(cfg.out_dir))
        if done < cfg.epochs:
            print(f"{run.key}: training epochs {done + 1}..{cfg.epochs}", flush=True)
            train(cfg, resume=done > 0)
            done = finished_epoch(Path(cfg.out_dir))  # what the checkpoint says (--max-steps may stop sooner)
    print(f"{run.key}: done ({done} epochs)", flush=True)


def _pct(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    if value is None:
        return "–"
    std = metrics.get(f"{key}_std")
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def _gains(metrics: dict) -> str:
    gains = sorted((k for k in metrics if k.startswith("aug_gain_")), key=lambda k: float(k[9:-3]))
    return ", ".join(f"{k[9:-3]}%: {100 * metrics[k]:+.1f}" for k in gains) or "–"


def model_table(exported: Path) -> str:
    """A Markdown table of every exported model: training and the metrics on its card (percent)."""
    rows = ["| dataset / model | epochs | train time | FID (floor) | precision / recall | copies (real test) | label fidelity | CAS (real) "
            "| augmentation gain (points) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for card_path in sorted(exported.glob("*/*/card.json")):
        card = json.loads(card_path.read_text())
        m, t = card.get("metrics", {}), card["training"]
        fid = f"{m['fid']:.2f} ({m['fid_floor']:.2f})" if "fid" in m else "not evaluated"
        pr = f"{m['precision']:.2f} / {m['recall']:.2f}" if "precision" in m else "–"
        cas = f"{_pct(m, 'cas')} ({_pct(m, 'cas_real')})" if "cas" in m else "–"
        memo = m.get("memorisation", {})
        copies = f"{_pct(memo, 'copy_fraction')}% ({_pct(memo, 'copy_fraction_real')}%)" if memo else "–"
        epochs = t["epochs"]
        if "mixture" in card:  # the members' shares in the epochs column; the time is the members' together
            epochs = " + ".join(f"{100 * member['share']:g}% {member['model']}" for member in card["mixture"]["members"])
        rows.append(f"| {card['dataset']} / {card['model']} | {epochs} | {t['wall_time_s'] / 60:.0f} min | {fid} | {pr} "
                    f"| {copies} | {_pct(m, 'label_fidelity')} | {cas} | {_gains(m)} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["list", "train", "export", "table"],
                        help="export rebuilds the zoo in --out: it replaces the models and mixtures there")
    parser.add_argument("--runs", default="runs", help="runs folder (default: runs)")
    parser.add_argument("--data-dir", default=None, help="data folder (default: $SYNTHGEN_DATA_DIR, then ./data)")
    parser.add_argument("--out", default="exported", help="export root (default: exported)")
    parser.add_argument("--only", nargs="*", default=None, help="dataset/model keys, e.g. mnist/cdcgan")
    args = parser.parse_args()
    runs = Path(args.runs)
    known = SHIPPED + TRAINABLE_NOT_SHIPPED
    unknown = sorted(set(args.only or ()) - {r.key for r in known} - {m.key for m in MIXTURES})
    if unknown:
        parser.error(f"--only: no zoo run {', '.join(unknown)}; known: "
                     f"{', '.join([r.key for r in known] + [m.key for m in MIXTURES])}")
    # Without --only: the shipped runs (the files of the others are not here); with it, any run.
    selected = [r for r in known if r.key in args.only] if args.only is not None else SHIPPED

    if args.action == "list":
        print("shipped:")
        for run in SHIPPED:
            export = f"  (export: --weights {run.weights})" if run.weights != "float32" else ""
            print(f"  {run.key:28s} {command(run)}{export}")
        print("trainable, not shipped (no real files here):")
        for run in TRAINABLE_NOT_SHIPPED:
            print(f"  {run.key:28s} {command(run)}")
        print("mixtures of shipped models (composed by `export`, nothing trained):")
        for mixture in MIXTURES:
            print(f"  {mixture.key:28s} {mixture_command(mixture, args.out)}")
        return
    if args.action == "table":
        print(model_table(Path(args.out)))
        return
    if args.action == "train":
        for run in selected:
            train_run(run, runs, args.data_dir)
        return
    from .export import export_run

    for run in selected:
        cfg = run.config(runs, args.data_dir)
        out_dir = Path(cfg.out_dir)
        if finished_epoch(out_dir) < cfg.epochs:
            print(f"{run.key}: not finished, skipped")
            continue
        out = export_run(out_dir, args.out, run.weights)
        card = json.loads((out / "card.json").read_text())
        print(f"{run.key}: exported, parity {card['parity_max_abs_error']}")
    from .mixture import export_mixture

    for mixture in MIXTURES:
        if args.only is not None and mixture.key not in args.only:
            continue
        dirs = mixture.member_dirs(Path(args.out))
        missing = [str(d) for d in dirs if not (d / "card.json").is_file()]
        if missing:
            print(f"{mixture.key}: members not exported ({', '.join(missing)}), skipped")
            continue
        shares, scales = [m[1] for m in mixture.members], [m[2] for m in mixture.members]
        out = export_mixture(dirs, shares, scales, mixture.model, args.out)
        print(f"{mixture.key}: composed, parity {json.loads((out / 'card.json').read_text())['parity_max_abs_error']}")


if __name__ == "__main__":
    with user_errors_exit():
        main()
