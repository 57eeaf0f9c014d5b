"""A fix for BentoML 1.4's TimeoutMiddleware, installed when the service module is imported.

BentoML's TimeoutMiddleware (bentoml/_internal/server/http/traffic.py) arms `loop.call_later(timeout, ...)`
for every request and never cancels it. The timer handle holds a copy of the request's context - its
OpenTelemetry span, BentoML's request ids, about 5 KB - for the full timeout after the response has gone:
with our 300 s timeout that is ~1.5 MB retained per request/s of traffic (measured: RSS +70 MB after
18,000 GET /livez). The replacement below is the same middleware (same 504 after `timeout` seconds without
a response start) whose timer runs in an empty context and is cancelled when the request ends.
"""

from __future__ import annotations

import asyncio
import contextvars

from bentoml._internal.server.http.traffic import TimeoutMiddleware
from starlette.responses import JSONResponse


async def _call_with_cancelled_timer(self, scope, receive, send) -> None:
    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    timer = loop.call_later(self.timeout, self._set_timer_out, waiter, context=contextvars.Context())

    async def _send(message) -> None:
        if not waiter.done():
            waiter.set_result(None)
        await send(message)

    task = asyncio.ensure_future(self.app(scope, receive, _send))
    # An app that returns without sending anything (a client that went away mid-upload) ends the wait too.
    task.add_done_callback(lambda _: waiter.done() or waiter.set_result(None))
    try:
        try:
            await waiter
        except asyncio.TimeoutError:
            if task.cancel():
                response = JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                        status_code=504)
                await response(scope, receive, send)
        else:
            await task
    finally:
        timer.cancel()


def install() -> None:
    TimeoutMiddleware.__call__ = _call_with_cancelled_timer
