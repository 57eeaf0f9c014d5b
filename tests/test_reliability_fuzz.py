"""Schemathesis fuzzing of /docs.json against the real server: no 5xx, and every error is a JSON body.

Two passes, both bounded (a fixed number of examples per operation, no shrinking of passing runs):
the schema exactly as served (mostly unknown datasets: the 404 and 400 paths), and the same schema with
`dataset` drawn from the served datasets and n capped at 64, so generation itself is fuzzed (labels, models,
seeds, formats) within a CI budget. Positive and negative (schema-violating) cases both.
"""

from __future__ import annotations

import copy

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode

from service_harness import main_server

EXAMPLES = 40
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, print_blob=True,
                         suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server(exported_dir, tmp_path_factory):
    return main_server(exported_dir, tmp_path_factory)


def load(spec: dict):
    return schemathesis.openapi.from_dict(spec)


@pytest.fixture(scope="module")
def served_spec(server) -> dict:
    return httpx.get(f"{server.url}/docs.json", timeout=30).json()


@pytest.fixture(scope="module")
def as_served(served_spec):
    return load(served_spec)


@pytest.fixture(scope="module")
def within_the_zoo(served_spec, server):
    spec = copy.deepcopy(served_spec)
    datasets = sorted(httpx.get(f"{server.url}/models", timeout=30).json()["datasets"])
    for path in ("/generate", "/interpolate"):
        props = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
        props["dataset"] = {"type": "string", "enum": datasets}
        props["model"] = {"type": "string", "enum": ["cdcgan", "mlp_vae", "dcgan", "cvae", "unknown"]}
        for field in ("n", "steps"):
            if field in props:
                props[field]["maximum"] = 64
        if "labels" in props:
            props["labels"]["oneOf"][2]["maxItems"] = 64
    return load(spec)


def check(case, server) -> int:
    response = case.call(base_url=server.url, timeout=60)
    assert response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        headers = {k.lower(): v[0] if isinstance(v, list) else v for k, v in response.headers.items()}
        assert headers["content-type"].startswith("application/json"), response.text[:200]
        body = response.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), str), body
        assert "Traceback" not in response.text
    return response.status_code


def fuzz(schema, server, mode: str, path_regex: str = ".*", statuses: list | None = None,
         method: str | None = None) -> list[str]:
    """Every operation of `schema` whose path matches: EXAMPLES cases each (schemathesis' pytest loader for
    fixtures does not run under this pytest, so the strategies are driven with hypothesis directly)."""
    fuzzed = []
    selected = schema.include(path_regex=path_regex, **({"method": method} if method else {}))
    for result in selected.get_all_operations():
        operation = result.ok()

        @FUZZ_SETTINGS
        @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        def run(case):
            status = check(case, server)
            if statuses is not None:
                statuses.append(status)

        run()
        fuzzed.append(f"{operation.method.upper()} {operation.path}")
    return fuzzed


def test_fuzzed_requests_never_get_5xx(as_served, server):
    assert {"POST /generate", "POST /interpolate", "POST /models"} <= set(fuzz(as_served, server, "positive"))


def test_fuzzed_invalid_bodies_never_get_5xx(as_served, server):
    """Negative cases need something to violate: the request bodies (the GETs take no input)."""
    assert len(fuzz(as_served, server, "negative", "^/(generate|interpolate|models)$", method="POST")) == 3


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_generation_never_gets_5xx(within_the_zoo, server, mode):
    statuses = []
    assert len(fuzz(within_the_zoo, server, mode, "^/(generate|interpolate)$", statuses)) == 2
    if mode == "positive":
        assert statuses.count(200) >= 5, statuses  # generation itself was exercised, not only its errors
