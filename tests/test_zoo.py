"""The zoo list is the record of how every shipped model was trained: each entry must be a valid run."""

import json
from pathlib import Path

from training.data import dataset_info
from training.export import WEIGHT_DTYPES
from training.zoo import MIXTURES, SHIPPED, TRAINABLE_NOT_SHIPPED, command, mixture_command

REPO = Path(__file__).resolve().parents[1]


def test_every_zoo_entry_is_a_valid_config_and_its_command_trains_exactly_that():
    from training.train import parse_args

    for run in SHIPPED + TRAINABLE_NOT_SHIPPED:
        configs = run.configs(Path("runs"), None)
        assert dataset_info(configs[0].dataset).id == run.dataset
        prefix = "python -m training.train "
        stages = command(run).split(" && ")
        assert len(stages) == len(configs) == 1 + len(run.then), run.key
        for stage, (line, cfg) in enumerate(zip(stages, configs)):
            assert line.startswith(f"{prefix}--dataset {run.dataset} --model {run.model}")
            parsed, resume = parse_args(line[len(prefix):].split())
            assert parsed == cfg and resume == (stage > 0), run.key


def test_every_shipped_file_stores_its_weights_the_way_its_zoo_entry_exports_them():
    for run in SHIPPED:
        card = json.loads((REPO / "exported" / run.dataset / run.model / "card.json").read_text())
        assert run.weights in WEIGHT_DTYPES, run.key
        assert card.get("weights", {"storage": "float32"})["storage"] == run.weights, run.key


def test_a_zoo_run_trains_each_stage_and_its_checkpoint_records_what_the_later_one_changed(data_dir, tmp_path):
    import torch

    from training.zoo import ZooRun, train_run

    run = ZooRun("mnist", "dcgan", dict(epochs=1, width=8, batch_size=16),  # 64 images: 4 steps an epoch
                 then=(dict(epochs=2, lr=2e-5),))
    train_run(run, tmp_path, str(data_dir))
    checkpoint = tmp_path / "mnist" / "dcgan" / "checkpoint.pt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert (state["epoch"], state["step"]) == (2, 8)
    assert state["resumes"] == [{"from_epoch": 2, "changed": {"lr": [2e-4, 2e-5]}}]
    assert state["config"] == vars(run.config(tmp_path, str(data_dir)))

    modified = checkpoint.stat().st_mtime_ns
    train_run(run, tmp_path, str(data_dir))  # finished: a second call trains nothing
    assert checkpoint.stat().st_mtime_ns == modified


def test_nothing_trained_on_missing_real_files_is_shipped():
    shipped = {run.dataset for run in SHIPPED}
    assert shipped <= {"mnist", "fashion_mnist", "pneumoniamnist", "retinamnist", "breastmnist", "breastmnist_64"}


def test_every_shipped_card_records_a_training_split_of_the_official_size():
    """A model trained on a small or made-up file of the right layout would record its own image count."""
    import json

    import medmnist

    official_train = {"mnist": 60_000, "fashion_mnist": 60_000}
    for card_path in sorted((REPO / "exported").glob("*/*/card.json")):
        card = json.loads(card_path.read_text())
        data = card["training"].get("data") if isinstance(card["training"], dict) else None
        if not isinstance(data, dict):  # older cards say "train split, real files"; a mixture lists its members
            continue
        info = dataset_info(card["dataset"])
        expected = official_train.get(info.base) or medmnist.INFO[info.base]["n_samples"]["train"]
        assert (data["split"], data["images"], sum(data["class_counts"])) == ("train", expected, expected), card_path


def test_model_table_has_a_row_per_exported_card(exported_dir):
    from training.zoo import model_table

    table = model_table(exported_dir).splitlines()
    assert len(table) == 2 + len(list(exported_dir.glob("*/*/card.json")))
    assert any(row.startswith("| mnist / cdcgan | 1 |") and "not evaluated" in row for row in table)


def test_the_shipped_list_is_what_exported_holds():
    exported = REPO / "exported"
    assert {p.parent.relative_to(exported).as_posix() for p in exported.glob("*/*/card.json")} == (
        {r.key for r in SHIPPED} | {m.key for m in MIXTURES})


def test_each_shipped_mixture_is_its_zoo_entry_built_from_the_shipped_member_files():
    """A member re-exported after the mixture was composed changes its sha256: compose the mixture again
    (`python -m training.zoo export --only DATASET/mixture`, or the command `python -m training.zoo list` prints)."""
    for mixture in MIXTURES:
        card = json.loads((REPO / "exported" / mixture.key / "card.json").read_text())
        members = {m["model"]: m for m in card["mixture"]["members"]}
        assert {model: (share, scale) for model, share, scale in mixture.members} == {
            model: (m["share"], m["noise_scale"]) for model, m in members.items()}, mixture.key
        for model in members:
            member_card = json.loads((REPO / "exported" / mixture.dataset / model / "card.json").read_text())
            assert members[model]["onnx_sha256"] == member_card["sha256"]["onnx"], (mixture.key, model, mixture_command(mixture))
            assert members[model]["torchscript_sha256"] == member_card["sha256"]["torchscript"], (mixture.key, model)


