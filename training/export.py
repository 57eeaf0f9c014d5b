"""Export a trained run's generator (GAN) or decoder (VAE) for serving: TorchScript + single-file ONNX.

    python -m training.export runs/mnist/cdcgan                 # -> exported/mnist/cdcgan/
    python -m training.export runs/mnist/cdcgan --out exported
    python -m training.export runs/mnist/cdcgan --weights float16   # files half the size, float32 compute
    python -m training.export exported/retinamnist/dcgan --from-exported --weights float16 --out my-exported  # without the run

An export never replaces a model already in the export root (its card may hold hours of evaluation) unless
--overwrite says so; the card's metrics are then kept only when the new ONNX file is byte-identical.

The inference contract, the same for every model:
    inputs   z       float32 [N, latent_dim]   standard normal noise (a VAE with a fitted mixture prior:
                                               one more coordinate, which picks the component; models/prior.py)
             labels  int64   [N]               class ids (conditional models only)
    output   images  float32 [N, C, H, W]      in [0, 1]
with a dynamic batch axis N. The export checks itself: onnx.checker, and ONNX Runtime and TorchScript
outputs equal eager outputs within 1e-5 on the same inputs; a failed check raises and writes no card.
`--weights float16` stores every parameter as float16 in both files and casts it to float32 where it is used
(compute, inputs and outputs stay float32); the card records it and how far the rounding moved the outputs.
Writes generator.onnx, generator.pt, samples.png (one row per class), card.json, and updates manifest.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as dt
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from .cli import UsageError, user_errors_exit
from .manifest import CARD, sha256_of, write_manifest
from .models import MODEL_FAMILIES
from .sampling import noise_dim, save_sample_grid
from .train import code_version, load_checkpoint

ONNX_FILE, TORCHSCRIPT_FILE, SAMPLES_FILE = "generator.onnx", "generator.pt", "samples.png"
PARITY_ATOL = 1e-5
ONNX_OPSET = 18
WEIGHT_DTYPES = ("float32", "float16")


class ConditionalInference(nn.Module):
    """(z, labels) -> images in [0, 1]: the exported graph of a class-conditional model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model.generate(z, labels).clamp(0, 1)


class UnconditionalInference(nn.Module):
    """z -> images in [0, 1]: the exported graph of an unconditional model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.generate(z).clamp(0, 1)


def load_torchscript(path: Path, **kwargs) -> torch.jit.ScriptModule:
    """torch.jit.load without torch 2.9's FutureWarning ("deprecated, switch to torch.export"), printed on
    every export: the TorchScript file is one of the two formats we ship, by design."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=FutureWarning)
        return torch.jit.load(str(path), **kwargs)


def inference_module(model: nn.Module) -> nn.Module:
    """The exported graph: the generator, or the VAE's decoder alone (its encoder is not shipped)."""
    model = copy.deepcopy(model).eval()
    for name in getattr(model, "encoder_modules", ()):
        setattr(model, name, None)
    return (ConditionalInference(model) if model.num_classes > 0 else UnconditionalInference(model)).eval()


def example_inputs(model: nn.Module, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, noise_dim(model), generator=g)
    if model.num_classes > 0:
        return z, torch.randint(0, model.num_classes, (n,), generator=g)
    return (z,)


class StoredAsFloat16(nn.Module):
    """Parametrization of a parameter kept as float16 and used as float32 (`store_weights_in_float16`)."""

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.float()


def store_weights_in_float16(module: nn.Module) -> float:
    """Keep every floating parameter of `module` as float16, cast to float32 where it is used; returns the
    largest absolute parameter change.

    Why: the files are half the size (the budget of `exported/` is what limits the widest generators), and
    the exported graphs hold the cast, so ONNX Runtime folds it into float32 weights when it loads the model
    (the same speed) and TorchScript casts on each call. The ONNX exporter's optimizer folds the casts of
    small weights (a few thousand values) back into float32 constants; the large ones stay float16. The
    module itself changes the same way, so the parity check compares the files with the float16-rounded
    model, and the metrics measured on the files are the shipped model's. Batch-norm statistics (buffers)
    stay float32.
    """
    largest = 0.0
    for layer in list(module.modules()):
        for name, param in list(layer.named_parameters(recurse=False)):
            if not param.is_floating_point():
                continue
            stored = param.detach().half()
            if not torch.isfinite(stored).all():
                raise ValueError(f"a parameter of {type(layer).__name__}.{name} does not fit float16 (|w| > 65504)")
            largest = max(largest, float((stored.float() - param.detach()).abs().max()))
            parametrize.register_parametrization(layer, name, StoredAsFloat16())
            layer.parametrizations[name].original = nn.Parameter(stored, requires_grad=False)
    return largest


