"""The guard in front of the API routes: bearer-token auth, JSON-only bodies, and a request-size limit.

It runs before BentoML reads the body, so an oversized or unauthorised request is refused without parsing
anything or allocating images: 401 (missing or wrong token, when SYNTHGEN_API_TOKEN is set), 415 (a body
that is not JSON), 413 (a body over SYNTHGEN_MAX_BODY_BYTES, by Content-Length or, for chunked uploads,
while reading). Health, metrics and docs routes stay open: probes and scrapers carry no token.
"""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse

OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics", "/docs.json", "/schema.json", "/"})
OPEN_PREFIXES = ("/static_content/", "/assets/")
JSON_TYPES = ("application/json", "")


def _reject(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class GuardMiddleware:
    """ASGI middleware; `token` None disables auth, `max_body_bytes` bounds every request body."""

    def __init__(self, app, token: str | None, max_body_bytes: int):
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                reason = "missing" if not given else "wrong"
                return await _reject(401, f"{reason} bearer token: send 'Authorization: Bearer <token>'",
                                     {"WWW-Authenticate": 'Bearer realm="synthgen"'})(scope, receive, send)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        content_type = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if content_type not in JSON_TYPES:
            return await _reject(415, f"request bodies are JSON: send 'Content-Type: application/json', "
                                      f"not {content_type!r}")(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _reject(400, "Content-Length is not a number")(scope, receive, send)
            if int(length) > self.max_body_bytes:
                return await self._too_large(scope, receive, send)
            return await self.app(scope, receive, send)
        # No Content-Length (chunked upload): read it here, bounded, then hand it on.
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
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        return await _reject(413, f"request body is larger than {self.max_body_bytes} bytes "
                                  "(SYNTHGEN_MAX_BODY_BYTES)")(scope, receive, send)
