"""Model runners: ONNX Runtime (the default, CPU) and TorchScript (for GPU hosts, SYNTHGEN_BACKEND=torchscript).

Both implement the export contract of `training/export.py`:
    inputs   z       float32 [N, latent_dim]   standard normal
             labels  int64   [N]               class ids (conditional models only)
    output   images  float32 [N, C, H, W]      in [0, 1]
`run` is blocking and thread-safe enough for the one inference thread the service uses. torch is imported
only when the TorchScript backend is selected, so the default serving path (and its container) has no torch.

ONNX Runtime calls are row-parallel: a call of many rows is split into contiguous parts that run side by
side on the worker's threads, one thread each (`row_parts`, SYNTHGEN_ORT_PART_ROWS). ORT's CPU ConvTranspose
computes one image at a time, so a single call on several intra-op threads leaves most of them waiting:
on 2 cores, n=1024 of the MNIST cDCGAN ran 7,400 images/s as one call and 13,100 in parts of 128 rows
(the 64x64 DCGAN 2,800 -> 4,400; the MLP GAN, all GEMMs, 118,000 -> 113,000; benchmarks/README.md). Rows
are independent in every exported graph (checked at start-up), so the bytes are the same either way.
`run_into` hands each part to the caller on the thread that computed it (the service quantizes it there).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .catalog import CatalogEntry, ModelCard
from .config import Settings


class BackendLoadError(RuntimeError):
    """A verified file that the runtime still cannot use (wrong opset, shapes that disagree with the card)."""


@functools.cache
def register_shared_arena() -> None:
    """Register one CPU memory arena with ONNX Runtime's process-wide environment, once; sessions that set
    `session.use_env_allocators` then share it. Calls are serialised on one inference thread, so it holds
    about one call's working memory (its parts' together), the largest one made so far."""
    import onnxruntime as ort

    cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(cpu, ort.OrtArenaCfg({}))


MIN_PART_ROWS = 16  # a part smaller than this costs more in hand-offs than a second thread saves
PARTS_PER_THREAD = 4  # parts a call is cut into per thread where rows allow, so that threads share it evenly


def row_parts(n: int, threads: int, part_rows: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal row ranges [a, b) covering n rows: as many as keep every part within part_rows,
    and PARTS_PER_THREAD per thread while each keeps MIN_PART_ROWS rows, in a multiple of the threads where
    the row limits allow. part_rows=0 or one thread: one part.

    Several parts per thread balance a call: a thread slowed by other work (the event loop, an encoder) takes
    fewer parts while the other takes more, where one part each would leave the faster one waiting. Part size
    hardly matters to the speed itself (16 to 128 rows within 3% for the 64x64 DCGAN and the MNIST cDCGAN),
    but their count does: 7 equal parts on 2 threads keep one thread idle for the last one (a 113-row call
    of the 64x64 DCGAN, as `SYNTHGEN_CALL_MS=50` cut it, took 13% longer than its share of a 1024-row call)."""
    if part_rows <= 0 or threads <= 1:
        return [(0, n)]
    k = max(1, -(-n // part_rows), min(PARTS_PER_THREAD * threads, n // MIN_PART_ROWS))
    if k > 1 and k % threads:
        up, down = -(-k // threads) * threads, k // threads * threads
        if n // up >= MIN_PART_ROWS:
            k = up
        elif down >= threads and -(-n // down) <= part_rows:
            k = down
    bounds = [i * n // k for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


@functools.cache
def part_pool(threads: int) -> ThreadPoolExecutor:
    """The worker's threads for row parts, shared by every model: calls come from the one inference thread,
    so the parts of only one call run at a time."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="synthgen-rows")


def session_options(threads: int, spinning: bool, arena: bool):
    """The service's ONNX Runtime settings for one model's session (benchmarks/ort_layers.py profiles with them)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # arena=True: every session of the process draws from one shared arena, which keeps the pages of the
    # largest model call (bounded by SYNTHGEN_BATCH_ROWS) instead of faulting in fresh ones on every call.
    # A per-session arena (ORT's default) gave the same speed but kept every model's peak. Without ORT's
    # memory pattern (one block per call for all of a graph's activations) the arena reuses each freed
    # tensor's chunk, at the same speed. RSS of 19 shipped models called at mixed sizes up to 1024 rows:
    # 2.5 GB with per-session arenas, 0.59 GB shared, 0.42 GB shared without the pattern, 0.12 GB with
    # no arena, whose large calls each fault in fresh pages (1.2x slower; see SYNTHGEN_ORT_ARENA).
    options.enable_cpu_mem_arena = False
    if arena:
        register_shared_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
        options.enable_mem_pattern = False
    # spinning=True (the default): idle intra-op threads spin briefly instead of sleeping, so the threads
    # meet at every op without a wake-up: n=1024 calls 1.6x faster on 2 cores (MNIST cDCGAN 111 -> 68 ms),
    # while n=1 requests/s at 1 and 16 connections did not change (benchmarks/README.md). The spin costs
    # idle CPU after each call: SYNTHGEN_ORT_SPINNING=0 where that CPU is billed or throttled.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


class OnnxRuntimeRunner:
    def __init__(self, path, card: ModelCard, threads: int, spinning: bool, arena: bool,
                 part_rows: int = Settings.ort_part_rows):
        import onnxruntime as ort

        self.card, self.threads = card, threads
        self.part_rows = part_rows if threads > 1 else 0
        # Row-parallel: each part runs on one thread; otherwise the one call gets all the intra-op threads.
        options = session_options(1 if self.part_rows else threads, spinning, arena)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unusable graphs
            raise BackendLoadError(f"ONNX Runtime cannot load {path.name}: {exc}") from None
        self.input_names = {i.name for i in self.session.get_inputs()}
        expected = {"z", "labels"} if card.conditional else {"z"}
        if self.input_names != expected:
            raise BackendLoadError(f"graph inputs {sorted(self.input_names)} != {sorted(expected)} for a "
                                   f"{'conditional' if card.conditional else 'unconditional'} card")

    def run(self, z: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        parts: dict[int, np.ndarray] = {}
        self.run_into(z, labels, lambda a, b, images: parts.__setitem__(a, images))
        # Joined as the graph returned them (never broadcast into a shape taken from the card).
        return parts[0] if len(parts) == 1 else np.concatenate([parts[a] for a in sorted(parts)])

    def run_into(self, z: np.ndarray, labels: np.ndarray | None, sink: Callable[[int, int, np.ndarray], None]) -> None:
        """Like `run`, but hands each row part's images to sink(a, b, images of rows a..b) on the thread that
        computed it, so the caller's per-row work (the service quantizes) runs in parallel too."""
        parts = row_parts(len(z), self.threads, self.part_rows)

        def run_part(rows: tuple[int, int]) -> None:
            a, b = rows
            sink(a, b, self._call(z[a:b], None if labels is None else labels[a:b]))

        if len(parts) == 1:
            run_part(parts[0])
            return
        for _ in part_pool(self.threads).map(run_part, parts):  # re-raises a part's exception here
            pass

    def _call(self, z: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        feeds = {"z": z}
        if self.card.conditional:
            feeds["labels"] = labels
        return self.session.run(["images"], feeds)[0]


class TorchScriptRunner:
    def __init__(self, path, card: ModelCard, threads: int, device: str | None):
        import torch

        self.torch = torch
        self.card = card
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if problem := missing_cuda_device(device):
            raise BackendLoadError(problem)
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        try:
            self.module = torch.jit.load(str(path), map_location=self.device).eval()
        except Exception as exc:  # torch raises RuntimeError and friends for unusable archives
            raise BackendLoadError(f"TorchScript cannot load {path.name}: {exc}") from None

    def run(self, z: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            args = [torch.from_numpy(z).to(self.device)]
            if self.card.conditional:
                args.append(torch.from_numpy(labels).to(self.device))
            return self.module(*args).float().cpu().numpy()

    def run_into(self, z: np.ndarray, labels: np.ndarray | None, sink: Callable[[int, int, np.ndarray], None]) -> None:
        sink(0, len(z), self.run(z, labels))  # one part: torch spreads a call over its own threads


def missing_cuda_device(device: str | None) -> str | None:
    """Why SYNTHGEN_DEVICE names a CUDA device torch does not see here (without creating a CUDA context), or None."""
    if device is None or not device.startswith("cuda"):
        return None
    import torch

    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    return None if index < count else f"SYNTHGEN_DEVICE={device}: torch sees {count} CUDA device(s) here"


def rows_are_independent(runner, card: ModelCard, n: int = 96) -> bool:
    """Whether row i of a call depends only on input row i, bit for bit, on this host: slices of one batch
    against separate calls of several sizes. Only then may concurrent requests share a model call without
    changing anyone's bytes. ONNX Runtime on CPU passes for every exported family; PyTorch CPU kernels do
    not (they pick different GEMM paths per batch size), so TorchScript requests run one by one."""
    z = np.random.Generator(np.random.PCG64(20240)).standard_normal((n, card.latent_dim), dtype=np.float32)
    labels = np.arange(n, dtype=np.int64) % card.num_classes
    whole = runner.run(z, labels)
    return all(np.array_equal(runner.run(z[a:b], labels[a:b]), whole[a:b])
               for a, b in ((0, 1), (5, 6), (2, 9), (17, 50), (40, n)))


def load_runner(entry: CatalogEntry, backend: str, threads: int, device: str | None = None,
                spinning: bool = Settings.ort_spinning, arena: bool = Settings.ort_arena,
                part_rows: int = Settings.ort_part_rows):
    """Load one verified model and check it on one sample: output shape and range must match its card."""
    card = entry.card
    if backend == "torchscript":
        runner = TorchScriptRunner(entry.model_path, card, threads, device)
    else:
        runner = OnnxRuntimeRunner(entry.model_path, card, threads, spinning, arena, part_rows)
    z = np.zeros((1, card.latent_dim), dtype=np.float32)
    labels = np.zeros(1, dtype=np.int64)
    try:
        out = runner.run(z, labels)
    except Exception as exc:  # any runtime failure on the smoke input means the model cannot be served
        raise BackendLoadError(f"{backend} fails on a smoke input: {exc}") from None
    if out.shape != (1, *card.image_shape) or out.dtype != np.float32:
        raise BackendLoadError(f"output {out.dtype}{list(out.shape)} != float32{[1, *card.image_shape]} from the card")
    if not (np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0):
        raise BackendLoadError("output on a smoke input is not within [0, 1]")
    runner.row_independent = rows_are_independent(runner, card)
    return runner