def export_onnx(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> None:
    names = ["z", "labels"][: len(inputs)]
    batch = torch.export.Dim("n", min=1, max=1_000_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, inputs, str(path), input_names=names, output_names=["images"],
            dynamic_shapes=tuple({0: batch} for _ in names), opset_version=ONNX_OPSET,
            dynamo=True, external_data=False, optimize=True, verbose=False,
        )


def export_torchscript(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, inputs, check_trace=False)
    traced.save(str(path))


def check_parity(module: nn.Module, onnx_path: Path, ts_path: Path, model: nn.Module) -> dict:
    """ONNX Runtime and TorchScript outputs vs eager on fresh inputs of two batch sizes; raises past 1e-5."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load(str(onnx_path)), full_check=True)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    scripted = load_torchscript(ts_path)
    worst = {"onnxruntime": 0.0, "torchscript": 0.0}
    for n, seed in ((1, 11), (37, 12)):
        inputs = example_inputs(model, n, seed)
        with torch.inference_mode():
            eager = module(*inputs).numpy()
            ts = scripted(*inputs).numpy()
        feeds = {name: t.numpy() for name, t in zip(["z", "labels"], inputs)}
        (ort_out,) = session.run(["images"], feeds)
        assert ort_out.shape == eager.shape == (n, *model.image_shape), f"shape {ort_out.shape} != {eager.shape}"
        worst["onnxruntime"] = max(worst["onnxruntime"], float(np.abs(ort_out - eager).max()))
        worst["torchscript"] = max(worst["torchscript"], float(np.abs(ts - eager).max()))
    for backend, err in worst.items():
        if err > PARITY_ATOL:
            raise AssertionError(f"{backend} output differs from eager by {err:.2e} (> {PARITY_ATOL:g})")
    return worst


def export_run(run_dir: str | Path, out_root: str | Path = "exported", weights: str = "float32") -> Path:
    """Export one run directory to out_root/<dataset>/<model>/ and refresh the manifest; returns that folder.
    weights: how the files store the parameters, "float32" or "float16" (see `store_weights_in_float16`)."""
    model, state = load_checkpoint(run_dir)
    return export_model(model, state, out_root, weights)


def rebuild_from_exported(model_dir: str | Path) -> tuple[nn.Module, dict]:
    """(model, checkpoint-like dict) rebuilt from an exported folder alone: the network its card's config
    builds, the weights of its TorchScript file, the training record of its card.

    Why: to store a shipped model's weights another way (`--from-exported DIR --weights float16`) when its
    training checkpoint is gone. Only files stored in float32 can be read back this way."""
    from .config import TrainConfig
    from .data import dataset_info
    from .models import build_model
    from .models.prior import MixturePrior

    model_dir = Path(model_dir)
    card_path = model_dir / CARD
    if not card_path.is_file():
        raise UsageError(f"{model_dir} has no {CARD}: pass an exported model folder (e.g. exported/mnist/mlp_gan)")
    card = json.loads(card_path.read_text())
    if "mixture" in card:
        raise UsageError(f"{model_dir} is a mixture: export its members, then compose it again (python -m training.mixture)")
    if card.get("weights", {}).get("storage", "float32") != "float32":
        raise UsageError(f"{model_dir} stores its weights as {card['weights']['storage']}; only float32 files can be rebuilt")
    ts_path = model_dir / card["files"]["torchscript"]
    if sha256_of(ts_path) != card["sha256"]["torchscript"]:
        raise UsageError(f"{ts_path} does not match the sha256 on its card")
    training = card["training"]
    cfg = TrainConfig.from_dict(training["config"])
    info = dataclasses.asdict(dataset_info(card["dataset"]))
    if list(info["classes"]) != card["classes"]:
        raise UsageError(f"{model_dir}: the card's classes differ from dataset {card['dataset']!r}'s")
    generator, _ = build_model(cfg.model, tuple(card["image_shape"]), len(card["classes"]), cfg.latent_dim, cfg.width,
                               class_norm=cfg.class_norm, embed_dim=cfg.embed_dim)
    for name in getattr(generator, "encoder_modules", ()):  # a VAE's files hold its decoder only
        setattr(generator, name, None)
    weights = {k.removeprefix("model."): v for k, v in load_torchscript(ts_path).state_dict().items()}
    prior = {k.removeprefix("prior."): v for k, v in weights.items() if k.startswith("prior.")}
    if prior:
        generator.prior = MixturePrior.from_state(prior)
    generator.load_state_dict(weights)
    state = {
        "config": training["config"], "dataset_info": info, "epoch": training["epochs"], "step": training["steps"],
        "wall_time_s": training["wall_time_s"], "hardware": training["hardware"], "precision": training["precision"],
        "torch_version": training["torch_version"], "version": training["code_version"], "train_data": training["data"],
        "resumes": training.get("resumes", []),
        **({"latent_prior": {"report": card["latent_prior"]}} if "latent_prior" in card else {}),
    }
    return generator.eval(), state


@contextlib.contextmanager
def staged(out: Path, names):
    """A folder beside `out` to write and check the files `names` in. They replace out's files when the block
    ends without an error and vanish when it raises, so an export that fails its checks leaves a model already
    in `out` as it was."""
    staging = out.with_name(f".{out.name}.export-{os.getpid()}")
    new_parent = not out.parent.exists()
    staging.mkdir(parents=True, exist_ok=True)
    try:
        yield staging
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            (staging / name).replace(out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if new_parent and not any(out.parent.iterdir()):
            out.parent.rmdir()  # a failed first export of a dataset leaves no empty folder either


def export_model(model: nn.Module, state: dict, out_root: str | Path = "exported", weights: str = "float32") -> Path:
    """Export a generator or VAE with its checkpoint record (`load_checkpoint`, `rebuild_from_exported`) to
    out_root/<dataset>/<model>/ and refresh the manifest; returns that folder."""
    if weights not in WEIGHT_DTYPES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_DTYPES)}, not {weights!r}")
    cfg, info = state["config"], state["dataset_info"]
    family = MODEL_FAMILIES[cfg["model"]]
    out = Path(out_root) / info["id"] / cfg["model"]

    module = inference_module(model)
    inputs = example_inputs(model, 4)
    storage = {"storage": weights, "compute": "float32"}
    if weights == "float16":
        probe = example_inputs(model, 64, seed=13)
        with torch.inference_mode():
            before = module(*probe)
        storage["max_abs_weight_change"] = store_weights_in_float16(module)
        with torch.inference_mode():
            storage["max_abs_output_change"] = float((module(*probe) - before).abs().max())  # 64 samples, [0, 1] scale
    files = {"onnx": ONNX_FILE, "torchscript": TORCHSCRIPT_FILE, "samples": SAMPLES_FILE}
    with staged(out, files.values()) as staging:
        export_onnx(module, inputs, staging / ONNX_FILE)
        export_torchscript(module, inputs, staging / TORCHSCRIPT_FILE)
        parity = check_parity(module, staging / ONNX_FILE, staging / TORCHSCRIPT_FILE, model)
        save_sample_grid(module.model, staging / SAMPLES_FILE, seed=0)

    card = {
        "format": "synthgen-card/1",
        "dataset": info["id"],
        "model": cfg["model"],
        "description": family.description,
        "classes": list(info["classes"]),
        "num_classes": len(info["classes"]),
        "conditional": family.conditional,
        "image_shape": [info["channels"], info["size"], info["size"]],
        "latent_dim": noise_dim(model),  # the width of z the graph takes
        "contract": {
            "inputs": {"z": "float32 [N, latent_dim], standard normal",
                       **({"labels": "int64 [N], class ids 0..num_classes-1"} if family.conditional else {})},
            "output": {"images": "float32 [N, C, H, W] in [0, 1]"},
        },
        **({"latent_prior": state["latent_prior"]["report"]} if "latent_prior" in state else {}),
        "samples_grid": "one row per class, fixed seed 0" if family.conditional else "8x8 grid, fixed seed 0",
        "files": files,
        "sha256": {kind: sha256_of(out / name) for kind, name in files.items()},
        "parameters": sum(p.numel() for p in module.parameters()),  # of the exported graph
        "weights": storage,
        "parity_max_abs_error": parity,
        "training": {
            "config": cfg,  # as of the last epoch; `resumes` lists the epochs from which a setting changed
            "resumes": state.get("resumes", []),
            "epochs": state["epoch"],
            "steps": state["step"],
            "wall_time_s": round(state["wall_time_s"], 1),
            "hardware": state["hardware"],
            # Checkpoints older than the field: the trainer then used bf16 on CUDA with amp, fp32 on every CPU.
            "precision": state.get("precision", "bf16" if cfg.get("amp") and not state["hardware"].startswith("CPU")
                                   else "fp32"),
            "torch_version": state["torch_version"],
            "code_version": state["version"],
            # Checkpoints older than `train_data` (the shipped models') were trained on the real files here.
            "data": state.get("train_data", f"{info['id']} train split, real files"),
        },
    }
    write_card(out, out_root, card)
    return out


def write_card(model_dir: Path, out_root: str | Path, card: dict) -> None:
    """Write model_dir's card.json, ending with what every export records (the metrics, when, by which code), and
    refresh the manifest of out_root.

    Metrics come from `python -m training.evaluate`, measured on generator.onnx: a re-export that writes the same
    ONNX bytes (export is deterministic) keeps the old card's, any other model starts without."""
    card_path = model_dir / CARD
    old = json.loads(card_path.read_text()) if card_path.exists() else {}
    same_onnx = old.get("sha256", {}).get("onnx") == sha256_of(model_dir / ONNX_FILE)
    card = {**card, "metrics": old.get("metrics", {}) if same_onnx else {},
            "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "export_code_version": code_version()}
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    write_manifest(out_root)


def refuse_to_replace(parser: argparse.ArgumentParser, target: Path, overwrite: bool, instead: str) -> None:
    """Stop the command (parser.error) when `target` holds an exported model and --overwrite was not given: its
    card may hold hours of evaluation. `instead` says what else to give, e.g. "give another --out"."""
    if overwrite or not (target / CARD).exists():
        return
    metrics = json.loads((target / CARD).read_text()).get("metrics") or {}
    evaluated = (metrics.get("protocol") or {}).get("evaluated_at")
    parser.error(f"{target} holds an exported model{f' (evaluated {evaluated})' if evaluated else ''}; "
                 f"--overwrite replaces it, or {instead}")


def export_target(source: str | Path, out_root: str | Path, from_exported: bool) -> Path | None:
    """Where exporting `source` (a run folder, or an exported folder with from_exported) writes: out_root/<dataset>/
    <model>, from its config.json or card.json; None when neither says (the export then names the problem)."""
    try:
        record = json.loads((Path(source) / (CARD if from_exported else "config.json")).read_text())
        return Path(out_root) / record["dataset"] / record["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="training run directories (holding checkpoint.pt); with "
                                                    "--from-exported, exported model folders")
    parser.add_argument("--out", default="exported", help="export root (default: exported)")
    parser.add_argument("--weights", default="float32", choices=WEIGHT_DTYPES,
                        help="parameter storage in the files (default: float32; float16 halves them, compute stays float32)")
    parser.add_argument("--from-exported", action="store_true",
                        help="the folders are exported models, not runs: rebuild each from its card and TorchScript "
                             "file (to store its weights another way when the checkpoint is gone)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a model already exported to <out>/<dataset>/<model> (refused without it)")
    args = parser.parse_args()
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out: {args.out} is a file, not a folder")
    targets: dict[Path, str] = {}
    for run_dir in args.run_dirs:
        target = export_target(run_dir, args.out, args.from_exported)
        if target is not None:
            if target in targets:  # the second would replace the first, --overwrite or not
                parser.error(f"{targets[target]} and {run_dir} would both export to {target}; export them to "
                             "different --out folders")
            targets[target] = run_dir
            refuse_to_replace(parser, target, args.overwrite, "give another --out")
    for run_dir in args.run_dirs:
        if args.from_exported:
            out = export_model(*rebuild_from_exported(run_dir), args.out, args.weights)
        else:
            out = export_run(run_dir, args.out, args.weights)
        card = json.loads((out / CARD).read_text())
        print(f"{out}: parity {card['parity_max_abs_error']}, {card['parameters']} parameters")


if __name__ == "__main__":
    with user_errors_exit():
        main()
