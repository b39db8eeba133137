"""The DiGIT codebook: faiss K-Means over SSL patch features, plus the patch sampling that feeds it.

As in the paper: plain L2 (no normalisation), 20 iterations, faiss' own subsampling to at most
`max_points_per_centroid` (default 256) training points per centroid, one run (nredo=1). faiss runs on
GPUs when the installed build has them (`faiss-gpu`), else on CPU threads.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
from tqdm import tqdm

from pipeline.assign import assign

log = logging.getLogger(__name__)

# faiss' CPU assignment step multiplies blocks of this many points by the centroids. With its default
# (4096) the step was 1.4-2x slower than with 16384 on this shared 2-core machine (benchmarks/kmeans.py):
# every block pays a hand-over between OpenBLAS' and faiss' OpenMP threads, which stalls when the cores
# are busy. Single-threaded, 16384 was ~15% slower. Cost: a 16384 x 1024 fp32 buffer (64 MiB).
BLAS_QUERY_BLOCK = 16384


class KMeansError(ValueError):
    pass


@dataclass
class KMeansResult:
    centroids: np.ndarray  # float32 [K, D]
    inertia: float  # sum of squared distances of the training sample to its nearest centroid
    seconds: float  # faiss training time only
    device: str  # "cpu" or "gpu"
    objective: list[float] = field(default_factory=list)  # faiss' objective at each iteration
    iteration_seconds: list[float] = field(default_factory=list)  # wall time of each iteration
    n_points: int = 0  # rows passed in
    n_train: int = 0  # rows faiss actually trained on (after its own subsampling)

    def summary(self) -> dict[str, Any]:
        """JSON-able figures for a metrics file (everything but the centroids)."""
        return {
            "k": int(self.centroids.shape[0]),
            "dim": int(self.centroids.shape[1]),
            "inertia": self.inertia,
            "mean_sq_distance": self.inertia / max(self.n_points, 1),
            "seconds": self.seconds,
            "device": self.device,
            "iterations": len(self.objective),
            "objective_first": self.objective[0] if self.objective else None,
            "objective_last": self.objective[-1] if self.objective else None,
            "n_points": self.n_points,
            "n_train": self.n_train,
        }


def faiss_gpu_count() -> int:
    """Number of GPUs faiss can use (0 for the faiss-cpu build)."""
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    return int(faiss.get_num_gpus())


@contextlib.contextmanager
def _faiss_blas_query_block(rows: int) -> Iterator[None]:
    saved = faiss.cvar.distance_compute_blas_query_bs
    faiss.cvar.distance_compute_blas_query_bs = rows
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_query_bs = saved


def fit_kmeans(
    x: np.ndarray,
    k: int,
    niter: int = 20,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    gpu: bool | Literal["auto"] = "auto",
    verbose: bool = False,
    init: np.ndarray | None = None,
) -> KMeansResult:
    """Train K centroids on `x` (float32 [N, D]; other float dtypes are converted).

    `gpu`: "auto" uses every GPU faiss sees, True requires one, False forces CPU.
    `init`: optional starting centroids [K, D] (default: K rows of the training sample chosen by `seed`).
    The returned inertia is computed here after training, exactly, on all N rows of `x`.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise KMeansError(f"features: expected a 2-D array [N, D], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise KMeansError(f"features: expected floating point values, got dtype {x.dtype}")
    n, d = x.shape
    if k < 1:
        raise KMeansError(f"k: expected at least 1 centroid, got {k}")
    if n < k:
        raise KMeansError(f"features: K-Means with k={k} needs at least {k} points, got N={n}")
    if niter < 1:
        raise KMeansError(f"niter: expected at least 1 iteration, got {niter}")
    if max_points_per_centroid < 1:
        raise KMeansError(f"max_points_per_centroid: expected >= 1, got {max_points_per_centroid}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise KMeansError("features: contain NaN or inf; K-Means needs finite values")

    if init is not None:
        init = np.ascontiguousarray(init, dtype=np.float32)
        if init.shape != (k, d):
            raise KMeansError(f"init: expected starting centroids of shape ({k}, {d}), got {init.shape}")

    n_gpus = faiss_gpu_count()
    if gpu is True and n_gpus == 0:
        raise KMeansError(
            "gpu=True but this faiss build sees no GPU (faiss-cpu installed, or no CUDA device); "
            "install the `gpu` extra (faiss-gpu) on a GPU machine or use gpu='auto'"
        )
    use_gpu = n_gpus > 0 and gpu is not False
    device = "gpu" if use_gpu else "cpu"
    if use_gpu:
        log.info("faiss K-Means: k=%d on %d GPU(s), N=%d, D=%d", k, n_gpus, n, d)
    else:
        log.info("faiss K-Means: k=%d on CPU (%d threads), N=%d, D=%d", k, faiss.omp_get_max_threads(), n, d)
    if n < 39 * k:
        log.warning("K-Means: only %d points for k=%d (faiss recommends >= %d)", n, k, 39 * k)

    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        seed=seed,
        max_points_per_centroid=max_points_per_centroid,
        nredo=1,
        spherical=False,
        verbose=verbose,
        gpu=n_gpus if use_gpu else False,
    )
    with _faiss_blas_query_block(BLAS_QUERY_BLOCK):
        t0 = time.perf_counter()
        km.train(x, init_centroids=init)
        seconds = time.perf_counter() - t0
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)

    _, dist = assign(x, centroids, return_distances=True)
    inertia = float(np.sum(dist, dtype=np.float64))
    elapsed = [float(st["time"]) for st in km.iteration_stats]  # faiss reports cumulative seconds
    return KMeansResult(
        centroids=centroids,
        inertia=inertia,
        seconds=seconds,
        device=device,
        objective=[float(v) for v in km.obj],
        iteration_seconds=[float(v) for v in np.diff(elapsed, prepend=0.0)],
        n_points=n,
        n_train=min(n, k * max_points_per_centroid),
    )


