"""Per-model micro-batching: concurrent requests share model calls, large requests are split into several.

Every request becomes a job (its latents, labels, and a preallocated uint8 N x H x W x C output). Each model
has a FIFO of jobs and one asyncio task that, whenever the inference thread is free, takes up to
`batch_rows` rows from the head of the FIFO - the tails of large jobs and whole small ones alike -
concatenates them into one model call, and writes each job's slice of the result into that job's output
(quantized to uint8 part by part, on the runner's threads, as each row part of the call is computed).
All models share ONE inference thread, so calls never compete for the CPU and the event loop stays free.

No waiting window: a lone request runs at once (lowest latency), and requests that arrive while a call is
running are merged into the next call (throughput under load). Merging is invisible in the output only
when the model is row-independent (row i of a call depends only on z[i] and labels[i], bit for bit), which
`backends.rows_are_independent` checks at start-up; a model that fails it (`merge=False`) runs one request
at a time, in chunks of `batch_rows` counted from the request's first row, so its bytes still depend on
the request alone. The tests check that batched and unbatched results are byte-identical.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from .sampling import quantize_into

logger = logging.getLogger("bentoml.synthgen.batching")


@dataclass(eq=False)
class Job:
    z: np.ndarray
    labels: np.ndarray
    out: np.ndarray
    future: asyncio.Future
    cursor: int = 0  # rows handed to model calls so far
    done: int = 0  # rows written to `out`
    cancelled: bool = False

    @property
    def n(self) -> int:
        return len(self.z)


@dataclass
class MicroBatcher:
    runner: object
    executor: Executor
    batch_rows: int
    image_shape: tuple[int, int, int]  # C, H, W
    merge: bool = True  # may one call serve several requests (see the module docstring)
    on_call: Callable[[int], None] | None = None  # told the rows of every finished call (metrics)
    calls: int = 0
    rows: int = 0
    _pending: collections.deque = field(default_factory=collections.deque)
    _wakeup: asyncio.Event | None = None
    _task: asyncio.Task | None = None

    async def generate(self, z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """uint8 N x H x W x C images for latents z and int64 labels (ignored by unconditional models)."""
        c, h, w = self.image_shape
        loop = asyncio.get_running_loop()
        job = Job(z=z, labels=labels, out=np.empty((len(z), h, w, c), dtype=np.uint8), future=loop.create_future())
        self._ensure_worker()
        self._pending.append(job)
        self._wakeup.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled = True  # the client went away: skip the rows not yet computed
            raise

    def _ensure_worker(self) -> None:
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._worker(), name="synthgen-batcher")

    def _take(self) -> list[tuple[Job, int, int]]:
        pieces, rows = [], 0
        while self._pending and rows < self.batch_rows:
            job = self._pending[0]
            if job.cancelled:
                self._pending.popleft()
                continue
            take = min(job.n - job.cursor, self.batch_rows - rows)
            pieces.append((job, job.cursor, job.cursor + take))
            job.cursor += take
            rows += take
            if job.cursor == job.n:
                self._pending.popleft()
            if not self.merge:
                break
        return pieces

    def _call(self, pieces: list[tuple[Job, int, int]]) -> None:
        """Runs on the inference thread: one model call for all pieces, results quantized into each job (by
        the runner's part threads, each part as soon as it is computed)."""
        if len(pieces) == 1:
            job, a, b = pieces[0]
            z, labels = job.z[a:b], job.labels[a:b]
        else:
            z = np.concatenate([job.z[a:b] for job, a, b in pieces])
            labels = np.concatenate([job.labels[a:b] for job, a, b in pieces])
        starts = np.cumsum([0] + [b - a for _, a, b in pieces[:-1]]).tolist()  # each piece's first row in the call

        def quantize_part(lo: int, hi: int, images: np.ndarray) -> None:
            """Call rows lo..hi, into the jobs whose pieces they belong to."""
            for (job, a, b), start in zip(pieces, starts):
                first, last = max(lo, start), min(hi, start + b - a)
                if first < last:
                    quantize_into(images[first - lo:last - lo], job.out[a + first - start:a + last - start])

        self.runner.run_into(z, labels, quantize_part)

    async def _worker(self) -> None:
        while True:
            await self._wakeup.wait()
            pieces = self._take()
            if not self._pending:
                self._wakeup.clear()
            if pieces:
                await self._run(pieces)
            del pieces  # a finished job's output must not outlive its request while the worker waits

    async def _run(self, pieces: list[tuple[Job, int, int]]) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, self._call, pieces)
        except Exception as exc:  # a failed call fails its jobs, never the worker
            logger.exception("model call failed for %d request(s)", len({id(j) for j, _, _ in pieces}))
            for job, _, _ in pieces:
                job.cancelled = True
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        rows = sum(b - a for _, a, b in pieces)
        self.calls += 1
        self.rows += rows
        if self.on_call is not None:
            self.on_call(rows)
        for job, a, b in pieces:
            job.done += b - a
            if job.done == job.n and not job.future.done():
                job.future.set_result(job.out)
