import math

import numpy as np
import pytest
import zarr

from pipeline.assign import assign
from pipeline.kmeans import (
    KMeansError,
    cluster_usage,
    faiss_gpu_count,
    fit_kmeans,
    sample_patches,
    sample_rows,
)


def blobs(n_per: int = 250, centers: int = 4, dim: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mu = 10.0 * rng.standard_normal((centers, dim))
    x = mu[:, None, :] + rng.standard_normal((centers, n_per, dim))
    return x.reshape(-1, dim).astype(np.float32)


def brute_inertia(x: np.ndarray, c: np.ndarray) -> float:
    d = ((x.astype(np.float64)[:, None] - c.astype(np.float64)[None]) ** 2).sum(-1)
    return float(d.min(1).sum())


def test_fit_kmeans_result_is_consistent_and_good():
    x = blobs()
    res = fit_kmeans(x, k=16, niter=20, seed=1)
    assert res.centroids.shape == (16, 8) and res.centroids.dtype == np.float32
    assert res.device == ("gpu" if faiss_gpu_count() else "cpu") and res.seconds > 0
    assert len(res.objective) == 20
    assert all(b <= a * (1 + 1e-6) for a, b in zip(res.objective, res.objective[1:], strict=False))
    # Our inertia: exact, on every row, with the final centroids (faiss' last objective predates the
    # last update, so it can only be larger).
    assert res.inertia == pytest.approx(brute_inertia(x, res.centroids), rel=1e-6)
    assert res.inertia <= res.objective[-1] * (1 + 1e-6)
    # 4 well-separated unit-variance blobs: every point ends near its own centre (inertia ≲ N·D).
    assert res.inertia < 1.0 * x.shape[0] * x.shape[1]
    assert brute_inertia(x, x.mean(0, keepdims=True)) > 20 * res.inertia
    summary = res.summary()
    assert summary["k"] == 16 and summary["n_points"] == 1000 and summary["n_train"] == 1000


def test_fit_kmeans_is_reproducible_from_its_seed():
    x = blobs(seed=2)
    a = fit_kmeans(x, k=8, niter=5, seed=3)
    b = fit_kmeans(x, k=8, niter=5, seed=3)
    c = fit_kmeans(x, k=8, niter=5, seed=4)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert not np.array_equal(a.centroids, c.centroids)


def test_fit_kmeans_from_given_init_does_lloyd_steps():
    x = blobs(seed=5)
    init = x[[0, 300, 600, 900, 1, 301]].copy()
    res = fit_kmeans(x, k=6, niter=1, seed=0, init=init)
    labels = assign(x, init)
    want = np.stack([x[labels == j].mean(0) for j in range(6)])  # one Lloyd update from `init`
    np.testing.assert_allclose(res.centroids, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(KMeansError, match=r"init: expected starting centroids of shape \(6, 8\)"):
        fit_kmeans(x, k=6, init=init[:5])


def test_fit_kmeans_subsamples_to_max_points_per_centroid():
    x = blobs(n_per=500)
    res = fit_kmeans(x, k=4, niter=5, seed=0, max_points_per_centroid=50)
    assert res.n_train == 200 and res.n_points == 2000
    # The inertia is still measured on all 2000 rows.
    assert res.inertia == pytest.approx(brute_inertia(x, res.centroids), rel=1e-6)


def test_fit_kmeans_errors():
    x = blobs(n_per=2)
    with pytest.raises(KMeansError, match=r"k=9 needs at least 9 points, got N=8"):
        fit_kmeans(x, k=9)
    with pytest.raises(KMeansError, match=r"expected a 2-D array \[N, D\]"):
        fit_kmeans(x[None], k=2)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(KMeansError, match="NaN or inf"):
        fit_kmeans(bad, k=2)
    if faiss_gpu_count() == 0:
        with pytest.raises(KMeansError, match="faiss-gpu"):
            fit_kmeans(x, k=2, gpu=True)


def test_sample_rows_is_reproducible_sorted_and_distinct():
    a = sample_rows(1000, 100, seed=7)
    assert a.dtype == np.int64 and a.shape == (100,)
    assert np.all(np.diff(a) > 0) and a[0] >= 0 and a[-1] < 1000
    np.testing.assert_array_equal(a, sample_rows(1000, 100, seed=7))
    assert not np.array_equal(a, sample_rows(1000, 100, seed=8))
    np.testing.assert_array_equal(sample_rows(10, 50, seed=0), np.arange(10))
    with pytest.raises(KMeansError, match="n_sample must be >= 1"):
        sample_rows(10, 0, seed=0)


class ReadRecorder:
    """Array wrapper that records every read, to check sample_patches reads block by block."""

    def __init__(self, array):
        self.array, self.shape, self.reads = array, array.shape, []
        self.chunks = getattr(array, "chunks", None)

    def __getitem__(self, key):
        self.reads.append(key)
        return self.array[key]


def test_sample_patches_reads_chunk_by_chunk_and_matches_direct_indexing(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((10, 6, 5)).astype(np.float16)
    z = zarr.create_array(store=str(tmp_path / "f.zarr"), shape=data.shape, chunks=(3, 6, 5), dtype="float16")
    z[:] = data

    rows = sample_rows(60, 25, seed=11)
    want = data.reshape(60, 5)[rows].astype(np.float32)
    rec = ReadRecorder(z)
    got = sample_patches(rec, 25, seed=11)  # default block = the Zarr chunk length (3 images)
    assert got.dtype == np.float32 and got.shape == (25, 5)
    np.testing.assert_array_equal(got, want)
    assert all(k.stop - k.start <= 3 for k in rec.reads) and len(rec.reads) >= 4
    for chunk in (1, 4, 100):
        np.testing.assert_array_equal(sample_patches(data, 25, seed=11, chunk_images=chunk), want)


def test_sample_patches_skips_blocks_without_samples():
    data = np.zeros((100, 4, 2), dtype=np.float16)
    rec = ReadRecorder(data)
    sample_patches(rec, 3, seed=0, chunk_images=10)
    assert 1 <= len(rec.reads) <= 3


def test_cluster_usage():
    counts, entropy, dead = cluster_usage(np.array([[0, 1], [2, 3]]), k=4)
    np.testing.assert_array_equal(counts, [1, 1, 1, 1])
    assert entropy == pytest.approx(2.0) and dead == 0
    counts, entropy, dead = cluster_usage(np.array([0, 0, 0, 2]), k=5)
    np.testing.assert_array_equal(counts, [3, 0, 1, 0, 0])
    assert entropy == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))) and dead == 3
    with pytest.raises(KMeansError, match=r"ids must lie in \[0, 4\)"):
        cluster_usage(np.array([0, 4]), k=4)
