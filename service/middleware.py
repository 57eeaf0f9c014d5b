"""The guard in front of the API routes (bearer-token auth, JSON-only bodies, a request-size limit) and the
rewriter that gives every error response of those routes the format of `service.errors`.

It runs before BentoML reads the body, so an oversized or unauthorised request is refused without parsing
anything or allocating images: 401 (missing or wrong token, when SYNTHGEN_API_TOKEN is set), 415 (a body
that is not JSON, or sent compressed: its Content-Encoding would otherwise be ignored), 413 (a body over
SYNTHGEN_MAX_BODY_BYTES, by Content-Length or, for chunked uploads, while reading), 400 (a key given twice
in one JSON object, which JSON parsers - BentoML's too - would otherwise settle silently by keeping the last).
Health, metrics and docs routes stay open: probes and scrapers carry no token.

A client that goes away before its answer is complete cancels its request: uvicorn never cancels a handler
itself, so without this a dropped n=10,000 request kept the model thread computing every row and its memory
reserved (the batcher skips a cancelled request's rows not yet computed).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from collections.abc import Callable

from .errors import ApiError, error_response, short_name, validation_error_body

OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics", "/docs.json", "/schema.json", "/"})
OPEN_PREFIXES = ("/static_content/", "/assets/")
JSON_TYPES = ("application/json", "")
logger = logging.getLogger("bentoml.synthgen.middleware")


class GuardMiddleware:
    """ASGI middleware; `token` None disables auth, `max_body_bytes` bounds every request body, `on_cancel`
    counts the requests cancelled because their client went away."""

    def __init__(self, app, token: str | None, max_body_bytes: int, on_cancel: Callable[[str], None] | None = None):
        self.app = app
        self.expected = token.encode() if token else None
        self.max_body_bytes = max_body_bytes
        self.on_cancel = on_cancel  # told the path of each request cancelled because its client went away

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None:
            given = headers.get(b"authorization", b"")
            scheme, _, credentials = given.partition(b" ")
            # RFC 7235: the scheme name is case-insensitive ("bearer" is "Bearer"); the token is compared as is.
            if scheme.lower() != b"bearer" or not hmac.compare_digest(credentials.strip(), self.expected):
                reason = "missing" if not given else "wrong"
                return await error_response(401, f"{reason} bearer token: send 'Authorization: Bearer <token>'",
                                     {"WWW-Authenticate": 'Bearer realm="synthgen"'})(scope, receive, send)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        # Every header of a name, not only the last: Starlette, behind this, reads the first.
        content_type_headers = [v.split(";") for v in header_values(scope, b"content-type")]
        content_types = [parts[0].strip().lower() for parts in content_type_headers] or [""]
        content_type = next((t for t in content_types if t not in JSON_TYPES), None)
        if content_type is not None:
            return await error_response(415, f"request bodies are JSON: send 'Content-Type: application/json', "
                                      f"not {short_name(content_type)!r}")(scope, receive, send)
        charsets = [p.split("=", 1)[1].strip().strip('"').lower() for parts in content_type_headers
                    for p in parts[1:] if p.strip().lower().startswith("charset=")]
        charset = next((c for c in charsets if c not in ("utf-8", "utf8", "us-ascii", "ascii")), None)  # ASCII is UTF-8
        if charset is not None:
            return await error_response(415, f"request bodies are UTF-8 JSON: send the body in UTF-8, not "
                                      f"{short_name(charset)!r}")(scope, receive, send)
        encodings = [e.strip().lower() for e in header_values(scope, b"content-encoding")]
        encoding = next((e for e in encodings if e not in ("", "identity")), None)
        if encoding is not None:
            return await error_response(415, f"Content-Encoding {short_name(encoding)!r} is not supported: send the JSON "
                                      "body uncompressed")(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await error_response(400, "Content-Length is not a number")(scope, receive, send)
            if int(length) > self.max_body_bytes:
                return await self._too_large(scope, receive, send)
        # Read the body here (bounded, also when chunked), check it, then hand it on.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        repeated = repeated_key(body)
        if repeated is not None:
            return await repeated.response()(scope, receive, send)
        if scope["path"] == "/models" and (fields := _object_keys(body)):
            return await ApiError(400, f"unknown field {short_name(fields[0])!r}: POST /models takes no fields (send {{}} "
                                       "or no body)", field=fields[0], allowed=[]).response()(scope, receive, send)
        return await self._run_until_disconnect(scope, body, receive, send)

    async def _run_until_disconnect(self, scope, body: bytes, receive, send):
        """The app on the body already read, cancelled if the client disconnects before the response is complete.

        With the body read, the connection's next message is its end, so one watcher awaits it for the app (which
        gets it too if it asks). The end also comes once the response is complete; only one before that cancels.
        """
        loop = asyncio.get_running_loop()
        ended = loop.create_future()
        replayed = complete = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await asyncio.shield(ended)

        async def tracking_send(message):
            nonlocal complete
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        request_task, disconnected, started = asyncio.current_task(), None, time.perf_counter()

        async def watch():
            nonlocal disconnected
            ended.set_result(await receive())
            if not complete:
                disconnected = time.perf_counter()
                request_task.cancel()

        watcher = loop.create_task(watch())
        try:
            return await self.app(scope, replay, tracking_send)
        except asyncio.CancelledError:
            # ours alone (not also the timeout's, which TimeoutMiddleware answers with a 504): the request ends here
            if disconnected is not None and request_task.uncancel() == 0:
                client = "%s:%s" % tuple(scope["client"]) if scope.get("client") else "a client"
                logger.info("Client went away: cancelled %s [%s] from %s after %.3f s", scope["path"], scope["method"],
                            client, disconnected - started)
                if self.on_cancel is not None:
                    self.on_cancel(scope["path"])
                return
            raise
        finally:
            watcher.cancel()

    async def _too_large(self, scope, receive, send):
        return await error_response(413, f"request body is larger than {self.max_body_bytes} bytes "
                                  "(SYNTHGEN_MAX_BODY_BYTES)")(scope, receive, send)


def _object_keys(body: bytes) -> list[str]:
    """The keys of a body that is a JSON object; [] for anything else (BentoML answers what is not JSON)."""
    try:
        parsed = json.loads(body) if body.strip() else None
    except (ValueError, RecursionError):  # RecursionError: nested too deep for the parser
        return []
    return list(parsed) if isinstance(parsed, dict) else []


def header_values(scope, name: bytes) -> list[str]:
    """The values of every header `name` (lower case) of the request, in order."""
    return [value.decode("latin-1") for key, value in scope["headers"] if key == name]


def repeated_key(body: bytes) -> ApiError | None:
    """A 400 naming the first key given twice within one JSON object of `body` ({"n": 1, "n": 2}, or a class
    twice in a labels object); None when no key repeats or the body is not JSON (BentoML answers that)."""
    repeats = []

    def pairs(items: list) -> dict:
        obj = dict(items)
        if len(obj) < len(items):
            seen: set = set()
            repeats.append((next(k for k, _ in items if k in seen or seen.add(k)), obj))
        return obj

    try:
        parsed = json.loads(body, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return None
    if not repeats:
        return None
    key, obj = repeats[0]
    if obj is parsed:
        return ApiError(400, f"{short_name(key)!r} is given twice in the request body; give each field once",
                        field=key, kind="duplicate_key")
    parent = next((k for k, v in parsed.items() if v is obj), None) if isinstance(parsed, dict) else None
    where = short_name(parent) if parent else "the request body"
    return ApiError(400, f"{where}: {short_name(key)!r} is given twice in one object; give each key once",
                    field=parent or "body", kind="duplicate_key")


VALIDATION_ERROR = re.compile(r"^\d+ validation errors? for ")
REWRITTEN = (400, 404, 405)


class ErrorBodies:
    """ASGI middleware: the error responses that BentoML and Starlette write themselves get this service's
    error format (`service.errors`) too, so a client reads every 4xx the same way.

    - BentoML's 400 for a request that fails its pydantic model: one entry per field with the field's rule
      and `allowed` (its values or its JSON-schema bounds), instead of one entry per union branch tried.
    - BentoML's 4xx written as a one-element JSON list: the object itself.
    - Starlette's plain-text 404 (no such route) and 405 (wrong method): JSON naming the routes or the method.
    `request_schemas` maps an API route to the JSON schema of its request model.
    """

    def __init__(self, app, request_schemas: dict[str, dict]):
        self.app = app
        self.request_schemas = request_schemas

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # BentoML's own routes keep their answers, except Starlette's plain-text 405 (POST /livez)
        rewritten = (405,) if scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIXES) else REWRITTEN
        start, chunks = None, []

        async def capture(message):
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] in rewritten:
                start = message
                return
            if start is None:
                return await send(message)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                status, headers, body = self._rewrite(scope, start, b"".join(chunks))
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})

        return await self.app(scope, receive, capture)

    def _rewrite(self, scope, start, body: bytes) -> tuple[int, list, bytes]:
        status, headers = start["status"], list(start.get("headers", []))
        content_type = dict(headers).get(b"content-type", b"").split(b";")[0].strip()
        new = None
        if content_type == b"application/json":
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            if isinstance(parsed, list) and len(parsed) == 1 and isinstance(parsed[0], dict):
                new = parsed[0]
            if (status == 400 and isinstance(parsed, dict)
                    and VALIDATION_ERROR.match(str(parsed.get("error", ""))) and isinstance(parsed.get("detail"), list)):
                # a route without a request model (POST /models) has no fields: its errors are the body's
                new = validation_error_body(parsed["detail"], self.request_schemas.get(scope["path"], {}))
        elif status == 404:
            new = {"error": f"no route {short_name(scope['path'])!r}; the API is POST {', POST '.join(self.request_schemas)}, "
                            "GET or POST /models, and GET /livez, /readyz, /metrics, /docs.json"}
        elif status == 405:
            allow = dict(headers).get(b"allow", b"").decode("latin-1") or "another method"
            if scope["path"] == "/models":  # GET /models is a route of its own (service.catalog_app)
                allow = "GET, POST"
            new = {"error": f"method {scope['method']} is not allowed on {short_name(scope['path'])}; use {allow}"}
        if new is None:
            return status, headers, body
        body = json.dumps(new).encode()
        headers = [(k, v) for k, v in headers if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        return status, headers, body
