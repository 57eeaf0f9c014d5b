"""Response formats for a batch of uint8 N x H x W x C images with int64 labels, and their decoders.

    npz       application/x-npz   uncompressed .npz (np.load): images uint8 N x H x W x C, labels int64 N,
                                  class_names str K, plus 0-d arrays for the metadata (dataset, model, seed...)
    png_grid  image/png           one preview PNG, images in row-major order, 2 px black gaps; a "synthgen"
                                  text chunk holds the metadata, n, labels and class_names as JSON
    zip       application/zip     images/000000.png ... (one PNG per image), labels.csv (RFC 4180:
                                  filename,label,class_name) and info.json (metadata, class_names)
    json      application/json    {"images": [base64 PNG, ...], "labels": [...], "class_names": [...],
                                   "image_shape": [H, W, C], ...metadata}; for small requests

Every encoder is a pure function of its inputs: archive timestamps are fixed (1980-01-01), so the same
images give the same bytes. Labels of unconditional models are -1 (class_name "" in labels.csv).
The decoders read each format back: `service.client` uses `decode_npz`, and the round-trip tests use them all.
"""

from __future__ import annotations

import base64
import csv
import functools
import io
import json
import math
import struct
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

FORMATS = ("npz", "png_grid", "zip", "json")
MEDIA_TYPES = {"npz": "application/x-npz", "png_grid": "image/png", "zip": "application/zip",
               "json": "application/json"}
EXTENSIONS = {"npz": "npz", "png_grid": "png", "zip": "zip", "json": "json"}
FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can store; makes archives reproducible
PNG_COMPRESS_LEVEL = 1  # lossless either way; level 1 is several times faster than the default 6
GRID_PAD = 2


@dataclass
class Batch:
    images: np.ndarray  # uint8 N x H x W x C
    labels: np.ndarray  # int64 N, -1 for unconditional models
    class_names: list[str]
    meta: dict = field(default_factory=dict)  # JSON scalars: dataset, model, seed, ...


def _zip_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def png_bytes(image: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """One H x W x C uint8 image (C = 1 or 3) as PNG (8-bit grayscale or RGB), with optional text chunks."""
    pil = Image.fromarray(image[..., 0], "L") if image.shape[-1] == 1 else Image.fromarray(image, "RGB")
    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_itxt(key, value)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, pnginfo=info)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 H x W x C (C = 1 for grayscale)."""
    with Image.open(io.BytesIO(data)) as pil:
        array = np.asarray(pil.convert("L" if pil.mode in ("L", "1", "I", "I;16") else "RGB"))
    return array[..., None] if array.ndim == 2 else array


def _npz_arrays(batch: Batch) -> dict[str, np.ndarray]:
    """The npz members, in order, each C-contiguous."""
    arrays = {"images": batch.images, "labels": batch.labels.astype(np.int64, copy=False),
              "class_names": np.asarray(batch.class_names, dtype=np.str_)}
    arrays.update({key: np.asarray(value) for key, value in batch.meta.items()})
    return {key: value if value.flags.c_contiguous else value.copy(order="C") for key, value in arrays.items()}


def _zip_name(filename: str) -> tuple[bytes, int]:
    """The name's bytes and flag bits, as zipfile stores them: ASCII, or UTF-8 with the language-encoding flag."""
    try:
        return filename.encode("ascii"), 0
    except UnicodeEncodeError:
        return filename.encode("utf-8"), 0x800


@functools.lru_cache(maxsize=1024)
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The .npy header of a C-contiguous array, as numpy writes it; cached, since numpy's formatting takes about
    3 us and a request's members repeat (same dtypes, the shapes of a few batch sizes)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                  "fortran_order": False, "shape": shape})
    return header.getvalue()


_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zipfile's structFileHeader
_CENTRAL_HEADER = struct.Struct("<4s4B4HL2L5H2L")  # zipfile's structCentralDir
_END_RECORD = struct.Struct("<4s4H2LH")  # zipfile's structEndArchive
_DOS_TIME, _DOS_DATE = 0, (FIXED_TIME[0] - 1980) << 9 | FIXED_TIME[1] << 5 | FIXED_TIME[2]
NPZ_HEADROOM = 1024  # bytes per array for its zip records and .npy header: a bound for the zip64 decision


