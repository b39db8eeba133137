"""Linear probe: how linearly separable are the classes in a frozen model's features?

Recipe (iGPT / DiGIT style): standardise the features with train statistics, fit a multinomial logistic
regression (full-batch L-BFGS, L2 penalty on the weights), pick the L2 strength on a seeded held-out slice of
train, refit on all of train with it, report val top-1. `probe_layers` does that per layer and names the best
layer — chosen by held-out train accuracy, so val is never used for a decision (the paper reports the best
layer; with a held-out choice our number is not optimistically biased).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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


def _as_features(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name}: expected float features [N, D], got {x.dtype} {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: features contain NaN or Inf")
    # float64 accumulation is cheap at probe sizes and keeps the standardisation exact for large offsets.
    return x.to(torch.float64)


def _as_labels(y: np.ndarray | torch.Tensor, n: int, name: str) -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.dim() != 1 or y.shape[0] != n or y.is_floating_point():
        raise ValueError(f"{name}: expected integer labels [{n}], got {y.dtype} {tuple(y.shape)}")
    if n and y.min() < 0:
        raise ValueError(f"{name}: labels must be >= 0, got min {int(y.min())}")
    return y.long()


def _standardise(fit_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean = fit_x.mean(dim=0)
    std = fit_x.std(dim=0, unbiased=False).clamp_min(1e-6)  # constant features stay 0, not NaN
    return [((x - mean) / std).float() for x in (fit_x, *others)]


def _fit_logreg(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: minimise mean CE + weight_decay * ||W||^2 with full-batch L-BFGS.
    Starts from zero, so the fit is a deterministic function of (x, y, weight_decay)."""
    weight = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()


def _accuracy(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    if len(y) == 0:
        return float("nan")
    return (x @ weight + bias).argmax(dim=1).eq(y).double().mean().item()


def linear_probe(
    train_x: np.ndarray | torch.Tensor,
    train_y: np.ndarray | torch.Tensor,
    val_x: np.ndarray | torch.Tensor,
    val_y: np.ndarray | torch.Tensor,
    config: ProbeConfig | None = None,
    num_classes: int | None = None,
) -> ProbeResult:
    """Train a linear classifier on frozen features and report val top-1 (see module docstring)."""
    cfg = config or ProbeConfig()
    if not cfg.weight_decays:
        raise ValueError("ProbeConfig.weight_decays is empty: need at least one L2 strength to try")
    if not 0.0 < cfg.holdout_fraction < 1.0:
        raise ValueError(f"ProbeConfig.holdout_fraction must be in (0, 1), got {cfg.holdout_fraction}")
    tx, vx = _as_features(train_x, "train features"), _as_features(val_x, "val features")
    if tx.shape[1] != vx.shape[1]:
        raise ValueError(f"train features have D={tx.shape[1]} but val features have D={vx.shape[1]}")
    ty, vy = _as_labels(train_y, tx.shape[0], "train labels"), _as_labels(val_y, vx.shape[0], "val labels")
    n = tx.shape[0]
    n_hold = int(round(n * cfg.holdout_fraction))
    if n_hold < 1 or n - n_hold < 2:
        raise ValueError(f"{n} train rows are too few to hold out {cfg.holdout_fraction:.0%} and still fit")
    c = int(max(ty.max(), vy.max() if len(vy) else 0)) + 1 if num_classes is None else num_classes
    if int(ty.max()) >= c or (len(vy) and int(vy.max()) >= c):
        raise ValueError(f"labels must be < num_classes={c}")

    dev = torch.device(cfg.device)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    hold, fit = perm[:n_hold], perm[n_hold:]
    fit_x, hold_x = _standardise(tx[fit], tx[hold])
    fit_x, hold_x, fit_y, hold_y = fit_x.to(dev), hold_x.to(dev), ty[fit].to(dev), ty[hold].to(dev)
    sweep: dict[float, float] = {}
    for wd in cfg.weight_decays:
        w, b = _fit_logreg(fit_x, fit_y, c, wd, cfg.max_iter)
        sweep[float(wd)] = _accuracy(hold_x, hold_y, w, b)
    # Ties go to the stronger regulariser: same held-out accuracy, simpler model.
    best_wd = max(sweep, key=lambda wd: (sweep[wd], wd))

    all_x, val_x_std = _standardise(tx, vx)
    all_x, val_x_std, all_y, val_y_dev = all_x.to(dev), val_x_std.to(dev), ty.to(dev), vy.to(dev)
    w, b = _fit_logreg(all_x, all_y, c, best_wd, cfg.max_iter)
    return ProbeResult(
        val_top1=_accuracy(val_x_std, val_y_dev, w, b),
        train_top1=_accuracy(all_x, all_y, w, b),
        weight_decay=best_wd,
        holdout_top1=sweep[best_wd],
        sweep=sweep,
    )


def probe_layers(
    features_per_layer: Sequence[tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]],
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
