"""Compose exported models of one dataset into one exported model: each image comes from one member.

    python -m training.mixture exported/fashion_mnist/cdcgan exported/fashion_mnist/cvae \\
        --shares 0.5 0.5 --noise-scales 1 1.3 [--name mixture] [--out exported] [--overwrite]   # the shipped one

Why: a classifier trained on synthetic images learns what the generator shows it. Two generators of
different families fail in different ways (a GAN drops modes, a VAE blurs), so a pool drawn from both covers
more of the real distribution than either: on Fashion-MNIST, half the CAS pool from the cDCGAN and half from
the cVAE trains a better classifier than the same number of images from either alone (docs/zoo-experiments.md,
"A mixture of the two Fashion-MNIST generators"; Eilertsen et al. 2021, "Ensembles of GANs for synthetic
training data", found the same with several GANs).

The result is an ordinary exported model (generator.onnx, generator.pt, card.json, samples.png), so the
service, the evaluation and any ONNX user run it unchanged. Its contract, like the fitted prior's
(models/prior.py):

    noise (N, 1 + max member latent_dim) ~ N(0, I)
    member k = how many of the thresholds noise[:, 0] exceeds         (P(k) = share_k)
    image    = member_k(noise_scale_k * noise[:, 1 : 1 + latent_dim_k], labels)

The thresholds are standard normal quantiles of the cumulative shares, members ordered with the largest share
in the middle, so a request's temperature (which scales all the noise) still favours the common member below
1. A member's noise scale is the temperature it runs at inside the mixture (the service's temperature
multiplies it). Each row is computed by its own member only (the graph gathers each member's rows and scatters
its images back), so a call costs the members' calls weighted by their shares, and rows stay independent of
each other, as the service's batching requires.

The members are read from their exported files (ONNX and TorchScript), not from training checkpoints: any
exported model can join, including ones trained elsewhere. The card lists each member with the sha256 of the
file it was built from, so a replaced member shows (tests/test_zoo.py checks the shipped mixture against its
members).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .cli import UsageError, user_errors_exit
from . import latent_prior
from .export import (ONNX_FILE, SAMPLES_FILE, TORCHSCRIPT_FILE, check_parity, example_inputs, export_torchscript,
                     load_torchscript, refuse_to_replace, staged, write_card)
from .manifest import CARD, sha256_of
from .sampling import save_sample_grid

SHARED_FIELDS = ("dataset", "classes", "conditional", "image_shape")  # members must agree on these


class MemberMixture(nn.Module):
    """(noise, labels) -> images: each row from the member its first noise coordinate picks.

    members: callables with the exported contract (here the members' TorchScript modules), in picker order;
    thresholds: the K-1 ascending standard normal quantiles between them."""

    def __init__(self, members: list[nn.Module], latent_dims: list[int], noise_scales: list[float],
                 thresholds: list[float], num_classes: int, image_shape: tuple[int, int, int]):
        super().__init__()
        if not (len(members) == len(latent_dims) == len(noise_scales) == len(thresholds) + 1):
            raise ValueError("a mixture needs one latent_dim and noise scale per member and K-1 thresholds")
        self.members = nn.ModuleList(members)
        self.latent_dims, self.noise_scales = list(latent_dims), list(noise_scales)
        self.register_buffer("thresholds", torch.tensor(thresholds, dtype=torch.float32))
        self.num_classes, self.image_shape = num_classes, tuple(image_shape)  # num_classes 0: unconditional
        self.noise_dim = 1 + max(latent_dims)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        picked = (noise[:, :1] > self.thresholds).sum(1)  # (N,) member index
        images = noise.new_zeros((noise.shape[0], *self.image_shape))
        for k, (member, dim, scale) in enumerate(zip(self.members, self.latent_dims, self.noise_scales)):
            rows = (picked == k).nonzero().squeeze(1)  # only the member's own rows are computed
            z = noise[rows, 1:1 + dim] * scale
            out = member(z, labels[rows]) if self.num_classes else member(z)
            images = images.index_copy(0, rows, out)
        return images

    def generate(self, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """As the members' generators name it, so that `sampling.sample` draws from a mixture too."""
        return self(noise, labels)


def picker_thresholds(shares: list[float]) -> tuple[list[int], list[float]]:
    """(member order, K-1 thresholds): the largest share in the middle, thresholds at the standard normal
    quantiles of the ordered shares' cumulative sums, the rule of the fitted prior's component picker."""
    order, thresholds = latent_prior.picker_thresholds(torch.tensor(shares, dtype=torch.float64))
    return order.tolist(), thresholds.tolist()


def compose_onnx(members: list, latent_dims: list[int], noise_scales: list[float], thresholds: list[float],
                 conditional: bool, image_shape: tuple[int, int, int]):
    """One ONNX graph holding every member's graph (under the prefixes m0/, m1/, ...): each member gathers the
    rows it is picked for, and its images are scattered back into place. The ONNX twin of `MemberMixture`."""
    from onnx import TensorProto, compose, helper

    opsets = {tuple((o.domain, o.version) for o in m.opset_import) for m in members}
    if len(opsets) != 1:
        raise UsageError(f"the members' ONNX files use different opsets {sorted(opsets)}: re-export them with one exporter")
    expected = ["z", "labels"] if conditional else ["z"]
    for member in members:
        if [i.name for i in member.graph.input] != expected or len(member.graph.output) != 1:
            raise UsageError(f"a member's ONNX graph takes {[i.name for i in member.graph.input]}, not the contract's "
                             f"{expected}: re-export it with python -m training.export")
    nodes, initializers = [], []

    def const(name: str, values, dtype=TensorProto.INT64, dims=None) -> str:
        array = np.asarray(values)
        initializers.append(helper.make_tensor(name, dtype, list(array.shape) if dims is None else dims, array.flatten().tolist()))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    pick = node("Reshape", [node("Slice", ["z", const("pick_start", [0]), const("pick_end", [1]), const("axis1", [1])],
                                 "pick_column"), const("flat", [-1])], "pick")  # (N,)
    above = node("Greater", [node("Unsqueeze", [pick, "axis1"], "pick_2d"), const("thresholds", thresholds, TensorProto.FLOAT)],
                 "above")  # (N, K-1)
    picked = node("ReduceSum", [node("Cast", [above], "above_int", to=TensorProto.INT64), "axis1"], "picked", keepdims=0)
    batch = node("Shape", ["z"], "batch", end=1)
    images = node("ConstantOfShape", [node("Concat", [batch, const("image_shape", list(image_shape))], "images_shape", axis=0)],
                  "images_zero", value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    for k, (member, dim, scale) in enumerate(zip(members, latent_dims, noise_scales)):
        prefix, own = f"m{k}/", f"mixture{k}_"  # the member's names, and this graph's names around it
        graph = compose.add_prefix(member, prefix).graph
        rows = node("NonZero", [node("Equal", [picked, const(f"{own}index", k)], f"{own}is_picked")], f"{own}rows_2d")
        rows = node("Reshape", [rows, "flat"], f"{own}rows")  # (M,)
        z = node("Slice", ["z", const(f"{own}start", [1]), const(f"{own}end", [1 + dim]), "axis1"], f"{own}z_all")
        z = node("Gather", [z, rows], f"{own}z_rows", axis=0)
        node("Mul", [z, const(f"{own}scale", scale, TensorProto.FLOAT, [])], f"{prefix}z")  # the member's input z
        if conditional:
            node("Gather", ["labels", rows], f"{prefix}labels", axis=0)
        nodes.extend(graph.node)
        initializers.extend(graph.initializer)
        scatter_rows = node("Unsqueeze", [rows, "axis1"], f"{own}rows_column")  # (M, 1)
        images = node("ScatterND", [images, scatter_rows, graph.output[0].name],
                      "images" if k == len(members) - 1 else f"{own}images_so_far")

    inputs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 1 + max(latent_dims)])]
    if conditional:
        inputs.append(helper.make_tensor_value_info("labels", TensorProto.INT64, ["n"]))
    # The members' value_info is left out: its batch dimension ("n") is each member's own row count here.
    outputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", *image_shape])]
    graph = helper.make_graph(nodes, "member_mixture", inputs, outputs, initializer=initializers)
    return helper.make_model(graph, opset_imports=list(members[0].opset_import), ir_version=members[0].ir_version,
                             producer_name="synthgen.training.mixture")  # checked by export's check_parity


