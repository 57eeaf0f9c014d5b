"""Training throughput: our trainer's step against a plain reference loop, same model, same machine, same run.

ours       what training/train.py does: the split held as one uint8 tensor, each batch an index slice of a
           random permutation, `.float().div_(255)`, then `GANObjective.step` (training/objectives.py) with the
           resolved default config (batch 128; conditional models add the mode-seeking term, weight 0.25); its
           generator step leaves D's weights out of autograd, so it skips the D weight gradients the textbook
           step computes and throws away.
reference  the style of the reference projects: a torchvision-style Dataset whose __getitem__ turns one
           uint8 image into a PIL image and applies ToTensor + Normalize(0.5, 0.5), a torch DataLoader
           (batch 64, shuffle, num_workers=0), and the textbook DCGAN step (D on real, D on fake.detach(),
           Adam step; G through D, Adam step; BCE on logits; .item() of the losses every step).

Both train the same architecture (same `build_model`, same seed, same Adam settings) for a fixed number of
steps; they run interleaved (1 of ours, 2 of the reference: the same number of images) so drift on a
shared machine hits both alike. images/s = batch / median seconds per batch, where a batch's time includes
getting its data (the slice, or the DataLoader's next()); the data share of that time is reported too.
Ours trains in bf16 autocast where the CPU computes bf16 natively (`training_precision`); `ours_fp32` is
the same loop in fp32, a diagnostic of what bf16 buys; `ours_compiled` is ours with `--compile`
(torch.compile of both networks, as train.py does; the warm-up step pays the compilation).

On a GPU (`device="cuda"`, `python -m benchmarks.run --parts training --device cuda`) the same loops run there: ours
with the split on the GPU, the reference with its DataLoader on the CPU and each batch copied over, as the
reference projects do; every timed step ends with a device synchronisation, so a step's time is its compute.
There it also times ours at large batches with --compile (`ours_batch1024_compiled`, `ours_batch4096_compiled`:
throughput only, the quality of a model trained at those batches is not measured here), and skips the
multi-process CPU loops.

The compute ceiling: each loop's arithmetic per training image (forward and backward matmul/convolution
FLOPs of one step, counted by torch's FlopCounterMode) and the machine's dense matmul rate at the same thread
count (`matmul_peak`, fp32 and bf16), so the table says what share of the CPU's peak each loop reaches and
how far any loop doing the reference's arithmetic in fp32 could go: 1 / (the reference's share of the fp32 peak).
"""

from __future__ import annotations

import time
import torch
import torch.nn.functional as F

from training.zoo import GENERATOR_SIZE_FIELDS, zoo_sizes

from .common import median

# (dataset, model, sizes) of the training benchmark, at their zoo sizes (width, latent_dim, embed_dim, disc_width).
TRAINING_MODELS = tuple((d, m, zoo_sizes(d, m, GENERATOR_SIZE_FIELDS + ("disc_width",)))
                        for d, m in (("mnist", "cdcgan"), ("bloodmnist_64", "dcgan")))
SHAPES = {"mnist": ((1, 28, 28), 10), "bloodmnist_64": ((3, 64, 64), 8)}
TRAIN_SPLIT = {"mnist": 60_000, "bloodmnist_64": 11_959}  # images in an epoch of the real training split
# On a GPU a step at batch 128 is launch-bound (an H200 ran it in 12 ms at batch 128 and 14 ms at 1024):
# the large batches say what the same loop reaches once the GPU has work to do.
GPU_LARGE_BATCHES = (1024, 4096)


def large_batch_loop(batch: int) -> str:
    """The result key of ours at a large GPU batch with --compile."""
    return f"ours_batch{batch}_compiled"


def sync(device: torch.device) -> None:
    """Wait for the work queued on the device: CUDA runs ahead of Python, so a step is timed to its end."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ReferenceDataset(torch.utils.data.Dataset):
    """torchvision.datasets.MNIST-style: per-sample PIL image -> transform (ToTensor + Normalize), int label."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        from torchvision import transforms

        array = images.permute(0, 2, 3, 1).numpy()  # N x H x W x C, as the raw datasets hold them
        self.data = array[..., 0] if array.shape[-1] == 1 else array
        self.targets = labels.tolist()
        channels = images.shape[1]
        self.transform = transforms.Compose([transforms.ToTensor(),
                                             transforms.Normalize((0.5,) * channels, (0.5,) * channels)])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        from PIL import Image

        img = Image.fromarray(self.data[index], mode="L" if self.data.ndim == 3 else "RGB")
        return self.transform(img), self.targets[index]


