"""Three fixes for BentoML 1.4, installed when the service module is imported.

A leak. BentoML's TimeoutMiddleware (bentoml/_internal/server/http/traffic.py) arms `loop.call_later(timeout, ...)`
for every request and never cancels it. The timer handle holds a copy of the request's context - its
OpenTelemetry span, BentoML's request ids, about 5 KB - for the full timeout after the response has gone:
with our 300 s timeout that is ~1.5 MB retained per request/s of traffic (measured: RSS +70 MB after
18,000 GET /livez). The replacement below is the same middleware (same 504 after `timeout` seconds without
a response start) whose timer runs in an empty context and is cancelled when the request ends.

A log flood. BentoML logs every request body its pydantic schema rejects as "Exception on /generate [POST]" at
ERROR, with the whole traceback and pydantic's message, which repeats every bad input: one 50 KB body with
10,000 bad labels wrote a 4 MB traceback and held the event loop for about 0.25 s, so a client sending such
bodies fills the disk and slows every other request. The request was the client's error and its 400 names
each bad field; `QuietClientErrors` turns that record into one INFO line (route, method, error count).

Unbounded metrics. BentoML's request metrics label each request with its raw URL path, so every distinct
path a client makes up becomes new series: 5,000 requests to /x1 ... /x5000 (answered 404, with or without the
token) grew /metrics to 18 MB and 100,000 series, a 9 s scrape and +100 MB of worker memory. `_BoundedEndpoints`
keeps a route's own label and gives every other path the one label "other".
"""

from __future__ import annotations

import asyncio
import contextvars
import logging

from bentoml._internal.context import server_context
from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware
from bentoml._internal.server.http.traffic import TimeoutMiddleware
from pydantic import ValidationError
from starlette.responses import JSONResponse

from .middleware import OPEN_PATHS

BENTOML_HTTP_LOGGER = "bentoml._internal.server.http_app"  # where BentoML logs "Exception on <path> [<method>]"
OTHER_ENDPOINT = "other"  # the endpoint label of a request to a path that is not a route


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


class QuietClientErrors(logging.Filter):
    """A rejected request body's "Exception on ..." record becomes one INFO line without the traceback; every
    other record, a real exception's included, passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ValidationError) and str(record.msg).startswith("Exception on"):
            record.msg = "Rejected %s [%s]: %d validation error(s), answered 400"
            record.args = (*record.args[:2], error.error_count())
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class _BoundedEndpoints:
    """A BentoML request metric whose `endpoint` label is a route of the service or an open path, else "other"."""

    def __init__(self, metric, endpoints: frozenset[str]):
        self._metric, self._endpoints = metric, endpoints

    def labels(self, *args, endpoint: str, **kwargs):
        known = endpoint in self._endpoints
        return self._metric.labels(*args, endpoint=endpoint if known else OTHER_ENDPOINT, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._metric, name)


_original_metrics_setup = RunnerTrafficMetricsMiddleware._setup


def _setup_with_bounded_endpoints(self) -> None:
    _original_metrics_setup(self)
    endpoints = frozenset(server_context.service_routes) | OPEN_PATHS
    for name in ("metrics_request_total", "metrics_request_duration", "metrics_request_in_progress"):
        setattr(self, name, _BoundedEndpoints(getattr(self, name), endpoints))


def install() -> None:
    TimeoutMiddleware.__call__ = _call_with_cancelled_timer
    RunnerTrafficMetricsMiddleware._setup = _setup_with_bounded_endpoints
    logger = logging.getLogger(BENTOML_HTTP_LOGGER)
    if not any(isinstance(f, QuietClientErrors) for f in logger.filters):
        logger.addFilter(QuietClientErrors())
