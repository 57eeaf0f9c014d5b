"""One error format for every 4xx the service itself returns, shaped like BentoML's request-validation errors.

    {"error": "<one sentence>",
     "detail": [{"loc": ["<field>"], "msg": "<one sentence>", "type": "<kind>", "allowed": [...]}],
     ...extra keys, e.g. "datasets" on a 404}

BentoML answers schema violations (wrong type, n out of range, unknown format, extra fields) itself with
status 400 and {"error": "...", "detail": [{"loc": [...], "msg": "...", "type": "..."}]}, so a client reads
`detail[*].loc` and `detail[*].msg` the same way for both. Bodies never carry stack traces.
"""

from __future__ import annotations

from starlette.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, field: str | None = None, allowed: list | None = None,
                 kind: str = "value_error", extra: dict | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.allowed = status, message, field, allowed
        self.kind, self.extra, self.headers = kind, extra or {}, headers

    def body(self) -> dict:
        body = {"error": self.message}
        if self.field is not None:
            item = {"loc": [self.field], "msg": self.message, "type": self.kind}
            if self.allowed is not None:
                item["allowed"] = self.allowed
            body["detail"] = [item]
        body.update(self.extra)
        return body

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)
