import numpy as np
import pytest
import torch

from pipeline.assign import AssignError, assign


def brute_force(x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 argmin over all pairs of the fp32 inputs; np.argmin takes the first (lowest) index on ties."""
    d = ((x.astype(np.float64)[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1)
    return d.argmin(1), d.min(1)


def naive_fp32(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    xt, ct = torch.from_numpy(x), torch.from_numpy(c)
    d = (xt * xt).sum(1, keepdim=True) - 2 * xt @ ct.T + (ct * ct).sum(1)[None]
    return d.argmin(1).numpy()


def hard_set(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features full of near-ties and exact ties, far from the origin (so ||x||² − 2x·c + ||c||² cancels)."""
    rng = np.random.default_rng(seed)
    k, d, offset = 32, 16, 300.0
    c = (rng.standard_normal((k, d)) + offset).astype(np.float32)
    c[5] = c[20]  # exact duplicate: points nearest to centroid 20 must get id 5
    c[31] = c[3]  # and those nearest to 3 keep 3
    a, b = rng.integers(0, k, 400), rng.integers(0, k, 400)
    eps = rng.uniform(-1e-5, 1e-5, (400, 1))  # near the bisector of (a, b): margins far below fp32 error
    near_tie = (c[a] + c[b]) / 2 + eps * (c[a] - c[b])
    near_centroid = c[rng.integers(0, k, 200)] + 0.1 * rng.standard_normal((200, d))
    x = np.concatenate([near_tie, near_centroid]).astype(np.float32)
    return x, c


def test_matches_float64_brute_force_on_near_and_exact_ties():
    x, c = hard_set()
    want, want_d = brute_force(x, c)
    # The data set is hard: the plain fp32 expansion gets many rows wrong.
    assert (naive_fp32(x, c) != want).sum() > 20
    got, dist = assign(x, c, batch=37, return_distances=True)
    np.testing.assert_array_equal(got, want)
    assert not np.isin(got, [20, 31]).any()  # duplicates resolved to the lowest index
    np.testing.assert_allclose(dist, want_d, rtol=1e-4, atol=1e-3)


def test_exact_midpoints_go_to_the_lowest_index():
    c = np.array([[2.0, 0.0], [0.0, 0.0], [0.0, 2.0], [4.0, 4.0]], dtype=np.float32)
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 2.0]], dtype=np.float32)
    # [1,1] is at distance 2 from 0,1,2 → 0; [2,2] is at distance 8 from 0,2 and 3 → 0.
    np.testing.assert_array_equal(assign(x, c), [0, 1, 0, 0])


def test_random_features_shapes_batches_and_types():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(50, 24, generator=g)
    x = torch.randn(2, 3, 40, 24, generator=g)
    want, _ = brute_force(x.reshape(-1, 24).numpy(), c.numpy())
    for batch in (1, 7, 10_000):
        got = assign(x, c, batch=batch)
        assert torch.is_tensor(got) and got.dtype == torch.int64 and got.shape == (2, 3, 40)
        np.testing.assert_array_equal(got.reshape(-1).numpy(), want)
    from_numpy = assign(x.numpy().astype(np.float16), c.numpy())
    assert isinstance(from_numpy, np.ndarray) and from_numpy.shape == (2, 3, 40)
    want16, _ = brute_force(x.numpy().astype(np.float16).astype(np.float32).reshape(-1, 24), c.numpy())
    np.testing.assert_array_equal(from_numpy.reshape(-1), want16)


def test_single_centroid():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    ids, dist = assign(x, x[:1], return_distances=True)
    np.testing.assert_array_equal(ids, [0, 0, 0, 0])
    np.testing.assert_allclose(dist, ((x - x[0]) ** 2).sum(1))


def test_distances_are_exact_squared_l2():
    rng = np.random.default_rng(1)
    c = rng.standard_normal((10, 8)).astype(np.float32)
    x = rng.standard_normal((30, 8)).astype(np.float32)
    ids, dist = assign(x, c, return_distances=True)
    np.testing.assert_allclose(dist, ((x - c[ids]) ** 2).sum(1), rtol=1e-6)


def test_errors_are_clear():
    c = np.zeros((4, 8), dtype=np.float32)
    with pytest.raises(AssignError, match=r"expected \[\.\.\., 8\] to match centroids \[K=4, D=8\]"):
        assign(np.zeros((3, 7), dtype=np.float32), c)
    with pytest.raises(AssignError, match="NaN or inf"):
        assign(np.full((3, 8), np.nan, dtype=np.float32), c)
    with pytest.raises(AssignError, match="non-empty"):
        assign(np.zeros((3, 8), dtype=np.float32), np.zeros((0, 8), dtype=np.float32))


def test_exact_even_when_the_caller_allows_reduced_precision_matmuls():
    x, c = hard_set(seed=3)
    want, _ = brute_force(x, c)
    torch.set_float32_matmul_precision("medium")  # TF32 on CUDA, bf16 on oneDNN CPUs
    try:
        np.testing.assert_array_equal(assign(x, c), want)
        assert torch.get_float32_matmul_precision() == "medium"  # the caller's setting is restored
    finally:
        torch.set_float32_matmul_precision("highest")