def encode_npz(batch: Batch) -> bytes:
    """The batch as an uncompressed .npz: the bytes that np.savez's path (zipfile in "w" mode over a seekable
    file, numpy.lib.format headers, fixed timestamps) writes, but its zip records packed here directly and
    joined with each array's buffer in one copy. zipfile's per-member work (about 20 us a member, six members)
    was 0.13 ms of an n=1 request, a tenth of the event loop's time per request; this takes about 0.02 ms.
    Archives that need zip64 records (over 4 GiB) go through zipfile itself."""
    arrays = _npz_arrays(batch)
    if sum(value.nbytes + NPZ_HEADROOM for value in arrays.values()) > zipfile.ZIP64_LIMIT:
        return _encode_npz_with_zipfile(arrays)
    parts, central, offset = [], [], 0
    for key, value in arrays.items():
        entry = _zip_entry(f"{key}.npy")
        name, flags = _zip_name(entry.filename)
        header = _npy_header(value.dtype, value.shape)
        data = value.reshape(-1).view(np.uint8)
        crc = zlib.crc32(data, zlib.crc32(header))
        size = len(header) + data.nbytes
        parts += [_LOCAL_HEADER.pack(b"PK\003\004", entry.extract_version, entry.reserved, flags, entry.compress_type,
                                     _DOS_TIME, _DOS_DATE, crc, size, size, len(name), 0), name, header, data]
        central += [_CENTRAL_HEADER.pack(b"PK\001\002", entry.create_version, entry.create_system,
                                         entry.extract_version, entry.reserved, flags, entry.compress_type, _DOS_TIME,
                                         _DOS_DATE, crc, size, size, len(name), 0, 0, 0, entry.internal_attr,
                                         entry.external_attr, offset), name]
        offset += _LOCAL_HEADER.size + len(name) + size
    central_size = sum(len(part) for part in central)
    end = _END_RECORD.pack(b"PK\005\006", 0, 0, len(arrays), len(arrays), central_size, offset, 0)
    return b"".join([*parts, *central, end])


def _encode_npz_with_zipfile(arrays: dict[str, np.ndarray]) -> bytes:
    """encode_npz through zipfile, which writes the zip64 records an archive over 4 GiB needs."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, value in arrays.items():
            # zip64 only where needed: forcing it made Python < 3.11.4 write other header bytes (gh-103861)
            zip64 = value.nbytes + (1 << 20) > zipfile.ZIP64_LIMIT
            with archive.open(_zip_entry(f"{key}.npy"), "w", force_zip64=zip64) as f:
                f.write(_npy_header(value.dtype, value.shape))
                f.write(value.reshape(-1).view(np.uint8))
    return out.getvalue()


def decode_npz(data: bytes) -> Batch:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    images, labels = arrays.pop("images"), arrays.pop("labels")
    class_names = [str(c) for c in arrays.pop("class_names")]
    meta = {key: value.item() for key, value in arrays.items()}
    return Batch(images=images, labels=labels, class_names=class_names, meta=meta)


def grid_columns(n: int) -> int:
    return max(1, math.ceil(math.sqrt(n)))


def encode_png_grid(batch: Batch, columns: int | None = None) -> bytes:
    images = batch.images
    n, h, w, c = images.shape
    cols = min(n, columns or grid_columns(n))
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * h + (rows + 1) * GRID_PAD, cols * w + (cols + 1) * GRID_PAD, c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        y, x = GRID_PAD + r * (h + GRID_PAD), GRID_PAD + k * (w + GRID_PAD)
        canvas[y:y + h, x:x + w] = images[i]
    about = {**batch.meta, "n": n, "columns": cols, "labels": batch.labels.tolist(), "class_names": batch.class_names}
    return png_bytes(canvas, {"synthgen": json.dumps(about, separators=(",", ":"))})


def png_grid_metadata(data: bytes) -> dict:
    """The "synthgen" text chunk of a png_grid: metadata (dataset, model, seed...), n, columns, labels, class_names."""
    with Image.open(io.BytesIO(data)) as pil:
        return json.loads(pil.text["synthgen"])


def split_png_grid(data: bytes, n: int, height: int, width: int, columns: int | None = None) -> np.ndarray:
    """The n images of a grid made by encode_png_grid, back as uint8 N x H x W x C."""
    canvas = decode_png(data)
    cols = min(n, columns or grid_columns(n))
    out = np.empty((n, height, width, canvas.shape[-1]), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        y, x = GRID_PAD + r * (height + GRID_PAD), GRID_PAD + k * (width + GRID_PAD)
        out[i] = canvas[y:y + height, x:x + width]
    return out


def image_name_width(n: int) -> int:
    """Digits of an image's row number in its file name (000000.png ...), for a set of n images."""
    return max(6, len(str(n - 1)))


