"""Train any model family on any dataset: one loop, the objective supplies the step.

    python -m training.train --dataset mnist --model cdcgan --epochs 10 --data-dir ../shared/data
    python -m training.train --dataset bloodmnist_64 --model cdcgan --epochs 30
    python -m training.train --dataset pathmnist_gray --model mlp_gan --epochs 20
    torchrun --nproc_per_node=2 -m training.train --dataset mnist --model dcgan --epochs 5   # DDP (gloo on CPU, nccl on GPU)

A run directory (default runs/<dataset>/<model>) gets: config.json (the resolved config), checkpoint.pt
(self-describing: weights, the generator's EMA copy, optimisers, epoch, step, config, code version), metrics.csv and metrics.jsonl
(per-epoch mean losses), loss_curve.png, samples/epoch_NNN.png (fixed-seed grid, one row per class for
conditional models) and, with --tensorboard, TensorBoard events. A VAE run with --prior-components K then fits
its latent prior (training/latent_prior.py) to the final weights: the checkpoint's `latent_prior`, and
samples/epoch_NNN_prior.png drawn through it. Run again with --resume to continue (a folder that holds a
checkpoint is refused without --resume or --overwrite, so a forgotten flag never wipes a run); a resume
that changes a training setting (say, more epochs with --aux-classifier) is recorded in the checkpoint's
`resumes` and from there on the model card.

Speed: the dataset is held as one uint8 tensor on the device, batches are index slices of it (no
DataLoader, no per-sample Python work); bf16 autocast (--amp, default on) on CUDA and on CPUs that compute bf16
natively (fp32 elsewhere), and --compile. The losses stay on the device until the end of the epoch, so a GPU is
never made to wait for the CPU to read them; on CUDA cuDNN picks its fastest convolutions for the fixed shapes.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .cli import UsageError, flag, user_errors_exit
from .config import TrainConfig
from .data import dataset_info, known_dataset_ids, load_dataset, resolve_data_dir
from .diagnosis import RealImageDiagnosis
from .hardware import hardware_name
from .ema import GeneratorEMA
from .latent_prior import fit_prior, most_components
from .models import MODEL_FAMILIES, build_model
from .models.prior import MixturePrior
from .objectives import build_objective
from .sampling import save_sample_grid, unwrap

CHECKPOINT = "checkpoint.pt"
# torch 2.13 renamed DistributedDataParallel's broadcast_buffers (warning on each use); the GPU host has torch 2.11
DDP_BUFFER_SYNC = next(name for name in ("forward_sync_buffers", "broadcast_buffers")
                       if name in inspect.signature(DistributedDataParallel).parameters)
PREVIEW_SEED = 1234  # of samples/epoch_NNN.png: the same noise every epoch, so the grids show training progress
# Config fields that do not change what is learned: a resume may change them without a record.
NOT_TRAINING_FIELDS = ("epochs", "out_dir", "data_dir", "download", "sample_every", "checkpoint_every", "max_steps",
                       "tensorboard", "device")


def code_version() -> str:
    """The git commit of the training code (with -dirty if modified), or 'unknown' outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here, capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def wrap_networks(generator: torch.nn.Module, discriminator: torch.nn.Module | None, world: int,
                  compile: bool) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The networks as a step runs them: in DistributedDataParallel under torchrun (world > 1), compiled with
    --compile. (The training benchmark wraps them the same way, through this.)"""
    if world > 1:
        # No buffer sync in forward: GAN steps run D several times per backward; per-rank BN stats are fine.
        no_sync = {DDP_BUFFER_SYNC: False}
        generator = DistributedDataParallel(generator, **no_sync)
        if discriminator is not None:
            discriminator = DistributedDataParallel(discriminator, **no_sync)
    if compile:
        # Static shapes: a training batch never changes size, and a second shape (a preview grid) should get its
        # own specialised graph, not turn every later one into a dynamic-shape graph.
        generator = torch.compile(generator, dynamic=False)
        discriminator = torch.compile(discriminator, dynamic=False) if discriminator is not None else None
    return generator, discriminator


def learning_rate(cfg: TrainConfig, epoch: int) -> float:
    """cfg.lr, then over the last cfg.lr_decay_epochs epochs a linear decay to lr / (lr_decay_epochs + 1) in the
    last one (pix2pix / CycleGAN's schedule). The schedule depends on cfg.epochs only when it decays."""
    decayed = max(0, epoch - (cfg.epochs - cfg.lr_decay_epochs))
    return cfg.lr * (1 - decayed / (cfg.lr_decay_epochs + 1))


def field_comments() -> dict[str, str]:
    """Each TrainConfig field's trailing comment in training/config.py, the one place its meaning is written:
    `--help` shows it."""
    line = re.compile(r"^    (\w+): [^=]+ = .*?  # (.*)$")
    return {m.group(1): m.group(2) for m in map(line.match, inspect.getsource(TrainConfig).splitlines()) if m}


def parse_args(argv=None) -> tuple[TrainConfig, bool]:
    """(config, resume) from the command line: one flag per TrainConfig field, plus --resume and --overwrite.
    A run folder that holds a checkpoint is neither continued nor overwritten unless one of the two says so."""
    defaults, comments = TrainConfig(), field_comments()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    for field in dataclasses.fields(TrainConfig):
        option = flag(field.name)
        default = getattr(defaults, field.name)
        # argparse expands "%" in help; a None default is explained by the comment ("None = ...")
        help_text = " ".join(part for part in (comments.get(field.name, "").replace("%", "%%"),
                                               f"(default: {default!r})" if default is not None else "") if part)
        if field.type == "bool":
            parser.add_argument(option, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        kind = {"int": int, "float": float, "str": str}.get(str(field.type).split(" |")[0], str)
        extra = {}
        if field.name == "dataset":
            help_text += f"; known: {', '.join(known_dataset_ids())} (RGB sets also take _gray)"
        if field.name == "model":
            extra["choices"] = list(MODEL_FAMILIES)
        parser.add_argument(option, type=kind, default=default, help=help_text, **extra)
    parser.add_argument("--resume", action="store_true", help="continue from <out-dir>/checkpoint.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again in an <out-dir> that holds a checkpoint, replacing it")
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume")  # not a config field: a resume that changes the config is recorded instead
    overwrite = args.pop("overwrite")
    if resume and overwrite:
        parser.error("--resume continues the run in --out-dir and --overwrite starts it again: give one")
    try:
        cfg = TrainConfig(**args).resolve()
    except ValueError as err:  # unknown dataset or model id: the message lists the known ones
        parser.error(str(err))
    checkpoint = Path(cfg.out_dir) / CHECKPOINT
    if checkpoint.exists() and not (resume or overwrite):
        parser.error(f"{checkpoint} exists: --resume continues that run, --overwrite starts it again (replacing "
                     "it), or give another --out-dir")
    return cfg, resume


def setup_distributed(cfg: TrainConfig) -> tuple[torch.device, int, int]:
    """(device, rank, world size). Under torchrun (WORLD_SIZE set) joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise UsageError(f"--device {cfg.device}: torch {torch.__version__} sees no CUDA GPU here; use --device cpu "
                         "(or auto)")
    if world > 1 and cfg.reconstruction:
        raise UsageError("--reconstruction trains in one process only: its encoder lives in the discriminator's module, "
                         "and DistributedDataParallel would wait for encoder gradients that the discriminator's step never makes")
    if world > 1 and cfg.r1:
        raise UsageError("--r1 trains in one process only: its penalty's double backward runs on the plain "
                         "discriminator, outside DistributedDataParallel's gradient sync")
    if world > 1 and cfg.self_diagnosing_from:
        raise UsageError("--self-diagnosing-from trains in one process only: each process would keep the record of "
                         "its own share of the real images, and draw its batches from it")
    if world > 1:
        dist.init_process_group("nccl" if want_cuda else "gloo")
        rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
        if want_cuda:
            torch.cuda.set_device(device)
        return device, rank, world
    return torch.device(cfg.device if cfg.device != "auto" else ("cuda" if want_cuda else "cpu")), 0, 1


def main(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train one run into cfg.out_dir (continuing its checkpoint when resume) and return that folder."""
    cfg = dataclasses.replace(cfg, data_dir=str(resolve_data_dir(cfg.data_dir)))  # the config records where the data was
    device, rank, world = setup_distributed(cfg)
    is_main = rank == 0
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out}: a file is there; give a folder for the run")
    family = MODEL_FAMILIES[cfg.model]
    info = dataset_info(cfg.dataset)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch has the same shape: time the algorithms once, keep the fastest

    data = load_dataset(cfg.dataset, "train", cfg.data_dir, cfg.download)
    train_data = describe_data(data.images, data.labels, info.num_classes)
    train_data["processes"] = world  # torchrun's: each takes batch_size images a step
    if cfg.prior_components > (limit := most_components(data.labels, info.num_classes if family.conditional else 0)):
        raise UsageError(f"--prior-components {cfg.prior_components}: a mixture can have at most {limit} components "
                         f"here (the latent codes of the smallest group it is fitted to)")
    images, labels = data.images.to(device), data.labels.to(device)  # (N, C, H, W) uint8, (N,) int64

    generator, discriminator = build_model(cfg.model, info.image_shape, info.num_classes, cfg.latent_dim, cfg.width,
                                           class_head=cfg.aux_classifier > 0, twin_head=cfg.twin_classifier,
                                           disc_width=cfg.disc_width, class_norm=cfg.class_norm, embed_dim=cfg.embed_dim,
                                           encoder=cfg.reconstruction > 0)
    generator = generator.to(device)
    discriminator = discriminator.to(device) if discriminator is not None else None

    start_epoch, step, wall_time = 1, 0, 0.0
    checkpoint_path = out / CHECKPOINT
    state = None
    if resume:
        if not checkpoint_path.exists():
            raise UsageError(f"--resume: no checkpoint at {checkpoint_path}; train without --resume to start the run")
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        _check_resume_matches(state, cfg)
        if not state.get("epoch_complete", True) and cfg.epochs > state["epoch"]:
            raise UsageError(f"--resume: {checkpoint_path} stopped inside epoch {state['epoch']} (--max-steps), and a "
                             "resume starts at the next epoch, so the rest of that one would be skipped; train the run "
                             "again with --overwrite")
        generator.load_state_dict(state["models"]["generator"])
        if discriminator is not None:
            _load_discriminator(discriminator, state["models"]["discriminator"], is_main=rank == 0)
        start_epoch, step, wall_time = state["epoch"] + 1, state["step"], state["wall_time_s"]
        if cfg.epochs < state["epoch"]:
            raise UsageError(f"--resume: the checkpoint is at epoch {state['epoch']}, past --epochs {cfg.epochs}; "
                             f"give --epochs {state['epoch']} or more")
        if cfg.epochs == state["epoch"] and is_main:
            print(f"{checkpoint_path}: already at epoch {cfg.epochs}, no epochs to train", flush=True)
    ema = GeneratorEMA(generator, cfg.ema_decay) if cfg.ema_decay else None
    if ema is not None and state is not None and "generator_ema" in state:
        ema.load_state_dict(state["generator_ema"])

    generator, discriminator = wrap_networks(generator, discriminator, world, cfg.compile)
    objective = build_objective(cfg, device, generator, discriminator, family.conditional)
    diagnosis = None
    if cfg.self_diagnosing_from:
        diagnosis = RealImageDiagnosis(len(images), device, cfg.self_diagnosing_weights)
        if state is not None and "real_image_diagnosis" in state:
            diagnosis.load_state_dict(state["real_image_diagnosis"])
    resumes = _record_resume(state, cfg, start_epoch, objective.precision, train_data) if state is not None else []
    if state is not None:
        objective.load_state_dict(state["optimizers"])
        if "objective_steps" in state:
            objective.steps = state["objective_steps"]

    if min(cfg.batch_size, len(images) // world) < 2:  # batch norm (in every network here) needs 2 images a batch
        raise UsageError(f"{cfg.dataset}: {len(images) // world} training image(s) per process; training needs "
                         "batches of at least 2")
    log = None
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if state is None:
            clear_run_outputs(out)
        else:
            keep_outputs_through(out, state["epoch"])
        cfg.save(out / "config.json")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            log = SummaryWriter(str(out / "tensorboard"))

    n_shard = len(images) // world
    batch = min(cfg.batch_size, n_shard)
    train_data["batch_size"] = batch  # per process; below --batch-size when the data is smaller than a batch
    if batch < cfg.batch_size and is_main:
        print(f"{cfg.dataset}: {n_shard} training images per process, fewer than --batch-size {cfg.batch_size}: "
              f"batches of {batch}", flush=True)
    steps_per_epoch = n_shard // batch
    for epoch in range(start_epoch, cfg.epochs + 1):
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
        t0 = time.perf_counter()
        lr = learning_rate(cfg, epoch)
        objective.set_lr(lr)
        torch.manual_seed(cfg.seed * 100_003 + epoch * 101 + rank)  # noise: reproducible per epoch, so resume is exact
        order_rng = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # seeds 0 and 1 share no epoch's order
        reweighted = diagnosis is not None and epoch >= cfg.self_diagnosing_from and diagnosis.ready()
        if reweighted:
            draws_fraction = diagnosis.effective_fraction()  # of the weights this epoch's images are drawn with
        order = diagnosis.epoch_order(order_rng) if reweighted else torch.randperm(len(images), generator=order_rng)
        shard = order[rank * n_shard:(rank + 1) * n_shard].to(device)
        sums: dict[str, torch.Tensor] = {}  # on the device, read once at the end of the epoch
        counts: dict[str, int] = {}
        count = 0
        progress = range(steps_per_epoch)
        if is_main:
            from tqdm import tqdm

            progress = tqdm(progress, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=None)
        for i in progress:
            idx = shard[i * batch:(i + 1) * batch]
            x = images[idx].float().div_(255)  # (B, C, H, W) in [0, 1]
            losses = objective.step(x, labels[idx])
            if diagnosis is not None:
                diagnosis.record(idx, objective.real_logits)
            if ema is not None:
                ema.update(unwrap(generator))
            step += 1
            count += 1
            for key, value in losses.items():  # WGAN-GP has loss_g only on its generator steps
                sums[key] = sums[key] + value if key in sums else value.float()
                counts[key] = counts.get(key, 0) + 1
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
        seconds = time.perf_counter() - t0
        wall_time += seconds
        if not is_main:
            continue
        row = {"epoch": epoch, "step": step, "seconds": round(seconds, 3),
               "images_per_s": round(count * batch * world / seconds, 1), "lr": lr,
               **{k: v.item() / counts[k] for k, v in sums.items()}}
        if reweighted:
            row["real_draws_effective_fraction"] = round(draws_fraction, 4)
        _append_metrics(out, row)
        if log is not None:
            for key, value in row.items():
                if key not in ("epoch", "step"):
                    log.add_scalar(key, value, epoch)
        print(json.dumps(row), flush=True)
        last = epoch == cfg.epochs or (cfg.max_steps is not None and step >= cfg.max_steps)
        if epoch % cfg.sample_every == 0 or last:
            save_sample_grid(ema.model if ema is not None else generator, out / "samples" / f"epoch_{epoch:03d}.png",
                             PREVIEW_SEED)
            _plot_losses(out)
        if epoch % cfg.checkpoint_every == 0 or last:
            _save_checkpoint(checkpoint_path, cfg, info, generator, discriminator, ema, objective, epoch, step, wall_time,
                             device, resumes, train_data, diagnosis, epoch_complete=count == steps_per_epoch)
    if log is not None:
        log.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if is_main and family.objective == "vae" and checkpoint_path.exists():
        _update_latent_prior(out, cfg, data.images, data.labels, resumes)
    return out


def _update_latent_prior(out: Path, cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor,
                         resumes: list[dict]) -> None:
    """Fit the VAE's mixture prior to the final weights (`--prior-components`; training/latent_prior.py), or drop
    one when the run asks for none, and save it in the checkpoint with the config that asked. Skipped when the
    checkpoint already holds a prior of that size fitted to these weights."""
    path = out / CHECKPOINT
    model, state = load_checkpoint(out)
    have = state.get("latent_prior", {}).get("report", {})
    if have.get("components", 0) == cfg.prior_components and have.get("epoch", state["epoch"]) == state["epoch"]:
        return
    state.pop("latent_prior", None)
    if cfg.prior_components:
        t0 = time.perf_counter()
        prior, report = fit_prior(model, images, labels, cfg.prior_components, cfg.seed)
        report.update(epoch=state["epoch"], seconds=round(time.perf_counter() - t0, 1))
        state["latent_prior"] = {"state": prior.state(), "report": report}
        print(json.dumps({"latent_prior": report}), flush=True)
        model.prior = prior
        save_sample_grid(model, out / "samples" / f"epoch_{state['epoch']:03d}_prior.png", PREVIEW_SEED)
    state["config"], state["resumes"] = cfg.to_dict(), resumes
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


# A resume cannot change these: the data and model family the weights were trained for, and what shapes them.
RESUME_FIXED_FIELDS = ("dataset", "model", "latent_dim", "width", "disc_width", "class_norm", "embed_dim")


def _check_resume_matches(state: dict, cfg: TrainConfig) -> None:
    """Refuse, naming the flag, a resume on another dataset or family, or whose networks would not fit the
    checkpoint's weights."""
    saved = TrainConfig.from_dict(state["config"]).resolve()
    for name in RESUME_FIXED_FIELDS:
        before, now = getattr(saved, name), getattr(cfg, name)
        if before != now:
            if isinstance(before, bool):  # --class-norm / --no-class-norm
                wanted, given = flag(name, before), flag(name, now)
            else:
                wanted, given = flag(name, before), str(now)
            raise UsageError(f"--resume: the checkpoint was trained with {wanted}, not {given}; resume with {wanted}")


def _load_discriminator(discriminator, weights: dict, is_main: bool) -> None:
    """Resume the discriminator; a class head, twin head or latent encoder the checkpoint lacks
    (--aux-classifier, --twin-classifier or --reconstruction added on resume) starts fresh, and one the run no
    longer trains (the flag left out on resume) is dropped with its optimiser state."""
    missing, unexpected = discriminator.load_state_dict(weights, strict=False)
    heads = {"classifier.": "class head (--aux-classifier)", "twin_classifier.": "twin head (--twin-classifier)",
             "encoder.": "latent encoder (--reconstruction)"}
    if any(not key.startswith(tuple(heads)) for key in missing + unexpected):
        raise RuntimeError(f"checkpoint does not match the discriminator: missing {missing}, unexpected {unexpected}")
    for prefix, what in heads.items():
        if is_main and any(key.startswith(prefix) for key in missing):
            print(f"resume: the checkpoint has no {what}: this run starts one fresh", flush=True)
        if is_main and any(key.startswith(prefix) for key in unexpected):
            print(f"resume: this run does not train the checkpoint's {what}: its weights are dropped", flush=True)


def _record_resume(state: dict, cfg: TrainConfig, start_epoch: int, precision: str, train_data: dict) -> list[dict]:
    """The checkpoint's list of resumes that changed the training config, the arithmetic precision, the
    training data (its sha256) or the number of processes, plus this one if it does: so a model whose later
    epochs ran with other settings (say --aux-classifier from epoch 61, bf16 after fp32 on another machine, or
    another file of the dataset) says so."""
    before = TrainConfig.from_dict(state["config"]).resolve().to_dict()  # a field newer than the checkpoint: its default
    free = set(NOT_TRAINING_FIELDS)
    if before["lr_decay_epochs"] or cfg.lr_decay_epochs:
        free.discard("epochs")  # the decay starts at epochs - lr_decay_epochs: moving the end moves the schedule
    changed = {k: [before[k], v] for k, v in cfg.to_dict().items() if k not in free and before[k] != v}
    if state.get("precision", precision) != precision:  # checkpoints older than the field: not known, not recorded
        changed["precision"] = [state["precision"], precision]
    data_before = state.get("train_data", {})
    for key in ("sha256", "images", "processes"):  # a checkpoint older than a field: not known, not recorded
        if key in data_before and data_before[key] != train_data[key]:
            changed[f"train_data.{key}"] = [data_before[key], train_data[key]]
    resumes = list(state.get("resumes", []))
    if changed:
        resumes.append({"from_epoch": start_epoch, "changed": changed})
    return resumes


def describe_data(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """What a run trained on, for its checkpoint and card: the image count, the images per class, and a
    sha256 of the uint8 images and int64 labels as loaded (the same data gives the same digest whichever file
    or format it came from; a small or altered file gives another)."""
    digest = hashlib.sha256()
    for tensor in (images, labels):
        digest.update(memoryview(tensor.contiguous().numpy()).cast("B"))
    return {"split": "train", "images": len(images),
            "class_counts": torch.bincount(labels, minlength=num_classes).tolist(), "sha256": digest.hexdigest()}


def _save_checkpoint(path: Path, cfg, info, generator, discriminator, ema, objective, epoch, step, wall_time, device,
                     resumes: list[dict], train_data: dict, diagnosis: RealImageDiagnosis | None = None,
                     epoch_complete: bool = True) -> None:
    state = {
        "format": "synthgen-checkpoint/1",
        "version": code_version(),
        "torch_version": torch.__version__,
        "config": cfg.to_dict(),
        "dataset_info": dataclasses.asdict(info),
        "train_data": train_data,
        "epoch": epoch,
        "epoch_complete": epoch_complete,  # False: --max-steps stopped the run inside this epoch
        "step": step,
        "wall_time_s": wall_time,
        "hardware": hardware_name(device),
        "precision": objective.precision,  # "bf16" (autocast) or "fp32"
        "models": {"generator": unwrap(generator).state_dict(),
                   **({"discriminator": unwrap(discriminator).state_dict()} if discriminator is not None else {})},
        **({"generator_ema": ema.state_dict()} if ema is not None else {}),
        "optimizers": objective.state_dict(),
        "objective_steps": getattr(objective, "steps", 0),
        "resumes": resumes,  # [{"from_epoch": 61, "changed": {"aux_classifier": [0.0, 1.0]}}, ...]
        **({"real_image_diagnosis": diagnosis.state_dict()} if diagnosis is not None else {}),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a crash mid-save never leaves a truncated checkpoint


RUN_OUTPUTS = ("metrics.jsonl", "metrics.csv", "loss_curve.png", CHECKPOINT)  # and the folders samples/, tensorboard/
SAMPLE_EPOCH = re.compile(r"^epoch_(\d+)(?:_prior)?\.png$")


def clear_run_outputs(out: Path) -> None:
    """A run starting from scratch (not --resume) in a folder that holds an earlier run's outputs, left by
    --overwrite or a run stopped before its first checkpoint: remove them, so that none mixes with the new run's
    (its metrics rows, its sample grids). Anything else in the folder is left alone."""
    for name in RUN_OUTPUTS:
        (out / name).unlink(missing_ok=True)
    for folder in ("samples", "tensorboard"):
        if (out / folder).is_dir():
            shutil.rmtree(out / folder)


def keep_outputs_through(out: Path, epoch: int) -> None:
    """A run resumed from its checkpoint at `epoch`: the metrics rows and sample grids of later epochs came from
    a run that stopped before checkpointing them, and are dropped (the resumed run writes its own)."""
    path = out / "metrics.jsonl"
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if r.get("epoch", 0) <= epoch]
        if len(kept) < len(rows):
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            _write_metrics_csv(out, kept)
    for grid in (out / "samples").glob("epoch_*.png"):
        match = SAMPLE_EPOCH.match(grid.name)
        if match and int(match.group(1)) > epoch:
            grid.unlink()


def _append_metrics(out: Path, row: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    _write_metrics_csv(out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])


def _write_metrics_csv(out: Path, rows: list[dict]) -> None:
    """metrics.csv from the rows of metrics.jsonl (a column for every key any row has)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)


def _plot_losses(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [k for k in rows[-1] if k.startswith("loss") or k in ("recon", "kl", "gp", "wasserstein")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        ax.plot([r["epoch"] for r in rows], [r.get(key) for r in rows], marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.legend()
    ax.set_title(out.as_posix())
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=80)
    plt.close(fig)


def load_checkpoint(run_dir: str | Path, device="cpu"):
    """Rebuild (generator or VAE, checkpoint dict) from a run directory alone: the generator's EMA copy where
    the run kept one (what previews, export and evaluation use), else the trained weights."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise UsageError(f"{run_dir}: no {CHECKPOINT}; a training run folder (runs/<dataset>/<model>, or --out-dir "
                         "of python -m training.train) holds one")
    state = torch.load(path, map_location=device, weights_only=False)
    cfg = TrainConfig.from_dict(state["config"])
    info = state["dataset_info"]
    image_shape = (info["channels"], info["size"], info["size"])
    generator, _ = build_model(cfg.model, image_shape, len(info["classes"]), cfg.latent_dim, cfg.width,
                               class_norm=cfg.class_norm, embed_dim=cfg.embed_dim)
    weights = state["generator_ema"]["model"] if "generator_ema" in state else state["models"]["generator"]
    generator.load_state_dict(weights)
    if "latent_prior" in state:  # a VAE's fitted mixture prior: the decoder samples through it
        generator.prior = MixturePrior.from_state(state["latent_prior"]["state"])
    return generator.to(device).eval(), state


if __name__ == "__main__":
    with user_errors_exit():  # a missing or malformed data file, a resume that would change the run, ...
        main(*parse_args())
