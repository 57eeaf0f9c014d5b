"""`exported/manifest.json`: the index the service loads, and the only thing `training/` and `service/` share.

Schema (format "synthgen-manifest/1"), every path relative to the manifest's folder:

    {
      "format": "synthgen-manifest/1",
      "defaults": {"<dataset>": "<model>", ...},        # the model used when a request names none
      "models": [
        {"dataset": "mnist", "model": "cdcgan", "dir": "mnist/cdcgan",
         "files": {"card": {"path": "mnist/cdcgan/card.json", "sha256": "..."},
                   "onnx": {"path": "mnist/cdcgan/generator.onnx", "sha256": "..."},
                   "torchscript": {"path": "mnist/cdcgan/generator.pt", "sha256": "..."},
                   "samples": {"path": "mnist/cdcgan/samples.png", "sha256": "..."}}}
      ]
    }

Each model's card.json (format "synthgen-card/1") holds what serving needs (classes, image_shape,
latent_dim, conditional, the input/output contract) plus the training config, the metrics and `weights` (how the
files store the parameters: float32, or float16 cast to float32 in the graph; cards older than the field: float32).

The default model of a dataset: conditional models first (the service exists to return labelled images),
then the lowest FID on the card, then the family order below. `write_manifest` recomputes everything from
the cards and files on disk, so it is safe to call after any change (export, evaluate).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
CARD = "card.json"
FAMILY_PREFERENCE = ("cdcgan", "cwgan_gp", "cvae", "cmlp_gan", "cmlp_vae", "dcgan", "wgan_gp", "conv_vae", "mlp_gan",
                     "mlp_vae")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _rank(card: dict) -> tuple:
    fid = (card.get("metrics") or {}).get("fid")
    family = FAMILY_PREFERENCE.index(card["model"]) if card["model"] in FAMILY_PREFERENCE else len(FAMILY_PREFERENCE)
    return (not card["conditional"], fid if fid is not None else float("inf"), family)


def write_manifest(exported_dir: str | Path) -> dict:
    """Scan exported_dir/<dataset>/<model>/card.json and write manifest.json with fresh sha256s and defaults."""
    root = Path(exported_dir)
    entries, cards = [], {}
    for card_path in sorted(root.glob(f"*/*/{CARD}")):
        card = json.loads(card_path.read_text())
        model_dir = card_path.parent
        files = {"card": card_path, **{kind: model_dir / name for kind, name in card["files"].items()}}
        entries.append({
            "dataset": card["dataset"],
            "model": card["model"],
            "dir": model_dir.relative_to(root).as_posix(),
            "files": {kind: {"path": p.relative_to(root).as_posix(), "sha256": sha256_of(p)} for kind, p in files.items()},
        })
        cards.setdefault(card["dataset"], []).append(card)
    defaults = {dataset: min(group, key=_rank)["model"] for dataset, group in sorted(cards.items())}
    manifest = {"format": "synthgen-manifest/1", "defaults": defaults, "models": entries}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