def load_images(dataset: str, data_dir: str | None, n_random: int,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(uint8 N x C x H x W, int64 N, description): the real MNIST train split when data_dir has it, else random."""
    shape, classes = SHAPES[dataset]
    if dataset == "mnist" and data_dir:
        from training.data import DataNotFoundError, load_dataset

        try:
            data = load_dataset("mnist", "train", data_dir)
            return data.images, data.labels, f"MNIST train ({len(data):,} real images)"
        except (DataNotFoundError, OSError):
            pass
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_random, *shape), dtype=torch.uint8, generator=g)
    labels = torch.arange(n_random) % classes
    c, h, w = shape
    return images, labels, f"random uint8 {c}x{h}x{w}, {classes} classes ({n_random:,} images)"


def _models(dataset: str, model: str, sizes: dict, seed: int = 0, device: torch.device = torch.device("cpu")):
    from training.config import TrainConfig
    from training.models import MODEL_FAMILIES, build_model

    shape, classes = SHAPES[dataset]
    cfg = TrainConfig(dataset=dataset, model=model, **sizes).resolve()
    torch.manual_seed(seed)
    generator, discriminator = build_model(model, shape, classes, cfg.latent_dim, cfg.width, embed_dim=cfg.embed_dim,
                                           disc_width=cfg.disc_width)
    return cfg, generator.to(device), discriminator.to(device), MODEL_FAMILIES[model].conditional


def matmul_peak(dtype: torch.dtype = torch.float32, size: int = 2048, calls: int = 5,
                device: torch.device = torch.device("cpu")) -> float:
    """GFLOP/s of a dense size x size matmul at torch's current thread count (or on the GPU): the device's ceiling."""
    if device.type == "cuda":
        size, calls = 8192, 20
    a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
    a @ b
    times = []
    for _ in range(calls):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * size**3 / median(times) / 1e9


def flops_per_image(loop) -> float:
    """Forward + backward FLOPs of one training step of `loop`, per image (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loop.step()
    return counter.get_total_flops() / loop.batch


class Ours:
    """train.py's inner loop: index slices of the uint8 tensor, GANObjective.step."""

    def __init__(self, dataset, model, sizes, images, labels, mode_seeking: float | None = None, amp: bool = True,
                 compile: bool = False, mode_seeking_in_batch: bool = False, world: int = 1, rank: int = 0,
                 device: torch.device = torch.device("cpu"), batch_size: int | None = None):
        from training.objectives import build_objective
        from training.train import wrap_networks

        self.cfg, generator, discriminator, conditional = _models(dataset, model, sizes, device=device)
        if batch_size is not None:
            self.cfg.batch_size = batch_size
        if mode_seeking is not None:
            self.cfg.mode_seeking = mode_seeking
        self.cfg.amp, self.cfg.compile, self.cfg.mode_seeking_in_batch = amp, compile, mode_seeking_in_batch
        generator, discriminator = wrap_networks(generator, discriminator, world, compile)  # as train.py runs them
        self.batch = self.cfg.batch_size // world
        self.objective = build_objective(self.cfg, device, generator, discriminator, conditional)
        self.precision = self.objective.precision
        self.images, self.labels = images.to(device), labels.to(device)  # the split on the device, as train.py holds it
        self.order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1 + rank)).to(device)
        self.i = 0

    def step(self) -> float:
        """One batch; returns the seconds spent getting its data."""
        t = time.perf_counter()
        if (self.i + 1) * self.batch > len(self.order):
            self.i = 0
        idx = self.order[self.i * self.batch:(self.i + 1) * self.batch]
        self.i += 1
        x = self.images[idx].float().div_(255)
        y = self.labels[idx]
        data_s = time.perf_counter() - t
        self.objective.step(x, y)
        return data_s


