"""The memory budget of a worker's requests (SYNTHGEN_MEMORY_BUDGET_MB), held until each answer has been sent.

A request reserves its share (about 4x its pixels: the images, the encoded body and the encoder's working
copies) before its model call and waits, never fails, until the share fits. Once encoded it keeps the
body's size, until the body has left for the client (not when the handler returns): a client that asks for
n=10,000 and then reads slowly, or not at all, keeps its body in this process, and 60 such clients once took
a worker from 207 MB to 1.6 GB within 92 s (the deployment's limit is 2 GiB).

So `BudgetedResponse` sends its body in chunks of SEND_CHUNK_BYTES, each of which the client must accept
within SYNTHGEN_SEND_TIMEOUT_S (uvicorn holds one chunk at a time while the client's socket is full), and
drops the rest of the answer of a client that does not, releasing the share then. (uvicorn then closes the
connection once the client has read what it had already buffered, about a chunk; ASGI gives no way to discard
it.) Measured with 60 clients that sent n=10,000 requests and did not read: the worker stayed at 300 MB.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref

from starlette.responses import Response

logger = logging.getLogger("bentoml.synthgen.budget")
SEND_CHUNK_BYTES = 1 << 20


class MemoryBudget:
    """Caps the image memory of requests in flight: a request waits (never fails) until its share fits."""

    def __init__(self, limit_bytes: int):
        self.limit, self.used = limit_bytes, 0
        self._waiters: list[asyncio.Future] = []

    async def acquire(self, nbytes: int) -> Share:
        """Wait until nbytes (at most the whole budget) fit, and take them."""
        nbytes = min(nbytes, self.limit)
        while self.used + nbytes > self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.used += nbytes
        return Share(self, nbytes)

    def _give_back(self, nbytes: int) -> None:
        self.used -= nbytes
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:  # each checks again whether its share fits now
            if not waiter.done():
                waiter.set_result(None)


class Share:
    """A request's part of the budget, taken on the event loop's thread and given back there."""

    def __init__(self, budget: MemoryBudget, nbytes: int):
        self.budget, self.nbytes = budget, nbytes
        self.loop = asyncio.get_running_loop()

    def shrink(self, nbytes: int) -> None:
        """Keep only nbytes (the encoded body, once the images and the encoder's copies are gone)."""
        if nbytes < self.nbytes:
            self.budget._give_back(self.nbytes - nbytes)
            self.nbytes = nbytes

    def release(self) -> None:
        """Give the whole share back; calling it again gives back nothing more."""
        self.shrink(0)

    def release_soon(self) -> None:
        """`release` on the loop's thread, from any thread (a garbage collector's finalizer may run on another)."""
        try:
            self.loop.call_soon_threadsafe(self.release)
        except RuntimeError:  # the loop is closed: the worker is stopping, nothing waits for the budget
            pass


class BudgetedResponse(Response):
    """A response that holds its request's memory share until its body is sent (or the connection dropped, or
    the response itself dropped unsent: then its finalizer gives the share back)."""

    def __init__(self, content: bytes, share: Share, send_timeout_s: float, **kwargs):
        self._unsent = weakref.finalize(self, share.release_soon)  # first: a failure below must not keep the share
        super().__init__(content, **kwargs)
        self.share, self.send_timeout_s = share, send_timeout_s
        share.shrink(len(self.body))  # what is left of the request in memory: its body

    async def __call__(self, scope, receive, send) -> None:
        """Each message must leave within send_timeout_s: the first too, since on a reused connection uvicorn
        first waits for the socket to take what an earlier answer left in its buffer."""
        sent, started = 0, time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.send_timeout_s) as deadline:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                body = memoryview(self.body)
                while True:  # an answer of one chunk (most are) is sent as it is, not copied
                    chunk = self.body if len(body) <= SEND_CHUNK_BYTES else bytes(body[sent:sent + SEND_CHUNK_BYTES])
                    last = sent + len(chunk) >= len(body)
                    deadline.reschedule(loop.time() + self.send_timeout_s)
                    await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                    sent += len(chunk)
                    if last:
                        break
        except TimeoutError:
            client = "%s:%s" % tuple(scope["client"]) if scope.get("client") else "a client"
            logger.warning("Client too slow: dropped the answer to %s [%s] from %s after %.1f s, %d of %d bytes sent "
                           "(each %d bytes must be taken within SYNTHGEN_SEND_TIMEOUT_S=%g s)", scope["path"],
                           scope["method"], client, time.perf_counter() - started, sent, len(self.body),
                           SEND_CHUNK_BYTES, self.send_timeout_s)
            return  # with the body incomplete, uvicorn closes the connection (and logs that at ERROR)
        finally:
            self.share.release()
            self._unsent.detach()
        if self.background is not None:  # BentoML's (the request's clean-up), as Starlette's Response runs them
            await self.background()