def labels_csv(filenames: list[str], labels: list[int], class_names: list[str]) -> str:
    """labels.csv of a set of image files: filename,label,class_name (class_name "" for a label of -1)."""
    table = io.StringIO(newline="")
    writer = csv.writer(table)  # RFC 4180: CRLF rows, fields with commas, quotes or line breaks quoted
    writer.writerow(["filename", "label", "class_name"])
    writer.writerows([name, label, class_names[label] if label >= 0 else ""] for name, label in zip(filenames, labels))
    return table.getvalue()


def encode_zip(batch: Batch) -> bytes:
    n = len(batch.images)
    width = image_name_width(n)
    names = [f"images/{i:0{width}d}.png" for i in range(n)]
    info = {**batch.meta, "n": n, "image_shape": list(batch.images.shape[1:]), "class_names": batch.class_names}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, image in zip(names, batch.images):
            archive.writestr(_zip_entry(name), png_bytes(image))
        archive.writestr(_zip_entry("labels.csv"), labels_csv(names, batch.labels.tolist(), batch.class_names))
        archive.writestr(_zip_entry("info.json"), json.dumps(info, indent=2) + "\n")
    return buf.getvalue()


def decode_zip(data: bytes) -> Batch:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        rows = list(csv.DictReader(io.StringIO(archive.read("labels.csv").decode("utf-8"), newline="")))
        info = json.loads(archive.read("info.json"))
        images = [decode_png(archive.read(row["filename"])) for row in rows]
    class_names = info.pop("class_names")
    h, w, c = info.pop("image_shape")
    info.pop("n")
    stacked = np.stack(images) if images else np.empty((0, h, w, c), dtype=np.uint8)
    return Batch(images=stacked, labels=np.asarray([int(r["label"]) for r in rows], dtype=np.int64),
                 class_names=class_names, meta=info)


def encode_json(batch: Batch) -> bytes:
    body = {**batch.meta, "n": len(batch.images), "image_shape": list(batch.images.shape[1:]),
            "class_names": batch.class_names, "labels": batch.labels.tolist(),
            "images": [base64.b64encode(png_bytes(image)).decode("ascii") for image in batch.images]}
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def decode_json(data: bytes | dict) -> Batch:
    body = json.loads(data) if isinstance(data, bytes | str) else dict(data)
    images = [decode_png(base64.b64decode(s)) for s in body.pop("images")]
    h, w, c = body.pop("image_shape")
    body.pop("n")
    stacked = np.stack(images) if images else np.empty((0, h, w, c), dtype=np.uint8)
    return Batch(images=stacked, labels=np.asarray(body.pop("labels"), dtype=np.int64),
                 class_names=body.pop("class_names"), meta=body)


ENCODERS = {"npz": encode_npz, "png_grid": encode_png_grid, "zip": encode_zip, "json": encode_json}


def encode(batch: Batch, fmt: str, columns: int | None = None) -> bytes:
    if fmt == "png_grid":
        return encode_png_grid(batch, columns)
    return ENCODERS[fmt](batch)
