"""Linear probe: how linearly separable are the classes in a frozen model's features?

Recipe (iGPT / DiGIT style): standardise the features with train statistics, fit a multinomial logistic
regression (full-batch L-BFGS, L2 penalty on the weights), pick the L2 strength on a seeded held-out slice of
train, refit on all of train with it, report val top-1. `probe_layers` does that per layer and names the best
layer — chosen by held-out train accuracy, so val is never used for a decision (the paper reports the best
layer; with a held-out choice our number is not optimistically biased).

Memory does not grow with the number of rows. Features are either in RAM (arrays, tensors) or in a
`FeatureFile` on disk (written in batches while the model runs); both are read through the same chunked
passes: the standardisation statistics are merged chunk by chunk, and every L-BFGS evaluation accumulates the
full-batch loss and gradient over chunks of `chunk_rows` rows. So the fit is exactly full-batch L-BFGS, and
the same numbers (up to float summation order) come out of RAM and disk.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass
class ProbeConfig:
    weight_decays: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # L2 strength on W (not the bias)
    holdout_fraction: float = 0.2  # share of train held out to choose the weight decay
    max_iter: int = 300  # L-BFGS iterations per fit
    seed: int = 0  # the holdout split
    device: str = "cpu"
    chunk_rows: int = 8192  # rows per pass of the loss/gradient accumulation (memory, not the result)


@dataclass
class ProbeResult:
    val_top1: float
    train_top1: float  # of the final fit, on all of train
    weight_decay: float  # chosen on the held-out slice
    holdout_top1: float  # held-out accuracy of the chosen weight decay
    sweep: dict[float, float] = field(default_factory=dict)  # weight decay -> held-out top-1

    def to_dict(self) -> dict:
        return {
            "val_top1": self.val_top1,
            "train_top1": self.train_top1,
            "weight_decay": self.weight_decay,
            "holdout_top1": self.holdout_top1,
            "sweep": {str(k): v for k, v in self.sweep.items()},
        }


class FeatureFile:
    """float32 feature rows [N, D] appended in batches to a raw file and read back in chunks.

    Plain reads, no memory map: a mapped file's pages count as the process' resident memory, which would
    then grow with N. The file is scratch space (e.g. inside a stage's temporary output); `unlink` removes it.
    """

    def __init__(self, path: str | Path, dim: int) -> None:
        self.path, self.dim, self.rows = Path(path), int(dim), 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(b"")

    def append(self, x: torch.Tensor | np.ndarray) -> None:
        x = np.ascontiguousarray(torch.as_tensor(x).detach().cpu().numpy(), dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{self.path}: expected rows [B, {self.dim}], got shape {x.shape}")
        with open(self.path, "ab") as f:
            f.write(x.tobytes())
        self.rows += x.shape[0]

    def __len__(self) -> int:
        return self.rows

    def chunks(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, float32 [b, D]) for consecutive chunks of at most `rows` rows."""
        row_bytes = 4 * self.dim
        with open(self.path, "rb") as f:
            for start in range(0, self.rows, rows):
                b = min(rows, self.rows - start)
                buf = np.empty((b, self.dim), dtype=np.float32)
                f.readinto(memoryview(buf).cast("B"))
                yield start, torch.from_numpy(buf)
        if os.path.getsize(self.path) != self.rows * row_bytes:
            raise ValueError(f"{self.path}: size does not match {self.rows} rows of D={self.dim}")

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)


class _InMemory:
    """Features already in RAM, seen through FeatureFile's chunk interface."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.dim = x.shape[1]

    def __len__(self) -> int:
        return self.x.shape[0]

    def chunks(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, len(self), rows):
            yield start, self.x[start : start + rows]


Features = np.ndarray | torch.Tensor | FeatureFile


def _as_features(x: Features, name: str) -> FeatureFile | _InMemory:
    if isinstance(x, FeatureFile):
        return x
    t = torch.as_tensor(x)
    if t.dim() != 2 or not t.is_floating_point():
        raise ValueError(f"{name}: expected float features [N, D], got {t.dtype} {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: features contain NaN or Inf")
    return _InMemory(t)


def _as_labels(y: np.ndarray | torch.Tensor, n: int, name: str) -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.dim() != 1 or y.shape[0] != n or y.is_floating_point():
        raise ValueError(f"{name}: expected integer labels [{n}], got {y.dtype} {tuple(y.shape)}")
    if n and y.min() < 0:
        raise ValueError(f"{name}: labels must be >= 0, got min {int(y.min())}")
    return y.long()


def _moments(src, rows: torch.Tensor, chunk_rows: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 mean and std (population) over the rows where `rows` [N] is True, merged chunk by chunk
    (Chan et al.), so large common offsets cost no precision."""
    count, mean, m2 = 0, torch.zeros(src.dim, dtype=torch.float64), torch.zeros(src.dim, dtype=torch.float64)
    for start, chunk in src.chunks(chunk_rows):
        x = chunk.double()[rows[start : start + len(chunk)]]
        if not torch.isfinite(x).all():
            raise ValueError(f"{name}: features contain NaN or Inf")
        if len(x) == 0:
            continue
        n_b, mean_b = len(x), x.mean(dim=0)
        m2_b = (x - mean_b).pow(2).sum(dim=0)
        delta, total = mean_b - mean, count + n_b
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + delta.pow(2) * (count * n_b / total)
        count = total
    std = (m2 / max(count, 1)).sqrt().clamp_min(1e-6)  # constant features stay 0, not NaN
    return mean, std


def _standardised(src, rows: torch.Tensor, stats, chunk_rows: int, device: torch.device):
    """(chunk slice, standardised float32 rows) of the rows where `rows` is True, chunk by chunk."""
    mean, std = stats
    for start, chunk in src.chunks(chunk_rows):
        keep = rows[start : start + len(chunk)]
        yield slice(start, start + len(chunk)), ((chunk.double()[keep] - mean) / std).float().to(device), keep


