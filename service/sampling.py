"""The fixed, documented rules that make a request reproducible: latents from the seed, labels, uint8 images.

    z        = numpy.random.Generator(numpy.random.PCG64(seed)).standard_normal((n, latent_dim), dtype=float32)
               times float32(temperature) when the request gives a temperature other than 1 (0..2)
    labels   "balanced" -> [0, 1, ..., k-1, 0, 1, ...]; one id/name -> that class n times; a list -> as given;
             an object {class name: count} -> each class count times, class by class in the object's order
             (n, when the request gives it, must equal the sum of the counts; otherwise it is that sum)
    images   uint8 = clip(rint(x * 255), 0, 255) (round half to even), laid out N x H x W x C

The temperature scales the noise the generator was trained on, N(0, I): below 1 the images keep nearer the
centre of each class (fewer odd ones, less variety; GANs' "truncation trick"), above 1 they spread wider, and 0
gives every image of a class the same, central one.

Row i of z depends only on (seed, i), so a request with the same seed and a larger n starts with the same
images, and /interpolate with seed_start=s starts at the image /generate returns for n=1, seed=s.
Unconditional models get label -1 for every image.
"""

from __future__ import annotations

import numpy as np

from .catalog import ModelCard
from .errors import MAX_DETAIL, ApiError, short_name

UNCONDITIONAL_LABEL = -1
INTERPOLATION_METHODS = ("slerp", "lerp")


def latents(seed: int, n: int, latent_dim: int, temperature: float = 1.0) -> np.ndarray:
    z = np.random.Generator(np.random.PCG64(seed)).standard_normal((n, latent_dim), dtype=np.float32)
    if temperature != 1.0:
        z *= np.float32(temperature)
    return z


def interpolation_latents(seed_start: int, seed_end: int, steps: int, latent_dim: int,
                          method: str = "slerp", temperature: float = 1.0) -> np.ndarray:
    """`steps` latents from z(seed_start) to z(seed_end), both ends exact; slerp keeps the Gaussian norm."""
    a = latents(seed_start, 1, latent_dim, temperature)[0].astype(np.float64)
    b = latents(seed_end, 1, latent_dim, temperature)[0].astype(np.float64)
    t = np.linspace(0.0, 1.0, steps)[:, None]
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    omega = np.arccos(np.clip(float(np.dot(a, b) / norms), -1.0, 1.0)) if norms > 0 else 0.0
    if method == "lerp" or np.sin(omega) < 1e-6:  # (anti)parallel or zero ends: slerp degenerates to lerp
        path = (1.0 - t) * a + t * b
    else:
        path = (np.sin((1.0 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)
    path[0], path[-1] = a, b
    return path.astype(np.float32)


def class_id(value: int | str, card: ModelCard, field: str) -> int:
    """One label, as a class id or a class name, checked against the card's classes."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ApiError(400, f"{field}: {value!r} is neither a class id nor a class name", field=field,
                       allowed=list(card.classes))
    if isinstance(value, int):
        if 0 <= value < card.num_classes:
            return value
        raise ApiError(400, f"{field}: class id {value} is outside 0..{card.num_classes - 1} for "
                       f"{card.dataset}/{card.model}", field=field, allowed=list(range(card.num_classes)))
    try:
        return card.classes.index(value)
    except ValueError:
        raise ApiError(400, f"{field}: unknown class name {short_name(value)!r} for {card.dataset}", field=field,
                       allowed=list(card.classes)) from None


def resolve_labels(labels, n: int | None, card: ModelCard, max_n: int | None = None) -> np.ndarray:
    """The int64 label of each image, following the module's rules; 4xx naming 'labels' otherwise.

    n is the request's image count, or None where the request gives a labels object and leaves n out: the
    counts then give n. Counts must add up to at most max_n.
    """
    if not card.conditional:
        if labels is None or labels == "balanced":
            return np.full(n, UNCONDITIONAL_LABEL, dtype=np.int64)
        raise ApiError(400, f"labels: {card.dataset}/{card.model} is an unconditional model and cannot follow "
                       "labels; omit 'labels' (every image gets label -1) or pick a conditional model",
                       field="labels", allowed=["balanced", None])
    if isinstance(labels, dict):
        return labels_from_counts(labels, n, card, max_n)
    if labels is None or labels == "balanced":
        return np.arange(n, dtype=np.int64) % card.num_classes
    if isinstance(labels, list):
        if len(labels) != n:
            raise ApiError(400, f"labels: a list of labels must have exactly n={n} items, it has {len(labels)}",
                           field="labels", allowed=[f"a list of {n} class ids or names", "balanced",
                                                    "one class id or name"])
        return np.asarray(class_ids([(i, value, f"labels[{i}]") for i, value in enumerate(labels)], card),
                          dtype=np.int64)
    return np.full(n, class_id(labels, card, "labels"), dtype=np.int64)


def class_ids(items: list[tuple[int | str, int | str, str]], card: ModelCard) -> list[int]:
    """`class_id` of each (key, value, field) of a labels list or object; every bad one is reported at
    ["labels", key] (up to MAX_DETAIL of them), not only the first."""
    ids, bad = [], []
    for key, value, field in items:
        try:
            ids.append(class_id(value, card, field))
        except ApiError as exc:
            bad.append(exc.detail_item(["labels", key]))
    if bad:
        shown = bad[:MAX_DETAIL]
        more = f"; and {len(bad) - len(shown)} more" if len(bad) > len(shown) else ""
        raise ApiError(400, "; ".join(item["msg"] for item in shown) + more, field="labels", details=shown)
    return ids


def labels_from_counts(counts: dict[str, int], n: int | None, card: ModelCard, max_n: int | None) -> np.ndarray:
    """{class name: count} -> each class `count` times, in the object's order; 4xx naming 'labels' otherwise."""
    ids = class_ids([(name, name, "labels") for name in counts], card)
    total = sum(counts.values())
    limit = max_n if max_n is not None else total
    if not 1 <= total <= limit:
        raise ApiError(400, f"labels: the counts add up to {total}; they must add up to 1..{limit} images",
                       field="labels", allowed={"type": "integer", "minimum": 1, "maximum": limit})
    if n is not None and n != total:
        raise ApiError(400, f"n is {n} but the labels' counts add up to {total}; leave n out or make them equal",
                       field="n", allowed=[total])
    return np.repeat(np.array(ids, dtype=np.int64), list(counts.values()))


def quantize_into(images: np.ndarray, out: np.ndarray) -> None:
    """float32 N x C x H x W in [0, 1] -> uint8 N x H x W x C written into `out`; consumes `images` as scratch.

    Works through ~1 MiB blocks so each one stays in cache across the four passes.
    """
    step = max(1, (1 << 18) // max(1, images[0].size)) if len(images) else 1
    for a in range(0, len(images), step):
        block = images[a:a + step]
        np.multiply(block, 255.0, out=block)
        np.rint(block, out=block)
        np.clip(block, 0.0, 255.0, out=block)
        np.copyto(out[a:a + step], block.astype(np.uint8).transpose(0, 2, 3, 1))
