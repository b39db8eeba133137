import numpy as np
import pytest
import torch

from pipeline.metrics.probe import ProbeConfig, linear_probe, probe_layers

FAST = ProbeConfig(weight_decays=(1e-3, 1e-1), max_iter=50, seed=0)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: intra-op threads only add synchronisation cost on a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _blobs(n: int, d: int, classes: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around well-separated class means, with a large common offset and scale (so the
    probe's standardisation matters)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, d, generator=torch.Generator().manual_seed(123)) * 3.0
    y = torch.arange(n) % classes
    x = means[y] + spread * torch.randn(n, d, generator=g)
    return x * 50.0 + 1000.0, y


def test_separable_features_reach_full_accuracy():
    tx, ty = _blobs(300, 16, 5, 0.3, seed=1)
    vx, vy = _blobs(200, 16, 5, 0.3, seed=2)
    r = linear_probe(tx, ty, vx, vy, FAST)
    assert r.val_top1 >= 0.99
    assert r.train_top1 >= 0.99
    assert r.weight_decay in FAST.weight_decays
    assert set(r.sweep) == set(FAST.weight_decays)


def test_random_labels_give_chance_accuracy():
    g = torch.Generator().manual_seed(0)
    tx, vx = torch.randn(600, 32, generator=g), torch.randn(1000, 32, generator=g)
    ty, vy = torch.randint(0, 10, (600,), generator=g), torch.randint(0, 10, (1000,), generator=g)
    r = linear_probe(tx, ty, vx, vy, FAST)
    # chance is 0.1; with 1000 val rows the std of the estimate is ~0.01
    assert 0.05 < r.val_top1 < 0.16
    # ... while the probe still fits its own train labels better than chance (it is not broken)
    assert r.train_top1 > 0.2


def test_deterministic_and_seed_changes_split():
    tx, ty = _blobs(200, 8, 4, 2.0, seed=3)
    vx, vy = _blobs(100, 8, 4, 2.0, seed=4)
    a = linear_probe(tx, ty, vx, vy, FAST)
    b = linear_probe(tx, ty, vx, vy, FAST)
    assert a == b
    c = linear_probe(tx, ty, vx, vy, ProbeConfig(weight_decays=FAST.weight_decays, max_iter=50, seed=7))
    assert c.sweep != a.sweep  # a different held-out slice


def test_numpy_inputs_match_torch_inputs():
    tx, ty = _blobs(120, 8, 3, 1.0, seed=5)
    vx, vy = _blobs(60, 8, 3, 1.0, seed=6)
    assert linear_probe(tx, ty, vx, vy, FAST) == linear_probe(
        tx.numpy(), ty.numpy(), vx.numpy(), vy.numpy(), FAST
    )


def test_probe_layers_picks_the_informative_layer():
    tx, ty = _blobs(200, 8, 4, 0.3, seed=8)
    vx, vy = _blobs(100, 8, 4, 0.3, seed=9)
    g = torch.Generator().manual_seed(1)
    noise_layer = (torch.randn(200, 8, generator=g), torch.randn(100, 8, generator=g))
    results, best = probe_layers([noise_layer, (tx, vx), noise_layer], ty, vy, FAST, progress=False)
    assert len(results) == 3
    assert best == 1
    assert results[1].val_top1 > 0.95 > results[0].val_top1


def test_clear_errors():
    x, y = torch.randn(50, 4), torch.arange(50) % 2
    with pytest.raises(ValueError, match=r"val features have D=3"):
        linear_probe(x, y, torch.randn(10, 3), torch.arange(10) % 2, FAST)
    with pytest.raises(ValueError, match=r"train labels: expected integer labels \[50\]"):
        linear_probe(x, y.float(), x, y, FAST)
    with pytest.raises(ValueError, match=r"train features: expected float features"):
        linear_probe(np.zeros((50, 4, 2), dtype=np.float32), y, x, y, FAST)
    with pytest.raises(ValueError, match="NaN or Inf"):
        linear_probe(torch.full((50, 4), float("nan")), y, x, y, FAST)
    with pytest.raises(ValueError, match="features_per_layer is empty"):
        probe_layers([], y, y)


def test_disk_features_in_small_chunks_equal_the_in_ram_probe(tmp_path):
    from pipeline.metrics.probe import FeatureFile

    tx, ty = _blobs(250, 12, 5, 1.5, seed=10)
    vx, vy = _blobs(120, 12, 5, 1.5, seed=11)
    in_ram = linear_probe(tx, ty, vx, vy, FAST)
    train, val = FeatureFile(tmp_path / "train.f32", 12), FeatureFile(tmp_path / "val.f32", 12)
    for i in range(0, 250, 40):  # written in batches, as the probe stage writes them
        train.append(tx[i : i + 40])
    val.append(vx)
    assert len(train) == 250 and (tmp_path / "train.f32").stat().st_size == 250 * 12 * 4
    chunked = ProbeConfig(weight_decays=FAST.weight_decays, max_iter=50, seed=0, chunk_rows=33)
    streamed = linear_probe(train, ty, val, vy, chunked)
    # the same full-batch L-BFGS; only the summation order of the loss and gradient differs
    assert streamed.weight_decay == in_ram.weight_decay
    assert streamed.val_top1 == pytest.approx(in_ram.val_top1, abs=1 / 120)
    assert streamed.holdout_top1 == pytest.approx(in_ram.holdout_top1, abs=1 / 50)
    with pytest.raises(ValueError, match=r"expected rows \[B, 12\]"):
        train.append(torch.zeros(3, 5))