def _read_member(model_dir: Path) -> dict:
    card_path = model_dir / CARD
    if not card_path.is_file():
        raise UsageError(f"{model_dir} has no {CARD}: pass exported model folders (e.g. exported/fashion_mnist/cdcgan)")
    card = json.loads(card_path.read_text())
    for kind in ("onnx", "torchscript"):
        path = model_dir / card["files"][kind]
        if sha256_of(path) != card["sha256"][kind]:
            raise UsageError(f"{path} does not match the sha256 on its card: re-export {model_dir}")
    if "mixture" in card:
        raise UsageError(f"{model_dir} is itself a mixture: list its members instead")
    return card


def _check_mixture_args(cards: list[dict], shares: list[float], noise_scales: list[float]) -> None:
    if len(cards) < 2:
        raise UsageError("a mixture needs at least two member folders")
    if len(shares) != len(cards) or len(noise_scales) != len(cards):
        raise UsageError(f"--shares and --noise-scales need one value per member ({len(cards)}); "
                         f"got {len(shares)} and {len(noise_scales)}")
    if any(not (0 < s < 1) for s in shares) or not math.isclose(sum(shares), 1.0, abs_tol=1e-6):
        raise UsageError(f"--shares must each lie in (0, 1) and sum to 1; got {shares}")
    if any(not (0 < s <= 10) for s in noise_scales):
        raise UsageError(f"--noise-scales must each lie in (0, 10]; got {noise_scales}")
    for field in SHARED_FIELDS:
        values = {json.dumps(card[field]) for card in cards}
        if len(values) > 1:
            raise UsageError(f"the members disagree on {field}: {', '.join(sorted(values))}")
    names = [card["model"] for card in cards]
    if len(set(names)) != len(names):
        raise UsageError(f"each member must be a different model; got {', '.join(names)}")


