"""The zoo list is the record of how every shipped model was trained: each entry must be a valid run."""

from pathlib import Path

from training.data import dataset_info
from training.zoo import PLANNED, SHIPPED, TRAINABLE_NOT_SHIPPED, command


def test_every_zoo_entry_is_a_valid_config_and_its_command_trains_exactly_that():
    from training.train import parse_args

    for run in SHIPPED + PLANNED + TRAINABLE_NOT_SHIPPED:
        cfg = run.config(Path("runs"), None)
        assert dataset_info(cfg.dataset).id == run.dataset
        prefix = "python -m training.train "
        assert command(run).startswith(f"{prefix}--dataset {run.dataset} --model {run.model}")
        parsed, resume = parse_args(command(run)[len(prefix):].split())
        assert parsed == cfg and not resume, run.key


def test_nothing_trained_on_missing_real_files_is_shipped():
    shipped = {run.dataset for run in SHIPPED}
    assert shipped <= {"mnist", "fashion_mnist", "pneumoniamnist", "retinamnist", "breastmnist", "breastmnist_64"}


def test_model_table_has_a_row_per_exported_card(exported_dir):
    from training.zoo import model_table

    table = model_table(exported_dir).splitlines()
    assert len(table) == 2 + len(list(exported_dir.glob("*/*/card.json")))
    assert any(row.startswith("| mnist / cdcgan | 1 |") and "not evaluated" in row for row in table)


def test_the_shipped_list_is_what_exported_holds():
    exported = Path(__file__).resolve().parents[1] / "exported"
    assert {p.parent.relative_to(exported).as_posix() for p in exported.glob("*/*/card.json")} == {r.key for r in SHIPPED}
