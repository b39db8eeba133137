"""Blockwise precision/recall equals torch-fidelity's on the same features, for any block size."""

import pytest
import torch
from torch_fidelity.metric_prc import prc_features_to_metric

from pipeline.metrics.prc import kth_neighbour_radii, precision_recall


def _features(n: int, shift: float, seed: int) -> torch.Tensor:
    centres = torch.randn(5, 16, generator=torch.Generator().manual_seed(0)) * 3  # both sets' modes
    g = torch.Generator().manual_seed(seed)
    return centres[torch.randint(0, 5, (n,), generator=g)] + torch.randn(n, 16, generator=g) + shift


@pytest.mark.parametrize("block", [7, 64, 4096])
def test_equals_torch_fidelity(block):
    fake, real = _features(300, 0.4, 0), _features(250, 0.0, 1)
    ours = precision_recall(fake, real, neighborhood=3, block=block)
    theirs = prc_features_to_metric(
        fake, real, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=True, verbose=False
    )
    assert ours == {k: float(theirs[k]) for k in ("precision", "recall", "f_score")}
    assert 0.0 < ours["precision"] < 1.0 and 0.0 < ours["recall"] < 1.0  # not a degenerate case


def test_radii_are_the_kth_nearest_other_point():
    x = _features(100, 0.0, 2)
    brute = torch.cdist(x, x).kthvalue(4, dim=1).values  # self (0) is the 1st
    assert torch.allclose(kth_neighbour_radii(x, 3, block=9), brute, atol=1e-5)
    # on a line at 0, 1, 3, 6: the 1st other neighbour is at distance 1, 1, 2, 3
    line = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    assert kth_neighbour_radii(line, 1, block=3).tolist() == [1.0, 1.0, 2.0, 3.0]


def test_a_set_against_itself_and_clear_errors():
    x = _features(50, 0.0, 3)
    assert precision_recall(x, x, block=16) == {"precision": 1.0, "recall": 1.0, "f_score": 1.0}
    with pytest.raises(ValueError, match="k=3 must be in"):
        kth_neighbour_radii(x[:3], 3)
    with pytest.raises(ValueError, match=r"expected features \[N, D\] and \[M, D\]"):
        precision_recall(x, x[:, :8])
