"""Nearest-centroid assignment (DiGIT tokens = K-Means cluster ids), exact in fp32 inputs.

The fast path is the usual expansion ||x||² − 2x·c + ||c||² (one matmul per batch). Its rounding error
grows with ||x||² and can swap two centroids whose distances differ by less than that error, so rows where
the runner-up is within a proven error bound of the winner are re-scored with direct float64 differences.
The result therefore equals a float64 brute-force argmin over the fp32 inputs, ties going to the lowest
centroid index, at the cost of one matmul plus a re-score of the (rare) ambiguous rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

# Relative rounding of a length-D fp32 dot product is at most D·u/(1 − D·u) (u = 2⁻²⁴, Higham's γ_D);
# the factor 4 also covers the two norm terms and the final additions. Pessimistic on purpose: a loose
# bound only costs a few more re-scored rows, a tight one would cost correctness.
_FP32_UNIT_ROUNDOFF = 2.0**-24
_REFINE_PAIRS_PER_CHUNK = 1 << 16


class AssignError(ValueError):
    pass


@contextlib.contextmanager
def _ieee_fp32_matmul() -> Iterator[None]:
    """Full-precision fp32 matmuls for the duration, restoring the caller's setting afterwards.

    torch.set_float32_matmul_precision("high"/"medium") turns fp32 matmuls into TF32 (CUDA) or bf16
    (oneDNN on CPU), whose rounding is far beyond the error bound used here to decide what to re-score.
    """
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    saved = [b.fp32_precision for b in backends]
    try:
        for b in backends:
            b.fp32_precision = "ieee"
        yield
    finally:
        for b, value in zip(backends, saved, strict=True):
            b.fp32_precision = value


def _as_tensor(a: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a))
    if torch.is_tensor(a):
        return a
    raise AssignError(f"{name}: expected a numpy array or torch tensor, got {type(a).__name__}")


def _error_bound(x_norm2: torch.Tensor, c_norm2_max: torch.Tensor, dim: int) -> torch.Tensor:
    gamma = 4.0 * dim * _FP32_UNIT_ROUNDOFF / (1.0 - 4.0 * dim * _FP32_UNIT_ROUNDOFF)
    # |x·c| ≤ ||x||·||c||, so every term of the expansion is bounded by (||x|| + max||c||)².
    return gamma * (x_norm2.sqrt() + c_norm2_max.sqrt()) ** 2


def _refine(
    x: torch.Tensor, centroids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n_rows: int
) -> torch.Tensor:
    """Exact argmin over candidate (row, col) pairs; `rows` ascending, cols ascending within a row."""
    exact = torch.empty(rows.numel(), dtype=torch.float64, device=x.device)
    for s in range(0, rows.numel(), _REFINE_PAIRS_PER_CHUNK):
        r, c = rows[s : s + _REFINE_PAIRS_PER_CHUNK], cols[s : s + _REFINE_PAIRS_PER_CHUNK]
        exact[s : s + r.numel()] = (x[r].double() - centroids[c].double()).pow(2).sum(dim=1)
    best = torch.full((n_rows,), float("inf"), dtype=torch.float64, device=x.device)
    best.scatter_reduce_(0, rows, exact, reduce="amin")
    # Among the pairs that reach the row minimum, the smallest column index wins (ties → lowest index).
    is_best = exact == best[rows]
    winner = torch.full((n_rows,), centroids.shape[0], dtype=torch.int64, device=x.device)
    winner.scatter_reduce_(0, rows[is_best], cols[is_best], reduce="amin")
    return winner


def _assign_block(
    x: torch.Tensor,
    x_norm2: torch.Tensor,
    centroids: torch.Tensor,
    c_norm2: torch.Tensor,
    c_norm2_max: torch.Tensor,
) -> torch.Tensor:
    if centroids.shape[0] == 1:
        return torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    approx = torch.addmm(c_norm2[None, :], x, centroids.T, alpha=-2.0).add_(x_norm2[:, None])
    tol = _error_bound(x_norm2, c_norm2_max, x.shape[1])
    top2 = approx.topk(2, dim=1, largest=False, sorted=True)
    labels = top2.indices[:, 0].clone()
    best, runner_up = top2.values[:, 0], top2.values[:, 1]
    # The true nearest centroid j* satisfies approx[j*] <= best + 2·tol; a row is settled when only the
    # approximate winner is that close.
    ambiguous = (runner_up <= best + 2.0 * tol).nonzero().squeeze(1)
    if ambiguous.numel():
        threshold = (best + 2.0 * tol)[ambiguous, None]
        local_rows, cols = (approx[ambiguous] <= threshold).nonzero(as_tuple=True)
        labels[ambiguous] = _refine(x[ambiguous], centroids, local_rows, cols, ambiguous.numel())
    return labels


def assign(
    features: np.ndarray | torch.Tensor,
    centroids: np.ndarray | torch.Tensor,
    batch: int = 8192,
    return_distances: bool = False,
) -> np.ndarray | torch.Tensor | tuple[np.ndarray, np.ndarray] | tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centroid (squared L2) for every vector of `features` [..., D].

    Computed in fp32 (fp16/bf16 inputs are upcast), `batch` rows at a time, on the device of `features`.
    Returns int64 ids shaped like `features` without its last axis — a numpy array if `features` is one,
    else a tensor — and, with `return_distances`, the squared distances (float32, computed directly as
    ||x − c||² so they carry no cancellation error).
    """
    as_numpy = isinstance(features, np.ndarray)
    x_all = _as_tensor(features, "features")
    c = _as_tensor(centroids, "centroids").to(device=x_all.device, dtype=torch.float32)
    if c.ndim != 2 or c.shape[0] == 0:
        raise AssignError(f"centroids: expected a non-empty [K, D] array, got shape {tuple(c.shape)}")
    if x_all.ndim < 1 or x_all.shape[-1] != c.shape[1]:
        raise AssignError(
            f"features: expected [..., {c.shape[1]}] to match centroids [K={c.shape[0]}, D={c.shape[1]}], "
            f"got shape {tuple(x_all.shape)}"
        )
    if batch < 1:
        raise AssignError(f"batch: expected a positive number of rows per batch, got {batch}")
    if not bool(torch.isfinite(c).all()):
        raise AssignError("centroids: contain NaN or inf")

    lead_shape = x_all.shape[:-1]
    x_flat = x_all.reshape(-1, c.shape[1])
    labels = torch.empty(x_flat.shape[0], dtype=torch.int64, device=x_all.device)
    distances = (
        torch.empty(x_flat.shape[0], dtype=torch.float32, device=x_all.device) if return_distances else None
    )
    c_norm2 = c.pow(2).sum(dim=1)
    c_norm2_max = c_norm2.max()
    with torch.inference_mode(), _ieee_fp32_matmul():
        for s in range(0, x_flat.shape[0], batch):
            x = x_flat[s : s + batch].to(torch.float32)
            x_norm2 = x.pow(2).sum(dim=1)
            # One pass over [B] instead of [B, D]: a NaN/inf anywhere in a row makes its norm non-finite.
            if not bool(torch.isfinite(x_norm2).all()):
                raise AssignError(
                    f"features: rows {s}..{s + x.shape[0] - 1} contain NaN or inf (or overflow)"
                )
            block = _assign_block(x, x_norm2, c, c_norm2, c_norm2_max)
            labels[s : s + x.shape[0]] = block
            if distances is not None:
                distances[s : s + x.shape[0]] = (x - c[block]).pow(2).sum(dim=1)

    labels = labels.reshape(lead_shape)
    out_labels = labels.cpu().numpy() if as_numpy else labels
    if distances is None:
        return out_labels
    distances = distances.reshape(lead_shape)
    return out_labels, (distances.cpu().numpy() if as_numpy else distances)