def _training_summary(cards: list[dict]) -> dict:
    """The card's `training`: the members' own figures as lists in member order (the catalog shows them)."""
    trainings = [card["training"] for card in cards]
    return {
        "mixture_of": [card["model"] for card in cards],
        **{key: [t.get(key) for t in trainings] for key in ("epochs", "steps", "hardware", "precision")},
        "wall_time_s": round(sum(t.get("wall_time_s", 0.0) for t in trainings), 1),
    }


def export_mixture(member_dirs: list[str | Path], shares: list[float], noise_scales: list[float],
                   name: str = "mixture", out_root: str | Path = "exported") -> Path:
    """Write out_root/<dataset>/<name>/ from the exported member folders and refresh the manifest; returns it."""
    import onnx

    member_dirs = [Path(d) for d in member_dirs]
    cards = [_read_member(d) for d in member_dirs]
    _check_mixture_args(cards, shares, noise_scales)
    if not name.isidentifier():
        raise UsageError(f"--name must be a plain identifier (letters, digits, _); got {name!r}")
    order, thresholds = picker_thresholds(shares)
    cards, member_dirs = [cards[i] for i in order], [member_dirs[i] for i in order]
    shares, noise_scales = [shares[i] for i in order], [noise_scales[i] for i in order]
    first = cards[0]
    conditional, latent_dims = bool(first["conditional"]), [int(card["latent_dim"]) for card in cards]
    out = Path(out_root) / first["dataset"] / name
    if any(out.resolve() == d.resolve() for d in member_dirs):
        raise UsageError(f"--name {name} would overwrite a member's folder")

    members = [load_torchscript(d / card["files"]["torchscript"]).eval() for d, card in zip(member_dirs, cards)]
    num_classes = len(first["classes"]) if conditional else 0
    mixture = MemberMixture(members, latent_dims, noise_scales, thresholds, num_classes,
                            tuple(first["image_shape"])).eval().requires_grad_(False)
    onnx_members = [onnx.load(str(d / card["files"]["onnx"])) for d, card in zip(member_dirs, cards)]
    files = {"onnx": ONNX_FILE, "torchscript": TORCHSCRIPT_FILE, "samples": SAMPLES_FILE}
    with staged(out, files.values()) as staging:
        onnx.save(compose_onnx(onnx_members, latent_dims, noise_scales, thresholds, conditional,
                               tuple(first["image_shape"])), str(staging / ONNX_FILE))
        export_torchscript(mixture, example_inputs(mixture, 4), staging / TORCHSCRIPT_FILE)
        parity = check_parity(mixture, staging / ONNX_FILE, staging / TORCHSCRIPT_FILE, mixture)  # against the members'
        save_sample_grid(mixture, staging / SAMPLES_FILE, seed=0)

    storages = {card.get("weights", {}).get("storage", "float32") for card in cards}
    card = {
        "format": "synthgen-card/1",
        "dataset": first["dataset"],
        "model": name,
        "description": "Mixture of " + " and ".join(f"{c['model']} ({100 * s:g}%)" for c, s in zip(cards, shares)) +
                       ": each image from one member",
        "classes": first["classes"],
        "num_classes": len(first["classes"]),
        "conditional": conditional,
        "image_shape": first["image_shape"],
        "latent_dim": mixture.noise_dim,
        "contract": {
            "inputs": {"z": "float32 [N, latent_dim], standard normal; z[:, 0] picks the member",
                       **({"labels": "int64 [N], class ids 0..num_classes-1"} if conditional else {})},
            "output": {"images": "float32 [N, C, H, W] in [0, 1]"},
        },
        "mixture": {
            "members": [{"model": c["model"], "share": s, "noise_scale": scale, "latent_dim": dim,
                         "picked_when": _interval(k, thresholds), "onnx_sha256": c["sha256"]["onnx"],
                         "torchscript_sha256": c["sha256"]["torchscript"]}
                        for k, (c, s, scale, dim) in enumerate(zip(cards, shares, noise_scales, latent_dims))],
            "rule": "member k when z[:, 0] lies in its interval; it gets noise_scale * z[:, 1:1 + latent_dim]",
        },
        "samples_grid": "one row per class, fixed seed 0" if conditional else "8x8 grid, fixed seed 0",
        "files": files,
        "sha256": {kind: sha256_of(out / file) for kind, file in files.items()},
        "parameters": sum(int(c["parameters"]) for c in cards),
        "weights": {"storage": storages.pop() if len(storages) == 1 else "mixed", "compute": "float32",
                    "members": [c.get("weights", {"storage": "float32"})["storage"] for c in cards]},
        "parity_max_abs_error": parity,
        "training": _training_summary(cards),
    }
    write_card(out, out_root, card)
    return out