def test_the_shipped_models_fit_the_80_mb_budget_of_exported():
    exported = REPO / "exported"
    total = sum(p.stat().st_size for p in exported.rglob("*") if p.is_file())
    assert total < 80e6, f"exported/ holds {total / 1e6:.2f} MB, over its 80 MB budget"


def test_the_readme_model_table_is_what_the_shipped_cards_say():
    from training.zoo import model_table

    table = model_table(REPO / "exported")
    assert table in (REPO / "README.md").read_text(), "README table is stale: paste `python -m training.zoo table`"


def test_the_readme_names_the_shipped_catalogs_best_model_for_training_of_each_dataset():
    from service.catalog import load_catalog

    catalog = load_catalog(REPO / "exported")
    best = {d: catalog.best_for_training(d) for d in catalog.datasets()}
    assert best == {"mnist": "cvae", "fashion_mnist": "mixture", "pneumoniamnist": "cvae", "retinamnist": "cdcgan",
                    "breastmnist": "cdcgan", "breastmnist_64": "cvae"}
    readme = " ".join((REPO / "README.md").read_text().split())
    assert ("on the shipped models `mnist` → `cvae`, `fashion_mnist` → `mixture`, `pneumoniamnist` → `cvae`, "
            "`retinamnist` and `breastmnist` → `cdcgan`, `breastmnist_64` → `cvae`") in readme


def test_each_shipped_card_was_trained_by_its_zoo_command():
    """Epochs and every setting that changes what is learned; a field a card lacks predates that option."""
    from training.train import NOT_TRAINING_FIELDS

    for run in SHIPPED:
        training = json.loads((REPO / "exported" / run.key / "card.json").read_text())["training"]
        zoo = vars(run.config(Path("runs"), None))
        assert training["epochs"] == zoo["epochs"], run.key
        for key, value in zoo.items():
            if key in NOT_TRAINING_FIELDS or key not in training["config"]:
                continue
            if key == "amp":  # bf16 only where the hardware has it: the card's precision says what ran
                assert value or training["precision"] == "fp32", run.key
                continue
            assert training["config"][key] == value, (run.key, key)


def test_the_benchmarks_build_the_served_mnist_models_at_their_shipped_sizes():
    """benchmarks/ trains its own throwaway zoo from these sizes: its generators must be as large as the shipped
    ones."""
    from benchmarks.zoo import SERVING_MODELS
    from training.config import TrainConfig
    from training.models import build_model

    for dataset, model, sizes in SERVING_MODELS:
        card_path = REPO / "exported" / dataset / model / "card.json"
        if not card_path.exists():  # bloodmnist_64: not shipped (no real files here)
            continue
        card = json.loads(card_path.read_text())
        cfg = TrainConfig(dataset=dataset, model=model, **sizes).resolve()
        generator, _ = build_model(model, tuple(card["image_shape"]), card["num_classes"], cfg.latent_dim, cfg.width,
                                   embed_dim=cfg.embed_dim)
        assert sum(p.numel() for p in generator.parameters()) == card["parameters"], (dataset, model, sizes)
        assert cfg.latent_dim == card["latent_dim"]


def test_the_training_benchmark_trains_the_zoo_discriminator_width():
    """The training benchmark times the networks the zoo trains: the MNIST cDCGAN's discriminator is wider
    than its generator."""
    import torch.nn as nn

    from benchmarks.training_bench import TRAINING_MODELS, _models

    entry = next(run for run in SHIPPED if run.key == "mnist/cdcgan")
    sizes = next(s for d, m, s in TRAINING_MODELS if (d, m) == ("mnist", "cdcgan"))
    _, _, discriminator, _ = _models("mnist", "cdcgan", sizes)
    first_conv = next(m for m in discriminator.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.out_channels == entry.overrides["disc_width"] != entry.overrides["width"]


def test_zoo_only_refuses_an_unknown_key_and_takes_the_trainable_ones(monkeypatch, capsys, tmp_path):
    import pytest

    from training import zoo

    monkeypatch.setattr("sys.argv", ["zoo", "export", "--runs", str(tmp_path), "--only", "bloodmnst/cdcgan"])
    with pytest.raises(SystemExit):
        zoo.main()
    assert "--only: no zoo run bloodmnst/cdcgan; known: " in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", ["zoo", "export", "--runs", str(tmp_path), "--only", "bloodmnist/cdcgan"])
    zoo.main()  # a trainable-not-shipped key is a run of the zoo: its (absent) run is reported, not ignored
    assert capsys.readouterr().out.strip() == "bloodmnist/cdcgan: not finished, skipped"