def _data_parallel_worker(rank: int, world: int, port: int, images_from: tuple, args: tuple, kwargs: dict, commands,
                          results) -> None:
    """One process of `DataParallelOurs`: one thread, its share of the batch, steps on command. It loads the
    images itself: a tensor over numpy memory (the real split) cannot be moved into shared memory to pass."""
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        images, labels, _ = load_images(*images_from)
        loop = Ours(*args, images, labels, **kwargs, world=world, rank=rank)
        results.put(("ready", rank, loop.precision))
        while (steps := commands.get()) is not None:
            times, data = [], []
            for _ in range(steps):
                t = time.perf_counter()
                data.append(loop.step())
                times.append(time.perf_counter() - t)
            results.put(("done", rank, (times, data)))
    except BaseException as exc:  # reported to the parent, which would otherwise wait forever
        results.put(("error", rank, repr(exc)))
    finally:
        dist.destroy_process_group()


class DataParallelOurs:
    """Ours on `world` processes of one thread each, the batch (128) split over them, gradients all-reduced by
    DistributedDataParallel over gloo: what `OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 -m training.train`
    runs. On a 2-core CPU one process's convolutions on 2 intra-op threads leave a core idle for part of every
    layer; two single-threaded processes keep both busy. Driven from this process: `step` runs one batch on
    every process and returns its data seconds; `last_step_s` is its time on the processes' own clock, so the
    hand-off is not counted. Each `step` runs two batches and times the second: the first absorbs threads
    still spinning after the loop timed before it."""

    def __init__(self, world: int, dataset: str, model: str, sizes: dict, data_dir: str | None, n_random: int,
                 **kwargs):
        import socket

        import torch.multiprocessing as mp

        from training.config import TrainConfig

        ctx = mp.get_context("spawn")
        with socket.socket() as sock:  # a free loopback port for the process group
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.commands, self.results = [ctx.Queue() for _ in range(world)], ctx.Queue()
        self.processes = [ctx.Process(target=_data_parallel_worker, daemon=True,
                                      args=(rank, world, port, (dataset, data_dir, n_random), (dataset, model, sizes),
                                            kwargs, self.commands[rank], self.results))
                          for rank in range(world)]
        for process in self.processes:
            process.start()
        self.world, self.batch, self.last_step_s = world, TrainConfig.batch_size, 0.0  # the batch of all processes
        self.precision = self._collect("ready")[0]

    def _collect(self, kind: str) -> list:
        """Every process's answer of `kind`, in rank order; fails as soon as a process fails or dies."""
        import queue

        answers = {}
        while len(answers) < self.world:
            try:
                got, rank, value = self.results.get(timeout=1)
            except queue.Empty:
                dead = [rank for rank, process in enumerate(self.processes) if process.exitcode is not None]
                if dead:
                    self.close()
                    raise RuntimeError(f"data-parallel benchmark process(es) {dead} exited without a result") from None
                continue
            if got == "error":
                self.close()
                raise RuntimeError(f"data-parallel benchmark process {rank} failed: {value}")
            assert got == kind, (got, kind)
            answers[rank] = value
        return [answers[rank] for rank in range(self.world)]

    def step(self) -> float:
        for queue in self.commands:
            queue.put(2)
        (times, data), *_ = self._collect("done")  # rank 0's: every rank waits for the others' gradients
        self.last_step_s = times[-1]
        return data[-1]

    def close(self) -> None:
        for queue in self.commands:
            queue.put(None)
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


