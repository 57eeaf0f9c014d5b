"""Per-model micro-batching: concurrent requests share model calls, large requests are split into several.

Every request becomes a job (its latents, labels, and a preallocated uint8 N x H x W x C output). Each model
has a FIFO of jobs and one asyncio task that, whenever the inference thread is free, takes up to
`batch_rows` rows from the head of the FIFO - the tails of large jobs and whole small ones alike -
concatenates them into one model call, and writes each job's slice of the result into that job's output
(quantized to uint8 part by part, on the runner's threads, as each row part of the call is computed).
All models share ONE inference thread, so calls never compete for the CPU and the event loop stays free.

No waiting window: a lone request runs at once (lowest latency), and requests that arrive while a call is
running are merged into the next call (throughput under load).

Calls are bounded in time as well as in rows: a call takes as many rows as the model computes in about
`call_s` seconds (from a running estimate of its seconds per row), at most `batch_rows`, and a large request
is cut into calls of equal size. A large request of a slow model thus runs as a series of short calls, and a
request that arrives meanwhile waits for one short call, not for a 1024-row one (a 64x64 DCGAN computes 1024
rows in about 0.35 s on 2 cores): a request for another model because the models share the inference
thread, and one for the same model because whole requests behind a large one go into its next call first
(in up to half of it, so the large one keeps going). Merging is invisible in the output only
when the model is row-independent (row i of a call depends only on z[i] and labels[i], bit for bit), which
`backends.rows_are_independent` checks at start-up; a model that fails it (`merge=False`) runs one request
at a time, in chunks of `batch_rows` counted from the request's first row, so its bytes still depend on
the request alone. The tests check that batched and unbatched results are byte-identical.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from .sampling import quantize_into

logger = logging.getLogger("bentoml.synthgen.batching")

FIRST_CALL_ROWS = 64  # rows of a model's first large call, before its seconds per row are known
MIN_CALL_ROWS = 32  # the fewest rows a call is cut to (row parts on two threads of 16 rows each)
ROW_TIME_SMOOTHING = 0.3  # weight of the newest call in the running seconds-per-row estimate


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


async def wait_through_cancels(future: asyncio.Future) -> None:
    """Wait until `future` is done, even if the waiting task is cancelled meanwhile (once or more): a cancelled
    request waits like this for thread work that still uses its memory. The future's outcome is its owner's."""
    while not future.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({future})


@dataclass
class MicroBatcher:
    runner: object
    executor: Executor
    batch_rows: int
    image_shape: tuple[int, int, int]  # C, H, W
    merge: bool = True  # may one call serve several requests (see the module docstring)
    on_call: Callable[[int], None] | None = None  # told the rows of every finished call (metrics)
    call_s: float = 0.0  # target seconds of one call (0: every call takes up to batch_rows rows)
    calls: int = 0
    rows: int = 0
    row_s: float | None = None  # running estimate of a call's seconds per row (calls of MIN_CALL_ROWS or more)
    _pending: collections.deque = field(default_factory=collections.deque)
    _wakeup: asyncio.Event | None = None
    _task: asyncio.Task | None = None
    _call_in_flight: tuple[asyncio.Future, list[Job]] | None = None  # the model call running now, and its jobs

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
            with contextlib.suppress(ValueError):  # and free its latents now, not when the queue reaches it
                self._pending.remove(job)
            if self._call_in_flight is not None and any(j is job for j in self._call_in_flight[1]):
                await wait_through_cancels(self._call_in_flight[0])  # it writes into job.out: the request's memory
            raise

    def _ensure_worker(self) -> None:
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._worker(), name="synthgen-batcher")

    def call_rows(self) -> int:
        """Most rows of the next call: batch_rows, or as many as take about call_s seconds. A model whose
        requests are not merged keeps batch_rows, since its bytes depend on where its calls split."""
        if not self.merge or self.call_s <= 0:
            return self.batch_rows
        if self.row_s is None:
            return min(self.batch_rows, FIRST_CALL_ROWS)
        return min(self.batch_rows, max(MIN_CALL_ROWS, int(self.call_s / self.row_s)))

    def _take(self) -> list[tuple[Job, int, int]]:
        while self._pending and self._pending[0].cancelled:
            self._pending.popleft()
        if not self._pending:
            return []
        pieces, rows, limit = [], 0, self.call_rows()
        left = self._pending[0].n - self._pending[0].cursor
        if self.merge and self.call_s > 0 and self.row_s is not None and left > limit:
            limit = -(-left // -(-left // limit))  # a large request in calls of equal size, not with a short one at
            # its end that would leave a row-part thread idle
        if self.merge and left > limit:
            # A large request at the head: whole requests waiting behind it go first, in up to half of the call,
            # so that they wait for one call rather than for all of it (the large one keeps the other half).
            for job in list(self._pending)[1:]:
                if not job.cancelled and job.cursor == 0 and rows + job.n <= limit // 2:
                    pieces.append((job, 0, job.n))
                    job.cursor, rows = job.n, rows + job.n
                    self._pending.remove(job)
        while self._pending and rows < limit:
            job = self._pending[0]
            if job.cancelled:
                self._pending.popleft()
                continue
            take = min(job.n - job.cursor, limit - rows)
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

        started = time.perf_counter()
        self.runner.run_into(z, labels, quantize_part)
        if len(z) >= MIN_CALL_ROWS:  # smaller calls are mostly fixed cost: they would overstate the cost of a row
            row_s = (time.perf_counter() - started) / len(z)
            self.row_s = row_s if self.row_s is None else (1 - ROW_TIME_SMOOTHING) * self.row_s + ROW_TIME_SMOOTHING * row_s

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
        call = asyncio.get_running_loop().run_in_executor(self.executor, self._call, pieces)
        self._call_in_flight = (call, [job for job, _, _ in pieces])
        try:
            await call
        except Exception as exc:  # a failed call fails its jobs, never the worker
            logger.exception("model call failed for %d request(s)", len({id(j) for j, _, _ in pieces}))
            for job, _, _ in pieces:
                job.cancelled = True
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        finally:
            self._call_in_flight = None
        rows = sum(b - a for _, a, b in pieces)
        self.calls += 1
        self.rows += rows
        if self.on_call is not None:
            self.on_call(rows)
        for job, a, b in pieces:
            job.done += b - a
            if job.done == job.n and not job.future.done():
                job.future.set_result(job.out)
