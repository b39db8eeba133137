"""Stage `tokenize`: nearest-centroid ids of every patch feature → token WebDataset shards.

Each image shard `<split>-NNNNN.tar` gets a token shard of the same name and keys holding
`digit.npy` (uint16 [h, w], raster order) and `cls`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.assign import assign
from pipeline.config import Params
from pipeline.features import ShardRows, layout_from_store, open_features
from pipeline.io import atomic_dir
from pipeline.kmeans import cluster_usage
from pipeline.shards import write_shard
from pipeline.stage import MapJobs, stage_main
from pipeline.tokenizer import load_centroids

log = logging.getLogger("digit.tokenize")
PATHS = {
    "features": "data/features.zarr",
    "kmeans": "models/kmeans",
    "out": "data/tokens",
    "metrics": "metrics/tokenize.json",
}


def tokenize_block(
    store, block: ShardRows, centroids: torch.Tensor, grid: tuple[int, int], batch: int
) -> np.ndarray:
    """Token ids (uint16 [n, h, w]) of one shard's rows, read from the feature store in batches."""
    patches = store[f"{block.split}/patches"]
    out = np.empty((block.count, *grid), dtype=np.uint16)
    for i in range(0, block.count, batch):
        rows = slice(block.start + i, block.start + min(i + batch, block.count))
        feats = torch.from_numpy(np.asarray(patches[rows], dtype=np.float32))
        out[i : i + feats.shape[0]] = assign(feats, centroids).reshape(-1, *grid).numpy().astype(np.uint16)
    return out


def run(
    params: Params,
    features: str = PATHS["features"],
    kmeans: str = PATHS["kmeans"],
    out: str = PATHS["out"],
    metrics: str | None = None,
    map_jobs: MapJobs | None = None,
) -> dict[str, Any]:
    store = open_features(features)
    centroids_np, _ = load_centroids(kmeans)
    dim = store["train/patches"].shape[2]
    if centroids_np.shape[1] != dim:
        raise ValueError(f"{kmeans}/centroids.npy has D={centroids_np.shape[1]} but {features} has D={dim}")
    centroids = torch.from_numpy(centroids_np)
    grid = tuple(store.attrs["grid"])
    layout = layout_from_store(store)
    blocks = [b for split in layout.values() for b in split]
    k = centroids.shape[0]
    usage: dict[str, np.ndarray] = {s: np.zeros(k, np.int64) for s in layout}

    def job(block: ShardRows, out_dir: Path) -> np.ndarray:
        tokens = tokenize_block(store, block, centroids, grid, params.tokenize.batch_size)
        keys = store[f"{block.split}/keys"][block.start : block.start + block.count]
        labels = store[f"{block.split}/labels"][block.start : block.start + block.count]
        write_shard(
            Path(out_dir) / block.shard,
            ((str(key), {"digit.npy": tokens[i], "cls": int(labels[i])}) for i, key in enumerate(keys)),
        )
        return np.bincount(tokens.ravel().astype(np.int64), minlength=k)

    with atomic_dir(out) as tmp:
        if map_jobs is not None:
            counts = map_jobs(job, blocks, tmp)
        else:
            counts = [job(b, tmp) for b in tqdm(blocks, desc="tokenize", unit="shard")]
    for block, c in zip(blocks, counts, strict=True):
        usage[block.split] += c
    summary: dict[str, Any] = {"k": k, "grid_h": grid[0], "grid_w": grid[1]}
    for split, c in usage.items():
        ids = np.repeat(np.arange(k), c)
        _, entropy, dead = cluster_usage(ids, k)
        summary[f"{split}_images"] = int(c.sum() // (grid[0] * grid[1]))
        summary[f"{split}_usage_entropy_bits"] = entropy
        summary[f"{split}_unused_tokens"] = dead
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main("tokenize", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