def _interval(k: int, thresholds: list[float]) -> str:
    low = f"{thresholds[k - 1]:.4f} < " if k > 0 else ""
    high = f" <= {thresholds[k]:.4f}" if k < len(thresholds) else ""
    return f"{low}z[:, 0]{high}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("members", nargs="+", help="exported model folders of one dataset (at least two)")
    parser.add_argument("--shares", nargs="+", type=float, required=True, help="each member's share of the images (sum 1)")
    parser.add_argument("--noise-scales", nargs="+", type=float, default=None,
                        help="each member's noise scale inside the mixture (default: 1 for each)")
    parser.add_argument("--name", default="mixture", help="the mixture's model name (default: mixture)")
    parser.add_argument("--out", default="exported", help="export root (default: exported)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a model already exported to <out>/<dataset>/<name> (refused without it)")
    args = parser.parse_args(argv)
    dataset = _read_member(Path(args.members[0]))["dataset"]
    refuse_to_replace(parser, Path(args.out) / dataset / args.name, args.overwrite, "give another --name or --out")
    scales = args.noise_scales if args.noise_scales is not None else [1.0] * len(args.members)
    out = export_mixture(args.members, args.shares, scales, args.name, args.out)
    card = json.loads((out / CARD).read_text())
    print(f"{out}: parity {card['parity_max_abs_error']}, members "
          + ", ".join(f"{m['model']} {m['share']:g} x{m['noise_scale']:g}" for m in card["mixture"]["members"]))


if __name__ == "__main__":
    with user_errors_exit():
        main()