def _fit_logreg(
    src, y: torch.Tensor, rows: torch.Tensor, stats, num_classes: int, weight_decay: float, cfg: ProbeConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on the rows where `rows` is True: minimise mean CE + weight_decay *
    ||W||^2 with full-batch L-BFGS, the loss and gradient accumulated over chunks. Starts from zero, so the fit
    is a deterministic function of the data and weight_decay."""
    device = torch.device(cfg.device)
    n = int(rows.sum())
    weight = torch.zeros(src.dim, num_classes, device=device, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=cfg.max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )
    one_chunk = None
    if len(src) <= cfg.chunk_rows:  # everything fits in one chunk: standardise it once, not per evaluation
        one_chunk = list(_standardised(src, rows, stats, cfg.chunk_rows, device))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        total = torch.zeros((), device=device)
        for where, x, keep in one_chunk or _standardised(src, rows, stats, cfg.chunk_rows, device):
            if len(x):
                part = F.cross_entropy(x @ weight + bias, y[where][keep].to(device), reduction="sum") / n
                part.backward()
                total = total + part.detach()
        penalty = weight_decay * weight.pow(2).sum()
        penalty.backward()
        return total + penalty.detach()

    opt.step(closure)
    return weight.detach(), bias.detach()


def _accuracy(src, y, rows, stats, weight, bias, cfg: ProbeConfig) -> float:
    n = int(rows.sum())
    if n == 0:
        return float("nan")
    correct = 0
    for where, x, keep in _standardised(src, rows, stats, cfg.chunk_rows, torch.device(cfg.device)):
        pred = (x @ weight + bias).argmax(dim=1).cpu()
        correct += int((pred == y[where][keep]).sum())
    return correct / n


def linear_probe(
    train_x: Features,
    train_y: np.ndarray | torch.Tensor,
    val_x: Features,
    val_y: np.ndarray | torch.Tensor,
    config: ProbeConfig | None = None,
    num_classes: int | None = None,
) -> ProbeResult:
    """Train a linear classifier on frozen features and report val top-1 (see module docstring).
    Features: float arrays/tensors [N, D] in RAM, or FeatureFiles."""
    cfg = config or ProbeConfig()
    if not cfg.weight_decays:
        raise ValueError("ProbeConfig.weight_decays is empty: need at least one L2 strength to try")
    if not 0.0 < cfg.holdout_fraction < 1.0:
        raise ValueError(f"ProbeConfig.holdout_fraction must be in (0, 1), got {cfg.holdout_fraction}")
    tx, vx = _as_features(train_x, "train features"), _as_features(val_x, "val features")
    if tx.dim != vx.dim:
        raise ValueError(f"train features have D={tx.dim} but val features have D={vx.dim}")
    ty, vy = _as_labels(train_y, len(tx), "train labels"), _as_labels(val_y, len(vx), "val labels")
    n = len(tx)
    n_hold = int(round(n * cfg.holdout_fraction))
    if n_hold < 1 or n - n_hold < 2:
        raise ValueError(f"{n} train rows are too few to hold out {cfg.holdout_fraction:.0%} and still fit")
    c = int(max(ty.max(), vy.max() if len(vy) else 0)) + 1 if num_classes is None else num_classes
    if int(ty.max()) >= c or (len(vy) and int(vy.max()) >= c):
        raise ValueError(f"labels must be < num_classes={c}")

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    hold = torch.zeros(n, dtype=torch.bool)
    hold[perm[:n_hold]] = True
    fit = ~hold
    fit_stats = _moments(tx, fit, cfg.chunk_rows, "train features")
    sweep: dict[float, float] = {}
    for wd in cfg.weight_decays:
        w, b = _fit_logreg(tx, ty, fit, fit_stats, c, wd, cfg)
        sweep[float(wd)] = _accuracy(tx, ty, hold, fit_stats, w, b, cfg)
    # Ties go to the stronger regulariser: same held-out accuracy, simpler model.
    best_wd = max(sweep, key=lambda wd: (sweep[wd], wd))

    every = torch.ones(n, dtype=torch.bool)
    all_stats = _moments(tx, every, cfg.chunk_rows, "train features")
    w, b = _fit_logreg(tx, ty, every, all_stats, c, best_wd, cfg)
    val_rows = torch.ones(len(vx), dtype=torch.bool)
    return ProbeResult(
        val_top1=_accuracy(vx, vy, val_rows, all_stats, w, b, cfg),
        train_top1=_accuracy(tx, ty, every, all_stats, w, b, cfg),
        weight_decay=best_wd,
        holdout_top1=sweep[best_wd],
        sweep=sweep,
    )


def probe_layers(
    features_per_layer: Sequence[tuple[Features, Features]],
    train_y: np.ndarray | torch.Tensor,
    val_y: np.ndarray | torch.Tensor,
    config: ProbeConfig | None = None,
    num_classes: int | None = None,
    progress: bool = True,
) -> tuple[list[ProbeResult], int]:
    """Probe each layer's (train [N, D_l], val [M, D_l]) features; return (results per layer, best layer index).

    The best layer maximises held-out train accuracy (ties: the earlier layer), never val accuracy."""
    if not features_per_layer:
        raise ValueError("features_per_layer is empty: need (train, val) features of at least one layer")
    results = []
    for train_x, val_x in tqdm(features_per_layer, desc="linear probe", unit="layer", disable=not progress):
        results.append(linear_probe(train_x, train_y, val_x, val_y, config=config, num_classes=num_classes))
    best = max(range(len(results)), key=lambda i: (results[i].holdout_top1, -i))
    return results, best