class Reference:
    """The reference projects' loop: DataLoader over per-sample transforms, the textbook DCGAN step (fp32)."""

    batch = 64
    precision = "fp32"

    def __init__(self, dataset, model, sizes, images, labels, device: torch.device = torch.device("cpu")):
        cfg, self.G, self.D, self.conditional = _models(dataset, model, sizes, device=device)
        self.latent_dim, self.device = cfg.latent_dim, device
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        self.loader = torch.utils.data.DataLoader(ReferenceDataset(images, labels), batch_size=self.batch,
                                                  shuffle=True, num_workers=0, drop_last=True)
        self.it = iter(self.loader)

    def step(self) -> float:
        t = time.perf_counter()
        try:
            real, y = next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            real, y = next(self.it)
        real, y = real.to(self.device), y.to(self.device)  # the reference projects' `.to(device)` of each batch
        data_s = time.perf_counter() - t
        y = y if self.conditional else None
        b = real.shape[0]
        ones, zeros = torch.ones(b, device=self.device), torch.zeros(b, device=self.device)
        self.D.zero_grad()
        err_real = F.binary_cross_entropy_with_logits(self.D(real, y), ones)
        err_real.backward()
        fake = self.G(torch.randn(b, self.latent_dim, device=self.device), y)
        err_fake = F.binary_cross_entropy_with_logits(self.D(fake.detach(), y), zeros)
        err_fake.backward()
        self.opt_d.step()
        self.G.zero_grad()
        err_g = F.binary_cross_entropy_with_logits(self.D(fake, y), ones)
        err_g.backward()
        self.opt_g.step()
        _ = (err_real + err_fake).item(), err_g.item()  # the reference loops log every step
        return data_s


