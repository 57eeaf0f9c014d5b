"""One error format for every 4xx the service itself returns, shaped like BentoML's request-validation errors.

    {"error": "<one sentence>",
     "detail": [{"loc": ["<field>"], "msg": "<one sentence>", "type": "<kind>", "allowed": [...]}],
     ...extra keys, e.g. "datasets" on a 404}

`allowed` is a list of values (datasets, models, class names, formats, field names) or a field's JSON-schema
range ({"type": "integer", "minimum": 1, "maximum": 10000}). BentoML answers schema violations (wrong type,
n out of range, unknown format, extra fields) itself, with one entry per pydantic union branch tried and no
`allowed`; `middleware.ErrorBodies` rewrites those with `validation_error_body` below, so a client reads every
4xx the same way. Bodies never carry stack traces.
"""

from __future__ import annotations

from starlette.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, field: str | None = None, allowed: list | None = None,
                 kind: str = "value_error", extra: dict | None = None, headers: dict | None = None,
                 details: list[dict] | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.allowed = status, message, field, allowed
        self.kind, self.extra, self.headers, self.details = kind, extra or {}, headers, details

    def detail_item(self, loc: list | None = None) -> dict:
        """This error as one `detail` entry, at `loc` (default: its field)."""
        item = {"loc": short_loc(loc if loc is not None else [self.field]), "msg": self.message, "type": self.kind}
        if self.allowed is not None:
            item["allowed"] = self.allowed
        return item

    def body(self) -> dict:
        body = {"error": self.message}
        if self.details is not None:  # several entries, e.g. one per bad item of a labels list
            body["detail"] = self.details
        elif self.field is not None:
            body["detail"] = [self.detail_item()]
        body.update(self.extra)
        return body

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


MAX_DETAIL = 10  # entries of one error body: a 10,000-item labels list of floats is one mistake, not 10,000
MAX_KEY = 64  # characters of a client's key shown back: a 500 KB field name is not echoed whole


def short_name(name: str) -> str:
    """A client's name cut to MAX_KEY characters, "..." marking a cut one."""
    return name if len(name) <= MAX_KEY else name[:MAX_KEY] + "..."


def short_loc(loc: list) -> list:
    """`loc` with each name cut by `short_name`; list indices as they are."""
    return [short_name(k) if isinstance(k, str) else k for k in loc]


def _allowed(prop: dict) -> list | dict:
    """What a field accepts, from its JSON schema: the list of values of an enum, else the schema itself
    (type and bounds) without its title, description and default; an optional field's null is dropped."""
    if "enum" in prop:
        return list(prop["enum"])
    branches = [b for b in prop.get("anyOf", []) if b.get("type") != "null"]
    if len(branches) == 1:
        prop = branches[0]
    return {k: v for k, v in prop.items() if k not in ("title", "description", "default")}


def _shape(allowed: dict, json_type: str) -> dict:
    """The branch of a "oneOf" schema (`labels`) that takes one JSON type: "array", "object", ..."""
    return next(branch for branch in allowed.get("oneOf", []) if branch.get("type") == json_type)


def _rule(field: str, allowed) -> str:
    """A field's rule in words, for the sentence of an error."""
    if isinstance(allowed, list):
        return f"{field} must be one of {', '.join(repr(v) for v in allowed)}"
    if allowed.get("type") == "integer":
        return f"{field} must be an integer in {allowed.get('minimum', '-inf')}..{allowed.get('maximum', 'inf')}"
    if allowed.get("type") == "number":
        return f"{field} must be a number from {allowed.get('minimum', '-inf')} to {allowed.get('maximum', 'inf')}"
    if allowed.get("type") == "string":
        return f"{field} must be a string of at most {allowed['maxLength']} characters" if "maxLength" in allowed \
            else f"{field} must be a string"
    if field == "labels":
        return ("labels must be 'balanced', one class id (integer) or class name (string), a list of n of them "
                f"(at most {_shape(allowed, 'array').get('maxItems')} items), or an object of class name -> count "
                f"(integers 0..{_shape(allowed, 'object')['additionalProperties'].get('maximum')}, at most "
                f"{_shape(allowed, 'object').get('maxProperties')} classes)")
    if field == "label":
        return "label must be a class id (integer) or a class name (string)"
    return f"{field} is not valid"


def validation_error_body(errors: list[dict], request_schema: dict) -> dict:
    """BentoML's 400 for a request that fails its pydantic model ("N validation error for ...IODescriptor",
    one `detail` entry per union branch tried) as this module's format: one entry per field, its loc the field
    (and the list index for a bad item of `labels`), a sentence that states the field's rule, and `allowed`."""
    fields = request_schema.get("properties", {})
    items: dict[tuple, dict] = {}
    fields_with_item_errors: set[str] = set()  # a set, not a scan of `items`: 40,000 unknown keys are one pass
    for error in errors:
        loc = list(error.get("loc") or ["body"])
        field, kind = str(loc[0]), error.get("type", "value_error")
        if kind == "extra_forbidden":
            key, msg, allowed = (field,), f"unknown field {short_name(field)!r}; fields: {', '.join(fields)}", list(fields)
        elif field not in fields:
            key, msg, allowed = (field,), f"{short_name(field)}: {error.get('msg', 'invalid')}", None
        else:
            allowed = _allowed(fields[field])
            index = next((p for p in loc[1:] if isinstance(p, int)), None)
            key = (field,) if index is None else (field, index)
            count_key = loc[2] if len(loc) == 3 and str(loc[1]).startswith("dict[") else None
            if count_key is not None:  # a bad count of a labels object: {"normal": -1}
                key, allowed = (field, count_key), _shape(allowed, "object")["additionalProperties"]
                msg = f"{field}[{short_name(str(count_key))!r}] must be a count, an integer in 0..{allowed.get('maximum')}"
            elif kind == "missing":
                msg = f"{field} is required; {_rule(field, allowed)}"
            elif kind == "too_long":
                msg = _rule(field, allowed)
            elif index is not None:  # one bad item of a list: what an item may be, not every form of the field
                msg = f"{field}[{index}] must be a class id (integer) or a class name (string)"
                if isinstance(allowed, dict) and any(b.get("type") == "array" for b in allowed.get("oneOf", [])):
                    allowed = _shape(allowed, "array").get("items", allowed)
            else:
                msg = _rule(field, allowed)
        if key in items and kind != "too_long":
            continue  # the other branches of a union: one sentence per field is enough
        if len(key) == 1 and field in fields_with_item_errors:
            continue  # a later branch's error about the whole field, after a precise one about one of its items
        if key[:1] in items and len(key) > 1 or kind == "too_long":
            items.pop(key[:1], None)  # a list item's or length's error is more precise than the field's
        if len(key) > 1:
            fields_with_item_errors.add(field)
        items[key] = {"loc": short_loc(list(key)), "msg": msg, "type": kind, **({"allowed": allowed} if allowed is not None else {})}
    detail = list(items.values())[:MAX_DETAIL]
    more = len(items) - len(detail)
    message = "; ".join(item["msg"] for item in detail) or "invalid request"
    return {"error": message + (f"; and {more} more" if more else ""), "detail": detail}
