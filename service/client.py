"""A small Python client for the synthgen service (httpx + numpy + pillow; no torch, no BentoML).

    from service.client import SynthClient

    client = SynthClient("http://127.0.0.1:3000", token=None)
    images, labels, class_names = client.generate("mnist", n=256, labels="balanced", seed=0)
    images.shape, images.dtype   # (256, 28, 28, 1) uint8, N x H x W x C; labels int64 (-1: unconditional)
    client.last_seed             # the seed the server used (drawn by it when seed=None)
    client.models()["datasets"]  # the catalog
    path = client.interpolate("mnist", seed_start=0, seed_end=1, steps=8, label=3)  # uint8 steps x H x W x C

Errors come back as `SynthError` with the HTTP status and the service's JSON error body.
"""

from __future__ import annotations

import httpx
import numpy as np

from .encoders import decode_npz


class SynthError(RuntimeError):
    """A non-2xx answer: `status` and `body` (the service's {"error": ..., "detail": [...]} when JSON)."""

    def __init__(self, status: int, body):
        message = body.get("error") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.body = status, body


class SynthClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 300.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.last_seed: int | None = None

    def __enter__(self) -> SynthClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _post(self, route: str, body: dict) -> httpx.Response:
        response = self.http.post(route, json={k: v for k, v in body.items() if v is not None})
        if response.status_code >= 400:
            try:
                detail = response.json()
            except ValueError:
                detail = response.text
            raise SynthError(response.status_code, detail)
        return response

    def generate(self, dataset: str, n: int = 64, model: str | None = None, labels=None,
                 seed: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(images uint8 N x H x W x C, labels int64 N, class_names); the seed used is in `last_seed`."""
        response = self._post("/generate", {"dataset": dataset, "model": model, "n": n, "labels": labels,
                                            "seed": seed, "format": "npz"})
        batch = decode_npz(response.content)
        self.last_seed = int(batch.meta["seed"])
        return batch.images, batch.labels, batch.class_names

    def generate_bytes(self, dataset: str, format: str, **fields) -> bytes:
        """The raw body of /generate in any format (npz, png_grid, zip, json), e.g. to save a PNG grid."""
        return self._post("/generate", {"dataset": dataset, "format": format, **fields}).content

    def models(self) -> dict:
        return self._post("/models", {}).json()

    def interpolate(self, dataset: str, seed_start: int = 0, seed_end: int = 1, steps: int = 8,
                    model: str | None = None, label=None, method: str = "slerp") -> np.ndarray:
        """uint8 steps x H x W x C images from the seed_start image to the seed_end image."""
        response = self._post("/interpolate", {"dataset": dataset, "model": model, "seed_start": seed_start,
                                               "seed_end": seed_end, "steps": steps, "label": label,
                                               "method": method, "format": "npz"})
        return decode_npz(response.content).images