def bench_training(models=TRAINING_MODELS, steps: int = 8, data_dir: str | None = None, n_random: int = 4096,
                   width: int | None = None, compile: bool = True, data_parallel: int = 1,
                   device: torch.device = torch.device("cpu"), log=print) -> list[dict]:
    """`steps` of ours and 2 x `steps` of the reference (same images) per model, interleaved, after a warm-up.
    compile: also time ours with --compile (`ours_compiled`; its warm-up step compiles, under a minute per model).
    data_parallel > 1: also ours on that many single-threaded processes (`ours_ddp`, and compiled; CPU only).
    device cuda: at least 50 steps, and ours at each of GPU_LARGE_BATCHES with --compile too."""
    from training.objectives import cpu_has_bf16

    rows = []
    peak = {"fp32": matmul_peak(torch.float32, device=device)}
    if device.type == "cuda" or cpu_has_bf16():
        peak["bf16"] = matmul_peak(torch.bfloat16, device=device)
    log("matmul peak GFLOP/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in peak.items()))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train.py sets it on CUDA
        steps, data_parallel = max(steps, 50), 1
    for dataset, model, model_sizes in models:
        sizes = {**model_sizes, "width": width, "disc_width": None} if width else model_sizes
        images, labels, data_what = load_images(dataset, data_dir, n_random)
        on = dict(device=device)
        ours = Ours(dataset, model, sizes, images, labels, **on)
        ref = Reference(dataset, model, sizes, images, labels, **on)
        loops = {"ours": ours, "reference": ref}
        same_arithmetic = dict(SAME_ARITHMETIC)
        if ours.precision != "fp32":  # a diagnostic: what bf16 autocast buys
            loops["ours_fp32"] = Ours(dataset, model, sizes, images, labels, amp=False, **on)
        if compile:
            loops["ours_compiled"] = Ours(dataset, model, sizes, images, labels, compile=True, **on)
            if device.type == "cuda":  # a GPU is far from busy at batch 128: what large batches reach
                for batch in GPU_LARGE_BATCHES:
                    name = large_batch_loop(batch)
                    loops[name] = Ours(dataset, model, sizes, images, labels, compile=True, batch_size=batch, **on)
                    same_arithmetic[name] = "ours"
        if ours.cfg.mode_seeking:  # a diagnostic: what the mode-seeking term (2nd generator pass) costs
            loops["ours_no_mode_seeking"] = Ours(dataset, model, sizes, images, labels, mode_seeking=0.0, **on)
            # The same term on pairs within the batch (--mode-seeking-in-batch): no second generator pass.
            loops["ours_in_batch_pairs"] = Ours(dataset, model, sizes, images, labels, mode_seeking_in_batch=True, **on)
            if compile:
                loops["ours_in_batch_pairs_compiled"] = Ours(dataset, model, sizes, images, labels, compile=True,
                                                             mode_seeking_in_batch=True, **on)
        if data_parallel > 1:  # ours on that many single-threaded processes (torchrun's DDP)
            same_data = (data_parallel, dataset, model, sizes, data_dir, n_random)
            loops["ours_ddp"] = DataParallelOurs(*same_data)
            if compile:
                loops["ours_ddp_compiled"] = DataParallelOurs(*same_data, compile=True)
                if ours.cfg.mode_seeking:
                    loops["ours_ddp_in_batch_pairs_compiled"] = DataParallelOurs(*same_data, compile=True,
                                                                                 mode_seeking_in_batch=True)
        try:
            rows.append(_bench_model(loops, ours, steps, peak, dataset, model, data_what, device, same_arithmetic, log))
        finally:
            for loop in loops.values():
                if isinstance(loop, DataParallelOurs):
                    loop.close()
    return rows


# What each loop computes, for the ones whose arithmetic the counter cannot see in this process (compiled
# graphs, other processes): the loop with the same step.
SAME_ARITHMETIC = {"ours_compiled": "ours", "ours_in_batch_pairs_compiled": "ours_in_batch_pairs", "ours_ddp": "ours",
                   "ours_ddp_compiled": "ours", "ours_ddp_in_batch_pairs_compiled": "ours_in_batch_pairs"}


def _bench_model(loops: dict, ours: Ours, steps: int, peak: dict, dataset: str, model: str, data_what: str,
                 device: torch.device, same_arithmetic: dict, log) -> dict:
    per = {name: max(1, ours.batch // loop.batch) for name, loop in loops.items()}
    times = {k: [] for k in loops}
    data = {k: [] for k in loops}
    flops, warmup_s = {}, {}
    for name, loop in loops.items():  # warm-up (first-call allocations, primitive caches, compiling), then count
        t = time.perf_counter()
        for _ in range(3 if device.type == "cuda" else 1):  # cuDNN's algorithm search and CUDA graphs take a few
            loop.step()
        sync(device)
        warmup_s[name] = time.perf_counter() - t  # left out of the step times; a run pays it once (compiling: ~40 s)
        flops[name] = flops[same_arithmetic[name]] if name in same_arithmetic else flops_per_image(loop)
    for _ in range(steps):
        for name, loop in loops.items():
            for _ in range(per[name]):
                t = time.perf_counter()
                data[name].append(loop.step())
                sync(device)
                elapsed = time.perf_counter() - t
                times[name].append(loop.last_step_s if isinstance(loop, DataParallelOurs) else elapsed)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    row = {"dataset": dataset, "model": model, "width": ours.cfg.width, "disc_width": ours.cfg.disc_width,
           "latent_dim": ours.cfg.latent_dim, "embed_dim": ours.cfg.embed_dim, "data": data_what, "device": where,
           "threads": torch.get_num_threads(), "matmul_peak_gflops": peak}
    for name, loop in loops.items():
        med = median(times[name])
        gflops = flops[name] * loop.batch / med / 1e9
        row[name] = {"batch": loop.batch, "steps": len(times[name]), "median_step_s": med,
                     "images_per_s": loop.batch / med, "epoch_s": TRAIN_SPLIT[dataset] * med / loop.batch,
                     "total_s": sum(times[name]), "warmup_s": warmup_s[name],
                     "data_share": sum(data[name]) / sum(times[name]), "precision": loop.precision,
                     "flops_per_image": flops[name], "gflops": gflops,
                     "share_of_peak": gflops / peak[loop.precision]}
    row["ours"]["mode_seeking"] = ours.cfg.mode_seeking
    row["ratio"] = row["ours"]["images_per_s"] / row["reference"]["images_per_s"]
    for name in loops:  # ratio_compiled, ratio_in_batch_pairs, ...
        if name.startswith("ours_") and name not in ("ours_fp32", "ours_no_mode_seeking"):
            row[f"ratio_{name.removeprefix('ours_')}"] = row[name]["images_per_s"] / row["reference"]["images_per_s"]
    # The most any loop doing the reference's fp32 arithmetic could gain over it on this machine.
    row["fp32_ceiling_vs_reference"] = 1 / row["reference"]["share_of_peak"]
    log(f"training {dataset}/{model}: ours ({ours.precision}) {row['ours']['images_per_s']:,.0f} img/s, "
        f"reference {row['reference']['images_per_s']:,.0f} img/s, {row['ratio']:.2f}x; the reference runs at "
        f"{100 * row['reference']['share_of_peak']:.0f}% of the fp32 matmul peak")
    return row