def sample_rows(n_total: int, n_sample: int, seed: int) -> np.ndarray:
    """Sorted, distinct row indices in [0, n_total): a reproducible uniform sample without replacement.

    Asking for at least n_total rows returns all of them.
    """
    if n_total < 1:
        raise KMeansError(f"sample_rows: nothing to sample from (n_total={n_total})")
    if n_sample < 1:
        raise KMeansError(f"sample_rows: n_sample must be >= 1, got {n_sample}")
    if n_sample >= n_total:
        return np.arange(n_total, dtype=np.int64)
    rng = np.random.default_rng(seed)
    rows = rng.choice(n_total, size=n_sample, replace=False, shuffle=False)
    return np.sort(rows.astype(np.int64))


def sample_patches(array: Any, n_sample: int, seed: int, chunk_images: int | None = None) -> np.ndarray:
    """A reproducible sample of `n_sample` patch vectors from `array` [N_images, T, D] as float32 [n, D].

    `array` is a Zarr array (or anything sliceable with .shape, e.g. numpy). The (image, patch) rows are
    chosen by `sample_rows(N_images * T, n_sample, seed)` and returned in row order, so the result does not
    depend on `chunk_images` — how many images are read at once (default: the array's own chunk length
    along axis 0). Only one block of images is in memory at a time; blocks with no sampled row are skipped.
    """
    shape = tuple(array.shape)
    if len(shape) != 3:
        raise KMeansError(f"patches: expected an array [N_images, T, D], got shape {shape}")
    n_images, n_tokens, dim = shape
    if chunk_images is None:
        chunks = getattr(array, "chunks", None)
        chunk_images = int(chunks[0]) if chunks else 1024
    if chunk_images < 1:
        raise KMeansError(f"chunk_images: expected >= 1, got {chunk_images}")

    rows = sample_rows(n_images * n_tokens, n_sample, seed)
    images, patches = np.divmod(rows, n_tokens)
    out = np.empty((rows.size, dim), dtype=np.float32)
    starts = range(0, n_images, chunk_images)
    # Each block's sampled rows form one contiguous run of `rows` because rows are sorted.
    bounds = np.searchsorted(images, [min(s + chunk_images, n_images) for s in starts])
    begin = 0
    with tqdm(total=rows.size, desc="sample patches", unit="patch", unit_scale=True, leave=False) as bar:
        for start, end in zip(starts, bounds, strict=True):
            if end > begin:
                block = np.asarray(array[start : start + chunk_images])
                out[begin:end] = block[images[begin:end] - start, patches[begin:end]]
                bar.update(end - begin)
            begin = end
    return out


def read_centroids(path: str | Path, k: int, dim: int, encoder: str) -> np.ndarray:
    """Given centroids (e.g. the DiGIT authors' km_8k.npy) as float32 [K, D], checked against the codebook
    size `k` and the encoder's feature dimension `dim` (`encoder` names the encoder in the error)."""
    path = Path(path)
    if not path.is_file():
        raise KMeansError(f"kmeans.centroids: {path} is not a file (expected a [K, D] .npy array)")
    try:
        c = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise KMeansError(f"kmeans.centroids: {path} is not a readable .npy array ({e})") from None
    if c.ndim != 2 or not np.issubdtype(c.dtype, np.floating):
        raise KMeansError(
            f"kmeans.centroids: {path} holds {c.dtype} {c.shape}; expected a float [K, D] array"
        )
    if c.shape[1] != dim:
        raise KMeansError(
            f"kmeans.centroids: {path} has D={c.shape[1]}, but the encoder's features have D={dim} ({encoder}); "
            "the centroids must come from the same encoder and layer"
        )
    if c.shape[0] != k:
        raise KMeansError(
            f"kmeans.centroids: {path} has K={c.shape[0]} centroids but kmeans.k is {k}; set k to {c.shape[0]}"
        )
    if not np.isfinite(c).all():
        raise KMeansError(f"kmeans.centroids: {path} contains NaN or inf")
    return np.ascontiguousarray(c, dtype=np.float32)


def cluster_usage(assignments: np.ndarray, k: int) -> tuple[np.ndarray, float, int]:
    """(counts int64 [K], entropy of the usage distribution in bits, number of never-used clusters).

    A perfectly even codebook has entropy log2(K); a collapsed one approaches 0.
    """
    a = np.asarray(assignments).ravel()
    if a.size == 0:
        raise KMeansError("cluster_usage: no assignments given")
    if a.min() < 0 or a.max() >= k:
        raise KMeansError(f"cluster_usage: ids must lie in [0, {k}), got range [{a.min()}, {a.max()}]")
    counts = np.bincount(a.astype(np.int64), minlength=k)
    p = counts[counts > 0] / a.size
    entropy = float(-(p * np.log2(p)).sum())
    dead = int((counts == 0).sum())
    return counts, entropy, dead
