"""Promises of the importance-resampling probe (training/importance_resampling.py): it keeps the same number of
images of each class, never one candidate twice, follows the density ratio as alpha grows, and runs end to end
on an exported conditional model (refusing an unconditional one by name)."""

import json

import pytest
import torch

from training import importance_resampling as ir
from training.cli import UsageError


def test_the_log_ratio_is_the_requested_class_real_logit_minus_its_generated_logit():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, 3.0, 1.0, 4.0]])  # K = 2: real 0, real 1, generated 0, generated 1
    assert ir.log_density_ratio(logits, torch.tensor([0, 1]), 2).tolist() == [0.5, -1.0]


def test_resampling_keeps_each_class_count_and_no_candidate_twice():
    labels = torch.arange(3).repeat(40)
    log_ratio = torch.randn(len(labels), generator=torch.Generator().manual_seed(0))
    chosen = ir.resample_per_class(log_ratio, labels, per_class=10, alpha=1.0)
    assert len(torch.unique(chosen)) == len(chosen) == 30
    assert torch.bincount(labels[chosen]).tolist() == [10, 10, 10]


def test_a_strong_alpha_keeps_the_candidates_the_ratio_favours_and_alpha_0_ignores_it():
    labels = torch.arange(2).repeat(50)
    log_ratio = torch.linspace(-5, 5, len(labels))
    strong = ir.resample_per_class(log_ratio, labels, per_class=5, alpha=100.0)
    for c in (0, 1):
        members = (labels == c).nonzero().squeeze(1)
        assert set(strong[labels[strong] == c].tolist()) == set(members[log_ratio[members].topk(5).indices].tolist())
    assert torch.equal(ir.resample_per_class(log_ratio, labels, 5, 0.0), ir.resample_per_class(-log_ratio, labels, 5, 0.0))


def test_too_few_candidates_of_a_class_is_refused():
    with pytest.raises(ValueError, match="class 1: 2 candidates for 3 draws"):
        ir.resample_per_class(torch.zeros(5), torch.tensor([0, 0, 0, 1, 1]), per_class=3, alpha=1.0)


@pytest.mark.filterwarnings("ignore:.*official file", "ignore::FutureWarning")
def test_the_probe_measures_the_plain_pool_and_one_pool_per_alpha(exported_dir, data_dir, tmp_path, capsys):
    rows = ir.main([str(exported_dir / "mnist/cdcgan"), "--quick", "--data-dir", str(data_dir), "--candidates", "2",
                    "--alphas", "0,1", "--classifier-dir", str(tmp_path)])
    assert [r["pool"] for r in rows] == ["as generated", "resampled, alpha 0", "resampled, alpha 1"]
    for row in rows:
        assert 0 <= row["cas_mean"] <= 1 and 0 <= row["label_fidelity"] <= 1 and row["fid"] >= 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "ratio_classifier" in printed[0] and printed[1:] == rows


def test_an_unconditional_model_is_refused_by_name(exported_dir, data_dir, tmp_path):
    with pytest.raises(UsageError, match="mnist/mlp_vae is unconditional"):
        ir.main([str(exported_dir / "mnist/mlp_vae"), "--quick", "--data-dir", str(data_dir),
                 "--classifier-dir", str(tmp_path)])
