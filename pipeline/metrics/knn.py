"""Feature-quality probes for an image encoder: weighted k-NN accuracy (as in DINO) on pooled features.

The encoder's patch features are what the DiGIT tokenizer clusters, so the probe pools the same features
the tokenizer uses: one block's output (default: third from last) through the final norm, prefix (CLS and
register) tokens dropped, mean-pooled over patches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_float_images(
    images: torch.Tensor | np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 [N, 3, H, W] (0..255) or float [N, 3, H, W] (0..1) -> normalised float32 [N, 3, H, W]."""
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images shaped [N, 3, H, W], got {tuple(x.shape)}")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def block_index(depth: int, layer: int) -> int:
    """A block index in [0, depth) from a python-style index (-3 = third from last)."""
    i = layer + depth if layer < 0 else layer
    if not 0 <= i < depth:
        raise ValueError(
            f"layer {layer} out of range for a ViT with {depth} blocks (valid: {-depth}..{depth - 1})"
        )
    return i


@torch.no_grad()
def patch_features(vit: torch.nn.Module, x: torch.Tensor, layer: int = -3) -> torch.Tensor:
    """Normalised images [B, 3, H, W] -> patch features [B, T, D] of block `layer` through the final norm."""
    i = block_index(len(vit.blocks), layer)
    (feats,) = vit.forward_intermediates(
        x, indices=[i], norm=True, output_fmt="NLC", intermediates_only=True, stop_early=True
    )
    return feats


@torch.no_grad()
def mean_patch_features(
    vit: torch.nn.Module,
    images: torch.Tensor | np.ndarray,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    layer: int = -3,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """Mean-pooled patch features [N, D] (float32) of uint8/float images [N, 3, H, W]."""
    was_training = vit.training
    vit.eval()
    out = []
    starts = range(0, len(images), batch_size)
    for s in tqdm(starts, desc="features", unit="batch", disable=not progress):
        x = to_float_images(images[s : s + batch_size], mean, std)
        out.append(patch_features(vit, x, layer).mean(dim=1))
    vit.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted k-NN labels (DINO's rule): cosine similarity, each of the k neighbours votes exp(sim / T)."""
    if len(train_features) != len(train_labels):
        raise ValueError(f"{len(train_features)} train features but {len(train_labels)} train labels")
    if len(train_features) == 0:
        raise ValueError("k-NN needs at least one train feature")
    k = min(k, len(train_features))
    bank = F.normalize(train_features.float(), dim=1)
    labels = torch.as_tensor(train_labels, dtype=torch.long)
    preds = []
    for s in range(0, len(query_features), chunk):
        q = F.normalize(query_features[s : s + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes)
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor | np.ndarray,
    val_features: torch.Tensor,
    val_labels: torch.Tensor | np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy (0..1) of the weighted k-NN classifier on the val features."""
    train_labels = torch.as_tensor(train_labels, dtype=torch.long)
    val_labels = torch.as_tensor(val_labels, dtype=torch.long)
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    preds = knn_predict(train_features, train_labels, val_features, num_classes, k, temperature)
    return float((preds == val_labels).float().mean())
